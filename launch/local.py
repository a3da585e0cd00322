"""Train on this machine with N processes: the embedded default with no arguments.

    python launch/local.py                                   # tiny preset, CPU, synthetic data
    python launch/local.py --nproc 2 train.max_steps=50      # 2 ranks over gloo (or NCCL on GPUs)
    python launch/local.py --nproc 2 --max-restarts 3        # a failed rank restarts every rank, up to 3 times
    python launch/local.py --config configs/tiny_cpu.yaml --run-dir runs/exp1 distributed.zero_stage=3

With no ``--config`` the built-in defaults are used (see configs/tiny_cpu.yaml): if the data
they point at (data/synthetic) is absent it is generated first. Relative paths (``--config``,
``run_dir``, data URLs, ``checkpoint.dir``) mean what they mean in the directory you start the
launcher from; the paths used are printed first. The config is checked once, here, before any
rank starts.

The ranks are started and watched by torchrun's elastic agent (torch.distributed.launcher.api,
one node, a c10d rendezvous on 127.0.0.1): every process gets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT and runs ``trainer.train`` (through launch/local_rank.py). If a rank
fails, the agent stops the others; with ``--max-restarts N`` it then starts every rank again, up to
N times, and the run resumes from its latest checkpoint. When no restart is left the launcher
names the first rank that failed, its error, and the error file holding its traceback (written by
torchelastic's ``record``), and exits with that rank's status (1 if a signal killed it).
SIGTERM / SIGINT (Ctrl-C) / SIGHUP of the launcher are passed on to the ranks (those still
running 30 s later are killed), and a rank exits by itself when the launcher dies (even by
SIGKILL). The last line printed on success is ``run_dir: PATH``.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import signal
import sys
import tempfile
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data_pipeline import preflight, storage  # noqa: E402
from launch.local_rank import LAUNCHER_PID  # noqa: E402
from launch.paths import absolute, describe, load_resolved  # noqa: E402
from trainer.config import ConfigError, check_runnable, config_help  # noqa: E402
from trainer.run_lock import RunLockedError, check_free  # noqa: E402

EMBEDDED_DATA = "data/synthetic"
RANK_COMMAND = os.path.join(ROOT, "launch", "local_rank.py")
GRACE_SECONDS = 30  # after a forwarded signal or a failed rank, ranks still running this long later are killed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python launch/local.py", description=__doc__, epilog=config_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=1, help="processes (ranks) to start (default: %(default)s)")
    parser.add_argument("--max-restarts", type=int, default=0,
                        help="when a rank fails, stop the others and start every rank again, at most this many "
                             "times; each restart resumes from the run's latest checkpoint (default: %(default)s)")
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


def launch(nproc: int, trainer_args: list[str], max_restarts: int = 0) -> int:
    """Run ``nproc`` ranks of the trainer under torch's elastic agent; the exit status of the launcher."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # Each rank's error file (and nothing else: the ranks' output goes to this terminal) lives here; the
    # directory is removed unless a rank left an error in it.
    log_dir = tempfile.mkdtemp(prefix="goembed_local_")
    # The agent's own TCP store, shared with the ranks (torch's default), keeps the keys of a failed
    # attempt: measured with torch 2.13 and gloo, the restarted ranks read the old addresses and
    # time out connecting (pytorch/pytorch#135712). Without sharing, rank 0 hosts a fresh store each attempt.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    # One intra-op thread per rank unless the caller says otherwise (torchrun's default too):
    # the tiny preset's small tensors ran ~5x slower with 2 threads on a busy 2-core machine.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["GOEMBED_LAUNCHER"] = "local"  # the trainer leaves the run_dir line to us
    os.environ[LAUNCHER_PID] = str(os.getpid())
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", local_addr="127.0.0.1",
                          max_restarts=max_restarts, monitor_interval=0.1, shutdown_timeout=GRACE_SECONDS,
                          logs_specs=DefaultLogsSpecs(log_dir=log_dir))
    try:
        elastic_launch(config, sys.executable)(RANK_COMMAND, *trainer_args)
        return 0
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        print(f"rank {rank} exited with status {failure.exitcode}"
              f"{f' ({failure.signal_name()})' if failure.exitcode < 0 else ''}; stopped the other ranks"
              f"{f' (after {max_restarts} restarts, --max-restarts {max_restarts})' if max_restarts else ''}",
              file=sys.stderr)
        if failure.error_file_data:
            message = failure.message["message"] if isinstance(failure.message, dict) else failure.message
            print(f"rank {rank}'s error: {message} (traceback in {failure.error_file})", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    except SignalException as error:
        name = signal.Signals(error.sigval).name
        print(f"launcher got {name}; passed it on to the ranks, all {nproc} stopped", file=sys.stderr)
        return 128 + error.sigval
    finally:
        if not glob.glob(os.path.join(log_dir, "**", "error.json"), recursive=True):
            shutil.rmtree(log_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.nproc < 1:
        build_parser().error("--nproc must be >= 1")
    if args.max_restarts < 0:
        build_parser().error("--max-restarts must be >= 0")
    overrides = list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    try:
        # Fails here, once, on a bad config; relative paths: against this directory, not the ranks'.
        config_file, overrides, config = load_resolved(args.config, overrides)
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
    code = launch(args.nproc, trainer_args, args.max_restarts)
    if code == 0:
        print(f"run_dir: {config.run_dir}")
    return code


if __name__ == "__main__":
    sys.exit(main())
