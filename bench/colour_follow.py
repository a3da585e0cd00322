"""Does the reconstruction follow the views' colours? One batch and its RGB-permuted twin.

    OMP_NUM_THREADS=2 python bench/colour_follow.py                       # the default model
    OMP_NUM_THREADS=2 python bench/colour_follow.py model.encoder=unprojection --steps 600

A fresh model (the default ``ModelConfig`` plus ``model.*`` overrides) is trained in
reconstruction mode on two batches that differ only in colour: one batch of synthetic objects
(3 context views, 2 targets) and the same batch with R, G, B of every view rotated (the white
background stays white). Shapes and cameras are identical, so the only way to fit both is to
read the colour from the context views. Every ``--every`` steps it renders both batches' target
views from their reconstructions and reports, on the true object's pixels:

* ``same``: mean |render(twin) − render(batch)| — ~0 when the model paints one colouring per shape;
* ``follows``: mean |render(twin) − rotate(render(batch))| — ~0 when it follows the views' colours;
* ``hue`` of the renders and ``truth_hue`` (model_zoo.metrics.hue).

A model that reads colour has ``follows`` well below ``same``. Measured (600 steps, 1 thread, ~2-3
minutes): ``same`` 0.001 and ``follows`` 0.065 with the default GOEmbed model, 0.005 and 0.059
with ``model.encoder=unprojection``: it fits one compromise colouring per shape (README, "Colour:
where it is lost"). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # not bench/data_pipeline.py

from data_pipeline.reader import ReaderConfig, StreamingReader
from data_pipeline.synthetic import generate_dataset
from model_zoo.goembedfusion import GOEmbedFusion, ModelConfig, Views
from model_zoo.metrics import foreground, hue, psnr
from trainer.config import ConfigError, apply_override

ROTATION = [2, 0, 1]  # new R, G, B = old B, R, G


def model_config(overrides: list[str]) -> ModelConfig:
    raw: dict = {"model": {"reconstruction_prob": 1.0, "context_dropout": 0.0}}
    for override in overrides:
        if not override.startswith("model."):
            raise ConfigError(f"only model.* overrides apply here, got {override!r}")
        apply_override(raw, override)
    return ModelConfig(**raw["model"])


@torch.no_grad()
def renders(model: GOEmbedFusion, batch) -> torch.Tensor:
    model.eval()
    context, target = Views.from_batch(batch, "context"), Views.from_batch(batch, "target")
    images = model.render(model.reconstruct(context, batch.background), target.K, target.c2w,
                          *target.images.shape[-2:], batch.background, context)
    model.train()
    return images


def scores(model: GOEmbedFusion, batch, twin) -> dict:
    first, second = renders(model, batch), renders(model, twin)
    truth = batch.target_images.flatten(0, 1)
    mask = foreground(truth, batch.background.repeat_interleave(batch.target_images.shape[1], 0))
    pixels = mask.unsqueeze(1).expand(-1, 3, -1, -1)

    def on_object(difference):
        return float(difference.flatten(0, 1).abs()[pixels].mean())

    return {"same": on_object(second - first), "follows": on_object(second - first[:, :, ROTATION]),
            "hue": float(hue(first.flatten(0, 1), mask).mean()), "truth_hue": float(hue(truth, mask).mean()),
            "psnr": float(psnr(first.flatten(0, 1), truth).mean())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Any model.KEY=VALUE override (e.g. model.encoder=unprojection) changes the model.")
    parser.add_argument("overrides", nargs="*", help="model.KEY=VALUE")
    parser.add_argument("--steps", type=int, default=600, help="training steps (alternating the two batches)")
    parser.add_argument("--every", type=int, default=100, help="report every this many steps")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (the default run's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        config = model_config(args.overrides)
    except (ConfigError, ValueError) as error:
        parser.error(str(error).splitlines()[0])
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="colour-follow-") as work:
        summary = generate_dataset(work, objects=8, views=8, resolution=64, seed=args.seed, holdout_fraction=0.0,
                                   workers=1, progress=False)
        reader = StreamingReader(ReaderConfig(summary["train_pattern"], batch_size=4, context_views_min=3,
                                              context_views_max=3, target_views=2, resolution=64, num_workers=0,
                                              seed=args.seed))
        batch = next(iter(reader))
    twin = dataclasses.replace(batch, context_images=batch.context_images[:, :, ROTATION],
                               target_images=batch.target_images[:, :, ROTATION])
    model = GOEmbedFusion(config)
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    curve = []
    for step in range(1, args.steps + 1):
        loss, _ = model((batch, twin)[step % 2], generator=generator)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % args.every == 0 or step == args.steps:
            curve.append({"step": step, **{k: round(v, 4) for k, v in scores(model, batch, twin).items()}})
            print(f"step {step}: {curve[-1]}", file=sys.stderr, flush=True)
    print(json.dumps({"bench": "colour_follow", "overrides": args.overrides, "steps": args.steps, "lr": args.lr,
                      "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - start, 1),
                      "final": curve[-1], "curve": curve}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
