"""Atomic local file writes: a reader (a viewer, a resuming run, another rank) sees the old file
or the new one, never half of one.

The data is written to a hidden temporary file beside the target (``.NAME.tmp``, on the same
filesystem, so the rename is atomic), then renamed over it. An error while writing removes the
temporary file and leaves the target as it was. Object stores need none of this: their PUT is
atomic already (see :mod:`data_pipeline.storage`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", fsync: bool = False, **open_kwargs) -> Iterator[IO]:
    """``with atomic_write(path) as f: f.write(...)``: ``path`` is replaced when the block ends
    without an error. ``mode`` is "w" or "wb"; ``fsync=True`` also survives a machine crash
    (the data reaches the disk before the rename). The parent directory is created if needed."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    if mode == "w":
        open_kwargs.setdefault("encoding", "utf-8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes, fsync: bool = False) -> None:
    """Replace ``path`` with ``data`` (text or bytes) atomically."""
    with atomic_write(path, "wb" if isinstance(data, bytes) else "w", fsync=fsync) as f:
        f.write(data)


__all__ = ["atomic_write", "write_atomic"]
