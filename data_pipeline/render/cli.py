"""``python -m data_pipeline.render``: meshes -> Blender renders -> schema-v1 shards.

Usage::

    python -m data_pipeline.render MESH_OR_DIR_OR_URL... --out DIR_OR_URL [--views N] [--resolution R]
        [--engine cycles|workbench] [--samples S] [--cameras random|orbit] [--camera-distance auto|MIN..MAX]
        [--elevation-deg MIN..MAX] [--fov-deg F] [--background R,G,B] [--lighting sun|uniform] [--seed S]
        [--box B] [--fit F] [--max-faces N] [--maxcount N] [--maxsize BYTES] [--workers W]
        [--ray-address ADDR] [--cpus-per-task C]

Inputs: GLB/glTF, OBJ, PLY, STL, FBX files, folders of them (recursive; the object id is the
path below the folder without the extension), globs, or any fsspec URL (s3://...). Each mesh is
normalised into the training box [-box, box]^3 (centred, largest half-extent ``fit * box``);
``extra.mesh_to_world`` in each sample maps the file's coordinates (as trimesh loads it) to the
world of the cameras, ``extra.source_file`` names the file. Cameras are drawn from --seed and the
object id (the same call gives the same cameras) and read back from Blender's own camera
matrices; each view is stored composited on --background, with its mask (KEY.viewNNN.mask.png).

Every --maxcount objects form a part, written as shard-PPPPPP-000000.tar (+ index) with a record in
OUT/manifest/; re-running the same command skips finished parts (see parts.py).

Exit status: 0 when every object was rendered; 1 when any was skipped (each named with its
reason); 2 on usage errors.
"""

from __future__ import annotations

import argparse
import sys
import time

from tqdm import tqdm

from data_pipeline.cli_types import background_colour, byte_size, positive_float, positive_int, usage_errors
from data_pipeline.render.blender import RenderDependencyError, check_bpy_installed
from data_pipeline.render.inputs import InputError, find_meshes
from data_pipeline.render.parts import ManifestError, finished_parts, split_parts, start_run, write_summary
from data_pipeline.render.run import RayConnectError, available_cores, render_local, render_ray
from data_pipeline.render.settings import CAMERA_MODES, ENGINES, LIGHTING, RenderSettings


def float_range(text: str) -> tuple[float, float]:
    """'MIN..MAX' or a single number (MIN = MAX)."""
    parts = text.split("..")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN..MAX (e.g. 1.8..2.4) or one number, got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or values[0] > values[1]:
        raise argparse.ArgumentTypeError(f"expected MIN..MAX with MIN <= MAX, got {text!r}")
    return values[0], values[1]


def distance_range(text: str) -> tuple[float, float] | None:
    return None if text.strip().lower() == "auto" else float_range(text)


