"""The work split into parts, their shards, and the manifest that makes a run resumable.

The sorted list of meshes is cut into parts of ``objects_per_part`` consecutive objects. Part i
is written as ``shard-{i:06d}-{j:06d}.tar`` (j > 0 only when --maxsize splits it), and when its
shards are complete, ``manifest/part-{i:06d}.json`` records what it holds: the objects written
and the objects skipped with their reasons. A part is the unit of work of a Ray task and of
resuming: a re-run with the same arguments skips every part that has its manifest record and
renders the others again from scratch (whatever a killed run left of them is overwritten), so
its output equals that of an uninterrupted run. ``manifest/run.json`` holds the settings and a
fingerprint of the input list; a re-run with different ones is refused rather than mixed in.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from data_pipeline import storage
from data_pipeline.render.objects import MeshJob, ObjectResult
from data_pipeline.render.settings import RenderSettings
from data_pipeline.shards import ShardWriter

MANIFEST_DIR = "manifest"
MANIFEST_FORMAT = "goembed-render-manifest/1"


class ManifestError(ValueError):
    """The output folder holds a run with other settings or other inputs."""


@dataclass(frozen=True)
class Part:
    index: int
    jobs: tuple[MeshJob, ...]

    @property
    def prefix(self) -> str:
        return f"shard-{self.index:06d}"


def split_parts(jobs: list[MeshJob], objects_per_part: int) -> list[Part]:
    return [Part(i, tuple(jobs[start:start + objects_per_part]))
            for i, start in enumerate(range(0, len(jobs), objects_per_part))]


def inputs_fingerprint(jobs: list[MeshJob], objects_per_part: int) -> str:
    digest = hashlib.sha256(f"{objects_per_part}\n".encode())
    for job in jobs:
        digest.update(f"{job.object_id}\t{job.url}\n".encode())
    return digest.hexdigest()[:16]


def _manifest_url(out: str, name: str) -> str:
    return storage.join(storage.join(out, MANIFEST_DIR), name)


def _read_json(url: str, storage_options: dict | None) -> dict | None:
    try:
        with storage.open_url(url, "rb", storage_options) as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None


def _write_json(url: str, value: dict, storage_options: dict | None) -> None:
    data = json.dumps(value, indent=1, sort_keys=True).encode("utf-8")
    if storage.is_local(url):  # write then rename: a killed writer never leaves a half record
        with storage.open_url(url + ".partial", "wb", storage_options) as f:
            f.write(data)
        storage.rename(url + ".partial", url, storage_options)
    else:
        with storage.open_url(url, "wb", storage_options) as f:
            f.write(data)


def start_run(out: str, settings: RenderSettings, jobs: list[MeshJob], objects_per_part: int, maxsize: int,
              storage_options: dict | None = None) -> None:
    """Record the run's settings, or check that a previous run in ``out`` had the same ones."""
    record = {"format": MANIFEST_FORMAT, "settings": settings.to_json(), "settings_fingerprint": settings.fingerprint(),
              "inputs_fingerprint": inputs_fingerprint(jobs, objects_per_part), "objects": len(jobs),
              "objects_per_part": objects_per_part, "maxsize": maxsize}
    url = _manifest_url(out, "run.json")
    previous = _read_json(url, storage_options)
    if previous is None:
        storage.makedirs(storage.join(out, MANIFEST_DIR), storage_options)
        _write_json(url, record, storage_options)
        return
    for name, what in (("settings_fingerprint", "render settings"), ("inputs_fingerprint", "input meshes (or --maxcount)"),
                       ("maxsize", "--maxsize")):
        if previous.get(name) != record[name]:
            raise ManifestError(f"{out} holds a render run with other {what} ({url}); re-run with the same "
                                f"arguments to resume it, or choose another --out")


def finished_parts(out: str, parts: list[Part], storage_options: dict | None = None) -> dict[int, dict]:
    """Manifest records of the parts already complete in ``out``.

    One listing of the manifest folder, then only the records that exist are read, in parallel
    (10 000 parts on an object store would otherwise be 10 000 sequential requests).
    """
    folder = storage.join(out, MANIFEST_DIR)
    fs, path = storage.filesystem(folder, storage_options)
    try:
        names = {posixpath.basename(str(p).rstrip("/")) for p in fs.ls(path, detail=False)}
    except FileNotFoundError:
        return {}
    present = [part for part in parts if f"part-{part.index:06d}.json" in names]

    def read(part: Part) -> tuple[Part, dict | None]:
        return part, _read_json(_manifest_url(out, f"part-{part.index:06d}.json"), storage_options)

    done = {}
    with ThreadPoolExecutor(max_workers=16) as pool:
        for part, record in pool.map(read, present):
            if record is not None and record.get("objects") == [j.object_id for j in part.jobs]:
                done[part.index] = record
    return done


def write_part(out: str, part: Part, results: list[ObjectResult], maxsize: int,
               storage_options: dict | None = None) -> dict:
    """Write one part's shards (objects in input order) and then its manifest record."""
    by_id = {r.object_id: r for r in results}
    written, skipped, warnings = [], [], []
    writer = ShardWriter(out, prefix=part.prefix, max_objects=max(1, len(part.jobs)), max_bytes=maxsize,
                         storage_options=storage_options)
    with writer:
        for job in part.jobs:
            result = by_id[job.object_id]
            if result.sample is None:
                skipped.append({"object_id": job.object_id, "source_file": job.url, "reason": result.error})
                continue
            writer.write(result.sample)
            written.append(job.object_id)
            warnings += [{"object_id": job.object_id, "warning": w} for w in result.warnings]
    record = {"format": MANIFEST_FORMAT, "part": part.index, "objects": [j.object_id for j in part.jobs],
              "written": written, "skipped": skipped, "warnings": warnings,
              "shards": [storage.basename(u) for u in writer.shard_urls]}
    _write_json(_manifest_url(out, f"part-{part.index:06d}.json"), record, storage_options)
    return record


def write_summary(out: str, records: list[dict], storage_options: dict | None = None) -> dict:
    records = sorted(records, key=lambda r: r["part"])
    summary = {"format": MANIFEST_FORMAT, "parts": len(records),
               "written": sum(len(r["written"]) for r in records),
               "skipped": [s for r in records for s in r["skipped"]],
               "warnings": [w for r in records for w in r["warnings"]],
               "shards": [s for r in records for s in r["shards"]]}
    _write_json(_manifest_url(out, "summary.json"), summary, storage_options)
    return summary
