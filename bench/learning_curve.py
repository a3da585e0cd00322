"""Evaluate every checkpoint of a run: held-out reconstruction and generation over training steps.

    OMP_NUM_THREADS=1 python bench/learning_curve.py runs/tiny_long --data 'data/synthetic/holdout-*.tar' \
        --out bench/learning/tiny_long.jsonl

For each ``checkpoints/step_*`` (oldest first; ones already in ``--out`` are skipped, so it can be
re-run while training continues): ``python -m model_zoo.export`` (EMA weights, or the trained ones
with ``--no-ema``), then
``python -m model_zoo.evaluate --task both --context-views 3 --resolution 64 --features random``
— PSNR/SSIM from 3 views and unconditional FID/KID (DDIM, ``--steps``; conditioned on
``--generation-context-views`` views if given) with the random-feature extractor (comparable
only with each other, never with published numbers). One JSON line per checkpoint, and a PNG of
the curves beside ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "checkpoints").glob("step_*") if (p / "MANIFEST.json").exists())


def evaluate(checkpoint: Path, data: str, steps: int, max_objects: int | None, ema: bool,
             generation_context_views: int = 0, made_views: int = 1) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        export = os.path.join(tmp, "export")
        subprocess.run([sys.executable, "-m", "model_zoo.export", str(checkpoint), export] + ([] if ema else ["--no-ema"]),
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        out = os.path.join(tmp, "results.json")
        command = [sys.executable, "-m", "model_zoo.evaluate", "--model", export, "--data", data, "--task", "both",
                   "--context-views", "3", "--resolution", "64", "--features", "random", "--sampler", "ddim", "--steps", str(steps),
                   "--generation-context-views", str(generation_context_views), "--made-views", str(made_views),
                   "--out", out]
        if max_objects:
            command += ["--max-objects", str(max_objects)]
        subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(out) as f:
            results = json.load(f)
    rec, gen = results["reconstruction"], results["generation"]
    return {"step": int(checkpoint.name.split("_")[1]), "psnr": rec["psnr"], "ssim": rec["ssim"], "hue": rec["hue"],
            "truth_hue": rec["truth_hue"], "fid": gen["fid"],
            "kid": gen["kid"], "generation_hue": gen["hue"], "generation_truth_hue": gen["truth_hue"], "generation_context_views": generation_context_views,
            "made_views": made_views, "objects": rec["objects"],
            "sampler": "ddim", "sampler_steps": steps, "weights": "ema" if ema else "trained"}


def plot(rows: list[dict], path: Path) -> None:
    """Four panels (PSNR, SSIM, FID, KID against step), drawn with matplotlib's Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    steps = [r["step"] for r in rows]
    for axes, (name, label) in zip(figure.subplots(2, 2).flat, (("psnr", "PSNR (dB)"), ("ssim", "SSIM"),
                                                                ("fid", "FID (random features)"), ("kid", "KID (random features)"))):
        values = [r[name] for r in rows]
        axes.plot(steps, values, marker="o", markersize=3)
        axes.set_title(f"{label}: {values[0]:.4g} -> {values[-1]:.4g}", fontsize=9)
        axes.set_xlabel("step", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.grid(alpha=0.3)
    figure.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/learning_curve.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--data", required=True, help="held-out shards")
    parser.add_argument("--out", required=True, help="JSON lines, one per checkpoint (appended; a PNG is written beside it)")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps for generation")
    parser.add_argument("--max-objects", type=int, default=None)
    parser.add_argument("--every", type=int, default=1, help="only checkpoints whose step is a multiple of this")
    parser.add_argument("--generation-context-views", type=int, default=0,
                        help="context views the generated samples are conditioned on (default 0: unconditional FID/KID)")
    parser.add_argument("--made-views", type=int, default=1,
                        help="images each generated sample makes, one after another (model_zoo.evaluate --made-views)")
    parser.add_argument("--no-ema", action="store_true",
                        help="the trained weights, not the EMA (an EMA of decay d still holds d^step of the initial weights)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {r["step"] for r in rows}
    for checkpoint in checkpoints(Path(args.run_dir)):
        step = int(checkpoint.name.split("_")[1])
        if step in done or step % args.every:
            continue
        row = evaluate(checkpoint, args.data, args.steps, args.max_objects, ema=not args.no_ema,
                       generation_context_views=args.generation_context_views, made_views=args.made_views)
        print(json.dumps(row), flush=True)
        rows.append(row)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
    rows.sort(key=lambda r: r["step"])
    if rows:
        plot(rows, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