def build_parser() -> argparse.ArgumentParser:
    defaults = RenderSettings()
    p = argparse.ArgumentParser(prog="python -m data_pipeline.render", description="Render meshes with Blender into "
                                "WebDataset shards of posed multi-view objects (with masks).")
    p.add_argument("sources", nargs="+", metavar="MESH_OR_DIR_OR_URL", help="mesh files, folders, globs or fsspec URLs")
    p.add_argument("--out", required=True, help="output folder or URL (s3://bucket/prefix, ...)")
    p.add_argument("--views", type=positive_int, default=defaults.views, help=f"views per object (default {defaults.views})")
    p.add_argument("--resolution", type=positive_int, default=defaults.resolution, help=f"square image size in pixels (default {defaults.resolution})")
    p.add_argument("--engine", choices=ENGINES, default=defaults.engine, help="cycles (path traced, default) or workbench (fast, raster)")
    p.add_argument("--samples", type=positive_int, default=defaults.samples, help=f"Cycles samples per pixel (default {defaults.samples})")
    p.add_argument("--cameras", choices=CAMERA_MODES, default=defaults.camera_mode, help="random (uniform on the sphere band) or orbit (even azimuths at the mid elevation)")
    p.add_argument("--camera-distance", type=distance_range, default=defaults.camera_distance, metavar="MIN..MAX|auto",
                   help="camera distance from the centre, in box half-sizes; auto (default): per object, where the "
                        "bounding sphere of its box fills 90%% of the field of view (all of it in every view)")
    p.add_argument("--elevation-deg", type=float_range, default=defaults.elevation_deg, metavar="MIN..MAX", help="camera elevation in degrees (default -10..40)")
    p.add_argument("--fov-deg", type=positive_float, default=defaults.fov_deg, help=f"field of view in degrees (default {defaults.fov_deg})")
    p.add_argument("--background", type=background_colour, default=defaults.background, help="r,g,b in [0,1] (or white/black/gray) that the views are composited on (default white)")
    p.add_argument("--lighting", choices=LIGHTING, default=defaults.lighting, help="sun: a sun lamp + soft ambient light (default); uniform: ambient only (flat shading)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="camera seed (with the object id)")
    p.add_argument("--box", type=positive_float, default=defaults.box, help="training box half-size (the model's box_half_size, default 1)")
    p.add_argument("--fit", type=positive_float, default=defaults.fit, help="largest half-extent of the object after normalisation, as a fraction of --box (default 0.9)")
    p.add_argument("--max-faces", type=positive_int, default=defaults.max_faces, help="skip larger meshes as huge (default 5000000)")
    p.add_argument("--maxcount", type=positive_int, default=100, help="objects per part = per shard (default 100)")
    p.add_argument("--maxsize", type=byte_size, default=1 << 30, help="bytes per shard, e.g. 1G (default 1 GiB)")
    p.add_argument("--workers", type=positive_int, default=1, help="Blender processes on this machine (default 1)")
    p.add_argument("--ray-address", default=None, help="render on a Ray cluster (an address or 'auto'): one task per part")
    p.add_argument("--cpus-per-task", type=positive_float, default=1.0, help="Ray CPUs per task (Blender threads; default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with usage_errors(parser, ValueError):
        settings = RenderSettings(
            views=args.views, resolution=args.resolution, engine=args.engine, samples=args.samples,
            camera_mode=args.cameras, camera_distance=args.camera_distance, elevation_deg=args.elevation_deg,
            fov_deg=args.fov_deg, background=tuple(args.background), lighting=args.lighting, seed=args.seed,
            box=args.box, fit=args.fit, max_faces=args.max_faces)
    if args.ray_address is None:
        try:  # fail before any work when Blender is missing (Ray workers check their own)
            check_bpy_installed()
        except RenderDependencyError as error:
            print(f"render: {error}", file=sys.stderr)
            return 2
    with usage_errors(parser, InputError, ManifestError):
        jobs = find_meshes(args.sources)
        parts = split_parts(jobs, args.maxcount)
        start_run(args.out, settings, jobs, args.maxcount, args.maxsize)
    done = finished_parts(args.out, parts)
    todo = [p for p in parts if p.index not in done]
    already = sum(len(p.jobs) for p in parts if p.index in done)
    if done:
        print(f"render: resuming: {len(done)} of {len(parts)} parts ({already} objects) already in {args.out}", file=sys.stderr)
    bar = tqdm(total=len(jobs), initial=already, desc="render", unit="obj", disable=args.no_progress, file=sys.stderr,
               smoothing=0.1, dynamic_ncols=True)
    failed_parts: list[dict] = []
    start = time.perf_counter()
    try:
        if args.ray_address:
            skipped_parts = 0

            def on_part(part, record, error):
                nonlocal skipped_parts
                bar.update(len(part.jobs))
                if error:
                    failed_parts.extend({"object_id": j.object_id, "source_file": j.url, "reason": error} for j in part.jobs)
                skipped_parts += len(part.jobs) if error else len(record["skipped"])
                bar.set_postfix(skipped=skipped_parts, refresh=False)
            try:
                new_records = render_ray(todo, settings, args.out, args.ray_address, args.maxsize, on_part,
                                         args.cpus_per_task)
            except RayConnectError as error:
                print(f"render: {error}", file=sys.stderr)
                return 2
        else:
            skipped = 0

            def on_object(result):
                nonlocal skipped
                skipped += result.sample is None
                bar.update(1)
                bar.set_postfix(skipped=skipped, refresh=False)
            new_records = render_local(todo, settings, args.out, args.workers, args.maxsize, on_object)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    summary = write_summary(args.out, list(done.values()) + new_records)
    skipped = summary["skipped"] + failed_parts
    for warning in summary["warnings"]:
        print(f"render: warning: {warning['object_id']}: {warning['warning']}", file=sys.stderr)
    for item in skipped:
        print(f"render: skipped {item['object_id']} ({item['source_file']}): {item['reason']}", file=sys.stderr)
    rendered = sum(len(r["written"]) for r in new_records)
    rate = rendered / seconds * 60 if seconds > 0 else 0.0
    print(f"render: {summary['written']} objects in {len(summary['shards'])} shards in {args.out}; {len(skipped)} skipped; "
          f"{len(summary['warnings'])} warnings; this run rendered {rendered} in {seconds:.1f} s ({rate:.1f} objects/min"
          f"{'' if args.ray_address else f' on {args.workers} worker(s), {available_cores()} cores'})")
    return 1 if skipped else 0
