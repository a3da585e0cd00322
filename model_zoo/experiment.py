"""A small plain-PyTorch fit-and-evaluate loop for experiments and learning tests.

The distributed trainer lives in trainer/; this is the minimum needed to show that a model
learns on one CPU: Adam, gradient clipping, the streaming reader, and a held-out novel-view
evaluation of the deterministic reconstruction mode against a mean-colour baseline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from data_pipeline.reader import ReaderConfig, StreamingReader
from model_zoo.goembedfusion import PSNR_MSE_FLOOR, GOEmbedFusion, Views
from model_zoo.metrics import psnr


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
