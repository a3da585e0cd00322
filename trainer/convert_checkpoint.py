"""Converting a checkpoint written before checkpoints carried portable weights: consolidate
DeepSpeed's shards offline (its ``zero_to_fp32``, with ``weights_only`` loading), reassemble the
ranks' ZeRO-3 EMA partitions, and add the portable files (:mod:`trainer.portable`) to the
checkpoint and its manifest. Local checkpoints only; ``python -m trainer.portable CHECKPOINT_DIR``
runs it."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import threading

import torch

from data_pipeline.atomic_files import write_atomic
from model_zoo.checkpoint_layout import DEEPSPEED_MODEL_STATES, MANIFEST, RUN_CONFIG, rank_file
from model_zoo.goembedfusion import ModelConfig
from trainer.portable import keep_for_inference, write_portable


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
    trained = {k: v for k, v in consolidate_offline(os.path.dirname(tag_dir), os.path.basename(tag_dir)).items() if keep_for_inference(k)}
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


__all__ = ["consolidate_offline", "convert_checkpoint", "safe_torch_load"]
