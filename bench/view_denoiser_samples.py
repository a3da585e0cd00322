"""Where an unconditional sample's colour goes, for a model with ``image_colour_view_denoiser``.

    OMP_NUM_THREADS=1 python bench/view_denoiser_samples.py EXPORT --data 'data/synthetic_long/holdout-*.tar' \
        --out grid.png [--objects 8 --steps 25]

For the first ``--objects`` held-out objects, at a held-out view's camera (chosen as
``model_zoo.evaluate`` does), one row each: the true view | the image the sampler made (DDIM) |
the sample rendered there | a sample of the view denoiser alone, run as a 2D diffusion model
(same steps) — so the 2D prior's colour can be told from what the 3D sampling keeps of it. Prints
one JSON line: each column's mean chroma, mean |c − mean_RGB(c)| over all pixels (0 for grey).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # not bench/data_pipeline.py

import model_zoo
from model_zoo.evaluate import _object_rng, iter_objects
from model_zoo.samplers import get_sampler


def chroma(images: torch.Tensor) -> float:
    """Mean |c − mean_RGB(c)| of images (..., 3, H, W) in [0, 1]."""
    return (images - images.mean(-3, keepdim=True)).abs().mean().item()


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an export (model_zoo.load) with image_colour_view_denoiser")
    parser.add_argument("--data", required=True, help="held-out shards (URL pattern)")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--objects", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model = model_zoo.load(args.model).eval()
    if model.view_denoiser is None:
        parser.error(f"{args.model} has no view denoiser (model.image_colour_view_denoiser: false)")
    width = model.config.encode_resolution
    scale = torch.tensor([width / args.resolution, width / args.resolution, 1.0]).view(3, 1)

    def view_only(x_t, t):  # the 2D network alone as the sampler's model
        steps = torch.full((x_t.shape[0],), int(t), dtype=torch.long)
        return model.view_denoiser(x_t, steps, model.schedule.alpha_bar(steps))

    rows, columns = [], {"truth": [], "made": [], "render": [], "view_denoiser_alone": []}
    for n, (object_id, images, K, c2w, background) in enumerate(iter_objects(args.data, args.resolution, args.objects)):
        view = _object_rng(args.seed, object_id).permutation(images.shape[0])[3]
        generator = torch.Generator().manual_seed(args.seed * 100_003 + n)
        state, sources = model.sample(K[view][None] * scale, c2w[view][None], background[None], steps=args.steps,
                                      sampler="ddim", generator=generator, return_sources=True)
        render = model.render(state, K[view][None, None], c2w[view][None, None], args.resolution, args.resolution,
                              background[None], sources=sources)[0, 0]
        noise = torch.randn(1, 3, width, width, generator=generator)
        alone = get_sampler("ddim")(view_only, noise, model.schedule.ddim_timesteps(args.steps), model.schedule)
        row = {"truth": images[view], "made": sources[-1].images[0, 0], "render": render,
               "view_denoiser_alone": ((alone[0].clamp(-1, 1) + 1) / 2)}
        for name, image in row.items():
            columns[name].append(chroma(image))
        rows.append(torch.cat([F.interpolate(image[None], size=args.resolution)[0] for image in row.values()], 2))
        if len(rows) == args.objects:
            break
    grid = torch.cat(rows, 1).clamp(0, 1).permute(1, 2, 0).numpy()
    Image.fromarray((grid * 255).round().astype(np.uint8)).save(args.out)
    result = {"objects": len(rows), "steps": args.steps, **{f"chroma_{k}": round(float(np.mean(v)), 4) for k, v in columns.items()}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
