"""launch/slurm.py on a real SLURM cluster (launch/cluster/slurm_up.sh: 2 virtual nodes on this host).

Nothing is mocked: jobs go through sbatch/srun and submitit. The cluster fixture fails (never
skips) when the cluster cannot come up. Each test uses a fresh submitit folder: job ids restart at 1
when the cluster's state is purged.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.synthetic_shards import synthetic_shards
from tests.test_trainer import settings as trainer_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM = [sys.executable, "launch/slurm.py"]


def env() -> dict:
    e = {**os.environ, "OMP_NUM_THREADS": "1"}
    # DeepSpeed JIT-builds its shared-memory op on first use: build it once, shared with other tests.
    e.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.expanduser("~"), ".cache", "goembed_torch_extensions"))
    return e


@pytest.fixture(scope="module")
def cluster():
    try:
        up = subprocess.run(["bash", os.path.join(ROOT, "launch/cluster/slurm_up.sh")], capture_output=True,
                            text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"slurm_up.sh did not run: {exc}", pytrace=False)
    if up.returncode != 0:
        pytest.fail(f"the SLURM cluster did not come up:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}", pytrace=False)
    # Warm DeepSpeed's op cache outside the jobs (otherwise both ranks build it inside the first job).
    subprocess.run([sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()"],
                   env=env(), capture_output=True, timeout=600, check=False)
    return up.stdout


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synthetic_shards(tmp_path_factory, objects=32)


def settings(shards, run_dir, **extra) -> list[str]:
    """tests/test_trainer.py's small deterministic run, shorter, with checkpoints every 2 steps."""
    return trainer_settings(shards, run_dir, **{"data.num_workers": 0, "checkpoint.every_steps": 2,
                                                "train.max_steps": 4, **extra})


def submit_args(folder, time_limit="10") -> list[str]:
    return ["--nodes", "2", "--tasks-per-node", "1", "--cpus-per-task", "1", "--partition", "debug", "--time", time_limit,
            "--folder", os.path.join(str(folder), "%j")]


def steps(run_dir) -> list[int]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.strip()]


def test_dry_run_prints_the_sbatch_script(tmp_path):
    out = subprocess.run([*SLURM, "--nodes", "8", "--gpus-per-node", "8", "--partition", "P", "--time", "72:00:00",
                          "--account", "acct1", "--qos", "high", "--constraint", "a100", "--exclusive",
                          "--cpus-per-task", "10", "--mem-per-task", "32G", "--dry-run", f"run_dir={tmp_path}/run"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    script = out.stdout
    for line in ("#SBATCH --nodes=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=4320", "#SBATCH --partition=P", "#SBATCH --account=acct1", "#SBATCH --qos=high",
                 "#SBATCH --constraint=a100", "#SBATCH --exclusive", "#SBATCH --cpus-per-task=10",
                 "#SBATCH --mem=262144M", "#SBATCH --signal=USR2@120", f"export PYTHONPATH={ROOT}"):
        assert line in script, f"{line!r} missing from:\n{script}"
    assert "submitit.core._submit" in script and f"{tmp_path}/run/slurm/%j" in script
    assert not os.path.exists(tmp_path / "run"), "a dry run must not create anything"


def test_two_node_job_trains_and_checkpoints(cluster, shards, tmp_path):
    run_dir = str(tmp_path / "run")
    out = subprocess.run([*SLURM, *submit_args(tmp_path / "submitit"), "--wait", *settings(shards, run_dir)],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=400, check=False)
    assert out.returncode == 0, out.stdout + out.stderr[-4000:]
    job_id = re.search(r"submitted job (\d+)", out.stdout).group(1)
    assert f"tail -f {tmp_path}/submitit/{job_id}/{job_id}_0_log.out" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == f"run_dir: {run_dir}"
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        tag = f.read().strip()
    with open(os.path.join(run_dir, "checkpoints", tag, "MANIFEST.json")) as f:
        manifest = json.load(f)
    assert manifest["world_size"] == 2 and manifest["step"] == 4
    assert steps(run_dir) == [1, 2, 3, 4]
    with open(tmp_path / "submitit" / job_id / f"{job_id}_0_log.err") as f:
        log = f.read()
    assert "2 tasks on ['node1', 'node2'], master node1:" in log


def test_preempted_job_requeues_and_resumes(cluster, shards, tmp_path):
    run_dir = str(tmp_path / "run")
    max_steps = 24
    process = subprocess.Popen(
        # --time 15: submitit counts a signal in the first 5 minutes as a preemption (with 10 or less, as a time-out)
        [*SLURM, *submit_args(tmp_path / "submitit", "15"), "--wait", "--max-requeues", "2",
         *settings(shards, run_dir, **{"train.max_steps": max_steps, "checkpoint.every_steps": 3,
                                      # a loader worker: a forked child must not answer the USR2 itself
                                      "data.num_workers": 1})],
        cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        job_id = None
        deadline = time.time() + 300
        while job_id is None and time.time() < deadline:
            line = process.stdout.readline()
            assert line, f"launcher ended before submitting: {process.stderr.read()[-4000:]}"
            match = re.search(r"submitted job (\d+)", line)
            job_id = match and match.group(1)
        # Wait for a checkpoint and a few steps past it, then preempt the job the way SLURM does
        # (submitit's own job._interrupt(): SIGTERM, then the USR2 its sbatch --signal asks for).
        latest = os.path.join(run_dir, "checkpoints", "latest")
        while not (os.path.exists(latest) and len(steps(run_dir)) >= 4):
            assert process.poll() is None and time.time() < deadline, "no checkpoint before the deadline"
            time.sleep(0.5)
        before = steps(run_dir)[-1]
        assert before < max_steps, "the run finished before it could be preempted: make it longer"
        subprocess.check_call(["scancel", job_id, "--signal", "SIGTERM"])
        subprocess.check_call(["scancel", job_id, "--signal", "USR2"])
        out, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            if job_id:
                subprocess.run(["scancel", str(job_id)], check=False)
            process.kill()
    assert process.returncode == 0, out + err[-4000:]
    with open(tmp_path / "submitit" / job_id / f"{job_id}_0_log.err") as f:
        log = f.read()
    assert "this job is preempted" in log and "requeuing (1/2)" in log, log[-4000:]
    resumed = [int(m) for m in re.findall(r"resumed from \S+ at step (\d+)", log)]
    # Not `<= before`: training goes on between reading `before` and the signal, so the checkpoint
    # resumed from may be a later one.
    assert len(resumed) == 1 and 0 < resumed[0] < max_steps, log[-4000:]
    assert "requeue 1/2" in log  # the second start knows it was requeued
    assert steps(run_dir) == list(range(1, max_steps + 1))  # continued from the checkpoint, not from 0
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        assert f.read().strip().endswith(f"{max_steps:08d}")


def test_requeue_bound_time_and_port():
    from launch.slurm import TrainJob, master_port, parse_time

    job = TrainJob(["--config", "x.yaml"], max_requeues=1)
    again = job.checkpoint()
    assert again.function.requeues == 1 and again.function.argv == job.argv
    assert again.function.checkpoint() is None  # the bound: submitit then ends the job with an error
    assert [parse_time(t) for t in ("10", "72:00:00", "1-00:00:00", "1-2", "5:30")] == [10, 4320, 1440, 1560, 6]
    assert master_port("12345") == 32345 and master_port("20001_3") == 20001
