"""Paired per-object comparison of two reconstruction evaluations (``model_zoo.evaluate --out``).

    python -m model_zoo.compare before.json after.json

For PSNR and SSIM: the mean of after − before over the objects both evaluated, with a 95%
percentile-bootstrap interval over the paired differences (10 000 resamples of objects, seeded) —
a difference whose interval contains 0 is within noise.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def paired(before: dict, after: dict, metric: str) -> dict:
    """{"mean", "low", "high", "objects"} of after − before for ``metric`` over the shared objects."""
    a, b = before["reconstruction"]["per_object"], after["reconstruction"]["per_object"]
    keys = sorted(set(a) & set(b))
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
    for metric in ("psnr", "ssim"):
        d = paired(before, after, metric)
        print(f"{metric}: after {after['reconstruction'][metric]:.4f}, before {before['reconstruction'][metric]:.4f}; "
              f"after − before {d['mean']:+.4f} [95% {d['low']:+.4f}, {d['high']:+.4f}] over {d['objects']} objects")
    return 0


if __name__ == "__main__":
    sys.exit(main())
