"""Benchmark of data_pipeline.render: objects per minute per core, Ray scaling, Blender start-up.

    python bench/render.py [--views 32] [--samples 16] [--objects 3] [--cycles-objects 1]

Prints one JSON line:

* ``objects_per_min_per_core``: for Workbench and Cycles at 128 and 256 px x ``--views`` views,
  one Blender (one worker, one render thread) rendering the example meshes one after another
  (import + normalise + render + PNG encode of views and masks: everything but writing shards);
* ``blender_startup``: ``import_s`` (import bpy in a fresh process: what a process per object
  pays every time) against ``reset_s`` (the scene reset between objects in a long-lived worker,
  the median over the objects rendered above), and their ratio;
* ``ray``: the same objects (Workbench, 128 px) through ``render_ray`` on an in-process Ray
  cluster with 1 and then 2 CPUs (one task per object, one render thread each); ``speedup`` is
  the objects/s ratio. Ray start-up is not timed; worker processes (bpy import) are.

The machine is shared (2 cores, other jobs running): absolute numbers move with the load;
``load_average`` is recorded beside them, and ratios measured in the same run are what to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipeline.render.example_meshes import make_meshes  # noqa: E402
from data_pipeline.render.objects import MeshJob, render_object  # noqa: E402
from data_pipeline.render.parts import split_parts  # noqa: E402
from data_pipeline.render.settings import RenderSettings  # noqa: E402


def time_import_bpy() -> float:
    """Seconds to import bpy in a fresh interpreter (median of 3), minus a bare interpreter start."""
    def run(code: str) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        return time.perf_counter() - start
    bare = statistics.median(run("pass") for _ in range(3))
    return statistics.median(run("import bpy") for _ in range(3)) - bare


def render_rate(renderer, jobs: list[MeshJob], settings: RenderSettings) -> tuple[float, list[float]]:
    """(objects per minute on one core, scene-reset seconds per object)."""
    start = time.perf_counter()
    resets = []
    for job in jobs:
        result = render_object(renderer, job, settings)
        if result.sample is None:
            raise RuntimeError(f"{job.object_id}: {result.error}")
        resets.append(result.seconds["reset"])
    return len(jobs) / ((time.perf_counter() - start) / 60.0), resets


def ray_rate(jobs: list[MeshJob], settings: RenderSettings, cpus: int, out: str) -> float:
    import ray

    from data_pipeline.render.run import render_ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    temp_dir = tempfile.mkdtemp(prefix="ray_b12_", dir="/tmp")  # short: Ray's socket paths must fit
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False, _temp_dir=temp_dir,
             runtime_env={"env_vars": {"PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}})
    try:
        parts = split_parts(jobs, 1)
        start = time.perf_counter()
        render_ray(parts, settings, out, "local", 1 << 30, lambda *a: None, cpus_per_task=1.0)
        return len(jobs) / (time.perf_counter() - start)
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--views", type=int, default=32)
    parser.add_argument("--samples", type=int, default=16, help="Cycles samples per pixel")
    parser.add_argument("--objects", type=int, default=3, help="example meshes per Workbench measurement (max 4)")
    parser.add_argument("--cycles-objects", type=int, default=1, help="example meshes per Cycles measurement")
    parser.add_argument("--ray-objects", type=int, default=4)
    args = parser.parse_args()

    from data_pipeline.render.blender import BlenderRenderer

    work = tempfile.mkdtemp(prefix="bench-render-")
    paths = make_meshes(os.path.join(work, "meshes"))
    jobs = [MeshJob(object_id, path) for object_id, path in sorted(paths.items())]
    renderer = BlenderRenderer(threads=1)
    result: dict = {"views": args.views, "cycles_samples": args.samples, "threads_per_blender": 1,
                    "load_average_start": os.getloadavg()[0],
                    "note": "shared 2-core machine: absolute numbers move with other jobs' load"}
    rates, resets = {}, []
    for engine, count in (("workbench", args.objects), ("cycles", args.cycles_objects)):
        for resolution in (128, 256):
            settings = RenderSettings(views=args.views, resolution=resolution, engine=engine, samples=args.samples)
            rate, reset = render_rate(renderer, jobs[:count], settings)
            rates[f"{engine}_{resolution}px"] = round(rate, 3)
            resets += reset
    result["objects_per_min_per_core"] = rates
    import_s = time_import_bpy()
    reset_s = statistics.median(resets)
    result["blender_startup"] = {"import_s": round(import_s, 3), "reset_s": round(reset_s, 4),
                                 "import_over_reset": round(import_s / reset_s, 1)}
    ray_jobs = [jobs[i % len(jobs)] for i in range(args.ray_objects)]
    ray_jobs = [MeshJob(f"{job.object_id}_{i}", job.url) for i, job in enumerate(ray_jobs)]
    settings = RenderSettings(views=args.views, resolution=128, engine="workbench")
    one = ray_rate(ray_jobs, settings, 1, os.path.join(work, "ray1"))
    two = ray_rate(ray_jobs, settings, 2, os.path.join(work, "ray2"))
    result["ray"] = {"objects": len(ray_jobs), "engine": "workbench", "resolution": 128,
                     "objects_per_s_1_worker": round(one, 3), "objects_per_s_2_workers": round(two, 3),
                     "speedup": round(two / one, 2)}
    result["load_average_end"] = os.getloadavg()[0]
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
