"""Turn a training checkpoint into a portable model directory.

    python -m model_zoo.export RUN_DIR_OR_CHECKPOINT OUT_DIR [--dtype fp32|bf16] [--no-ema]

RUN_DIR_OR_CHECKPOINT is a run directory (its ``checkpoints/latest`` is used), a checkpoints
directory (its ``latest``) or one checkpoint's tag directory (``.../step_00000300``), local or
any fsspec URL (s3://...; credentials from the AWS_* environment). A remote checkpoint is
downloaded to a temporary directory first. Every ZeRO stage (0-3) is accepted.

OUT_DIR receives:

    model.safetensors   consolidated weights: the EMA of the weights by default (--no-ema: the
                        trained weights themselves), fp32 or bf16 (--dtype)
    model_config.json   the ModelConfig, what ``model_zoo.load`` builds the model from
    config.yaml         the training run's whole config (credentials removed)
    MODEL_CARD.md       data, steps, last metrics, and the command that made the export

No pickle is written, and none is read beyond ``torch.load(..., weights_only=True)`` of the
checkpoint's files (DeepSpeed's few plain data classes are allow-listed for that).

EMA: the trainer keeps an EMA of whatever each rank holds. Under ZeRO 0-2 that is every whole
parameter (``trainer_rank00000.pt`` has them all); under ZeRO-3 it is each rank's partition
(``param.ds_tensor``): DeepSpeed flattens each parameter, pads it to ``world_size *
ceil(numel / world_size)`` elements and gives rank r the r-th chunk. The export concatenates the
ranks' chunks in rank order, drops the padding and reshapes. If the saved EMA does not have the
shapes that layout predicts, the export falls back to the trained weights with a warning.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import shlex
import shutil
import sys
import tempfile
import threading
import warnings
from datetime import datetime, timezone

import torch
import yaml

from data_pipeline import storage
from model_zoo.goembedfusion import GOEmbedFusion, ModelConfig
from model_zoo.loading import MODEL_CONFIG, WEIGHTS

log = logging.getLogger("model_zoo.export")

MANIFEST = "MANIFEST.json"
LATEST = "latest"
CONFIG = "config.yaml"
MODEL_CARD = "MODEL_CARD.md"
EXPORT_FILES = (WEIGHTS, MODEL_CONFIG, CONFIG, MODEL_CARD)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Parts of the training model that inference does not use (the LPIPS loss network).
TRAINING_ONLY_PREFIXES = ("lpips.",)


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
    if storage.basename(source).startswith("step_"):
        raise ExportError(f"{source} has no {MANIFEST}: that checkpoint was never completed (a crash mid-save?)")
    raise ExportError(f"{source} is not a run directory, a checkpoints directory (with '{LATEST}') "
                      f"or a checkpoint (with {MANIFEST})")


def _parent(url: str) -> str:
    if storage.is_local(url):
        return os.path.dirname(os.path.abspath(storage.local_path(url)))
    return url.rstrip("/").rsplit("/", 1)[0]


def _verify(checkpoints_url: str, tag: str) -> dict:
    from trainer.checkpoint import CheckpointError, Checkpointer
    from trainer.distributed import DistEnv

    try:
        return Checkpointer(checkpoints_url, DistEnv(0, 1, 0, torch.device("cpu"))).verify(tag)
    except CheckpointError as error:
        raise ExportError(str(error)) from None


@contextlib.contextmanager
def local_checkpoint(checkpoints_url: str, tag: str, manifest: dict):
    """A local directory holding ``tag``/ (the checkpoint itself, or a downloaded copy)."""
    if storage.is_local(checkpoints_url):
        yield os.path.abspath(storage.local_path(checkpoints_url))
        return
    fs, base = storage.filesystem(checkpoints_url)
    with tempfile.TemporaryDirectory(prefix="goembed-export-") as tmp:
        for name in manifest["files"]:
            target = os.path.join(tmp, tag, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            fs.get(f"{base.rstrip('/')}/{tag}/{name}", target)
        yield tmp


# -- reading the checkpoint safely ------------------------------------------------------------------


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


def consolidated_state_dict(checkpoints_dir: str, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 weights (and buffers) of a local DeepSpeed checkpoint, any ZeRO stage."""
    tag_dir = os.path.join(checkpoints_dir, tag)
    names = os.listdir(tag_dir)
    model_states = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    if any(name.endswith("optim_states.pt") and "zero_pp_rank_" in name for name in names):
        from deepspeed.utils import zero_to_fp32

        with _PATCH_LOCK:  # zero_to_fp32 reads the files with torch.load(weights_only=False): make it safe
            original = zero_to_fp32.torch
            zero_to_fp32.torch = _SafeTorch()
            try:
                # its progress prints and bars (stdout, stderr) would mix with ours
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(checkpoints_dir, tag)
            except ValueError as error:  # e.g. a bf16 ZeRO-0 run's optimizer files, not ZeRO's layout
                if not os.path.exists(model_states):
                    raise ExportError(f"DeepSpeed cannot consolidate {tag_dir}: {error}") from None
                state = None
            finally:
                zero_to_fp32.torch = original
        if state is not None:
            return {name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in state.items()}
    if os.path.exists(model_states):  # ZeRO-0: the module's own state dict, whole
        module = safe_torch_load(model_states)["module"]
        if any(t.is_floating_point() and t.dtype != torch.float32 for t in module.values()):
            warnings.warn(f"{tag_dir}: no fp32 master weights found; exporting the module's "
                          f"{next(t.dtype for t in module.values() if t.is_floating_point())} weights", stacklevel=2)
        return {name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in module.items()}
    raise ExportError(f"{tag_dir} holds no DeepSpeed model or optimizer states")


