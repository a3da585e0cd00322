"""Paired per-object comparison of two evaluations (``model_zoo.evaluate --out``) of the same objects.

    python -m model_zoo.compare before.json after.json

Reconstruction: PSNR and SSIM. Generation: each object's sample's hue, object_hue, coverage and
PSNR to the object (the two samplings must share the seed, so that the objects' views match; FID
and KID are set statistics and have no per-object difference). For each metric: the mean of
after − before over the objects both evaluated (an object without foreground in either is left
out of that metric), with a 95% percentile-bootstrap interval over the paired differences
(10 000 resamples of objects, seeded) — a difference whose interval contains 0 is within noise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

METRICS = {"reconstruction": ("psnr", "ssim"), "generation": ("hue", "object_hue", "coverage", "psnr_to_object")}


def paired(before: dict, after: dict, metric: str, task: str = "reconstruction") -> dict:
    """{"mean", "low", "high", "objects"} of after − before for ``metric`` over the shared objects."""
    if "per_object" not in before[task] or "per_object" not in after[task]:
        raise ValueError(f"{task} results without per_object (an evaluation from before they were written)")
    a, b = before[task]["per_object"], after[task]["per_object"]
    keys = [k for k in sorted(set(a) & set(b)) if not (math.isnan(a[k][metric]) or math.isnan(b[k][metric]))]
    if len(keys) < 2:
        raise ValueError(f"need >= 2 objects evaluated by both, got {len(keys)}")
    diff = np.array([b[k][metric] - a[k][metric] for k in keys])
    resampled = diff[np.random.default_rng(0).integers(0, len(diff), (10_000, len(diff)))].mean(axis=1)
    low, high = np.percentile(resampled, [2.5, 97.5])
    return {"mean": float(diff.mean()), "low": float(low), "high": float(high), "objects": len(keys)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_zoo.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    args = parser.parse_args(argv)
    with open(args.before) as f:
        before = json.load(f)
    with open(args.after) as f:
        after = json.load(f)
    tasks = [task for task in METRICS if task in before and task in after]
    if not tasks:
        print("error: the two files share no task (reconstruction or generation)", file=sys.stderr)
        return 2
    for task in tasks:
        for metric in METRICS[task]:
            try:
                d = paired(before, after, metric, task)
            except ValueError as error:
                print(f"error: {task}: {error}", file=sys.stderr)
                return 2
            print(f"{task} {metric}: after {after[task][metric]:.4f}, before {before[task][metric]:.4f}; "
                  f"after − before {d['mean']:+.4f} [95% {d['low']:+.4f}, {d['high']:+.4f}] over {d['objects']} objects")
    return 0


if __name__ == "__main__":
    sys.exit(main())
