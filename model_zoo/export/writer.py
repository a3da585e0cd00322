"""The export itself: the checkpoint's portable weights, checked against their model config, cast
to the export's dtype and written with the configs and the model card (locally, or uploaded)."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import tempfile
import warnings

import torch
import yaml

from data_pipeline import storage
from model_zoo.checkpoint_layout import MODEL_CARD, MODEL_CONFIG, RUN_CONFIG, TRAINED_WEIGHTS, WEIGHTS
from model_zoo.export.checkpoints import ExportError, fetch_portable_files, read_manifest, resolve_checkpoint
from model_zoo.export.model_card import last_metrics, model_card, run_config_namespace
from model_zoo.goembedfusion import GOEmbedFusion
from model_zoo.loading import model_config_from_dict

EXPORT_FILES = (WEIGHTS, MODEL_CONFIG, RUN_CONFIG, MODEL_CARD)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclasses.dataclass
class ExportResult:
    out_dir: str
    step: int
    weights: str  # "ema" or "trained"
    dtype: str
    zero_stage: int
    world_size: int
    warnings: list[str]
    command: str


def export(source: str, out_dir: str, dtype: str = "fp32", ema: bool = True, force: bool = False,
           command: str | None = None) -> ExportResult:
    """Export the checkpoint ``source`` (see :mod:`model_zoo.export.cli`) to ``out_dir`` (local or any URL)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    command = command or export_command(source, out_dir, dtype, ema)
    checkpoints_url, tag = resolve_checkpoint(source)
    manifest = read_manifest(checkpoints_url, tag)
    step, world_size = int(manifest["step"]), int(manifest["world_size"])
    notes: list[str] = []

    with tempfile.TemporaryDirectory(prefix="goembed-export-") as tmp:
        names = fetch_portable_files(checkpoints_url, tag, manifest, tmp)
        with safe_open(os.path.join(tmp, WEIGHTS), framework="pt") as f:
            stored_kind = (f.metadata() or {}).get("weights", "trained")
        if ema and stored_kind != "ema":
            message = "the run kept no EMA of the weights (optim.ema_decay=0); exporting the trained weights"
            warnings.warn(message, stacklevel=2)
            notes.append(message)
        use_trained = not ema and stored_kind == "ema"
        if use_trained and TRAINED_WEIGHTS not in names:
            raise ExportError(f"checkpoint {checkpoints_url}/{tag} has no {TRAINED_WEIGHTS}: --no-ema cannot be served")
        weights = load_file(os.path.join(tmp, TRAINED_WEIGHTS if use_trained else WEIGHTS), device="cpu")
        kind = "trained" if use_trained else stored_kind
        with open(os.path.join(tmp, MODEL_CONFIG)) as f:
            model_config = model_config_from_dict(json.load(f))
        with open(os.path.join(tmp, RUN_CONFIG)) as f:
            config_text = f.read()
    run_config = run_config_namespace(yaml.safe_load(config_text) or {})
    zero_stage = int(run_config.distributed.zero_stage)

    model = GOEmbedFusion(model_config)  # the export must load into exactly this model
    expected = model.state_dict()
    if set(expected) != set(weights) or any(expected[k].shape != weights[k].shape for k in expected):
        bad = sorted(set(expected) ^ set(weights)) or [k for k in expected if expected[k].shape != weights[k].shape]
        raise ExportError(f"the checkpoint's weights do not fit its own model config (e.g. {bad[:3]})")
    target = DTYPES[dtype]
    tensors = {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in sorted(weights.items())}

    local_out, upload_to = _output_dir(out_dir, force)
    metadata = {"format": "pt", "goembedfusion_export": "1", "step": str(step), "weights": kind, "dtype": dtype,
                "zero_stage": str(zero_stage), "world_size": str(world_size)}
    save_file(tensors, os.path.join(local_out, WEIGHTS), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(os.path.join(local_out, WEIGHTS), 0o666 & ~umask)  # safetensors writes it 0600; share it like the rest
    with open(os.path.join(local_out, MODEL_CONFIG), "w") as f:
        json.dump(dataclasses.asdict(model_config), f, indent=2)
        f.write("\n")
    with open(os.path.join(local_out, RUN_CONFIG), "w") as f:
        f.write(_redacted_config_text(config_text))
    metrics = last_metrics(checkpoints_url, source, run_config.run_dir, step)
    with open(os.path.join(local_out, MODEL_CARD), "w") as f:
        f.write(model_card(run_config, model_config, model, step, kind, dtype, zero_stage, world_size,
                           checkpoints_url, tag, metrics, command, notes))
    if upload_to is not None:
        fs, base = storage.filesystem(upload_to)
        for name in EXPORT_FILES:
            fs.put(os.path.join(local_out, name), f"{base.rstrip('/')}/{name}")
        shutil.rmtree(local_out, ignore_errors=True)
    return ExportResult(out_dir, step, kind, dtype, zero_stage, world_size, notes, command)


def export_command(source: str, out_dir: str, dtype: str, ema: bool) -> str:
    """The command line that makes this export (recorded in the model card)."""
    args = ["python", "-m", "model_zoo.export", source, out_dir]
    if dtype != "fp32":
        args += ["--dtype", dtype]
    if not ema:
        args.append("--no-ema")
    return shlex.join(args)


def _output_dir(out_dir: str, force: bool) -> tuple[str, str | None]:
    """(local directory to write into, URL to upload to afterwards or None)."""
    if not storage.is_local(out_dir):
        if storage.exists(storage.join(out_dir, WEIGHTS)) and not force:
            raise ExportError(f"{out_dir} already holds an export; pass --force to overwrite it")
        return tempfile.mkdtemp(prefix="goembed-export-out-"), out_dir
    path = storage.local_path(out_dir)
    if os.path.isdir(path) and os.listdir(path) and not force:
        raise ExportError(f"{path} exists and is not empty; pass --force to overwrite it")
    if force and os.path.isdir(path):
        for name in os.listdir(path):
            if name in EXPORT_FILES:
                os.remove(os.path.join(path, name))
    os.makedirs(path, exist_ok=True)
    return path, None


def _redacted_config_text(text: str) -> str:
    """The checkpoint's config.yaml as it is, unless something in it still looks like a credential."""
    raw = yaml.safe_load(text) or {}
    if storage.redact(raw) == raw:
        return text
    return "# secrets redacted at export\n" + yaml.safe_dump(storage.redact(raw), sort_keys=False)


__all__ = ["DTYPES", "EXPORT_FILES", "ExportResult", "export", "export_command"]