def rank_file(rank: int) -> str:
    return f"trainer_rank{rank:05d}.pt"


def reassemble_zero3(name: str, partitions: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """One parameter from its ZeRO-3 partitions (rank order): concatenate, drop the padding, reshape."""
    numel = math.prod(shape)
    chunk = math.ceil(numel / len(partitions))
    for rank, part in enumerate(partitions):
        if part.dim() != 1 or part.numel() != chunk:
            raise ValueError(f"{name}: rank {rank}'s EMA partition has shape {tuple(part.shape)}, "
                             f"expected ({chunk},) for a parameter of shape {tuple(shape)} over {len(partitions)} ranks")
    return torch.cat(partitions)[:numel].reshape(shape)


def ema_state_dict(tag_dir: str, world_size: int, zero_stage: int,
                   shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The EMA of every parameter in ``shapes``, whole. Raises ValueError when it cannot be trusted."""
    if zero_stage < 3:
        ema = safe_torch_load(os.path.join(tag_dir, rank_file(0)))["ema"]
        if ema is None:
            raise ValueError("the run kept no EMA (optim.ema_decay=0)")
        out = {}
        for name, shape in shapes.items():
            if name not in ema:
                raise ValueError(f"the EMA has no {name}")
            if ema[name].shape != shape:
                raise ValueError(f"EMA {name} has shape {tuple(ema[name].shape)}, the weights {tuple(shape)}")
            out[name] = ema[name].float()
        return out
    emas = [safe_torch_load(os.path.join(tag_dir, rank_file(rank)))["ema"] for rank in range(world_size)]
    if any(ema is None for ema in emas):
        raise ValueError("the run kept no EMA (optim.ema_decay=0)")
    out = {}
    for name, shape in shapes.items():
        missing = [rank for rank, ema in enumerate(emas) if name not in ema]
        if missing:
            raise ValueError(f"the EMA of rank {missing[0]} has no {name}")
        out[name] = reassemble_zero3(name, [ema[name].float() for ema in emas], shape)
    return out


# -- the export -----------------------------------------------------------------------------------


def export(source: str, out_dir: str, dtype: str = "fp32", ema: bool = True, force: bool = False,
           command: str | None = None) -> ExportResult:
    """Export the checkpoint ``source`` (see the module docstring) to ``out_dir`` (local or any URL)."""
    from safetensors.torch import save_file

    from trainer.config import load_config

    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    command = command or _command(source, out_dir, dtype, ema)
    checkpoints_url, tag = resolve_checkpoint(source)
    manifest = _verify(checkpoints_url, tag)
    world_size = manifest["world_size"]
    notes: list[str] = []

    with local_checkpoint(checkpoints_url, tag, manifest) as local_dir:
        tag_dir = os.path.join(local_dir, tag)
        config_path = os.path.join(tag_dir, CONFIG)
        config_log = logging.getLogger("trainer.config")
        level = config_log.level  # its "field was redacted" warnings are about resuming, not exporting
        config_log.setLevel(logging.ERROR)
        try:
            run_config = load_config(config_path)
        finally:
            config_log.setLevel(level)
        with open(config_path) as f:
            config_text = f.read()
        zero_stage = run_config.distributed.zero_stage
        trainer_state = safe_torch_load(os.path.join(tag_dir, rank_file(0)))
        step = int(trainer_state["step"])

        weights = consolidated_state_dict(local_dir, tag)
        weights = {k: v for k, v in weights.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
        kind = "trained"
        if ema:
            try:
                averaged = ema_state_dict(tag_dir, world_size, zero_stage, {k: v.shape for k, v in weights.items()})
                weights = {**weights, **averaged}  # buffers (if any) come from the consolidated weights
                kind = "ema"
            except ValueError as error:
                message = (f"the EMA weights could not be used ({error}); exporting the trained weights "
                           f"instead (as with --no-ema)")
                warnings.warn(message, stacklevel=2)
                notes.append(message)

    model_config = dataclasses.replace(run_config.model, lpips_weight=0.0, lpips_weights_path=None)
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
