"""Resume a checkpoint written by N ranks on M ranks (a job requeued on fewer or more nodes).

DeepSpeed's ZeRO optimizer shards are tied to the data-parallel size that wrote them. DeepSpeed
0.19's *universal checkpoint* removes that tie: ``deepspeed.checkpoint.ds_to_universal`` turns
the shards into one folder per parameter (fp32 weights, Adam's exp_avg and exp_avg_sq, whole),
and an engine whose config says ``checkpoint.load_universal`` re-partitions them for its own
ranks on ``load_checkpoint``. The conversion runs once per node (by local rank 0, into the
node's staging directory); the trainer's own per-rank state (reader positions) is combined by
the reader's elastic resume (data_pipeline/reader.py), the EMA from the portable weights.
ZeRO 1-3 are supported; a ZeRO-0 checkpoint holds no shards and loads on any number of ranks
without conversion.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil

from trainer.distributed import DistEnv, barrier


def convert_to_universal(tag_dir: str, out_dir: str) -> str:
    """DeepSpeed's ds_to_universal of one checkpoint directory; returns ``out_dir``."""
    from deepspeed.checkpoint import ds_to_universal

    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    args = argparse.Namespace(input_folder=tag_dir, output_folder=out_dir, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              # our model is not Megatron: DeepSpeed's universal-checkpoint metadata
                              # (parameter patterns for tensor parallelism) is absent; inject the default
                              inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()):  # its progress prints would mix with the trainer's
        ds_to_universal.main(args)
    return out_dir


def load_universal(engine, tag_dir: str, staging: str, env: DistEnv):
    """Load the checkpoint in ``tag_dir`` (written by another number of ranks) into ``engine``."""
    tag = os.path.basename(tag_dir.rstrip(os.sep))
    out_dir = os.path.join(staging, f"{tag}_universal")
    if env.local_rank == 0:
        os.makedirs(staging, exist_ok=True)
        convert_to_universal(tag_dir, out_dir)
    barrier()
    previous = engine._config.load_universal_checkpoint
    engine._config.load_universal_checkpoint = True  # DeepSpeed reads the flag at load time
    try:
        load_path, _ = engine.load_checkpoint(staging, tag=os.path.basename(out_dir), load_module_strict=True,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
    finally:
        engine._config.load_universal_checkpoint = previous
    barrier()
    if env.local_rank == 0:
        shutil.rmtree(out_dir, ignore_errors=True)
    return load_path
