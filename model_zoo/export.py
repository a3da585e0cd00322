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

So this module needs neither DeepSpeed nor anything in ``trainer/``. A checkpoint written before
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
import dataclasses
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import warnings
from types import SimpleNamespace
from datetime import datetime, timezone

import torch
import yaml

from data_pipeline import storage
from model_zoo.goembedfusion import GOEmbedFusion, ModelConfig
from model_zoo.loading import MODEL_CONFIG, TRAINED_WEIGHTS, WEIGHTS, model_config_from_dict

log = logging.getLogger("model_zoo.export")

MANIFEST = "MANIFEST.json"
LATEST = "latest"
CONFIG = "config.yaml"
MODEL_CARD = "MODEL_CARD.md"
EXPORT_FILES = (WEIGHTS, MODEL_CONFIG, CONFIG, MODEL_CARD)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Files that only a checkpoint directory has (what tells a step directory from anything else).
CHECKPOINT_MARKERS = ("trainer_rank00000.pt", "mp_rank_00_model_states.pt", TRAINED_WEIGHTS)


class ExportError(RuntimeError):
    """A checkpoint that cannot be exported; the message says why."""


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


# -- finding the checkpoint -----------------------------------------------------------------------


def resolve_checkpoint(source: str) -> tuple[str, str]:
    """(checkpoints directory URL, tag) for a run dir, a checkpoints dir or a tag dir."""
    source = source.rstrip("/") or source
    if storage.is_local(source):
        source = os.path.abspath(storage.local_path(source))

    def has(name: str, base: str = source) -> bool:
        return storage.exists(storage.join(base, name))

    def latest_of(directory: str) -> str:
        with storage.open_url(storage.join(directory, LATEST), "rb") as f:
            tag = f.read().decode().strip()
        if not tag:
            raise ExportError(f"{storage.join(directory, LATEST)} is empty")
        return tag

    if has(MANIFEST):  # a tag directory
        return _parent(source), storage.basename(source)
    # A step directory whose save never completed: refuse it here, before the branches below could
    # find some other checkpoint (its config.yaml names the run's checkpoint.dir) and export that.
    if storage.basename(source).startswith("step_") or any(has(name) for name in CHECKPOINT_MARKERS):
        raise ExportError(f"{source} has no {MANIFEST}: that checkpoint was never completed (a crash mid-save?); "
                          f"refusing to export it or any other step in its place")
    if has(LATEST):  # a checkpoints directory
        return source, latest_of(source)
    checkpoints = storage.join(source, "checkpoints")
    if has(LATEST, checkpoints):  # a run directory with its checkpoints inside
        return checkpoints, latest_of(checkpoints)
    if has(CONFIG):  # a run directory whose checkpoint.dir points elsewhere
        with storage.open_url(storage.join(source, CONFIG), "r") as f:
            elsewhere = ((yaml.safe_load(f) or {}).get("checkpoint") or {}).get("dir")
        if elsewhere and storage.exists(storage.join(elsewhere, LATEST)):
            return elsewhere.rstrip("/"), latest_of(elsewhere.rstrip("/"))
    raise ExportError(f"{source} is not a run directory, a checkpoints directory (with '{LATEST}') "
                      f"or a checkpoint (with {MANIFEST})")


def _parent(url: str) -> str:
    if storage.is_local(url):
        return os.path.dirname(os.path.abspath(storage.local_path(url)))
    return url.rstrip("/").rsplit("/", 1)[0]


