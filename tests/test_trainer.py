"""The trainer end to end: real DeepSpeed engines, real gloo process groups, 2 processes, real kills."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.synthetic_shards import synthetic_shards
from trainer.checkpoint import CheckpointError, Checkpointer
from trainer.distributed import DistEnv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synthetic_shards(tmp_path_factory, objects=48)


def settings(shards, run_dir, **extra) -> list[str]:
    """Overrides for a small, fast, deterministic run (every step logged)."""
    train, holdout = shards
    values = {
        "run_dir": run_dir, "data.train_urls": train, "data.holdout_urls": holdout, "data.batch_size": 2,
        "data.resolution": 32, "data.num_workers": 1, "data.context_views_max": 2, "model.encode_resolution": 16,
        "model.rays_per_view": 64, "optim.lr": 3e-3, "optim.lr_warmup_steps": 2, "log.every_steps": 1,
        "log.preview_every_steps": 0, "log.tensorboard": False, "checkpoint.every_steps": 4, "train.max_steps": 12,
        "train.device": "cpu",
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def launch(args: list[str], nproc: int = 2, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "launch/local.py", "--nproc", str(nproc), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **popen)


def kill_job(process: subprocess.Popen) -> None:
    """SIGKILL every rank (with its data workers) and the launcher at once, mid-step. The elastic agent
    starts each rank in a session of its own, so the launcher's process group alone is not the job."""
    with open(f"/proc/{process.pid}/task/{process.pid}/children") as f:  # the agent starts ranks from its main thread
        ranks = [int(pid) for pid in f.read().split()]
    for pid in ranks:
        os.killpg(pid, signal.SIGKILL)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()


def run(args: list[str], nproc: int = 2, timeout: float = 400) -> str:
    process = launch(args, nproc)
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-4000:]
    return out


def losses(run_dir: str) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {record["step"]: record["loss"] for record in map(json.loads, f)}


def test_zero2_and_zero3_train_the_decoder_through_the_encoder_and_agree(shards, tmp_path):
    """ZeRO-3 with model.train_decoder_through_encoder=true (the default): GOEmbed's closed form
    reads ψ only through ψ(0) and its Jacobian, inside ψ's forward, so ZeRO-3 gathers ψ as for any
    forward. Same seed, data and draws as ZeRO-2: the first losses agree to fp32 reduction order
    (measured: identical to 6 digits); tolerance 1e-4 relative over the first 3 steps."""
    curves = {}
    for stage in (2, 3):
        run_dir = str(tmp_path / f"zero{stage}")
        run(settings(shards, run_dir, **{"distributed.zero_stage": stage, "train.max_steps": 30,
                                         "checkpoint.every_steps": 30, "model.reconstruction_prob": 1.0,
                                         "model.context_dropout": 0.0, "model.train_decoder_through_encoder": True}))
        with open(os.path.join(run_dir, "config.yaml")) as f:
            assert "train_decoder_through_encoder: true" in f.read()
        curve = curves[stage] = losses(run_dir)
        assert sorted(curve) == list(range(1, 31))
        first, last = sum(curve[s] for s in range(1, 6)) / 5, sum(curve[s] for s in range(26, 31)) / 5
        assert last < 0.7 * first, (stage, first, last)
    for step in (1, 2, 3):
        assert curves[3][step] == pytest.approx(curves[2][step], rel=1e-4), (step, curves[2][step], curves[3][step])


def test_zero3_refuses_joint_training_where_goembed_has_no_closed_form(tmp_path):
    from trainer.config import ConfigError, load_config
    from trainer.engine import check_zero3_joint_training
    from model_zoo.goembedfusion import GOEmbedFusion

    for overrides in (["model.representation=mlp"], ["model.goembed_method=autograd"]):
        config = load_config(None, overrides + ["distributed.zero_stage=3"])
        with pytest.raises(ConfigError, match="model.train_decoder_through_encoder=false"):
            check_zero3_joint_training(config, GOEmbedFusion(config.model))
        for fine in (["distributed.zero_stage=2"], ["model.train_decoder_through_encoder=false"]):
            config = load_config(None, overrides + ["distributed.zero_stage=3"] + fine)
            check_zero3_joint_training(config, GOEmbedFusion(config.model))
    config = load_config(None, ["distributed.zero_stage=3"])  # the triplane default: the closed form applies
    check_zero3_joint_training(config, GOEmbedFusion(config.model))


def test_sigkill_and_restart_continue_with_identical_losses(shards, tmp_path):
    reference_dir, killed_dir = str(tmp_path / "reference"), str(tmp_path / "killed")
    run(settings(shards, reference_dir))
    reference = losses(reference_dir)

    process = launch(settings(shards, killed_dir))
    metrics = os.path.join(killed_dir, "metrics.jsonl")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # wait until a checkpoint exists and training went past it
        latest = os.path.join(killed_dir, "checkpoints", "latest")
        if os.path.exists(latest) and os.path.exists(metrics) and max(losses(killed_dir), default=0) >= 6:
            break
        time.sleep(0.05)
    kill_job(process)  # the launcher and both ranks, mid-step
    with open(os.path.join(killed_dir, "checkpoints", "latest")) as f:
        resumed_from = int(f.read().strip().split("_")[1])
    assert 4 <= resumed_from < 12

    out = run(settings(shards, killed_dir))
    assert out.strip().splitlines()[-1] == f"run_dir: {os.path.abspath(killed_dir)}"
    resumed = losses(killed_dir)
    assert sorted(resumed) == list(range(1, 13))  # no duplicated or missing steps in the log
    for step in range(resumed_from + 1, 13):
        assert resumed[step] == reference[step], f"step {step}: {resumed[step]} != {reference[step]}"


