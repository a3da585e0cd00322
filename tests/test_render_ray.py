"""data_pipeline.render --ray-address on a real local Ray cluster: one task per part, one task's
worker killed once (Ray retries it), and the output is byte-identical to a local run.

The cluster is this test's own (`ray start --head --block` on free ports, a fresh temp dir), and
is stopped by signalling that process and then checking, by PID, that all it started is gone —
never `ray stop`, which stops every Ray on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import pytest

import trimesh  # noqa: E402  (the dev extra; bpy, the [render] extra, is used by the command under test)
import psutil  # noqa: E402  (comes with ray[default])

from tests.test_render import ROOT, read_samples, run_render, tree_bytes  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env() -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def ray_cluster():
    temp_dir = tempfile.mkdtemp(prefix="ray_r12_", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp_dir,
         "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
         "--min-worker-port", "23000", "--max-worker-port", "23999"],
        env=cluster_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not os.path.exists(os.path.join(temp_dir, "ray_current_cluster")):
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start failed: {head.stderr.read().decode()[-3000:]}", pytrace=False)
            time.sleep(0.2)
        yield {"address": f"127.0.0.1:{port}", "head": head}
    finally:
        started = psutil.Process(head.pid).children(recursive=True) if head.poll() is None else []
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started on exit
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        gone, alive = psutil.wait_procs(started, timeout=20)
        for process in alive:  # anything left of *this* cluster, by PID
            process.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def kill_one_render_task(head_pid: int, stop: threading.Event, killed: list) -> None:
    """SIGKILL the worker process of the first running render task of this cluster, once."""
    while not stop.is_set():
        try:
            for process in psutil.Process(head_pid).children(recursive=True):
                try:
                    title = " ".join(process.cmdline())
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                if title.startswith("ray::render_part"):
                    time.sleep(0.3)  # well inside the task: it has started rendering
                    process.kill()
                    killed.append(process.pid)
                    return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.05)


def test_ray_render_survives_a_killed_task_and_equals_a_local_run(ray_cluster, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(4):
        mesh = trimesh.creation.icosphere(subdivisions=2)
        mesh.apply_scale([1.0, 1.0 + 0.5 * i, 0.6])
        mesh.export(str(folder / f"m{i}.glb"))
    args = [str(folder), "--engine", "cycles", "--samples", "4", "--views", "3", "--resolution", "40", "--maxcount", "1"]
    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=kill_one_render_task, args=(ray_cluster["head"].pid, stop, killed), daemon=True)
    watcher.start()
    out = str(tmp_path / "ray")
    try:
        done = run_render(*args, "--out", out, "--ray-address", ray_cluster["address"], timeout=240)
    finally:
        stop.set()
        watcher.join(5)
    assert done.returncode == 0, done.stderr[-3000:]
    assert killed, "no render task was seen running, so none was killed"
    samples = read_samples(out)
    assert sorted(samples) == [f"m{i}" for i in range(4)]
    local = str(tmp_path / "local")
    assert run_render(*args, "--out", local).returncode == 0
    assert tree_bytes(out) == tree_bytes(local)
