"""Evaluate every checkpoint of a run: held-out reconstruction and generation over training steps.

    OMP_NUM_THREADS=1 python bench/learning_curve.py runs/tiny_long --data 'data/synthetic/holdout-*.tar' \
        --out bench/learning/tiny_long.jsonl

For each ``checkpoints/step_*`` (oldest first; ones already in ``--out`` are skipped, so it can be
re-run while training continues): ``python -m model_zoo.export`` (EMA weights, or the trained ones
with ``--no-ema``), then
``python -m model_zoo.evaluate --task both --context-views 3 --resolution 64 --features random``
— PSNR/SSIM from 3 views and unconditional FID/KID (DDIM, ``--steps``) with the random-feature extractor (comparable
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

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "checkpoints").glob("step_*") if (p / "MANIFEST.json").exists())


def evaluate(checkpoint: Path, data: str, steps: int, max_objects: int | None, ema: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        export = os.path.join(tmp, "export")
        subprocess.run([sys.executable, "-m", "model_zoo.export", str(checkpoint), export] + ([] if ema else ["--no-ema"]),
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        out = os.path.join(tmp, "results.json")
        command = [sys.executable, "-m", "model_zoo.evaluate", "--model", export, "--data", data, "--task", "both",
                   "--context-views", "3", "--resolution", "64", "--features", "random", "--sampler", "ddim", "--steps", str(steps),
                   "--out", out]
        if max_objects:
            command += ["--max-objects", str(max_objects)]
        subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(out) as f:
            results = json.load(f)
    rec, gen = results["reconstruction"], results["generation"]
    return {"step": int(checkpoint.name.split("_")[1]), "psnr": rec["psnr"], "ssim": rec["ssim"], "fid": gen["fid"],
            "kid": gen["kid"], "objects": rec["objects"], "sampler": "ddim", "sampler_steps": steps, "weights": "ema" if ema else "trained"}


def plot(rows: list[dict], path: Path) -> None:
    """Four small panels (PSNR, SSIM, FID, KID against step), drawn with PIL."""
    names = ("psnr", "ssim", "fid", "kid")
    panel_w, panel_h, margin = 320, 220, 40
    image = Image.new("RGB", (panel_w * 2, panel_h * 2), "white")
    draw = ImageDraw.Draw(image)
    steps = [r["step"] for r in rows]
    for index, name in enumerate(names):
        x0, y0 = (index % 2) * panel_w, (index // 2) * panel_h
        values = [r[name] for r in rows]
        lo, hi = min(values), max(values)
        hi = hi if hi > lo else lo + 1
        s_lo, s_hi = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1

        def px(step, value):
            return (x0 + margin + (step - s_lo) / (s_hi - s_lo) * (panel_w - 2 * margin),
                    y0 + panel_h - margin - (value - lo) / (hi - lo) * (panel_h - 2 * margin))

        draw.rectangle([x0 + margin, y0 + margin, x0 + panel_w - margin, y0 + panel_h - margin], outline=(90, 90, 90))
        points = [px(s, v) for s, v in zip(steps, values)]
        if len(points) > 1:
            draw.line(points, fill=(31, 119, 180), width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(31, 119, 180))
        draw.text((x0 + margin, y0 + 12), f"{name}: {values[0]:.4g} -> {values[-1]:.4g}", fill=(0, 0, 0))
        draw.text((x0 + margin, y0 + panel_h - margin + 6), f"step {s_lo:,}", fill=(60, 60, 60))
        draw.text((x0 + panel_w - margin - 70, y0 + panel_h - margin + 6), f"{max(steps):,}", fill=(60, 60, 60))
        draw.text((x0 + 2, y0 + margin), f"{hi:.3g}", fill=(60, 60, 60))
        draw.text((x0 + 2, y0 + panel_h - margin - 10), f"{lo:.3g}", fill=(60, 60, 60))
    image.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/learning_curve.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--data", required=True, help="held-out shards")
    parser.add_argument("--out", required=True, help="JSON lines, one per checkpoint (appended; a PNG is written beside it)")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps for generation")
    parser.add_argument("--max-objects", type=int, default=None)
    parser.add_argument("--every", type=int, default=1, help="only checkpoints whose step is a multiple of this")
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
        row = evaluate(checkpoint, args.data, args.steps, args.max_objects, ema=not args.no_ema)
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
