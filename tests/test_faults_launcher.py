"""The launcher and the run directory: one run per directory, real signals, paths from another directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.test_trainer import ROOT, launch, losses, settings
from trainer.run_lock import RunLock, RunLockedError


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from data_pipeline.synthetic import generate_dataset

    out = str(tmp_path_factory.mktemp("data"))
    summary = generate_dataset(out, objects=24, views=8, resolution=32, seed=2, holdout_fraction=0.125, progress=False)
    return summary["train_pattern"], summary["holdout_pattern"]


def wait_for_step(process: subprocess.Popen, run_dir: str, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) and max(losses(run_dir), default=0) >= step:
            return
        time.sleep(0.1)
    raise AssertionError(f"no step {step} within {timeout}s")


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


# -- one run per run directory -----------------------------------------------------------------------


def test_the_lock_names_its_holder_and_a_sigkilled_holder_leaves_it_free(tmp_path):
    run_dir = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from trainer.run_lock import RunLock; "
                               f"RunLock({run_dir!r}).acquire(); print('held', flush=True); time.sleep(600)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunLockedError) as refused:
        RunLock(run_dir).acquire()
    assert run_dir in str(refused.value) and f"pid {holder.pid}" in str(refused.value)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with RunLock(run_dir) as lock:  # a crashed run leaves nothing stuck
        assert lock.holder()["pid"] == os.getpid()


def test_a_second_run_on_a_live_run_directory_is_refused_at_once(shards, tmp_path):
    run_dir = str(tmp_path / "run")
    first = launch(settings(shards, run_dir, **{"train.max_steps": 200, "checkpoint.every_steps": 200}))
    try:
        wait_for_step(first, run_dir, 1)
        start = time.monotonic()
        second = launch(settings(shards, run_dir, **{"optim.lr": 1e-3}))  # through the launcher
        out, err = second.communicate(timeout=120)
        assert second.returncode == 2 and time.monotonic() - start < 60, err[-3000:]
        assert f"run directory {run_dir} is in use by another run" in err and "pid " in err, err[-3000:]
        assert "Traceback" not in err
        # ...and straight into the trainer (a launcher that does not check): the trainer's own lock refuses
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        direct = subprocess.run([sys.executable, "-m", "trainer.train", *settings(shards, run_dir)], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=120)
        assert direct.returncode == 2 and "is in use by another run" in direct.stderr, direct.stderr[-3000:]
        assert first.poll() is None  # the first run goes on, its config untouched
        with open(os.path.join(run_dir, "config.yaml")) as f:
            assert "lr: 0.003" in f.read()
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
    with RunLock(run_dir):  # free again after the SIGKILL
        pass


# -- stopping the launcher stops the job --------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_signal_to_the_launcher_stops_every_rank(shards, tmp_path, signum):
    run_dir = str(tmp_path / "run")
    process = launch(settings(shards, run_dir, **{"train.max_steps": 500, "checkpoint.every_steps": 500}))
    try:
        wait_for_step(process, run_dir, 1)
        ranks = children(process.pid)
        assert len(ranks) == 2, ranks
        os.kill(process.pid, signum)  # the launcher only, not its process group
        process.wait(timeout=60)
        if signum != signal.SIGKILL:
            assert process.returncode == 128 + signum, process.returncode
        left = wait_gone(ranks, 30)
        assert not left, f"ranks {left} still running after {signal.Signals(signum).name} of the launcher"
        steps = max(losses(run_dir))
        time.sleep(2)
        assert max(losses(run_dir)) == steps  # nobody writes to the run directory any more
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.communicate()


# -- a failed rank: restarted (--max-restarts), or reported -----------------------------------------


def kill_second_rank(process, run_dir: str, after_step: int, timeout: float):
    """SIGKILL the rank started second (LOCAL_RANK 1) once ``after_step`` is logged; wait for the
    launcher. Returns the two ranks' pids and the launcher's stdout and stderr."""
    try:
        wait_for_step(process, run_dir, after_step)
        ranks = sorted(children(process.pid))
        assert len(ranks) == 2, ranks
        os.kill(ranks[1], signal.SIGKILL)
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    return ranks, out, err


def test_a_killed_rank_restarts_every_rank_and_the_run_resumes_with_max_restarts(shards, tmp_path):
    """torchelastic's agent: rank 1 SIGKILLed after the step-4 checkpoint; --max-restarts 1 stops rank
    0, starts both again, they resume from step 4 and the run ends as a normal one (status 0)."""
    run_dir = str(tmp_path / "run")
    process = launch(["--max-restarts", "1", *settings(shards, run_dir, **{"train.max_steps": 10})])
    ranks, out, err = kill_second_rank(process, run_dir, after_step=6, timeout=300)
    assert process.returncode == 0, err[-4000:]
    assert out.strip().splitlines()[-1] == f"run_dir: {os.path.abspath(run_dir)}"
    assert "launcher: restart 1 of 1 (--max-restarts)" in err, err[-4000:]
    assert f"resumed from {os.path.join(run_dir, 'checkpoints', 'step_00000004')} at step 4" in err, err[-4000:]
    assert sorted(losses(run_dir)) == list(range(1, 11))
    assert not wait_gone(ranks, 5)


def test_a_killed_rank_fails_the_launcher_and_stops_the_others_without_restarts(shards, tmp_path):
    run_dir = str(tmp_path / "run")
    process = launch(settings(shards, run_dir, **{"train.max_steps": 500, "checkpoint.every_steps": 500}))
    ranks, out, err = kill_second_rank(process, run_dir, after_step=1, timeout=120)
    assert process.returncode == 1, err[-4000:]
    assert "rank 1 exited with status -9 (SIGKILL); stopped the other ranks\n" in err, err[-4000:]
    assert "launcher: restart" not in err and "run_dir:" not in out
    assert not wait_gone(ranks, 5)  # rank 0 was stopped by the agent before the launcher returned


# -- paths mean what the user typed --------------------------------------------------------------------


def test_local_launcher_from_another_directory_uses_the_callers_paths(shards, tmp_path):
    caller = tmp_path / "elsewhere"
    (caller / "cfg").mkdir(parents=True)
    train, holdout = shards
    data = os.path.dirname(train)
    os.symlink(data, caller / "mydata")  # relative data URLs, relative to the caller
    rel_train, rel_holdout = (os.path.join("mydata", os.path.basename(p)) for p in (train, holdout))
    (caller / "cfg" / "run.yaml").write_text(f"data:\n  train_urls: {rel_train}\n  holdout_urls: {rel_holdout}\n")
    args = [a for a in settings(shards, "unused", **{"train.max_steps": 2}) if not a.startswith(("run_dir=", "data.train_urls=", "data.holdout_urls="))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "local.py"), "--config", "cfg/run.yaml",
                             "--run-dir", "runs/rel", *args], cwd=caller, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = str(caller / "runs" / "rel")
    assert result.stdout.strip().splitlines()[-1] == f"run_dir: {run_dir}"
    assert f"run_dir: {run_dir}" in result.stderr and f"data.train_urls: {caller / rel_train}" in result.stderr
    assert sorted(losses(run_dir)) == [1, 2]
    assert not os.path.exists(os.path.join(ROOT, "runs", "rel"))


def test_slurm_and_ray_launchers_resolve_relative_paths_against_the_caller(tmp_path, monkeypatch):
    """Without submitting anything (the SLURM cluster and Ray are not needed for this)."""
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "slurm.py"), "--dry-run", "--run-dir", "r1",
                             "data.train_urls=d/train-{0..3}.tar", "checkpoint.dir=ck"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"run_dir: {tmp_path / 'r1'}" in result.stderr
    trainer_args = [line for line in result.stdout.splitlines() if line.startswith("# trainer arguments:")][0]
    for expected in (f"run_dir={json.dumps(str(tmp_path / 'r1'))}", f"checkpoint.dir={json.dumps(str(tmp_path / 'ck'))}",
                     f"data.train_urls={json.dumps(str(tmp_path / 'd/train-{0..3}.tar'))}"):
        assert expected in trainer_args.replace("'", ""), trainer_args
    assert f"{tmp_path / 'r1'}/slurm/%j" in result.stdout  # submitit's folder, under the resolved run_dir

    pytest.importorskip("ray")
    from launch.ray_job import build_parser, job_config

    config = job_config(build_parser().parse_args(["--num-workers", "1", "--storage", "store", "--name", "n",
                                                   "data.train_urls=d/*.tar", "data.holdout_urls=null"]))
    assert config.run_dir == str(tmp_path / "store" / "n" / "run")
    assert config.checkpoint.dir == str(tmp_path / "store" / "n" / "goembed_checkpoints")
    assert config.data.train_urls == str(tmp_path / "d" / "*.tar")
