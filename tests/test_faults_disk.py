"""A full disk during a checkpoint, and staged copies of S3 checkpoints kept to keep_last.

The full disk is a real one: a 9 MiB tmpfs mounted for the test (one checkpoint of this model is
~6 MiB, so the first fits and the second does not). RLIMIT_FSIZE would not do: it raises EFBIG
(and SIGXFSZ), not ENOSPC, so it would not test what a user sees. Mounting needs root (CI runs as
root); elsewhere the test is skipped, saying why.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from data_pipeline import storage
from tests.synthetic_shards import synthetic_shards
from tests.test_trainer import ROOT, losses, settings
from trainer.checkpoint import Checkpointer
from trainer.distributed import DistEnv


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synthetic_shards(tmp_path_factory, objects=24)


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=9m", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield str(mount_point)
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def train(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_a_full_disk_says_so_and_the_previous_checkpoint_stays_usable(shards, small_disk, tmp_path):
    checkpoints = os.path.join(small_disk, "ck")
    args = settings(shards, str(tmp_path / "run"), **{"checkpoint.dir": checkpoints, "checkpoint.every_steps": 2,
                                                      "train.max_steps": 4, "data.num_workers": 0})
    result = train(args)
    # (the progress bar has no newline of its own when the error comes)
    errors = [line[line.index("error:"):] for line in re.split(r"[\r\n]", result.stderr) if "error:" in line]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert "No space left on device" in errors[0] and f"{checkpoints}/step_00000004" in errors[0], errors[0]
    assert "step_00000002 is intact" in errors[0] and "Traceback" not in result.stderr
    checkpointer = Checkpointer(checkpoints, DistEnv(0, 1, 0, None))
    assert checkpointer.latest_tag() == "step_00000002"
    checkpointer.verify("step_00000002")
    assert sorted(losses(str(tmp_path / "run"))) == [1, 2, 3, 4]
    # it resumes from there (and says the disk is still full when it next saves)
    again = train(args)
    assert "resumed from" in again.stderr and "step_00000002 at step 2" in again.stderr, again.stderr[-3000:]
    assert again.returncode == 2 and "No space left on device" in again.stderr


def test_staged_copies_of_s3_checkpoints_are_pruned_with_keep_last(shards, s3_env, s3_bucket, tmp_path):
    run_dir = str(tmp_path / "run")
    checkpoints = f"{s3_bucket}/ck"
    result = train(settings(shards, run_dir, **{"checkpoint.dir": checkpoints, "checkpoint.every_steps": 1,
                                                "checkpoint.keep_last": 2, "train.max_steps": 5, "data.num_workers": 0}))
    assert result.returncode == 0, result.stderr[-3000:]
    staging = os.path.join(run_dir, ".staging", "goembed-ckpt-staging", "ck")
    assert sorted(n for n in os.listdir(staging) if n.startswith("step_")) == ["step_00000004", "step_00000005"]  # was: all 5
    fs, base = storage.filesystem(checkpoints)
    fs.invalidate_cache()
    # (tags with files: SeaweedFS may list a deleted prefix as an empty directory for a moment)
    remote = sorted({name[len(base):].strip("/").split("/")[0] for name in fs.find(base)} - {"latest", "zero_to_fp32.py", "zero_to_torch.py"})
    assert remote == ["step_00000004", "step_00000005"]
