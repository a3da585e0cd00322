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
CHECKPOINT_DIR`` adds them, offline, from DeepSpeed's shards (README, "Exporting a model").
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import sys
import threading

import torch

from data_pipeline.atomic_files import write_atomic
from model_zoo.goembedfusion import ModelConfig
from model_zoo.checkpoint_layout import (DEEPSPEED_MODEL_STATES, MANIFEST, MODEL_CONFIG, RUN_CONFIG, TRAINED_WEIGHTS,
                                         WEIGHTS, rank_file)
from model_zoo.loading import inference_config

# Parts of the training model that inference does not use (the LPIPS loss network).
TRAINING_ONLY_PREFIXES = ("lpips.",)


def _keep(name: str) -> bool:
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
        if _keep(name) and keep:
            trained[name] = full.detach().float().reshape(getattr(param, "ds_shape", full.shape)).cpu().clone()
        del full
    parameter_names = {name for name, _ in module.named_parameters()}
    for name, buffer in module.state_dict().items() if keep else ():
        if name not in parameter_names and _keep(name):
            trained[name] = buffer.detach().cpu().clone()
    averaged = None
    if ema is not None:
        averaged = {name: tensor for name, tensor in ema.full_state_dict(device, keep).items() if _keep(name)}
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


# -- converting a checkpoint written before portable weights existed --------------------------------


def _deepspeed_safe_globals() -> list:
    """DeepSpeed's plain data classes that its checkpoint files contain (allow-listed for weights_only)."""
    allowed = []
    for module_name, names in (("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
                               ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
                               ("deepspeed.utils.tensor_fragment", ("fragment_address",))):
        try:
            module = __import__(module_name, fromlist=list(names))
        except ImportError:
            continue
        allowed.extend(getattr(module, name) for name in names if hasattr(module, name))
    return allowed


def safe_torch_load(path: str, **kwargs):
    """``torch.load`` with ``weights_only=True`` (DeepSpeed's data classes allowed; nothing else)."""
    kwargs.pop("weights_only", None)
    kwargs.setdefault("map_location", "cpu")
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return torch.load(path, weights_only=True, **kwargs)


class _SafeTorch:
    """``torch`` as DeepSpeed's zero_to_fp32 sees it while we consolidate: its ``load`` is safe."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(f, map_location=None, **kwargs):
        return safe_torch_load(f, map_location=map_location or "cpu",
                               **{k: v for k, v in kwargs.items() if k in ("mmap",)})


_PATCH_LOCK = threading.Lock()


def consolidate_offline(checkpoints_dir: str, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a local DeepSpeed checkpoint, any ZeRO stage, in one process."""
    tag_dir = os.path.join(checkpoints_dir, tag)
    model_states = os.path.join(tag_dir, DEEPSPEED_MODEL_STATES)
    if any(name.endswith("optim_states.pt") and "zero_pp_rank_" in name for name in os.listdir(tag_dir)):
        from deepspeed.utils import zero_to_fp32

        with _PATCH_LOCK:  # zero_to_fp32 reads with torch.load(weights_only=False): make it safe
            original, zero_to_fp32.torch = zero_to_fp32.torch, _SafeTorch()
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(checkpoints_dir, tag)
            except ValueError:  # e.g. a bf16 ZeRO-0 run's optimizer files: not ZeRO's layout
                if not os.path.exists(model_states):
                    raise
                state = None
            finally:
                zero_to_fp32.torch = original
        if state is not None:
            return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    module = safe_torch_load(model_states)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}


def _reassemble_zero3(name: str, partitions: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """One parameter from its ZeRO-3 partitions (rank order): concatenate, drop the padding, reshape."""
    numel = math.prod(shape)
    chunk = math.ceil(numel / len(partitions))
    for rank, part in enumerate(partitions):
        if part.dim() != 1 or part.numel() != chunk:
            raise ValueError(f"{name}: rank {rank}'s EMA partition has shape {tuple(part.shape)}, expected ({chunk},)")
    return torch.cat(partitions)[:numel].reshape(shape)


def convert_checkpoint(tag_dir: str) -> list[str]:
    """Add the portable files to an old checkpoint directory (and list them in its manifest)."""
    import yaml

    tag_dir = os.path.abspath(tag_dir)
    manifest_path = os.path.join(tag_dir, MANIFEST)
    if not os.path.exists(manifest_path):
        raise FileNotFoundError(f"{tag_dir} has no {MANIFEST}: not a complete checkpoint")
    with open(manifest_path) as f:
        manifest = json.load(f)
    with open(os.path.join(tag_dir, RUN_CONFIG)) as f:
        raw = yaml.safe_load(f) or {}
    model_config = ModelConfig(**(raw.get("model") or {}))
    zero_stage = int((raw.get("distributed") or {}).get("zero_stage", 2))
    trained = {k: v for k, v in consolidate_offline(os.path.dirname(tag_dir), os.path.basename(tag_dir)).items() if _keep(k)}
    emas = [safe_torch_load(os.path.join(tag_dir, rank_file(r)))["ema"] for r in range(manifest["world_size"])]
    ema = None
    if emas[0] is not None:
        ema = dict(trained)  # buffers
        for name, tensor in trained.items():
            if name not in emas[0]:
                continue
            ema[name] = (emas[0][name].float() if zero_stage < 3 else
                         _reassemble_zero3(name, [e[name].float() for e in emas], tensor.shape))
    names = write_portable(tag_dir, model_config, trained, ema, int(manifest["step"]))
    for name in names:
        manifest["files"][name] = os.path.getsize(os.path.join(tag_dir, name))
    write_atomic(manifest_path, json.dumps(manifest, indent=1, sort_keys=True))
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.portable",
                                     description="Add portable weights (model.safetensors, model_config.json) to a "
                                                 "checkpoint written before they existed. Local checkpoints only.")
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="a checkpoint's tag directory (.../step_00000300)")
    args = parser.parse_args(argv)
    try:
        names = convert_checkpoint(args.checkpoint)
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps({"checkpoint": os.path.abspath(args.checkpoint), "added": names}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["convert_checkpoint", "gather_weights", "read_weights", "write_portable"]
