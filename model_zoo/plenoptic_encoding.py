"""The Plenoptic-Encoding experiment, in miniature: how much does each encoder tell a network?

    python -m model_zoo.plenoptic_encoding [--quick] [--steps N] [--out results.json]

For each representation (triplane, voxel grid, per-object MLP) the same network — the preset's
denoiser as a reconstruction network, plus the field decoder ψ — is trained from scratch to
reconstruct objects from 3 context views, given the views encoded by

  (a) GOEmbed (gradient-origin embedding; also with each normalisation, on the triplane),
  (b) unprojection (mean colour of the pixels whose rays cross each cell; grids only),
  (c) no encoding (zeros: the network can only learn an average object),

and scored by novel-view PSNR on held-out objects of the synthetic dataset, beside a baseline
that predicts each object's mean context colour. Prints one JSON table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from data_pipeline.synthetic import generate_dataset
from model_zoo.experiment import FitConfig, evaluate_novel_views, fit
from model_zoo.goembedfusion import GOEmbedFusion, ModelConfig

# (representation, encoder, GOEmbed normalisation) per row; unprojection needs grid cells.
RUNS = [
    ("triplane", "goembed", "coverage"), ("triplane", "unprojection", None), ("triplane", "zeros", None),
    ("voxel", "goembed", "coverage"), ("voxel", "unprojection", None), ("voxel", "zeros", None),
    ("mlp", "goembed", "coverage"), ("mlp", "zeros", None),
    ("triplane", "goembed", "views"), ("triplane", "goembed", "sum"),
]


def run_one(representation: str, encoder: str, normalisation: str | None, train: str, holdout: str,
            steps: int, seed: int, resolution: int) -> dict:
    torch.manual_seed(seed)
    model = GOEmbedFusion(ModelConfig(
        representation=representation, encoder=encoder, goembed_normalisation=normalisation or "coverage",
        encode_resolution=resolution, reconstruction_prob=1.0, context_dropout=0.0,
        # ψ learns from the rendering loss; not differentiating through the encoder keeps every
        # encoder on the same footing (and the run 3x cheaper on a CPU).
        train_decoder_through_encoder=False, rays_per_view=256))
    start = time.perf_counter()
    history = fit(model, train, FitConfig(steps=steps, lr=2e-3, seed=seed), progress=True)
    scores = evaluate_novel_views(model, holdout, context_views=3)
    return {"representation": representation, "encoder": encoder, "normalisation": normalisation,
            "heldout_psnr": round(scores["psnr"], 2), "mean_colour_baseline_psnr": round(scores["baseline_mean_colour_psnr"], 2),
            "final_train_loss": round(sum(h["loss"] for h in history[-10:]) / 10, 4), "steps": steps,
            "seconds": round(time.perf_counter() - start, 1), "heldout_objects": scores["objects"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="150 steps per run: under 10 minutes on a 2-core CPU")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 150 with --quick, else 600)")
    parser.add_argument("--objects", type=int, default=128, help="synthetic objects (1/8 held out; default %(default)s)")
    parser.add_argument("--resolution", type=int, default=32, help="image width in pixels (default %(default)s)")
    parser.add_argument("--data", default=None, help="directory of synthetic shards (default: a fresh temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: tiny ops on few cores)")
    parser.add_argument("--out", default=None, help="also write the JSON table here")
    args = parser.parse_args(argv)
    steps = args.steps or (150 if args.quick else 600)
    torch.set_num_threads(args.threads)

    data = args.data or tempfile.mkdtemp(prefix="plenoptic-")
    if not os.path.exists(os.path.join(data, "train-000000.tar")):
        generate_dataset(data, objects=args.objects, views=16, resolution=args.resolution, seed=1,
                         holdout_fraction=0.125, progress=False)
    train, holdout = os.path.join(data, "train-*.tar"), os.path.join(data, "holdout-*.tar")
    rows = []
    for representation, encoder, normalisation in RUNS:
        rows.append(run_one(representation, encoder, normalisation, train, holdout, steps, args.seed, args.resolution))
        print(json.dumps(rows[-1]), file=sys.stderr)
    rows.append({"representation": "mlp", "encoder": "unprojection", "heldout_psnr": None,
                 "note": "an MLP's weights have no cells for rays to cross"})
    table = {"experiment": "plenoptic_encoding", "steps_per_run": steps, "objects": args.objects,
             "resolution": args.resolution, "context_views": 3, "rows": rows}
    text = json.dumps(table)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