def read_manifest(checkpoints_url: str, tag: str) -> dict:
    """The manifest of ``tag`` after checking the files the export reads exist with their sizes."""
    fs, base = storage.filesystem(checkpoints_url)
    base = f"{base.rstrip('/')}/{tag}"
    if not fs.exists(f"{base}/{MANIFEST}"):
        raise ExportError(f"checkpoint {checkpoints_url}/{tag} has no {MANIFEST}: it was never completed")
    with fs.open(f"{base}/{MANIFEST}", "rb") as f:
        manifest = json.loads(f.read().decode())
    if WEIGHTS not in manifest["files"] or MODEL_CONFIG not in manifest["files"]:
        location = f"{checkpoints_url}/{tag}"
        raise ExportError(f"checkpoint {location} has no portable weights ({WEIGHTS}, {MODEL_CONFIG}): it was "
                          f"written before checkpoints carried them. Add them with `python -m trainer.portable "
                          f"{location}` (local checkpoints; copy a remote one first), then export again")
    for name in (WEIGHTS, TRAINED_WEIGHTS, MODEL_CONFIG, CONFIG):
        if name not in manifest["files"]:
            continue
        path = f"{base}/{name}"
        if not fs.exists(path):
            raise ExportError(f"checkpoint {checkpoints_url}/{tag} is missing {name} (listed in its manifest)")
        if fs.size(path) != manifest["files"][name]:
            raise ExportError(f"checkpoint {checkpoints_url}/{tag}: {name} has {fs.size(path)} bytes, "
                              f"the manifest says {manifest['files'][name]}")
    return manifest


def _fetch(checkpoints_url: str, tag: str, names: list[str], into: str) -> None:
    fs, base = storage.filesystem(checkpoints_url)
    for name in names:
        fs.get(f"{base.rstrip('/')}/{tag}/{name}", os.path.join(into, name))


# -- the export -----------------------------------------------------------------------------------


