"""A picture of what a model does on held-out objects: reconstruction, conditional and unconditional samples.

    OMP_NUM_THREADS=1 python bench/sample_grid.py exports/tiny --data 'data/synthetic/holdout-*.tar' --out grid.png

One row per object (the first ``--objects`` in shard order): its 3 context views | the true
held-out view | ``reconstruct`` from the context | a conditional sample (on the 3 views) | an
unconditional sample — all three rendered at the held-out view's camera. With ``--made-views N``
the unconditional sample makes N images (``GOEmbedFusion.sample_views``: the held-out view's
camera, then others spread round the object), and one more column shows it from the camera
farthest from the held-out view: the side a single made image does not see. Views and noise come
from (seed, object id), as in ``model_zoo.evaluate``.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # not bench/data_pipeline.py

from model_zoo.evaluate import _object_rng, iter_objects
from model_zoo.goembedfusion import Views
from model_zoo.rays import spread_cameras


@torch.no_grad()
def rows(model, data: str, objects: int, resolution: int, steps: int, sampler: str, seed: int,
         made_views: int = 1, noisy_skip_level: int | None = None) -> list[list[torch.Tensor]]:
    out = []
    sample_width = model.config.encode_resolution
    for object_id, images, K, c2w, background in iter_objects(data, resolution, objects):
        rng = _object_rng(seed, object_id)
        chosen = rng.permutation(images.shape[0])
        ctx, view = chosen[:3], chosen[3]
        made = chosen[3:][spread_cameras(c2w[chosen[3:]], made_views)]  # the held-out view first, then spread
        context = Views(images[ctx][None], K[ctx][None], c2w[ctx][None])
        bg = background[None]
        scale = torch.tensor([sample_width / resolution, sample_width / resolution, 1.0]).view(3, 1)
        generator = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        states = [(model.reconstruct(context, bg), model.sources(context))]
        states.append(model.sample(K[view][None] * scale, c2w[view][None], bg, context=context, steps=steps,
                                   sampler=sampler, generator=generator, return_sources=True,
                                   noisy_skip_level=noisy_skip_level))
        states.append(model.sample_views(K[made][None] * scale, c2w[made][None], bg, steps=steps, sampler=sampler,
                                         generator=generator, noisy_skip_level=noisy_skip_level))
        renders = [model.render(s, K[view][None, None], c2w[view][None, None], resolution, resolution, bg,
                                sources=sources)[0, 0]
                   for s, sources in states]
        if made_views > 1:  # the unconditional sample from the far side too
            far = made[1]
            renders.append(model.render(states[-1][0], K[far][None, None], c2w[far][None, None], resolution, resolution,
                                        bg, sources=states[-1][1])[0, 0])
        out.append([*images[ctx], images[view], *renders])
        if len(out) == objects:
            break
    return out


def save(grid: list[list[torch.Tensor]], path: str, gap: int = 2) -> None:
    height, width = grid[0][0].shape[-2:]
    columns = len(grid[0])
    canvas = Image.new("RGB", (columns * (width + gap) - gap, len(grid) * (height + gap) - gap), (128, 128, 128))
    for r, row in enumerate(grid):
        for c, image in enumerate(row):
            pixels = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            canvas.paste(Image.fromarray(pixels), (c * (width + gap), r * (height + gap)))
    canvas.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/sample_grid.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="an exported model directory")
    parser.add_argument("--data", required=True, help="held-out shards")
    parser.add_argument("--out", required=True, help="PNG path")
    parser.add_argument("--objects", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--made-views", type=int, default=1,
                        help="images the unconditional sample makes, one after another (default 1)")
    parser.add_argument("--noisy-skip-level", type=int, default=None,
                        help="samplers' x̂₀ also take x_t's colour bands from this level on (evaluate's option)")
    args = parser.parse_args(argv)
    from model_zoo.loading import load

    model = load(args.model, "cpu")
    save(rows(model, args.data, args.objects, args.resolution, args.steps, args.sampler, args.seed, args.made_views,
              args.noisy_skip_level),
         args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
