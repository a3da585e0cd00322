"""Train GOEmbedFusion with DeepSpeed: ``python -m trainer.train [--config FILE] [key=value ...]``.

Run it through a launcher (``python launch/local.py --nproc 2 ...``, SLURM, Ray) or alone for a
single process. The distributed set-up comes only from RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT. The loop lives in :class:`trainer.trainer.Trainer`, top to bottom:
restore from ``latest`` if the run has one; then for each optimizer step read its micro-batches,
forward + backward + ``engine.step()`` for each, EMA, log, preview, checkpoint.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from data_pipeline import preflight, storage
from trainer.config import ConfigError, RunConfig, config_help, load_config
from trainer.run_lock import RunLockedError
from trainer.trainer import NonFiniteError, TrainHooks, Trainer

__all__ = ["NonFiniteError", "TrainHooks", "Trainer", "build_parser", "main", "train"]


def train(config: RunConfig, hooks: TrainHooks | None = None) -> str:
    """Train to ``config.train.max_steps`` (resuming from ``latest``); returns the run directory."""
    return Trainer(config, hooks).fit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.train", description=__doc__, epilog=config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML run config (default: the built-in defaults, see configs/tiny_cpu.yaml)")
    parser.add_argument("--run-dir", default=None, help="shorthand for run_dir=DIR")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of a refused config or storage error")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100 distributed.zero_stage=3")
    return parser


# Errors that are the user's to fix: one message, no traceback (unless --debug).
USER_ERRORS = (ConfigError, preflight.PreflightError, RunLockedError, storage.StorageUnavailableError)


def user_error_message(error: BaseException) -> str | None:
    """The one-line message for an error the user must fix, or None for a bug (traceback wanted)."""
    text = str(error)
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: its last line is the error
        last = text.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if last.startswith(tuple(e.__module__ + "." + e.__name__ for e in USER_ERRORS)) else None
    if isinstance(error, USER_ERRORS):
        lines = [line.strip() for line in text.splitlines()]
        return " ".join(lines) if len(lines) <= 2 else text  # "invalid config: <the one problem>"
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        where = f" ({error.filename})" if error.filename and str(error.filename) not in str(error.strerror) else ""
        return f"{error.strerror}{where}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    try:
        config = load_config(args.config, overrides)
        run_dir = train(config)
    except Exception as error:
        message = user_error_message(error)
        if message is None or args.debug:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0 and not os.environ.get("GOEMBED_LAUNCHER"):  # the launcher prints it last
        print(f"run_dir: {os.path.abspath(run_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
