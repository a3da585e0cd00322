"""Turn a training checkpoint into a portable model directory.

    python -m model_zoo.export RUN_DIR_OR_CHECKPOINT OUT_DIR [--dtype fp32|bf16] [--no-ema]

RUN_DIR_OR_CHECKPOINT is a run directory (its ``checkpoints/latest`` is used), a checkpoints
directory (its ``latest``) or one checkpoint's tag directory (``.../step_00000300``), local or
any fsspec URL (s3://...; credentials from the AWS_* environment). Every ZeRO stage (0-3) and
any number of ranks is accepted: the export reads only the checkpoint's *portable* files, which
the trainer writes into every checkpoint (trainer/portable.py), never DeepSpeed's shards:

    MANIFEST.json               which files the checkpoint has, their sizes, its step and world size
    model.safetensors           whole fp32 weights: the EMA when the run kept one (metadata "weights")
    model_trained.safetensors   the trained weights, beside their EMA
    model_config.json           the ModelConfig the weights load into
    config.yaml                 the run's config (credentials removed)

So the export needs neither DeepSpeed nor anything in ``trainer/``. A checkpoint written before
checkpoints carried portable weights is refused with the command that adds them
(``python -m trainer.portable CHECKPOINT_DIR``). A step directory without its manifest (a save
that never completed) is refused, never replaced by another step.

OUT_DIR receives:

    model.safetensors   consolidated weights: the EMA of the weights by default (--no-ema: the
                        trained weights themselves), fp32 or bf16 (--dtype)
    model_config.json   the ModelConfig, what ``model_zoo.load`` builds the model from
    config.yaml         the training run's whole config (credentials removed)
    MODEL_CARD.md       data, steps, last metrics, and the command that made the export

No pickle is read or written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings

from model_zoo.export.checkpoints import ExportError
from model_zoo.export.writer import DTYPES, export


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model_zoo.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT",
                        help="run directory, checkpoints directory or checkpoint tag directory (local or s3://...)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where the model directory is written (local or s3://...)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights' dtype (default: %(default)s)")
    parser.add_argument("--no-ema", action="store_true", help="export the trained weights instead of their EMA")
    parser.add_argument("--force", action="store_true", help="overwrite an existing export in OUT_DIR")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            result = export(args.source, args.out_dir, dtype=args.dtype, ema=not args.no_ema, force=args.force)
    except (ExportError, FileNotFoundError, PermissionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps({"out_dir": result.out_dir, "step": result.step, "weights": result.weights, "dtype": result.dtype,
                      "zero_stage": result.zero_stage, "world_size": result.world_size}))
    return 0


__all__ = ["build_parser", "main"]
