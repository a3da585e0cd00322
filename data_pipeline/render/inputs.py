"""Finding the meshes to render: files, folders (recursive), globs, or any fsspec URL of those."""

from __future__ import annotations

import glob
import os
import posixpath

from data_pipeline import storage
from data_pipeline.render.blender import MESH_EXTENSIONS
from data_pipeline.render.objects import MeshJob


class InputError(ValueError):
    """An input argument that names no mesh, or two meshes with the same object id."""


def _object_id(relative: str) -> str:
    """The path below the input root, without the extension ('chairs/0042.glb' -> 'chairs/0042')."""
    return posixpath.splitext(relative.replace(os.sep, "/"))[0]


def _is_mesh(name: str) -> bool:
    return name.lower().endswith(MESH_EXTENSIONS)


def _expand_one(source: str) -> list[MeshJob]:
    local = storage.is_local(source)
    if local:
        path = storage.local_path(source)
        if any(ch in path for ch in "*?["):
            matches = sorted(glob.glob(path, recursive=True))
            return [MeshJob(_object_id(os.path.basename(m)), m) for m in matches if os.path.isfile(m)]
        if os.path.isdir(path):
            found = []
            for root, _, files in os.walk(path):
                found += [os.path.join(root, f) for f in files if _is_mesh(f)]
            return [MeshJob(_object_id(os.path.relpath(f, path)), f) for f in sorted(found)]
        if os.path.exists(path):
            return [MeshJob(_object_id(os.path.basename(path)), path)]
        raise InputError(f"{source}: no such file or folder")
    fs, path = storage.filesystem(source)
    scheme = storage.protocol_of(source) + "://"
    if any(ch in path for ch in "*?["):
        return [MeshJob(_object_id(posixpath.basename(m)), scheme + m) for m in sorted(fs.glob(path)) if fs.isfile(m)]
    if fs.isdir(path):
        files = sorted(f for f in fs.find(path) if _is_mesh(f))
        return [MeshJob(_object_id(posixpath.relpath(f, path)), scheme + f) for f in files]
    if fs.exists(path):
        return [MeshJob(_object_id(posixpath.basename(path)), source)]
    raise InputError(f"{source}: no such file or folder")


def find_meshes(sources: list[str]) -> list[MeshJob]:
    """Every mesh the sources name, sorted by object id (so the split into parts is stable).

    A file named explicitly (or by a glob) is taken whatever its extension, so that a non-mesh
    file is reported as skipped rather than silently ignored; folders contribute mesh files only.
    """
    jobs: dict[str, MeshJob] = {}
    for source in sources:
        found = _expand_one(source)
        if not found:
            raise InputError(f"{source}: names no mesh file ({', '.join(MESH_EXTENSIONS)})")
        for job in found:
            other = jobs.get(job.object_id)
            if other is not None and other.url != job.url:
                raise InputError(f"object id {job.object_id!r} is given by two files: {other.url} and {job.url} "
                                 f"(object ids are paths below the input folder without the extension)")
            jobs[job.object_id] = job
    return [jobs[k] for k in sorted(jobs)]
