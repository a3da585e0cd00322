"""Held-out evaluation of a GOEmbedFusion model: reconstruction (PSNR/SSIM/LPIPS) and generation (FID/KID).

    python -m model_zoo.evaluate --model DIR --data 'data/synthetic/holdout-*.tar' --task both --out results.json
    torchrun --nproc_per_node 4 -m model_zoo.evaluate ...      # each rank evaluates its share

**Which views.** Every object's views are read (all of them, sorted by stored index) and the
context / target / evaluation views are drawn from an RNG seeded by (seed, object id). The
reader's own view draw depends on the reader slot (rank x worker), which would make the numbers
depend on the world size; this way they do not, at the cost of decoding every view. The
evaluation therefore assumes every object has as many views as the first one (objects with fewer
are skipped by the reader and counted).

**Which objects.** Shards in file order (no shuffling), split over ranks by the reader
(``drop_last=False``: every object is read; its few padding repeats are dropped by object id).
``max_objects`` takes the first N objects in that order, whatever the world size.

**Resolution.** Views are read at ``resolution`` (the reader resizes them and scales the
intrinsics). Reconstruction: the model encodes the context views at its own ``encode_resolution``
(it resizes them itself); the target view is rendered and scored at ``resolution``. Generation:
the real views and the sample's renders are both at ``resolution`` (OmniObject3D: 128), and the
feature extractor resizes to 128 px in any case.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zlib

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data_pipeline import storage
from data_pipeline.cli_types import nonnegative_int, positive_int
from data_pipeline.epoch_plan import EpochPlan
from data_pipeline.ranks import rank_and_world
from data_pipeline.reader import DatasetIndex, ReaderConfig, StreamingReader
from data_pipeline.schema import object_key, parse_sample
from data_pipeline.shards import read_sample_range
from model_zoo.goembedfusion import GOEmbedFusion, Views
from model_zoo.rays import spread_cameras
from model_zoo.samplers import SAMPLERS
from model_zoo.metrics import (UNAVAILABLE, FeatureExtractor, block_hue, build_feature_extractor, fid_from_features,
                               foreground, hue, kernel_inception_distance, load_lpips, object_hue, psnr, ssim)


# -- reading held-out objects -------------------------------------------------------------------
def _object_rng(seed: int, object_id: str) -> np.random.Generator:
    # crc32, not hash(): Python's str hash is salted per process, ranks would disagree.
    return np.random.default_rng([seed, zlib.crc32(object_id.encode())])


def _views_in_first_object(index: DatasetIndex, storage_options) -> int:
    shard = next(s for s in index.shards if len(s))
    key, _, members = next(read_sample_range(shard.url, shard, 0, 1, storage_options))
    return parse_sample(key, members, check_cameras=False).num_views


def iter_objects(pattern: str, resolution: int | None, max_objects: int | None = None, batch_size: int = 4,
                 num_workers: int = 0, storage_options: dict | None = None, progress: bool = False, desc: str = "objects"):
    """This rank's share of the objects, one at a time, with all views in stored order:
    (object_id, images (V, 3, H, W), K (V, 3, 3), c2w (V, 4, 4), background (3,))."""
    rank, world = rank_and_world()
    index = DatasetIndex(storage.expand_urls(pattern, storage_options), storage_options)
    config = ReaderConfig(pattern, batch_size=batch_size, context_views_min=0, context_views_max=0,
                          target_views=_views_in_first_object(index, storage_options), resolution=resolution,
                          num_workers=num_workers, shuffle=False, drop_last=False, storage_options=storage_options)
    reader = StreamingReader(config, rank=rank, world_size=world)
    # The keys this rank should evaluate: its slots' positions among the first max_objects. With
    # shuffle=False the epoch order is the shards' file order, so this is the same set of objects
    # for any world size, and we can stop as soon as all of them are done.
    limit = reader.num_samples if max_objects is None else min(max_objects, reader.num_samples)
    plan = EpochPlan(counts=reader.index.counts, seed=config.seed, epoch=0, num_slots=world * reader.workers,
                     batch_size=batch_size, shuffle=False, drop_last=False)
    wanted = set()
    for slot in range(rank * reader.workers, (rank + 1) * reader.workers):
        positions = plan.slot_positions(slot)
        shards, local = plan.locate(positions[positions < limit])
        wanted |= {reader.index.shards[s].keys[i] for s, i in zip(shards, local)}
    bar = tqdm(total=len(wanted), desc=desc, unit="obj", disable=not progress)
    for batch in reader:
        for b, object_id in enumerate(batch.object_ids):
            if object_key(object_id) not in wanted:
                continue
            wanted.discard(object_key(object_id))  # refill repeats after a bad sample are not evaluated twice
            order = batch.target_view_indices[b].argsort()
            yield (object_id, batch.target_images[b, order], batch.target_K[b, order], batch.target_c2w[b, order],
                   batch.background[b])
            bar.update(1)
        if not wanted:
            break
    bar.close()


def _gather(local: dict) -> dict:
    """Merge every rank's {object_id: result}; duplicates (padding) collapse onto one key."""
    rank, world = rank_and_world()
    if world == 1:
        return local
    parts = [None] * world
    dist.all_gather_object(parts, local)
    merged = {}
    for part in parts:
        for key, value in part.items():
            merged.setdefault(key, value)
    return merged