def export(source: str, out_dir: str, dtype: str = "fp32", ema: bool = True, force: bool = False,
           command: str | None = None) -> ExportResult:
    """Export the checkpoint ``source`` (see the module docstring) to ``out_dir`` (local or any URL)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    command = command or _command(source, out_dir, dtype, ema)
    checkpoints_url, tag = resolve_checkpoint(source)
    manifest = read_manifest(checkpoints_url, tag)
    step, world_size = int(manifest["step"]), int(manifest["world_size"])
    notes: list[str] = []

    with tempfile.TemporaryDirectory(prefix="goembed-export-") as tmp:
        names = [name for name in (WEIGHTS, TRAINED_WEIGHTS, MODEL_CONFIG, CONFIG) if name in manifest["files"]]
        _fetch(checkpoints_url, tag, names, tmp)
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
        with open(os.path.join(tmp, CONFIG)) as f:
            config_text = f.read()
    run_config = _namespace(yaml.safe_load(config_text) or {})
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
    with open(os.path.join(local_out, CONFIG), "w") as f:
        f.write(_redacted_config_text(config_text))
    metrics = _last_metrics(checkpoints_url, source, run_config.run_dir, step)
    with open(os.path.join(local_out, MODEL_CARD), "w") as f:
        f.write(_model_card(run_config, model_config, model, step, kind, dtype, zero_stage, world_size,
                            checkpoints_url, tag, metrics, command, notes))
    if upload_to is not None:
        fs, base = storage.filesystem(upload_to)
        for name in EXPORT_FILES:
            fs.put(os.path.join(local_out, name), f"{base.rstrip('/')}/{name}")
        shutil.rmtree(local_out, ignore_errors=True)
    return ExportResult(out_dir, step, kind, dtype, zero_stage, world_size, notes, command)


def _namespace(value):
    """The saved run config (plain YAML) with attribute access, for the model card."""
    if isinstance(value, dict):
        return SimpleNamespace(**{str(k): _namespace(v) for k, v in value.items()})
    return value


def _command(source: str, out_dir: str, dtype: str, ema: bool) -> str:
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


def _last_metrics(checkpoints_url: str, source: str, run_dir: str, step: int) -> dict | None:
    """The last metrics.jsonl record at or before ``step``, from the run directory if it can be found."""
    candidates = [source.rstrip("/"), _parent(checkpoints_url), run_dir]
    for directory in candidates:
        url = storage.join(directory, "metrics.jsonl")
        try:
            if not storage.exists(url):
                continue
            with storage.open_url(url, "r") as f:
                records = [json.loads(line) for line in f if line.strip()]
        except Exception:  # the card is still useful without metrics
            continue
        records = [r for r in records if r.get("step", 0) <= step]
        if records:
            return {"source": url, "record": records[-1], "first": records[0]}
    return None


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def _model_card(run_config, model_config: ModelConfig, model: GOEmbedFusion, step: int, kind: str, dtype: str,
                zero_stage: int, world_size: int, checkpoints_url: str, tag: str, metrics: dict | None,
                command: str, notes: list[str]) -> str:
    data, optim, dist = run_config.data, run_config.optim, run_config.distributed
    parameters = sum(p.numel() for p in model.parameters())
    lines = [
        f"# GOEmbedFusion — {model_config.preset} {model_config.representation} ({parameters:,} parameters)",
        "",
        "Exported from a training checkpoint of this repository's trainer. Load it with:",
        "",
        "```python",
        "import model_zoo",
        "model = model_zoo.load(\"PATH_OR_URL_OF_THIS_DIRECTORY\")   # eval mode, on the CPU",
        "```",
        "",
        "## Weights",
        "",
        f"- **{('EMA of the weights (decay ' + _fmt(optim.ema_decay) + ')') if kind == 'ema' else 'trained weights (no EMA)'}**, "
        f"stored as {dtype} in `{WEIGHTS}` (safetensors; no pickle anywhere in this directory)",
        f"- checkpoint `{tag}` of `{checkpoints_url}`, step **{step}** of {run_config.train.max_steps} planned",
        f"- trained with DeepSpeed ZeRO-{zero_stage} on {world_size} rank(s), {dist.precision}, "
        f"gradient accumulation {dist.gradient_accumulation_steps}",
    ]
    lines += [f"- note: {note}" for note in notes]
    lines += [
        "",
        "## Model",
        "",
        f"- preset `{model_config.preset}`, representation `{model_config.representation}`, encoder "
        f"`{model_config.encoder}` (normalisation `{model_config.goembed_normalisation}`), encode resolution "
        f"{model_config.encode_resolution}, {model_config.num_timesteps} diffusion timesteps",
        f"- state shape {list(model.representation.state_shape)}; full settings in `{MODEL_CONFIG}`, the whole "
        f"training run's config in `{CONFIG}`",
        "",
        "## Data",
        "",
        f"- training shards: `{data.train_urls}`",
        f"- held-out shards: `{data.holdout_urls}`",
        f"- views at {data.resolution if data.resolution else 'stored'} px, {data.context_views_min}–"
        f"{data.context_views_max} context views and {data.target_views} target view(s) per object, "
        f"{data.batch_size} objects per rank per micro-batch",
        "",
        "## Training",
        "",
        f"- AdamW, peak lr {_fmt(optim.lr)} (warm-up {optim.lr_warmup_steps} steps, cosine to ×{_fmt(optim.lr_min_ratio)}), "
        f"weight decay {_fmt(optim.weight_decay)}, gradient clipping {_fmt(optim.grad_clip)}, seed {run_config.train.seed}",
        "",
        "## Metrics",
        "",
    ]
    if metrics is None:
        lines.append("No metrics.jsonl was found beside the checkpoint.")
    else:
        record, first = metrics["record"], metrics["first"]
        lines.append(f"From `{metrics['source']}`, the last record at or before step {step} (step {record.get('step')}):")
        lines.append("")
        lines.append("| metric | value | at the first logged step |")
        lines.append("|---|---|---|")
        for key in ("loss", "target_mse", "context_mse", "psnr_target", "lpips", "lr", "grad_norm", "nonfinite_steps",
                    "objects_per_s", "rays_per_s", "epoch"):
            if key in record:
                lines.append(f"| {key} | {_fmt(record[key])} | {_fmt(first.get(key, ''))} |")
    lines += [
        "",
        "## Provenance",
        "",
        f"Exported {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} with:",
        "",
        "```bash",
        command,
        "```",
        "",
    ]
    return "\n".join(lines)


# -- command line -------------------------------------------------------------------------------


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


if __name__ == "__main__":
    sys.exit(main())
