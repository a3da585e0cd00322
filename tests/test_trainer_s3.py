"""S3 end to end: shards and checkpoints on a real S3 server (SeaweedFS on loopback), killed and resumed."""

from __future__ import annotations

import os
import time

from data_pipeline import storage
from data_pipeline.synthetic import generate_dataset
from tests.test_trainer import kill_job, launch, losses, run, settings


def test_run_on_s3_is_killed_and_resumes_from_its_s3_checkpoint_identically(s3_server, s3_bucket, tmp_path, monkeypatch):
    for key, value in s3_server.env().items():  # the launcher's ranks inherit the credentials
        monkeypatch.setenv(key, value)
    options = s3_server.storage_options()
    local = generate_dataset(str(tmp_path / "data"), objects=48, views=8, resolution=32, seed=2, holdout_fraction=0.125,
                             progress=False)
    remote = generate_dataset(f"{s3_bucket}/data", objects=48, views=8, resolution=32, seed=2, holdout_fraction=0.125,
                              progress=False, storage_options=options)
    reference_dir = str(tmp_path / "reference")
    run(settings((local["train_pattern"], local["holdout_pattern"]), reference_dir))
    reference = losses(reference_dir)

    run_dir = str(tmp_path / "s3run")
    checkpoints = f"{s3_bucket}/checkpoints"
    args = settings((remote["train_pattern"], remote["holdout_pattern"]), run_dir, **{"checkpoint.dir": checkpoints})
    process = launch(args)
    latest = f"{checkpoints}/latest"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        storage.filesystem(latest)[0].invalidate_cache()
        if storage.exists(latest) and max(losses(run_dir), default=0) >= 6:
            break
        time.sleep(0.2)
    kill_job(process)
    with storage.open_url(latest, "rb") as f:
        resumed_from = int(f.read().decode().strip().split("_")[1])
    assert 4 <= resumed_from < 12

    run(args)
    resumed = losses(run_dir)
    assert sorted(resumed) == list(range(1, 13))
    for step in range(resumed_from + 1, 13):
        assert resumed[step] == reference[step], f"step {step}: {resumed[step]} != {reference[step]}"
    # The checkpoint lives on S3 (nothing under the run directory but staging), and no credential was written.
    fs, base = storage.filesystem(checkpoints)
    fs.invalidate_cache()
    assert any(name.endswith("step_00000012") for name in fs.ls(base, detail=False))
    for root, _, names in os.walk(run_dir):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                assert s3_server.secret_key.encode() not in f.read(), os.path.join(root, name)
