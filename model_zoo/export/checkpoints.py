"""Finding the checkpoint an export reads, checking it against its manifest, and downloading
the files the export needs (local paths or any fsspec URL)."""

from __future__ import annotations

import json
import os

import yaml

from data_pipeline import storage
from model_zoo.checkpoint_layout import (CHECKPOINT_MARKERS, CHECKPOINTS, LATEST, MANIFEST, MODEL_CONFIG, RUN_CONFIG,
                                         TAG_PREFIX, TRAINED_WEIGHTS, WEIGHTS)

# The portable files an export reads from a checkpoint, when its manifest lists them.
PORTABLE_FILES = (WEIGHTS, TRAINED_WEIGHTS, MODEL_CONFIG, RUN_CONFIG)


class ExportError(RuntimeError):
    """A checkpoint that cannot be exported; the message says why."""


def resolve_checkpoint(source: str) -> tuple[str, str]:
    """(checkpoints directory URL, tag) for a run dir, a checkpoints dir or a tag dir."""
    source = source.rstrip("/") or source
    if storage.is_local(source):
        source = os.path.abspath(storage.local_path(source))

    def has(name: str, base: str = source) -> bool:
        return storage.exists(storage.join(base, name))

    def latest_of(directory: str) -> str:
        with storage.open_url(storage.join(directory, LATEST), "rb") as f:
            tag = f.read().decode().strip()
        if not tag:
            raise ExportError(f"{storage.join(directory, LATEST)} is empty")
        return tag

    if has(MANIFEST):  # a tag directory
        return parent_url(source), storage.basename(source)
    # A step directory whose save never completed: refuse it here, before the branches below could
    # find some other checkpoint (its config.yaml names the run's checkpoint.dir) and export that.
    if storage.basename(source).startswith(TAG_PREFIX) or any(has(name) for name in CHECKPOINT_MARKERS):
        raise ExportError(f"{source} has no {MANIFEST}: that checkpoint was never completed (a crash mid-save?); "
                          f"refusing to export it or any other step in its place")
    if has(LATEST):  # a checkpoints directory
        return source, latest_of(source)
    checkpoints = storage.join(source, CHECKPOINTS)
    if has(LATEST, checkpoints):  # a run directory with its checkpoints inside
        return checkpoints, latest_of(checkpoints)
    if has(RUN_CONFIG):  # a run directory whose checkpoint.dir points elsewhere
        with storage.open_url(storage.join(source, RUN_CONFIG), "r") as f:
            elsewhere = ((yaml.safe_load(f) or {}).get("checkpoint") or {}).get("dir")
        if elsewhere and storage.exists(storage.join(elsewhere, LATEST)):
            return elsewhere.rstrip("/"), latest_of(elsewhere.rstrip("/"))
    raise ExportError(f"{source} is not a run directory, a checkpoints directory (with '{LATEST}') "
                      f"or a checkpoint (with {MANIFEST})")


def parent_url(url: str) -> str:
    """The directory that holds ``url`` (local path or URL)."""
    if storage.is_local(url):
        return os.path.dirname(os.path.abspath(storage.local_path(url)))
    return url.rstrip("/").rsplit("/", 1)[0]


def read_manifest(checkpoints_url: str, tag: str) -> dict:
    """The manifest of ``tag`` after checking the files the export reads exist with their sizes."""
    fs, base = storage.filesystem(checkpoints_url)
    base = f"{base.rstrip('/')}/{tag}"
    if not fs.exists(f"{base}/{MANIFEST}"):
        raise ExportError(f"checkpoint {checkpoints_url}/{tag} has no {MANIFEST}: it was never completed")
    with fs.open(f"{base}/{MANIFEST}", "rb") as f:
        manifest = json.loads(f.read().decode())
    if WEIGHTS not in manifest["files"] or MODEL_CONFIG not in manifest["files"]:
        location = f"{checkpoints_url}/{tag}"
        raise ExportError(f"checkpoint {location} has no portable weights ({WEIGHTS}, {MODEL_CONFIG}): it was "
                          f"written before checkpoints carried them. Add them with `python -m trainer.portable "
                          f"{location}` (local checkpoints; copy a remote one first), then export again")
    for name in PORTABLE_FILES:
        if name not in manifest["files"]:
            continue
        path = f"{base}/{name}"
        if not fs.exists(path):
            raise ExportError(f"checkpoint {checkpoints_url}/{tag} is missing {name} (listed in its manifest)")
        if fs.size(path) != manifest["files"][name]:
            raise ExportError(f"checkpoint {checkpoints_url}/{tag}: {name} has {fs.size(path)} bytes, "
                              f"the manifest says {manifest['files'][name]}")
    return manifest


def fetch_portable_files(checkpoints_url: str, tag: str, manifest: dict, into: str) -> list[str]:
    """Download the portable files the manifest lists into the local directory ``into``; their names."""
    names = [name for name in PORTABLE_FILES if name in manifest["files"]]
    fs, base = storage.filesystem(checkpoints_url)
    for name in names:
        fs.get(f"{base.rstrip('/')}/{tag}/{name}", os.path.join(into, name))
    return names


__all__ = ["ExportError", "PORTABLE_FILES", "fetch_portable_files", "parent_url", "read_manifest", "resolve_checkpoint"]
