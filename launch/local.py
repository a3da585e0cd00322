"""Train on this machine with N processes (torchrun-style): the embedded default with no arguments.

    python launch/local.py                                   # tiny preset, CPU, synthetic data
    python launch/local.py --nproc 2 train.max_steps=50      # 2 ranks over gloo (or NCCL on GPUs)
    python launch/local.py --config configs/tiny_cpu.yaml --run-dir runs/exp1 distributed.zero_stage=3

With no ``--config`` the built-in defaults are used (see configs/tiny_cpu.yaml): if the data
they point at (data/synthetic) is absent it is generated first. Relative paths (``--config``,
``run_dir``, data URLs, ``checkpoint.dir``) mean what they mean in the directory you start the
launcher from; the paths used are printed first. Every process gets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT and runs ``python -m trainer.train``; if one fails the
others are stopped. SIGTERM / SIGINT (Ctrl-C) of the launcher are passed on to the ranks, and a
rank exits by itself when the launcher dies (even by SIGKILL). The last line printed is
``run_dir: PATH``.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data_pipeline import preflight, storage  # noqa: E402
from launch.paths import absolute, describe, resolved_overrides  # noqa: E402
from trainer.config import ConfigError, check_runnable, load_config  # noqa: E402
from trainer.distributed import free_port  # noqa: E402
from trainer.run_lock import RunLockedError, check_free  # noqa: E402

EMBEDDED_DATA = "data/synthetic"
_PR_SET_PDEATHSIG = 1
GRACE_SECONDS = 30.0  # after a forwarded signal, ranks still running this long later are killed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python launch/local.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=1, help="processes (ranks) to start (default: %(default)s)")
    parser.add_argument("--config", default=None, help="YAML run config (default: built-in defaults)")
    parser.add_argument("--run-dir", default=None, help="run directory (default: the config's run_dir, runs/tiny)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of refused configs (also passed to the ranks)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    return parser


def ensure_embedded_data(train_urls: str) -> None:
    """Generate the synthetic default dataset when the config points at it and it is not there."""
    embedded = absolute(EMBEDDED_DATA)
    if not absolute(train_urls).startswith(embedded + os.sep):
        return
    try:
        storage.expand_urls(absolute(train_urls))
    except FileNotFoundError:
        from data_pipeline.synthetic import generate_dataset

        summary = generate_dataset(embedded, objects=160, views=24, resolution=64, seed=0)
        print(summary["summary"], file=sys.stderr)


def _die_with_parent(parent: int) -> None:
    """In the child, before exec: the kernel sends SIGTERM when the launcher dies (even by SIGKILL)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the launcher died before prctl took effect
        os._exit(1)


def launch(nproc: int, trainer_args: list[str]) -> int:
    port = free_port()
    processes: list[subprocess.Popen] = []
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        for p in processes:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    parent = os.getpid()
    try:
        for rank in range(nproc):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GOEMBED_LAUNCHER": "local",
                   # One intra-op thread per rank unless the caller says otherwise (torchrun's default too):
                   # the tiny preset's small tensors ran ~5x slower with 2 threads on a busy 2-core machine.
                   "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            processes.append(subprocess.Popen([sys.executable, "-m", "trainer.train", *trainer_args], env=env, cwd=ROOT,
                                              preexec_fn=lambda: _die_with_parent(parent)))
        return _supervise(processes, received)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _supervise(processes: list[subprocess.Popen], received: list[int]) -> int:
    stop_deadline = None
    while True:
        codes = [p.poll() for p in processes]
        if received:
            if all(code is not None for code in codes):
                name = signal.Signals(received[0]).name
                print(f"launcher got {name}; passed it on to the ranks, all {len(processes)} stopped", file=sys.stderr)
                return 128 + received[0]
            stop_deadline = stop_deadline or time.monotonic() + GRACE_SECONDS
            if time.monotonic() > stop_deadline:
                for p in processes:
                    if p.poll() is None:
                        p.kill()
        else:
            failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                for p in processes:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                for p in processes:
                    p.wait()
                rank, code = failed[0]
                print(f"rank {rank} exited with status {code}; stopped the other ranks", file=sys.stderr)
                return code if code > 0 else 1
            if all(code == 0 for code in codes):
                return 0
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.nproc < 1:
        build_parser().error("--nproc must be >= 1")
    config_file = absolute(args.config) if args.config else None
    overrides = list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    try:
        config = load_config(config_file, overrides)  # fails here, once, on a bad config
        overrides += resolved_overrides(config)  # relative paths: against this directory, not the ranks'
        config = load_config(config_file, overrides)
        check_runnable(config)  # what this machine cannot run (train.device=cuda without CUDA, fp16 on CPU)
        print(describe(config), file=sys.stderr)
        ensure_embedded_data(config.data.train_urls)
        preflight.check_run(config)  # bad data, buckets, credentials: refused before any rank starts
        if storage.is_local(config.run_dir):
            check_free(storage.local_path(config.run_dir))
    except (ConfigError, preflight.PreflightError, RunLockedError, FileNotFoundError) as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    trainer_args = (["--config", config_file] if config_file else []) + overrides + (["--debug"] if args.debug else [])
    code = launch(args.nproc, trainer_args)
    if code == 0:
        print(f"run_dir: {config.run_dir}")
    return code


if __name__ == "__main__":
    sys.exit(main())
