"""launch/ray_job.py on a real local Ray cluster (launch/cluster/ray_up.sh), through the real
``ray job submit`` CLI: 2 Ray Train workers running DeepSpeed over gloo, a worker failure
recovered from the last checkpoint, and a re-submitted run name resuming."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from data_pipeline.synthetic import generate_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADDRESS = "http://127.0.0.1:8265"


def ray_env() -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_NUM_CPUS": "2"}
    # DeepSpeed JIT-builds its shared-memory comm op on first use (~30 s cold): keep the build.
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.expanduser("~"), ".cache", "goembed_torch_extensions"))
    return env


@pytest.fixture(scope="module")
def cluster():
    """A Ray head on 127.0.0.1 (ray_up.sh); stopped afterwards if this fixture started it. Fails, never skips."""
    up = subprocess.run([os.path.join(ROOT, "launch/cluster/ray_up.sh")], cwd=ROOT, env=ray_env(),
                        capture_output=True, text=True, timeout=180, check=False)
    if up.returncode != 0:
        pytest.fail(f"ray_up.sh failed:\n{up.stdout}\n{up.stderr[-4000:]}", pytrace=False)
    started = "already up" not in up.stdout
    yield ADDRESS
    if started:
        subprocess.run([os.path.join(ROOT, "launch/cluster/ray_down.sh")], cwd=ROOT, env=ray_env(),
                       capture_output=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def train_urls(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("raydata"))  # outside the repo: --working-dir uploads the repo
    return generate_dataset(out, objects=32, views=8, resolution=32, seed=0, holdout_fraction=0.125,
                            progress=False)["train_pattern"]


def settings(train_urls: str, **extra) -> list[str]:
    values = {"data.train_urls": train_urls, "data.holdout_urls": "null", "data.batch_size": 2, "data.resolution": 32,
              "data.num_workers": 0, "data.context_views_max": 2, "model.encode_resolution": 16,
              "model.rays_per_view": 64, "log.every_steps": 1, "log.preview_every_steps": 0, "log.tensorboard": "false",
              "train.device": "cpu", "checkpoint.every_steps": 2, "train.max_steps": 4}
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def submit(cluster: str, storage: str, name: str, overrides: list[str], *options: str) -> str:
    command = ["ray", "job", "submit", "--address", cluster, "--working-dir", ".", "--",
               "python", "launch/ray_job.py", "--num-workers", "2", "--storage", storage, "--name", name,
               *options, *overrides]
    done = subprocess.run(command, cwd=ROOT, env=ray_env(), capture_output=True, text=True, timeout=400, check=False)
    out = done.stdout + done.stderr
    with open(os.path.join(storage + f".{name}.log"), "a") as f:  # the whole job log, next to the storage dir
        f.write(out)
    assert done.returncode == 0 and "succeeded" in out, out[-6000:]
    return out


def logged_steps(run_dir: str) -> list[int]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [record["step"] for record in map(json.loads, f)]


def latest(storage: str, name: str) -> str:
    with open(os.path.join(storage, name, "goembed_checkpoints", "latest")) as f:
        return f.read().strip()


def test_a_failed_worker_resumes_from_its_checkpoint_and_a_resubmit_continues(cluster, train_urls, tmp_path):
    """One run name, two submissions (each ``ray job submit`` costs ~40-70 s on 2 cores, so one test does both).

    1. 2 workers, checkpoints every 2 steps, rank 0 raises once at step 5: Ray restarts the worker
       group (--max-failures 1), the trainer resumes from step 4 (not 0) and finishes at step 7.
    2. The same --storage/--name re-submitted with train.max_steps=8: resumes at 7, runs to 8.
    """
    storage = str(tmp_path / "storage")
    run_dir = os.path.join(storage, "faulty", "run")
    out = submit(cluster, storage, "faulty", settings(train_urls, **{"train.max_steps": 7}),
                 "--max-failures", "1", "--fail-once-at-step", "5")
    assert "InjectedFailure" in out  # rank 0 really failed at step 5 ...
    assert os.path.exists(os.path.join(storage, "faulty", "fail_once_at_step_5.done"))
    assert "goembed_checkpoints/step_00000004 at step 4" in out  # ... and the restart resumed at 4, not 0
    assert f"run_dir: {run_dir}" in out
    assert logged_steps(run_dir) == [1, 2, 3, 4, 5, 6, 7]  # each step once: nothing after the checkpoint kept twice
    assert latest(storage, "faulty") == "step_00000007"
    with open(os.path.join(storage, "faulty", "goembed_checkpoints", "step_00000007", "MANIFEST.json")) as f:
        assert json.load(f)["world_size"] == 2
    # Ray registered the trainer's own checkpoints (every rank reports after each save).
    with open(os.path.join(storage, "faulty", "checkpoint_manager_snapshot.json")) as f:
        assert "goembed_checkpoints/step_00000007" in f.read()

    out = submit(cluster, storage, "faulty", settings(train_urls, **{"train.max_steps": 8}),
                 "--max-failures", "1", "--fail-once-at-step", "5")  # the marker keeps it from failing again
    assert "InjectedFailure" not in out
    assert "goembed_checkpoints/step_00000007 at step 7" in out  # "resumed from ... at step 7"
    assert logged_steps(run_dir) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert latest(storage, "faulty") == "step_00000008"
    # checkpoint.keep_last=3: Ray's checkpoint manager deleted the older ones (and forgot them).
    kept = sorted(n for n in os.listdir(os.path.join(storage, "faulty", "goembed_checkpoints")) if n.startswith("step_"))
    assert kept == ["step_00000006", "step_00000007", "step_00000008"]
    assert "'step': 8" in out  # the final metrics Ray returned to the driver
