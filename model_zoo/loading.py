"""Load an exported GOEmbedFusion model directory (see ``model_zoo/export/``).

    import model_zoo
    model = model_zoo.load("exports/tiny")               # or "s3://bucket/exports/tiny"
    state = model.reconstruct(context_views, background)

An export holds ``model.safetensors`` (weights), ``model_config.json`` (the ``ModelConfig``),
``config.yaml`` (the training run's config) and ``MODEL_CARD.md``. Loading reads only the first
two: safetensors and JSON, never a pickle, so an export from an untrusted source cannot run code.

Every training checkpoint directory (``.../checkpoints/step_00000300``) carries the same two
files (the EMA weights in ``model.safetensors``, the trained weights in
``model_trained.safetensors``; see trainer/portable.py), so ``load`` reads a checkpoint directly,
without DeepSpeed: ``load(checkpoint_dir, weights="trained")`` for the trained weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import pydantic
import torch

from data_pipeline import storage
from model_zoo.checkpoint_layout import CHECKPOINTS, LATEST, MANIFEST, MODEL_CONFIG, TRAINED_WEIGHTS, WEIGHTS
from model_zoo.goembedfusion import GOEmbedFusion, ModelConfig


class ExportFormatError(ValueError):
    """A directory that is not a usable model export; the message says what is wrong."""


def model_config_from_dict(raw: dict) -> ModelConfig:
    """A :class:`ModelConfig` from ``model_config.json``'s contents (unknown keys are an error)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ExportFormatError(f"{MODEL_CONFIG} has unknown fields {unknown}: written by a newer version of this code?")
    try:
        return ModelConfig(**raw)
    except pydantic.ValidationError as error:  # one line, each problem named by its field
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}, got {e['input']!r}" if e["loc"] else e["msg"]
                             for e in error.errors(include_url=False))
        raise ExportFormatError(f"{MODEL_CONFIG} is not a valid ModelConfig: {problems}") from None


def inference_config(config: ModelConfig) -> ModelConfig:
    """The model as inference builds it: without the LPIPS loss network (a training-only part)."""
    return dataclasses.replace(config, lpips_weight=0.0, lpips_weights_path=None)


def weights_file(directory_listing: set[str], weights: str) -> str:
    """Which file holds ``weights`` ("default": the EMA if there is one; "trained")."""
    if weights not in ("default", "trained"):
        raise ValueError(f"weights must be 'default' or 'trained', got {weights!r}")
    return TRAINED_WEIGHTS if weights == "trained" and TRAINED_WEIGHTS in directory_listing else WEIGHTS


def load(path_or_url: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         weights: str = "default") -> GOEmbedFusion:
    """The exported model (or training checkpoint) at ``path_or_url`` (local or any fsspec URL), in eval mode.

    ``dtype=None`` keeps the dtype the weights were exported in (fp32 or bf16); pass
    ``torch.float32`` to run a bf16 export in fp32. Storage credentials come from the
    environment (``AWS_*`` for s3://), as everywhere else in this repository.
    """
    if storage.is_local(path_or_url):
        return _load_local(storage.local_path(path_or_url), device, dtype, weights)
    with tempfile.TemporaryDirectory(prefix="goembed-load-") as tmp:
        fs, base = storage.filesystem(path_or_url)
        base = base.rstrip("/")
        listing = {name for name in (MODEL_CONFIG, WEIGHTS, TRAINED_WEIGHTS) if fs.exists(f"{base}/{name}")}
        for name in (MODEL_CONFIG, weights_file(listing, weights)):
            if name not in listing:
                raise ExportFormatError(f"{path_or_url} has no {name}: is it a model export (python -m model_zoo.export)?")
            fs.get(f"{base}/{name}", os.path.join(tmp, name))
        return _load_local(tmp, device, dtype, weights, shown_as=path_or_url)


def _load_local(directory: str, device, dtype, weights: str = "default", shown_as: str | None = None) -> GOEmbedFusion:
    from safetensors.torch import load_file

    shown_as = shown_as or directory
    if not os.path.isdir(directory):
        raise ExportFormatError(f"model directory {shown_as} does not exist")
    listing = set(os.listdir(directory))
    weights_name = weights_file(listing, weights)
    for name in (MODEL_CONFIG, weights_name):
        if name not in listing:
            if MANIFEST in listing:
                hint = (" It is a training checkpoint written before checkpoints carried portable weights: "
                        "add them with `python -m trainer.portable CHECKPOINT_DIR`.")
            elif LATEST in listing or CHECKPOINTS in listing:
                hint = (" It looks like a run or checkpoints directory: pass one checkpoint's directory "
                        "(.../checkpoints/step_00000300) or export it with `python -m model_zoo.export`.")
            else:
                hint = ""
            raise ExportFormatError(f"{shown_as} has no {name}: it is not a model export or checkpoint.{hint}")
    try:  # a truncated or foreign file: one line naming it, not a JSON/safetensors traceback
        with open(os.path.join(directory, MODEL_CONFIG)) as f:
            raw_config = json.load(f)
    except (ValueError, UnicodeDecodeError) as error:
        raise ExportFormatError(f"{shown_as}/{MODEL_CONFIG} is not valid JSON (truncated?): {error}") from None
    try:
        config = model_config_from_dict(raw_config) if isinstance(raw_config, dict) else None
    except (TypeError, ValueError) as error:
        raise ExportFormatError(f"{shown_as}/{MODEL_CONFIG}: {error}") from None
    if config is None:
        raise ExportFormatError(f"{shown_as}/{MODEL_CONFIG} does not hold a JSON object")
    try:
        state = load_file(os.path.join(directory, weights_name), device="cpu")
    except Exception as error:  # safetensors raises its own SafetensorError (and OSError for short files)
        raise ExportFormatError(f"{shown_as}/{weights_name} cannot be read (truncated or not safetensors): "
                                f"{type(error).__name__}: {error}") from None
    model = GOEmbedFusion(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ExportFormatError(f"{shown_as}/{weights_name} does not match its {MODEL_CONFIG}: "
                                f"missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ExportFormatError(f"{shown_as}/{weights_name}: {name} has shape {tuple(tensor.shape)}, "
                                    f"the model expects {tuple(expected[name].shape)}")
    stored = {t.dtype for t in state.values() if t.is_floating_point()}
    target = dtype or (stored.pop() if len(stored) == 1 else torch.float32)
    model.to(dtype=target)
    model.load_state_dict(state, strict=True)  # copies (and casts) into the parameters
    return model.to(device).eval()


__all__ = ["ExportFormatError", "MODEL_CONFIG", "TRAINED_WEIGHTS", "WEIGHTS", "inference_config", "load",
           "model_config_from_dict"]