# -- reconstruction -----------------------------------------------------------------------------
@torch.no_grad()
def evaluate_reconstruction(model: GOEmbedFusion, pattern: str, context_views: int = 3, max_objects: int | None = None,
                            resolution: int | None = 128, lpips_weights: str | None = None, batch_size: int = 4,
                            seed: int = 0, num_workers: int = 0, storage_options: dict | None = None,
                            progress: bool = False) -> dict:
    """Novel-view PSNR / SSIM / LPIPS of ``model.reconstruct`` from ``context_views`` views per object,
    scored on one other view, means over objects. LPIPS is ``"unavailable"`` without weights."""
    model.eval()
    device = next(model.parameters()).device
    lpips = load_lpips(lpips_weights, device)
    results: dict[str, dict] = {}
    pending = []

    def flush():
        if not pending:
            return
        ids, context, target, background = zip(*pending)
        context = Views(*(torch.stack(parts).to(device) for parts in zip(*context)))
        target_images, target_K, target_c2w = (torch.stack(parts).to(device) for parts in zip(*target))
        background = torch.stack(background).to(device)
        state = model.reconstruct(context, background)
        height, width = target_images.shape[-2:]
        rendered = model.render(state, target_K, target_c2w, height, width, background, context)[:, 0].float()
        truth = target_images[:, 0]
        scores = {"psnr": psnr(rendered, truth), "ssim": ssim(rendered, truth)}
        mask = foreground(truth, background)  # hue where the object is, in the true view
        scores["hue"], scores["truth_hue"] = hue(rendered, mask), hue(truth, mask)
        if lpips is not None:
            scores["lpips"] = lpips(rendered, truth)
        for i, object_id in enumerate(ids):
            results[object_id] = {name: float(values[i]) for name, values in scores.items()}
        pending.clear()

    for object_id, images, K, c2w, background in iter_objects(pattern, resolution, max_objects, batch_size, num_workers,
                                                              storage_options, progress, desc="reconstruction"):
        if images.shape[0] < context_views + 1:
            raise ValueError(f"{object_id} has {images.shape[0]} views; {context_views} context + 1 target are needed")
        chosen = _object_rng(seed, object_id).permutation(images.shape[0])[:context_views + 1]
        ctx, tgt = chosen[:context_views], chosen[context_views:]
        pending.append((object_id, (images[ctx], K[ctx], c2w[ctx]), (images[tgt], K[tgt], c2w[tgt]), background))
        if len(pending) == batch_size:
            flush()
    flush()
    results = _gather(results)
    if not results:
        raise ValueError(f"no objects evaluated from {pattern}")
    ordered = [results[key] for key in sorted(results)]  # a fixed summation order on every world size

    def mean(name):
        return float(np.mean([r[name] for r in ordered]))

    return {
        "task": "reconstruction", "objects": len(ordered), "context_views": context_views,
        "resolution": resolution, "encode_resolution": model.config.encode_resolution,
        "psnr": mean("psnr"), "ssim": mean("ssim"),
        "lpips": mean("lpips") if lpips is not None else UNAVAILABLE,
        # How colourful the renders are on the true object's pixels, beside the truth's own (metrics.hue).
        "hue": mean("hue"), "truth_hue": mean("truth_hue"),
        # Per object, so two models can be compared by paired differences (python -m model_zoo.compare).
        "per_object": {key: results[key] for key in sorted(results)},
    }


