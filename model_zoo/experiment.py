"""A small plain-PyTorch fit-and-evaluate loop for experiments and learning tests.

The distributed trainer lives in trainer/; this is the minimum needed to show that a model
learns on one CPU: Adam, gradient clipping, the streaming reader, and a held-out novel-view
evaluation of the deterministic reconstruction mode against a mean-colour baseline.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from data_pipeline.reader import ReaderConfig, StreamingReader
from data_pipeline.synthetic import generate_dataset
from model_zoo.goembedfusion import PSNR_MSE_FLOOR, GOEmbedFusion, Views
from model_zoo.metrics import foreground, hue, psnr


@dataclass
class FitConfig:
    steps: int = 200
    lr: float = 2e-3
    batch_size: int = 4
    context_views: int = 3
    target_views: int = 1
    grad_clip: float = 1.0
    seed: int = 0
    num_workers: int = 0


def fit(model: GOEmbedFusion, train_pattern: str, config: FitConfig, progress: bool = False) -> list[dict[str, float]]:
    """Train ``model`` for ``config.steps`` steps on the shards; returns the metrics of every step."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    reader = StreamingReader(ReaderConfig(
        train_pattern, batch_size=config.batch_size, context_views_min=config.context_views,
        context_views_max=config.context_views, target_views=config.target_views,
        resolution=model.config.encode_resolution, num_workers=config.num_workers, seed=config.seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    model.train()
    history: list[dict[str, float]] = []
    bar = tqdm(total=config.steps, desc=f"fit {model.config.representation}/{model.config.encoder}", disable=not progress)
    start = time.perf_counter()
    while len(history) < config.steps:
        for batch in reader:
            loss, metrics = model(batch, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            history.append({name: float(value) for name, value in metrics.items()})
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
            if len(history) == config.steps:
                break
    bar.close()
    history[-1]["seconds"] = time.perf_counter() - start
    return history


@torch.no_grad()
def evaluate_novel_views(model: GOEmbedFusion, holdout_pattern: str, context_views: int = 3, max_objects: int = 32,
                         seed: int = 0) -> dict[str, float]:
    """Held-out novel-view PSNR of ``model.reconstruct`` from ``context_views`` views, beside the
    PSNR of predicting each object's mean context colour everywhere (a constant image)."""
    model.eval()
    reader = StreamingReader(ReaderConfig(
        holdout_pattern, batch_size=4, context_views_min=context_views, context_views_max=context_views,
        target_views=1, resolution=model.config.encode_resolution, num_workers=0, seed=seed, shuffle=False,
        drop_last=False))
    model_psnr, baseline_psnr, ids, objects = [], [], [], 0
    for batch in reader:
        context = Views.from_batch(batch, "context")
        state = model.reconstruct(context, batch.background)
        height, width = batch.target_images.shape[-2:]
        rendered = model.render(state, batch.target_K, batch.target_c2w, height, width, batch.background)
        target = batch.target_images
        model_psnr += psnr(rendered, target, mse_floor=PSNR_MSE_FLOOR).tolist()
        if context_views:
            mean_colour = batch.context_images.mean(dim=(1, 3, 4), keepdim=True).unsqueeze(1).squeeze(2)
        else:
            mean_colour = torch.full_like(target[:, :, :, :1, :1], 0.5)
        baseline_psnr += psnr(mean_colour.expand_as(target), target, mse_floor=PSNR_MSE_FLOOR).tolist()
        ids += list(batch.object_ids)
        objects += batch.num_objects
        if objects >= max_objects:
            break
    model.train()
    # Per object too (same objects, same context views for every model at the same seed): paired comparisons.
    return {"psnr": sum(model_psnr) / len(model_psnr), "baseline_mean_colour_psnr": sum(baseline_psnr) / len(baseline_psnr),
            "objects": objects, "per_object": dict(zip(ids, model_psnr)),
            "baseline_per_object": dict(zip(ids, baseline_psnr))}


@torch.no_grad()
def evaluate_denoising(model: GOEmbedFusion, holdout_pattern: str, t: int, context_views: int = 3,
                       max_objects: int = 32, seed: int = 0) -> dict[str, float]:
    """Held-out PSNR of one denoising step: ζ̂ = D([ζ_ctx, ζ(x_t)], t) rendered at the noised target view.

    Beside ``reconstruct``'s PSNR at the same view, it shows whether the model reads the noisy
    target evidence (at small t it should beat the reconstruction, which never sees the view)."""
    model.eval()
    reader = StreamingReader(ReaderConfig(
        holdout_pattern, batch_size=4, context_views_min=context_views, context_views_max=context_views,
        target_views=1, resolution=model.config.encode_resolution, num_workers=0, seed=seed, shuffle=False,
        drop_last=False))
    generator = torch.Generator().manual_seed(seed)
    denoised_psnr, objects = [], 0
    for batch in reader:
        context = Views.from_batch(batch, "context")
        target = Views.from_batch(batch, "target")
        steps = torch.full((batch.num_objects,), t, dtype=torch.long)
        height, width = model.encode_shape(*batch.target_images.shape[-2:])
        noisy = model.noisy_target(target, steps, torch.randn(batch.num_objects, 3, height, width, generator=generator))
        state = model.denoise(model.condition(context, noisy, batch.background), steps)
        rendered = model.render(state, batch.target_K, batch.target_c2w, *batch.target_images.shape[-2:], batch.background)
        denoised_psnr += psnr(rendered, target.images, mse_floor=PSNR_MSE_FLOOR).tolist()
        objects += batch.num_objects
        if objects >= max_objects:
            break
    model.train()
    return {"psnr": sum(denoised_psnr) / len(denoised_psnr), "objects": objects, "t": t}


# -- does the reconstruction follow the views' colours? ------------------------------------------
ROTATION = [2, 0, 1]  # new R, G, B = old B, R, G


def colour_follow_batch(directory: str, seed: int = 0):
    """The batch ``colour_follow`` is measured on: 4 synthetic objects (written under ``directory``),
    3 context views and 2 targets at 64 px. One definition, so bench/colour_follow.py and the
    learning test in tests/test_image_colour.py measure the same thing."""
    summary = generate_dataset(directory, objects=8, views=8, resolution=64, seed=seed, holdout_fraction=0.0,
                               workers=1, progress=False)
    return next(iter(StreamingReader(ReaderConfig(summary["train_pattern"], batch_size=4, context_views_min=3,
                                                  context_views_max=3, target_views=2, resolution=64, num_workers=0,
                                                  seed=seed))))


def rotated(batch):
    """The batch with R, G, B of every view rotated (a white background stays white)."""
    return dataclasses.replace(batch, context_images=batch.context_images[:, :, ROTATION],
                               target_images=batch.target_images[:, :, ROTATION])


@torch.no_grad()
def _reconstructed_targets(model: GOEmbedFusion, batch) -> torch.Tensor:
    model.eval()
    context, target = Views.from_batch(batch, "context"), Views.from_batch(batch, "target")
    images = model.render(model.reconstruct(context, batch.background), target.K, target.c2w,
                          *target.images.shape[-2:], batch.background, context)
    model.train()
    return images


def colour_scores(model: GOEmbedFusion, batch, twin) -> dict[str, float]:
    """On the true object's pixels of the target views: ``same`` = mean |render(twin) − render(batch)|,
    ``follows`` = mean |render(twin) − rotate(render(batch))|, the renders' ``hue``, ``truth_hue``, ``psnr``."""
    first, second = _reconstructed_targets(model, batch), _reconstructed_targets(model, twin)
    truth = batch.target_images.flatten(0, 1)
    mask = foreground(truth, batch.background.repeat_interleave(batch.target_images.shape[1], 0))
    pixels = mask.unsqueeze(1).expand(-1, 3, -1, -1)

    def on_object(difference):
        return float(difference.flatten(0, 1).abs()[pixels].mean())

    return {"same": on_object(second - first), "follows": on_object(second - first[:, :, ROTATION]),
            "hue": float(hue(first.flatten(0, 1), mask).mean()), "truth_hue": float(hue(truth, mask).mean()),
            "psnr": float(psnr(first.flatten(0, 1), truth).mean())}


def colour_follow(model: GOEmbedFusion, batch, steps: int, every: int, lr: float = 2e-3, seed: int = 0,
                  report: Callable[[dict], None] | None = None) -> list[dict[str, float]]:
    """Train ``model`` (Adam) alternately on ``batch`` and its :func:`rotated` twin, which differ only
    in colour, so fitting both needs the colour read from the context views; every ``every`` steps
    (and at the end) a row of :func:`colour_scores`. A model that reads colour has ``follows`` well
    below ``same``; one that paints one colouring per shape has ``same`` ≈ 0 (bench/colour_follow.py)."""
    twin = rotated(batch)
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    curve = []
    for step in range(1, steps + 1):
        loss, _ = model((batch, twin)[step % 2], generator=generator)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % every == 0 or step == steps:
            curve.append({"step": step, **{k: round(v, 4) for k, v in colour_scores(model, batch, twin).items()}})
            if report is not None:
                report(curve[-1])
    return curve
