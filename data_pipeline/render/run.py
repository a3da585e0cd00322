"""Running the parts: W local Blender worker processes, or Ray tasks on a cluster.

Local (``--workers W``): W spawned processes, each importing bpy once and rendering object
after object (a scene reset between objects costs ~0.04 s, the import ~0.6 s once); the parent
collects the objects of each part in input order and writes the part. A worker that dies (a
Blender crash) is replaced; an object in flight during two deaths is skipped, named.

Ray (``--ray-address``): one task per part, writing its own shards and manifest record directly
to the output URL. Ray reuses worker processes, so each keeps its Blender between tasks. A task
whose worker dies is retried by Ray (``max_retries``); a part whose retries are exhausted is
reported as skipped and left without a manifest record, so a re-run renders it again.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import sys
from concurrent.futures.process import BrokenProcessPool
from typing import Callable

from data_pipeline.render.blender import BlenderRenderer
from data_pipeline.render.objects import MeshJob, ObjectResult, render_object
from data_pipeline.render.parts import Part, write_part
from data_pipeline.render.settings import RenderSettings

_RENDERER: BlenderRenderer | None = None  # one Blender per worker process


class RayConnectError(RuntimeError):
    """--ray-address names no reachable cluster."""
TASK_MAX_RETRIES = 3


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_renderer(threads: int) -> BlenderRenderer:
    """This process's Blender. Its own prints go to the file $GOEMBED_RENDER_LOG names (PID appended), else nowhere."""
    global _RENDERER
    if _RENDERER is None:
        log = os.environ.get("GOEMBED_RENDER_LOG")
        _RENDERER = BlenderRenderer(threads=threads, log_path=f"{log}.{os.getpid()}" if log else None)
    return _RENDERER


def _init_worker(threads: int) -> None:
    worker_renderer(threads)


def _render_in_worker(job: MeshJob, settings: RenderSettings) -> ObjectResult:
    return render_object(worker_renderer(0), job, settings)


def render_local(parts: list[Part], settings: RenderSettings, out: str, workers: int, maxsize: int,
                 on_object: Callable[[ObjectResult], None], storage_options: dict | None = None) -> list[dict]:
    """Render the parts with ``workers`` Blender processes; returns the parts' manifest records."""
    threads = max(1, available_cores() // workers)
    queue = [(part.index, job) for part in parts for job in part.jobs]
    by_part = {part.index: part for part in parts}
    collected: dict[int, list[ObjectResult]] = {part.index: [] for part in parts}
    attempts: dict[str, int] = {}
    records: list[dict] = []
    position = 0

    def finish(part_index: int, result: ObjectResult) -> None:
        on_object(result)
        collected[part_index].append(result)
        part = by_part[part_index]
        if len(collected[part_index]) == len(part.jobs):
            records.append(write_part(out, part, collected.pop(part_index), maxsize, storage_options))

    context = multiprocessing.get_context("spawn")  # never fork a process that may hold threads
    while position < len(queue):
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                                    initargs=(threads,)) as pool:
            in_flight: dict[concurrent.futures.Future, tuple[int, MeshJob]] = {}
            broken = False
            while (position < len(queue) or in_flight) and not broken:
                while position < len(queue) and len(in_flight) < 2 * workers:
                    part_index, job = queue[position]
                    in_flight[pool.submit(_render_in_worker, job, settings)] = (part_index, job)
                    position += 1
                done, _ = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    part_index, job = in_flight.pop(future)
                    try:
                        finish(part_index, future.result())
                    except BrokenProcessPool:
                        broken = True
                        in_flight[future] = (part_index, job)
            if broken:  # a worker died: every object in flight may be the culprit; try them again
                retry = []
                for future, (part_index, job) in in_flight.items():
                    if future.done() and not future.exception():
                        finish(part_index, future.result())
                        continue
                    attempts[job.object_id] = attempts.get(job.object_id, 0) + 1
                    if attempts[job.object_id] >= 2:
                        finish(part_index, ObjectResult(job.object_id, job.url, error="the Blender worker died twice while rendering it"))
                    else:
                        retry.append((part_index, job))
                queue[position:position] = retry
                print(f"render: a Blender worker died; retrying {len(retry)} object(s) in a new pool", file=sys.stderr)
    return records


# --------------------------------------------------------------------------- Ray


def _ray_render_part(out: str, part: Part, settings: RenderSettings, maxsize: int, threads: int,
                     storage_options: dict | None) -> dict:
    renderer = worker_renderer(threads)
    results = [render_object(renderer, job, settings) for job in part.jobs]
    return write_part(out, part, results, maxsize, storage_options)


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast on a HOST:PORT nobody listens on (ray.init would retry for minutes)."""
    import socket

    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if address in ("auto", "local") or not port.isdigit():
        return
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as error:
        raise RayConnectError(f"cannot connect to the Ray cluster at {address!r} ({error})") from None


def render_ray(parts: list[Part], settings: RenderSettings, out: str, address: str, maxsize: int,
               on_part: Callable[[Part, dict | None, str | None], None], cpus_per_task: float = 1.0,
               storage_options: dict | None = None) -> list[dict]:
    """One Ray task per part; returns the manifest records of the parts that completed."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # see DESIGN.md: no token files on local clusters
    started_here = not ray.is_initialized()
    if started_here:
        _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise RayConnectError(f"cannot connect to the Ray cluster at {address!r} ({type(error).__name__}: "
                                  f"{str(error).strip().splitlines()[0] if str(error).strip() else ''})") from None
    try:
        task = ray.remote(_ray_render_part).options(num_cpus=cpus_per_task, max_retries=TASK_MAX_RETRIES,
                                                    name="render_part")
        cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
        limit = max(2, 2 * int(cluster_cpus / cpus_per_task))
        threads = max(1, int(cpus_per_task))
        pending = list(parts)
        in_flight: dict = {}
        records = []
        while pending or in_flight:
            while pending and len(in_flight) < limit:
                part = pending.pop(0)
                in_flight[task.remote(out, part, settings, maxsize, threads, storage_options)] = part
            done, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in done:
                part = in_flight.pop(ref)
                try:
                    record = ray.get(ref)
                except Exception as error:  # retries exhausted (or an error in our own code)
                    on_part(part, None, f"Ray task failed after {TASK_MAX_RETRIES} retries ({type(error).__name__}: "
                                        f"{str(error).strip().splitlines()[0] if str(error).strip() else ''})")
                    continue
                records.append(record)
                on_part(part, record, None)
        return records
    finally:
        if started_here:
            ray.shutdown()