# -- generation ---------------------------------------------------------------------------------
# Defaults chosen from the measured quality-versus-steps curve (README, "Samplers"): DPM-Solver++(2M)
# was better than DDIM at every step count, and 25 steps came within 0.015 FID of 50 at half the cost.
DEFAULT_SAMPLER = "dpmpp_2m"
DEFAULT_STEPS = 25

@torch.no_grad()
def evaluate_generation(model: GOEmbedFusion, pattern: str, features: FeatureExtractor | str = "random",
                        views_per_object: int = 10, context_views: int = 0, steps: int = DEFAULT_STEPS,
                        guidance_scale: float = 1.0, sampler: str = DEFAULT_SAMPLER, guidance_on: str = "x0",
                        made_views: int = 1, image_from: str = "render", noisy_skip_level: int | None = None,
                        sample_resolution: int | None = None,
                        resolution: int | None = 128,
                        max_objects: int | None = None, seed: int = 0, kid_subsets: int = 100,
                        kid_subset_size: int = 1000, num_workers: int = 0, storage_options: dict | None = None,
                        progress: bool = False) -> dict:
    """FID / KID between an object's real views and renders of a sample, OmniObject3D-style: per held-out
    object one sample (unconditional, or conditioned on ``context_views`` of its views), rendered at
    ``views_per_object`` of the object's own stored cameras (other than the context ones); the real
    images are those same views. ``features``: a FeatureExtractor, or "random" (RandomConvFeatures).

    ``made_views``: the sampler makes an image at that many of the evaluation cameras, the first
    one and then those farthest from the ones chosen (``rays.spread_cameras``), one after another,
    each conditioned on those before (``GOEmbedFusion.sample_views``, DFM's autoregressive
    sampling); 1 is a single image at the first evaluation camera."""
    model.eval()
    device = next(model.parameters()).device
    extractor = build_feature_extractor(features, seed=seed) if isinstance(features, str) else features
    extractor = extractor.to(device)
    sample_resolution = sample_resolution or model.config.encode_resolution
    local: dict[str, tuple[np.ndarray, np.ndarray, float, float, float]] = {}
    used_views = None
    for object_id, images, K, c2w, background in iter_objects(pattern, resolution, max_objects, 4, num_workers,
                                                              storage_options, progress, desc="generation"):
        count = min(views_per_object, images.shape[0] - context_views)  # protocol: 10; fewer if the object has fewer
        if count < 1:
            raise ValueError(f"{object_id} has {images.shape[0]} views: none left after {context_views} context views")
        used_views = count
        rng = _object_rng(seed, object_id)
        chosen = rng.permutation(images.shape[0])
        ctx, views = chosen[:context_views], chosen[context_views:context_views + count]
        images, K, c2w, background = images.to(device), K.to(device), c2w.to(device), background.to(device)
        context = Views(images[ctx][None], K[ctx][None], c2w[ctx][None]) if context_views else None
        height, width = images.shape[-2:]
        # The sampler denoises images at made_views of the evaluation cameras, at its own width.
        scale = torch.tensor([sample_resolution / width, sample_resolution / width, 1.0], device=device).view(3, 1)
        made = views[spread_cameras(c2w[views], min(made_views, count))]
        # One generator per object, not per batch: the sample then does not depend on which rank
        # drew the object or what else was in its batch.
        generator = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        state, sources = model.sample_views(K[made][None] * scale, c2w[made][None], background[None], context=context,
                                            steps=steps, guidance_scale=guidance_scale, resolution=sample_resolution,
                                            generator=generator, sampler=sampler, guidance_on=guidance_on,
                                            image_from=image_from, noisy_skip_level=noisy_skip_level)
        fake = model.render(state, K[views][None], c2w[views][None], height, width, background[None],
                            sources=sources)[0]
        # PSNR to the object's own views: for conditional samples, how faithful they are to it.
        fidelity = float(psnr(fake.float(), images[views]).mean())
        # How colourful a sample is where it has an object (its own foreground), beside the real views.
        bg = background.expand(count, 3)
        fake_fg, real_fg = foreground(fake, bg), foreground(images[views], bg)
        colourful = (float(hue(fake.float(), fake_fg).nanmean()), float(hue(images[views].float(), real_fg).nanmean()),
                     float(block_hue(fake, fake_fg).nanmean()), float(block_hue(images[views], real_fg).nanmean()),
                     float(object_hue(fake, fake_fg).nanmean()), float(object_hue(images[views], real_fg).nanmean()))
        # How much of the image a sample covers, beside the real views: too big (fog) or too small.
        covers = (float(fake_fg.float().mean()), float(real_fg.float().mean()))
        local[object_id] = (extractor(images[views]).cpu().numpy(), extractor(fake).cpu().numpy(), fidelity, *colourful[:2],
                            *covers, *colourful[2:])
    results = _gather(local)
    if not results:
        raise ValueError(f"no objects evaluated from {pattern}")
    keys = sorted(results)
    real = np.concatenate([results[key][0] for key in keys])
    generated = np.concatenate([results[key][1] for key in keys])
    kid_mean, kid_std = kernel_inception_distance(real, generated, kid_subsets, kid_subset_size, seed=seed)
    notes = []
    if len(real) <= real.shape[1]:
        notes.append(f"{len(real)} images for {real.shape[1]}-d features: singular covariances, FID is unreliable")
    if len(real) <= kid_subset_size:
        notes.append("KID subsets are the whole set, so kid_std is 0")
    return {
        "task": "generation", "objects": len(keys), "images": len(real), "views_per_object": used_views,
        "context_views": context_views, "steps": steps, "sampler": sampler, "guidance_scale": guidance_scale,
        "guidance_on": guidance_on, "made_views": made_views, "image_from": image_from,
        "noisy_skip_level": noisy_skip_level,
        "sample_resolution": sample_resolution, "resolution": resolution, "features": extractor.name,
        "fid": fid_from_features(real, generated), "kid": kid_mean, "kid_std": kid_std,
        # Mean PSNR of the renders to the true views; meaningful for conditional samples only.
        "psnr_to_object": float(np.mean([results[key][2] for key in keys])),
        # metrics.hue of the samples on their own foreground and of the real views on theirs.
        "hue": float(np.nanmean([results[key][3] for key in keys])),
        "truth_hue": float(np.nanmean([results[key][4] for key in keys])),
        # The mean fraction of pixels that are not background (metrics.foreground), samples and real views.
        "coverage": float(np.mean([results[key][5] for key in keys])),
        "truth_coverage": float(np.mean([results[key][6] for key in keys])),
        # metrics.block_hue (4 × 4 px block means): colour speckle has hue but little of this.
        "hue_4px": float(np.nanmean([results[key][7] for key in keys])),
        "truth_hue_4px": float(np.nanmean([results[key][8] for key in keys])),
        # metrics.object_hue (the hue of the mean foreground colour): speckle of every hue has none.
        "object_hue": float(np.nanmean([results[key][9] for key in keys])),
        "truth_object_hue": float(np.nanmean([results[key][10] for key in keys])), "notes": notes,
        # Each object's sample, for paired comparisons of two samplings (model_zoo.compare); NaN: no foreground.
        "per_object": {key: {"psnr_to_object": results[key][2], "hue": results[key][3], "coverage": results[key][5],
                             "hue_4px": results[key][7], "object_hue": results[key][9]} for key in keys},
    }


