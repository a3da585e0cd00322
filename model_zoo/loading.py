"""Load an exported GOEmbedFusion model directory (see ``model_zoo/export.py``).

    import model_zoo
    model = model_zoo.load("exports/tiny")               # or "s3://bucket/exports/tiny"
    state = model.reconstruct(context_views, background)

An export holds ``model.safetensors`` (weights), ``model_config.json`` (the ``ModelConfig``),
``config.yaml`` (the training run's config) and ``MODEL_CARD.md``. Loading reads only the first
two: safetensors and JSON, never a pickle, so an export from an untrusted source cannot run code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import torch

from data_pipeline import storage
from model_zoo.goembedfusion import GOEmbedFusion, ModelConfig

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"


class ExportFormatError(ValueError):
    """A directory that is not a usable model export; the message says what is wrong."""


def model_config_from_dict(raw: dict) -> ModelConfig:
    """A :class:`ModelConfig` from ``model_config.json``'s contents (unknown keys are an error)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ExportFormatError(f"{MODEL_CONFIG} has unknown fields {unknown}: written by a newer version of this code?")
    return ModelConfig(**raw)


def load(path_or_url: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> GOEmbedFusion:
    """The exported model at ``path_or_url`` (local directory or any fsspec URL), in eval mode.

    ``dtype=None`` keeps the dtype the weights were exported in (fp32 or bf16); pass
    ``torch.float32`` to run a bf16 export in fp32. Storage credentials come from the
    environment (``AWS_*`` for s3://), as everywhere else in this repository.
    """
    if storage.is_local(path_or_url):
        return _load_local(storage.local_path(path_or_url), device, dtype)
    with tempfile.TemporaryDirectory(prefix="goembed-load-") as tmp:
        fs, base = storage.filesystem(path_or_url)
        base = base.rstrip("/")
        for name in (MODEL_CONFIG, WEIGHTS):
            if not fs.exists(f"{base}/{name}"):
                raise ExportFormatError(f"{path_or_url} has no {name}: is it a model export (python -m model_zoo.export)?")
            fs.get(f"{base}/{name}", os.path.join(tmp, name))
        return _load_local(tmp, device, dtype, shown_as=path_or_url)


def _load_local(directory: str, device, dtype, shown_as: str | None = None) -> GOEmbedFusion:
    from safetensors.torch import load_file

    shown_as = shown_as or directory
    if not os.path.isdir(directory):
        raise ExportFormatError(f"model directory {shown_as} does not exist")
    for name in (MODEL_CONFIG, WEIGHTS):
        if not os.path.isfile(os.path.join(directory, name)):
            hint = (" It looks like a training checkpoint: export it first with "
                    "`python -m model_zoo.export CHECKPOINT OUT_DIR`."
                    if os.path.exists(os.path.join(directory, "MANIFEST.json"))
                    or os.path.exists(os.path.join(directory, "latest"))
                    or os.path.exists(os.path.join(directory, "checkpoints")) else "")
            raise ExportFormatError(f"{shown_as} has no {name}: it is not a model export.{hint}")
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
        state = load_file(os.path.join(directory, WEIGHTS), device="cpu")
    except Exception as error:  # safetensors raises its own SafetensorError (and OSError for short files)
        raise ExportFormatError(f"{shown_as}/{WEIGHTS} cannot be read (truncated or not safetensors): "
                                f"{type(error).__name__}: {error}") from None
    model = GOEmbedFusion(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ExportFormatError(f"{shown_as}/{WEIGHTS} does not match its {MODEL_CONFIG}: "
                                f"missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ExportFormatError(f"{shown_as}/{WEIGHTS}: {name} has shape {tuple(tensor.shape)}, "
                                    f"the model expects {tuple(expected[name].shape)}")
    stored = {t.dtype for t in state.values() if t.is_floating_point()}
    target = dtype or (stored.pop() if len(stored) == 1 else torch.float32)
    model.to(dtype=target)
    model.load_state_dict(state, strict=True)  # copies (and casts) into the parameters
    return model.to(device).eval()


__all__ = ["ExportFormatError", "MODEL_CONFIG", "WEIGHTS", "load", "model_config_from_dict"]
