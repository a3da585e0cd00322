"""Single image to 3D: one photo -> a conditional GOEmbedFusion sample -> mesh (PLY + GLB) + turntable GIF.

    python -m model_zoo.image_to_3d photo.png --model runs/tiny/export --out out/photo

The image is the single context view of :meth:`GOEmbedFusion.sample`. It has no camera, so one is
assumed, in the synthetic data's convention: a pinhole with ``--fov-deg`` horizontal field of view
at distance ``--radius`` (default 2.6 × the box half-size) from the origin, ``--elevation-deg``
above the xy plane on the +x side, looking at the origin with +z up. A non-square image is
centre-cropped, then resized to the model's ``encode_resolution``. The background colour (what
the model composites empty space on) comes from the image: transparent pixels are composited on
white; an opaque image whose four corners agree uses their mean colour, otherwise white. The sampler
then denoises an image at a second camera (``target_azimuth_deg`` around the object, 90° by
default: a novel view, as in training, where targets differ from context views) into a 3D state
ζ, from which the mesh and the turntable are made (see :mod:`model_zoo.assets`).

Writes to OUT: ``mesh.ply``, ``mesh.glb``, ``turntable.gif``, ``input.png`` (the view as the model
saw it) and ``summary.json`` (settings, iso-level, mesh size, seconds per stage); prints the time
of every stage and the total.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_pipeline import image_io
from data_pipeline.cameras import orbit_camera
from data_pipeline.cli_types import background_colour, int_at_least, positive_int
from model_zoo.assets import DEFAULT_FOV_DEG, DEFAULT_RADIUS_FACTOR, extract_mesh, turntable
from model_zoo.samplers import SAMPLERS

CORNER_TOLERANCE = 0.1  # max spread of the four corner colours (in [0, 1]) to call them a background
WHITE = (1.0, 1.0, 1.0)


def load_image(path: str | os.PathLike, resolution: int, background: str = "auto") -> tuple[np.ndarray, tuple[float, float, float]]:
    """(image (resolution, resolution, 3) float32 in [0, 1], background RGB) ready to encode.

    ``background``: "auto" (transparency -> white; else the corners' colour if they agree, else
    white), or a colour for :func:`data_pipeline.cli_types.background_colour` (white, black, gray,
    "R,G,B" in [0, 1]; ValueError otherwise).
    """
    image = image_io.open_image(path)  # any Pillow mode (16-bit, palette, CMYK, LA, ...); ImageFileError if unreadable
    has_alpha = image_io.has_alpha(image)
    rgba = image_io.to_rgba(image)
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    if background == "auto":
        if has_alpha and alpha.min() < 1.0:
            colour = WHITE
        else:
            colour = corner_background(rgb)
    else:
        colour = background_colour(background)
    rgb = rgb * alpha + np.asarray(colour, np.float32) * (1.0 - alpha)
    height, width = rgb.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = Image.fromarray(np.round(rgb[top:top + side, left:left + side] * 255).astype(np.uint8))
    resized = square.resize((resolution, resolution), Image.Resampling.LANCZOS if side > resolution else Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.float32) / 255.0, colour


def corner_background(rgb: np.ndarray) -> tuple[float, float, float]:
    """Mean colour of the four corner patches when they agree within CORNER_TOLERANCE, else white."""
    height, width = rgb.shape[:2]
    k = max(1, min(height, width) // 32)
    corners = np.stack([rgb[:k, :k], rgb[:k, -k:], rgb[-k:, :k], rgb[-k:, -k:]]).reshape(4, -1, 3).mean(1)
    if float((corners.max(0) - corners.min(0)).max()) > CORNER_TOLERANCE:
        return WHITE
    return tuple(float(c) for c in corners.mean(0))


def background_argument(text: str) -> str:
    """The --background value: "auto" or a colour (checked here, parsed by :func:`load_image`)."""
    if text != "auto":
        background_colour(text)
    return text


def image_to_3d(model, image_path: str | os.PathLike, out_dir: str | os.PathLike, steps: int = 10,
                guidance: float = 1.0, fov_deg: float = DEFAULT_FOV_DEG, elevation_deg: float = 20.0,
                radius: float | None = None, seed: int = 0, mesh_resolution: int = 64, level: float | None = None,
                background: str = "auto", target_azimuth_deg: float = 90.0, turntable_frames: int = 36,
                turntable_resolution: int | None = None, log=print, sampler: str = "dpmpp_2m",
                progress=None) -> dict:
    """One image -> ``OUT/{mesh.ply, mesh.glb, turntable.gif, input.png, summary.json}``.

    Returns {"mesh_ply", "mesh_glb", "turntable_gif", "input_png", "summary_json": paths,
    "timings": {stage: seconds, "total": ...}, "mesh": {vertices, faces, level, level_rule},
    "background": RGB}. ``progress(step, steps)`` is called after every sampler step (the CLI
    draws a progress bar with it).
    """
    from model_zoo.goembedfusion import Views

    start = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    device = next(model.parameters()).device
    resolution = model.config.encode_resolution
    radius = radius or DEFAULT_RADIUS_FACTOR * float(model.config.box_half_size)

    def stage(name: str, began: float) -> float:
        now = time.perf_counter()
        timings[name] = now - began
        if log:
            log(f"{name:<12s}{timings[name]:8.2f} s")
        return now

    t = time.perf_counter()
    image, colour = load_image(image_path, resolution, background)
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(out / "input.png")
    # square cameras on the orbit the turntable uses, looking at the origin, +z up
    K, c2w = orbit_camera(radius, elevation_deg, 0.0, fov_deg, resolution)
    target_K, target_c2w = orbit_camera(radius, elevation_deg, target_azimuth_deg, fov_deg, resolution)

    def tensor(x):
        return torch.as_tensor(np.asarray(x), dtype=torch.float32, device=device)

    context = Views(tensor(image).permute(2, 0, 1)[None, None], tensor(K)[None, None], tensor(c2w)[None, None])
    bg = tensor(colour)[None]
    t = stage("preprocess", t)

    generator = torch.Generator(device=device).manual_seed(seed)
    callback = (lambda info: progress(info["i"] + 1, info["steps"])) if progress else None
    state, sources = model.sample(tensor(target_K)[None], tensor(target_c2w)[None], bg, context=context, steps=steps,
                                  guidance_scale=guidance, resolution=resolution, generator=generator, sampler=sampler,
                                  callback=callback, return_sources=True)
    t = stage("sample", t)

    mesh = extract_mesh(model, state[0], out, resolution=mesh_resolution, level=level)
    t = stage("mesh", t)

    gif = turntable(model, state[0], out / "turntable.gif", frames=turntable_frames, resolution=turntable_resolution,
                    radius=radius, elevation_deg=elevation_deg, fov_deg=fov_deg, background=colour, sources=sources)
    stage("turntable", t)
    timings["total"] = time.perf_counter() - start
    if log:
        log(f"{'total':<12s}{timings['total']:8.2f} s")

    summary = {
        "image": str(image_path), "sampler": sampler, "steps": steps, "guidance": guidance, "fov_deg": fov_deg,
        "elevation_deg": elevation_deg, "radius": radius, "seed": seed, "target_azimuth_deg": target_azimuth_deg,
        "encode_resolution": resolution, "background": list(colour), "mesh_resolution": mesh_resolution,
        "mesh": {k: mesh[k] for k in ("vertices", "faces", "level", "level_rule")},
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {"mesh_ply": mesh["ply"], "mesh_glb": mesh["glb"], "turntable_gif": gif, "input_png": str(out / "input.png"),
            "summary_json": str(out / "summary.json"), "timings": timings, "mesh": summary["mesh"],
            "background": colour}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model_zoo.image_to_3d", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", help="the input image (PNG/JPEG/WebP; transparency is composited on white)")
    parser.add_argument("--model", required=True, help="an exported model directory (read by model_zoo.loading.load)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--steps", type=positive_int, default=10, help="sampler steps (default 10)")
    parser.add_argument("--sampler", choices=tuple(SAMPLERS), default="dpmpp_2m",
                        help="see model_zoo/samplers.py (default dpmpp_2m: better than ddim at every measured step count)")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = none; default 1)")
    parser.add_argument("--fov-deg", type=float, default=DEFAULT_FOV_DEG, help="assumed horizontal field of view (default 50)")
    parser.add_argument("--elevation-deg", type=float, default=20.0, help="assumed camera elevation (default 20)")
    parser.add_argument("--radius", type=float, default=None,
                        help=f"assumed camera distance (default {DEFAULT_RADIUS_FACTOR} x the box half-size)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--mesh-resolution", type=int_at_least(2), default=64, help="density grid points per side (default 64)")
    parser.add_argument("--level", type=float, default=None,
                        help="iso-level density (default: ln 2 / render step; see model_zoo.assets)")
    parser.add_argument("--background", type=background_argument, default="auto",
                        help="auto (default), white, black, gray or R,G,B in [0, 1]")
    parser.add_argument("--frames", type=positive_int, default=36, help="turntable frames (default 36)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for torch (default: torch's own; 1 is much faster for the tiny preset "
                             "on a small shared machine)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # sizes and the colour are checked there (exit status 2)
    if not Path(args.image).is_file():
        print(f"error: no such image: {args.image}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from model_zoo.loading import load  # written alongside; imported here so --help works without it

    from model_zoo.loading import ExportFormatError

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        image_io.open_image(args.image)  # a bad image is refused before the model is loaded
        began = time.perf_counter()
        model = load(args.model, device)
    except (image_io.ImageFileError, ExportFormatError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    load_s = time.perf_counter() - began
    print(f"{'load':<12s}{load_s:8.2f} s")
    from tqdm import tqdm

    with tqdm(total=args.steps, desc="sample", unit="step", leave=False) as bar:
        result = image_to_3d(model, args.image, args.out, steps=args.steps, guidance=args.guidance, fov_deg=args.fov_deg,
                             elevation_deg=args.elevation_deg, radius=args.radius, seed=args.seed,
                             mesh_resolution=args.mesh_resolution, level=args.level, background=args.background,
                             turntable_frames=args.frames, sampler=args.sampler,
                             progress=lambda step, steps: bar.update(step - bar.n))
    print(f"{'with load':<12s}{load_s + result['timings']['total']:8.2f} s")
    print(f"mesh: {result['mesh']['vertices']} vertices, {result['mesh']['faces']} faces "
          f"(level {result['mesh']['level']:.3g}: {result['mesh']['level_rule']})")
    for key in ("mesh_ply", "mesh_glb", "turntable_gif"):
        print(f"{key}: {result[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