# -- command line -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model_zoo.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory (read with model_zoo.loading.load)")
    parser.add_argument("--data", required=True, help="held-out shards: a URL pattern (braces/globs, any fsspec URL)")
    parser.add_argument("--task", choices=("reconstruction", "generation", "both"), default="both")
    parser.add_argument("--context-views", type=nonnegative_int, default=3, help="context views for reconstruction")
    parser.add_argument("--generation-context-views", type=nonnegative_int, default=0,
                        help="context views a generated sample is conditioned on (0: unconditional)")
    parser.add_argument("--max-objects", type=positive_int, default=None, help="the first N objects (file order)")
    parser.add_argument("--lpips-weights", default=None, help="LPIPS weights file; without it LPIPS is 'unavailable'")
    features = parser.add_mutually_exclusive_group()
    features.add_argument("--inception-weights", default=None, help="Inception-v3 weights file for FID/KID")
    features.add_argument("--features", choices=("random",), default=None,
                          help="the built-in random-conv extractor (numbers not comparable with published FID)")
    parser.add_argument("--views-per-object", type=positive_int, default=10)
    parser.add_argument("--resolution", type=positive_int, default=128, help="width the views are read, rendered and scored at")
    parser.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS,
                        help="sampler steps per sample (default %(default)s, from the README's quality-vs-steps curve)")
    parser.add_argument("--sampler", choices=tuple(SAMPLERS), default=DEFAULT_SAMPLER, help="see model_zoo/samplers.py")
    parser.add_argument("--guidance-scale", type=float, default=1.0,
                        help="classifier-free guidance (needs --generation-context-views > 0; 1 = none)")
    parser.add_argument("--guidance-on", choices=("state", "x0"), default="x0",
                        help="apply guidance to the 3D state ζ̂ or to its rendered x̂₀")
    parser.add_argument("--made-views", type=positive_int, default=1,
                        help="images the sampler makes per sample, one after another, each conditioned on the "
                             "earlier ones (DFM's autoregressive sampling; default 1: one image). Keep "
                             "--generation-context-views + N - 1 within the training's data.context_views_max")
    parser.add_argument("--image-from", choices=("render", "view_denoiser"), default="render",
                        help="the x̂₀ an unconditional sampler steps with: the render at the target camera, or "
                             "(a model with image_colour_view_denoiser) that 2D network's own prediction")
    parser.add_argument("--noisy-skip-level", type=nonnegative_int, default=None,
                        help="the sampler's x̂₀ also takes x_t's own colour bands from this pyramid level on, "
                             "Wiener-shrunk around the render (a wiener / wiener_bands model; default: off; "
                             "README \"The noisy skip\")")
    parser.add_argument("--sample-resolution", type=positive_int, default=None, help="sampler image width (default: encode_resolution)")
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--workers", type=nonnegative_int, default=0, help="reader worker processes per rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda (this rank's LOCAL_RANK) if available, else cpu")
    parser.add_argument("--out", default=None, help="also write the results JSON here")
    return parser


def format_table(results: dict) -> str:
    rows = []
    for task, values in results.items():
        if not isinstance(values, dict):
            continue
        names = ("psnr", "ssim", "lpips", "hue", "truth_hue") if task == "reconstruction" else ("fid", "kid", "kid_std", "hue", "truth_hue",
                                                                                             "coverage", "truth_coverage", "hue_4px", "truth_hue_4px",
                                                                                             "object_hue", "truth_object_hue")
        cells = [f"{name}={values[name]:.4f}" if isinstance(values[name], float) else f"{name}={values[name]}"
                 for name in names]
        rows.append(f"{task:<15} objects={values['objects']:<5} " + "  ".join(cells))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.task in ("generation", "both") and not (args.inception_weights or args.features):
        build_parser().error("generation needs --inception-weights PATH or --features random")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")  # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the environment
    rank, _ = rank_and_world()
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    try:
        from model_zoo.loading import ExportFormatError, load  # imported here: the CLI is the only user

        try:
            model = load(args.model, device)
        except ExportFormatError as error:
            print(f"error: --model: {error}", file=sys.stderr)
            return 2
        common = dict(max_objects=args.max_objects, resolution=args.resolution, seed=args.seed,
                      num_workers=args.workers, progress=rank == 0)
        results = {"model": args.model, "data": args.data, "world_size": world}
        if args.task in ("reconstruction", "both"):
            results["reconstruction"] = evaluate_reconstruction(
                model, args.data, context_views=args.context_views, lpips_weights=args.lpips_weights,
                batch_size=args.batch_size, **common)
        if args.task in ("generation", "both"):
            extractor = build_feature_extractor("inception" if args.inception_weights else "random",
                                                args.inception_weights, seed=args.seed)
            results["generation"] = evaluate_generation(
                model, args.data, features=extractor, views_per_object=args.views_per_object,
                context_views=args.generation_context_views, steps=args.steps, guidance_scale=args.guidance_scale,
                sampler=args.sampler, guidance_on=args.guidance_on, made_views=args.made_views,
                image_from=args.image_from, noisy_skip_level=args.noisy_skip_level,
                sample_resolution=args.sample_resolution, **common)
        if rank == 0:
            text = json.dumps(results, indent=2)
            print(text)
            print(format_table(results), file=sys.stderr)
            if args.out:
                with open(args.out, "w") as f:
                    f.write(text + "\n")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
