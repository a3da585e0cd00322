"""Fail before the expensive part: bad data URLs, buckets, credentials and view counts are refused
before the run directory exists and before any engine starts, naming what to fix."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from data_pipeline.preflight import PreflightError, check_data
from data_pipeline.synthetic import generate_dataset
from tests.test_trainer import ROOT, settings


@pytest.fixture(scope="module")
def remote(s3_server):
    bucket = s3_server.create_bucket("preflight-data")
    summary = generate_dataset(f"{bucket}/d", objects=12, views=4, resolution=16, seed=0, holdout_fraction=0.25,
                               progress=False, objects_per_shard=3, storage_options=s3_server.storage_options())
    return summary


def trainer(args: list[str], env: dict | None = None, launcher: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, "launch/local.py"] if launcher else [sys.executable, "-m", "trainer.train"]
    return subprocess.run([*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "AWS_EC2_METADATA_DISABLED": "true", **(env or {})})


def refused(result: subprocess.CompletedProcess, *words: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_s3_mistakes_are_refused_naming_the_field_or_variable(s3_env, remote):
    train, brace = remote["train_pattern"], remote["train_pattern"]
    glob = train.rsplit("/", 1)[0] + "/train-*.tar"
    assert "{" in brace
    check_data(brace, None, None, 4)
    check_data(glob, None, None, 4)
    with pytest.raises(PreflightError, match=r"data.context_views_max \+ data.target_views = 5 views .* have 4"):
        check_data(glob, None, None, 5)
    with pytest.raises(PreflightError, match="data.train_urls: bucket 'no-such-bucket' does not exist"):
        check_data("s3://no-such-bucket/train-*.tar", None, None, 2)
    with pytest.raises(PreflightError, match="data.train_urls: no files match"):
        check_data(train.rsplit("/", 1)[0] + "/nothing-*.tar", None, None, 2)
    with pytest.raises(PreflightError, match="data.holdout_urls: shard .* does not exist"):
        check_data(glob, train.rsplit("/", 1)[0] + "/nothing-{0..3}.tar", None, 2)
    s3_env_secret = {"key": s3_env.access_key, "secret": "wrong-secret", "endpoint_url": s3_env.endpoint_url}
    messages = set()
    for pattern in (brace, glob):  # the same message for both kinds of pattern
        with pytest.raises(PreflightError) as caught:
            check_data(pattern, None, s3_env_secret, 2)
        messages.add(str(caught.value))
    assert len(messages) == 1, messages
    assert "access to bucket 'preflight-data' was denied" in messages.pop()


def test_the_trainer_refuses_before_making_the_run_directory(s3_server, remote, tmp_path):
    env = s3_server.env()
    glob = remote["train_pattern"].rsplit("/", 1)[0] + "/train-*.tar"
    run_dir = str(tmp_path / "never")
    base = settings((glob, remote["holdout_pattern"]), run_dir)
    cases = [
        (base + ["data.context_views_max=4"], env, ("data.context_views_max",)),
        (base + ["data.train_urls=s3://no-such-bucket/x-{0..3}.tar"], env, ("bucket 'no-such-bucket' does not exist",)),
        (base, {**env, "AWS_SECRET_ACCESS_KEY": "wrong"}, ("AWS_SECRET_ACCESS_KEY", "denied")),
        (base, {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
         | {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"},
         ("no S3 credentials", "AWS_ACCESS_KEY_ID")),
        (base + [f"data.train_urls={tmp_path}/missing/train-*.tar"], env, ("data.train_urls", "no files match")),
        (base + ["optim.lr=-1"], env, ("optim.lr must be > 0",)),
        (base + ["optim.lrr=1"], env, ("optim.lrr", "did you mean 'optim.lr'")),
    ]
    for args, case_env, words in cases:
        start = time.monotonic()
        refused(trainer(args, case_env), *words)
        assert time.monotonic() - start < 60
        assert not os.path.exists(run_dir), args
    # through the launcher: refused once, before any rank starts
    result = trainer(base + ["data.context_views_max=4"], env, launcher=True)
    refused(result, "data.context_views_max")
    assert "rank" not in result.stderr and not os.path.exists(run_dir)


def test_debug_shows_the_traceback(tmp_path):
    result = trainer(["--debug", "optim.lr=-1", f"run_dir={tmp_path}/r"])
    assert result.returncode != 0 and "Traceback" in result.stderr and "ConfigError" in result.stderr
