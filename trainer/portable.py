"""Portable weights in every checkpoint: what ``model_zoo.load`` and ``model_zoo.export`` read.

Beside DeepSpeed's shards, each checkpoint directory ``<dir>/step_XXXXXXXX/`` holds (written by
rank 0, before the manifest, so the manifest lists and sizes them):

    model.safetensors           the EMA of the weights (fp32, whole) when the run keeps one,
                                otherwise the trained weights; metadata "weights": "ema" | "trained"
    model_trained.safetensors   the trained weights (fp32 master copy, whole), when the EMA is
                                in model.safetensors
    model_config.json           the ModelConfig the weights load into (the inference model: the
                                LPIPS loss network is left out)

The format is the export format of ``model_zoo/loading.py`` (safetensors + JSON, no pickle):
``model_zoo.load(checkpoint_dir)`` works on a checkpoint directly, and neither reader needs
DeepSpeed or ``trainer/``. Gathering is collective: every rank calls :func:`gather_weights`
(under ZeRO-3 each parameter, and each EMA partition, is all-gathered on the process's device).

Checkpoints written before this existed have no portable files; ``python -m trainer.portable
CHECKPOINT_DIR`` adds them, offline, from DeepSpeed's shards (trainer/convert_checkpoint.py;
README, "Exporting a model").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

from model_zoo.checkpoint_layout import MODEL_CONFIG, TRAINED_WEIGHTS, WEIGHTS
from model_zoo.goembedfusion import ModelConfig
from model_zoo.loading import inference_config

# Parts of the training model that inference does not use (the LPIPS loss network).
TRAINING_ONLY_PREFIXES = ("lpips.",)


def keep_for_inference(name: str) -> bool:
    return not name.startswith(TRAINING_ONLY_PREFIXES)


def gather_weights(engine, ema, device: torch.device,
                   keep: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(trained fp32 weights, EMA weights or None), whole, on the CPU. Collective: every rank calls it.

    Trained: DeepSpeed's fp32 master copy where it keeps one (ZeRO 1-3, bf16), else the
    parameter itself. Buffers come from the module (never partitioned). ``keep=False`` (ranks
    other than the writer): take part in the gathers, drop each tensor at once, return empty dicts,
    so only one process per job holds a whole copy in host memory.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    trained: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        full = safe_get_full_fp32_param(param)
        if full is None:
            full = param.data
        if keep_for_inference(name) and keep:
            trained[name] = full.detach().float().reshape(getattr(param, "ds_shape", full.shape)).cpu().clone()
        del full
    parameter_names = {name for name, _ in module.named_parameters()}
    for name, buffer in module.state_dict().items() if keep else ():
        if name not in parameter_names and keep_for_inference(name):
            trained[name] = buffer.detach().cpu().clone()
    averaged = None
    if ema is not None:
        averaged = {name: tensor for name, tensor in ema.full_state_dict(device, keep).items() if keep_for_inference(name)}
        averaged.update({name: tensor for name, tensor in trained.items() if name not in parameter_names})
    return trained, averaged


def write_portable(directory: str, model_config: ModelConfig, trained: dict[str, torch.Tensor],
                   ema: dict[str, torch.Tensor] | None, step: int) -> list[str]:
    """Write the portable files into ``directory``; returns their names."""
    from safetensors.torch import save_file

    def save(tensors: dict[str, torch.Tensor], name: str, kind: str) -> None:
        tensors = {k: v.contiguous() for k, v in sorted(tensors.items())}
        save_file(tensors, os.path.join(directory, name), metadata={"format": "pt", "weights": kind, "step": str(step)})

    names = [WEIGHTS, MODEL_CONFIG]
    if ema is not None:
        save(ema, WEIGHTS, "ema")
        save(trained, TRAINED_WEIGHTS, "trained")
        names.append(TRAINED_WEIGHTS)
    else:
        save(trained, WEIGHTS, "trained")
    with open(os.path.join(directory, MODEL_CONFIG), "w") as f:
        json.dump(dataclasses.asdict(inference_config(model_config)), f, indent=2)
        f.write("\n")
    return names


def read_weights(directory: str, name: str = WEIGHTS) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(directory, name), device="cpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.portable",
                                     description="Add portable weights (model.safetensors, model_config.json) to a "
                                                 "checkpoint written before they existed. Local checkpoints only.")
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="a checkpoint's tag directory (.../step_00000300)")
    args = parser.parse_args(argv)
    from trainer.convert_checkpoint import convert_checkpoint  # the CLI's one job; training never needs it

    try:
        names = convert_checkpoint(args.checkpoint)
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps({"checkpoint": os.path.abspath(args.checkpoint), "added": names}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["gather_weights", "keep_for_inference", "read_weights", "write_portable"]
