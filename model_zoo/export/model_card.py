"""The export's MODEL_CARD.md: data, steps, last metrics, and the command that made the export."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from types import SimpleNamespace

from data_pipeline import storage
from model_zoo.checkpoint_layout import METRICS, MODEL_CONFIG, RUN_CONFIG, WEIGHTS
from model_zoo.export.checkpoints import parent_url
from model_zoo.goembedfusion import GOEmbedFusion, ModelConfig

# The metrics the card shows, in this order, where the run logged them.
CARD_METRICS = ("loss", "target_mse", "context_mse", "psnr_target", "lpips", "lr", "grad_norm", "nonfinite_steps",
                "objects_per_s", "rays_per_s", "epoch")


def run_config_namespace(value):
    """The saved run config (plain YAML) with attribute access, for the model card."""
    if isinstance(value, dict):
        return SimpleNamespace(**{str(k): run_config_namespace(v) for k, v in value.items()})
    return value


def last_metrics(checkpoints_url: str, source: str, run_dir: str, step: int) -> dict | None:
    """The last metrics.jsonl record at or before ``step``, from the run directory if it can be found."""
    candidates = [source.rstrip("/"), parent_url(checkpoints_url), run_dir]
    for directory in candidates:
        url = storage.join(directory, METRICS)
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


def model_card(run_config, model_config: ModelConfig, model: GOEmbedFusion, step: int, kind: str, dtype: str,
               zero_stage: int, world_size: int, checkpoints_url: str, tag: str, metrics: dict | None,
               command: str, notes: list[str]) -> str:
    """The card's Markdown. ``run_config``: :func:`run_config_namespace` of the checkpoint's config.yaml."""
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
        f"training run's config in `{RUN_CONFIG}`",
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
        lines.append(f"No {METRICS} was found beside the checkpoint.")
    else:
        record, first = metrics["record"], metrics["first"]
        lines.append(f"From `{metrics['source']}`, the last record at or before step {step} (step {record.get('step')}):")
        lines.append("")
        lines.append("| metric | value | at the first logged step |")
        lines.append("|---|---|---|")
        for key in CARD_METRICS:
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


__all__ = ["CARD_METRICS", "last_metrics", "model_card", "run_config_namespace"]