def test_checkpoint_missing_a_rank_shard_or_half_written_is_refused(shards, tmp_path):
    run_dir = str(tmp_path / "run")
    run(settings(shards, run_dir, **{"train.max_steps": 4}))
    checkpoints = Checkpointer(os.path.join(run_dir, "checkpoints"), DistEnv(0, 1, 0, None))
    tag = checkpoints.latest_tag()
    assert tag == "step_00000004"
    manifest = checkpoints.verify(tag)
    assert manifest["world_size"] == 2
    # A half-written save (no manifest yet) is never `latest` and is refused if named directly.
    half = os.path.join(run_dir, "checkpoints", "step_00000008")
    shutil.copytree(os.path.join(run_dir, "checkpoints", tag), half)
    os.remove(os.path.join(half, "MANIFEST.json"))
    assert checkpoints.latest_tag() == tag
    with pytest.raises(CheckpointError, match="never completed"):
        checkpoints.verify("step_00000008")
    # A rank's optimizer shard gone: refused, naming the file.
    shard = next(name for name in manifest["files"] if "zero_pp_rank_1" in name)
    os.remove(os.path.join(run_dir, "checkpoints", tag, shard))
    with pytest.raises(CheckpointError, match="zero_pp_rank_1"):
        checkpoints.verify(tag)
    process = launch(settings(shards, run_dir, **{"train.max_steps": 6}))
    _, err = process.communicate(timeout=300)
    assert process.returncode != 0 and "zero_pp_rank_1" in err


def test_config_error_names_the_field():
    result = subprocess.run([sys.executable, "launch/local.py", "train.max_steps=abc"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "train.max_steps" in result.stderr
    result = subprocess.run([sys.executable, "launch/local.py", "distributed.zero_stage=5"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "distributed.zero_stage" in result.stderr


def test_local_launcher_leaves_a_complete_run_directory(shards, tmp_path):
    run_dir = str(tmp_path / "run")
    out = run(settings(shards, run_dir, **{"train.max_steps": 4, "log.preview_every_steps": 4, "log.tensorboard": True,
                                           "log.turntable_frames": 4, "log.every_steps": 2}), nproc=1)
    assert out.strip().splitlines()[-1] == f"run_dir: {os.path.abspath(run_dir)}"
    names = set(os.listdir(run_dir))
    assert {"config.yaml", "metrics.jsonl", "loss.png", "checkpoints", "tensorboard", "previews"} <= names
    assert {"grid_00000004.png", "turntable_00000004.gif"} <= set(os.listdir(os.path.join(run_dir, "previews")))
    assert os.listdir(os.path.join(run_dir, "tensorboard"))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        record = json.loads(f.readlines()[-1])
    for key in ("step", "loss", "lr", "grad_norm", "objects_per_s", "rays_per_s", "data_wait_fraction", "peak_memory_mb_rank0"):
        assert key in record
    with open(os.path.join(run_dir, "config.yaml")) as f:
        assert "max_steps: 4" in f.read()


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(shards, tmp_path):
    run_dir = str(tmp_path / "diverging")
    # An absurd learning rate: the first update sends the weights to ~1e30 and the loss to NaN.
    process = launch(settings(shards, run_dir, **{"optim.lr": 1e30, "optim.lr_warmup_steps": 0, "optim.grad_clip": 0,
                                                  "train.max_nonfinite_steps": 3, "checkpoint.every_steps": 100}))
    _, err = process.communicate(timeout=300)
    assert process.returncode == 1, err[-3000:]
    assert "3 non-finite steps in a row (train.max_nonfinite_steps=3)" in err
    # The launcher names the first rank that failed and its error, read from the error file that
    # torchelastic's record() wrote in that rank, with the traceback.
    report = re.search(r"^rank (\d)'s error: NonFiniteError: (.*) \(traceback in (\S+)\)$", err, re.M)
    assert report and "3 non-finite steps in a row" in report[2], err[-3000:]
    with open(report[3]) as f:
        assert "Traceback" in json.load(f)["message"]["extraInfo"]["py_callstack"]
    log_dir = report[3]
    for _ in range(4):  # <log_dir>/<run id>/attempt_0/<rank>/error.json: the launcher keeps it for the user
        log_dir = os.path.dirname(log_dir)
    assert os.path.basename(log_dir).startswith("goembed_local_"), log_dir
    shutil.rmtree(log_dir)
    assert "the step was skipped (1 in a row" in err
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert records[0]["nonfinite_steps"] == 0 and records[-1]["nonfinite_steps"] == 3
