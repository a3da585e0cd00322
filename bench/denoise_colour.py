"""How much of x_t does the denoiser keep? x̂₀ of noised held-out views, per noise level.

    OMP_NUM_THREADS=1 python bench/denoise_colour.py EXPORT [EXPORT ...] --data 'data/synthetic_long/holdout-*.tar'

For each exported model and each held-out object, one stored view (the first) is resized to the
model's encode resolution, noised to x_t at each of ``--timesteps`` (the same noise for every
model: paired), and denoised unconditionally — exactly the ``model(x_t, t) -> x̂₀`` a sampler
calls (``GOEmbedFusion.x0_predictor``, no context views). Per t it reports, on the true view's
object pixels:

* ``psnr``: x̂₀ against x₀ (dB, the [0, 1] image);
* ``hue`` of x̂₀ and ``truth_hue`` of x₀ (model_zoo.metrics.hue);
* ``chroma_slope``: the least-squares slope of x̂₀'s mean chroma (its mean RGB less the mean of
  the three, one 3-vector per object) on x₀'s, through the origin. An ideal denoiser's slope
  rises from ~0 at t = T−1 (nothing is known) to 1 at t = 0 (x_t is x₀); an unconditional sample
  can only become colourful if the slope is well above 0 at the middle noise levels, where the
  sampler decides what it draws.

Why: an unconditional sample's colour must come from x_t; the README ("Unconditional colour")
measured this on the long runs. Prints one JSON line: {"models": [{"model", "rows": [...]}, ...]}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model_zoo.evaluate import iter_objects
from model_zoo.goembedfusion import GOEmbedFusion, Views
from model_zoo.loading import load
from model_zoo.metrics import chroma_slope, foreground, hue, mean_chroma, psnr


@torch.no_grad()
def measure(model: GOEmbedFusion, objects: list, timesteps: list[int], seed: int) -> list[dict]:
    """Rows per t over ``objects``: (index, images (V, 3, H, W), K, c2w, background) as stored."""
    per_t = {t: {"psnr": [], "hue": [], "made": []} for t in timesteps}
    truth_hue, true = [], []
    for index, images, K, c2w, background in objects:
        view = Views(images[:1][None], K[:1][None], c2w[:1][None]).resized(model.config.encode_resolution)
        clean = view.images[:, 0]  # (1, 3, h, w) in [0, 1]
        mask = foreground(clean, background[None])
        truth_hue.append(float(hue(clean, mask)[0]))
        true.append(mean_chroma(clean, mask))
        predict = model.x0_predictor(view.K[:, 0], view.c2w[:, 0], background[None])
        for t in timesteps:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index * 1009 + t)  # same noise per model
            x_t = model.schedule.q_sample(clean * 2 - 1, torch.tensor([t]), torch.randn(clean.shape, generator=generator))
            made = (predict(x_t, t).float().clamp(-1, 1) + 1) / 2
            row = per_t[t]
            row["psnr"].append(float(psnr(made, clean, mse_floor=1e-10)[0]))
            row["hue"].append(float(hue(made, mask)[0]))
            row["made"].append(mean_chroma(made, mask))
    true_chroma = torch.cat(true)
    return [{"t": t, "psnr": float(np.mean(row["psnr"])), "hue": float(np.nanmean(row["hue"])),
             "truth_hue": float(np.nanmean(truth_hue)), "chroma_slope": chroma_slope(true_chroma, torch.cat(row["made"]))}
            for t, row in per_t.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="exported models (python -m model_zoo.export)")
    parser.add_argument("--data", required=True, help="held-out shards (glob or fsspec URL)")
    parser.add_argument("--objects", type=int, default=24, help="held-out objects (the first ones)")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[0, 100, 300, 500, 700, 900, 999])
    parser.add_argument("--weights", choices=("default", "trained"), default="default",
                        help="default: the EMA where there is one; trained: the optimiser's weights")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # Read once for every model; each resizes the views to its own encode resolution.
    objects = [(index, images, K, c2w, background)
               for index, (_, images, K, c2w, background) in enumerate(iter_objects(args.data, None, args.objects))]
    results = []
    for path in args.models:
        model = load(path, weights=args.weights)
        results.append({"model": path, "weights": args.weights, "objects": len(objects),
                        "rows": measure(model, objects, args.timesteps, args.seed)})
    print(json.dumps({"models": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
