"""Reading consecutive samples of a shard from any byte offset, with one exact ranged read."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from data_pipeline import storage
from data_pipeline.shards.index import ShardIndex
from data_pipeline.shards.tar import TarDamage, group_members, sizes_match, parse_members, span_bytes


@dataclass
class RawRange:
    """Consecutive samples of one shard, still encoded: one buffer and, per sample, its members' spans."""

    url: str
    buffer: bytes
    groups: list[tuple[str, dict[str, int]]]  # (key, {suffix: span}); see span_bytes
    damage: str | None = None  # why the range stops short of what was asked, if it does


def read_raw_range(url: str, index: ShardIndex, first: int, count: int, storage_options: dict | None = None) -> RawRange:
    """Samples ``first .. first+count-1`` of a shard with a single exact ranged read, parsed lazily.

    Only the tar headers are parsed here; a sample's members are sliced from the buffer when the
    sample is used. Damage (a short read, a bad header) ends the range early with ``damage`` set.
    With the index's member table the headers are not walked but checked, all at once
    (:func:`groups_from_table`); whatever that check does not accept is walked as before.
    """
    start = index.offsets[first]
    end = index.offsets[first + count] if first + count < len(index) else index.num_bytes
    buffer = _read(url, start, end, storage_options)
    if index.members is not None and len(buffer) == end - start:
        groups = groups_from_table(index, first, count, buffer)
        if groups is not None:
            return RawRange(url, buffer, groups)
    return _walk(url, index, first, count, buffer, start, end)


def _read(url: str, start: int, end: int, storage_options: dict | None) -> bytes:
    """Bytes ``start .. end - 1`` of a shard (fewer if it is shorter), with one exact read."""
    if storage.is_local(url):
        return _pread(storage.local_path(url), start, end)
    fs, path = storage.filesystem(url, storage_options)
    # cat_file makes one exact ranged GET on object stores; a file object would read ahead blocks.
    return fs.cat_file(path, start=start, end=end)


def advise_will_read(url: str, index: ShardIndex, first: int, count: int) -> None:
    """Tell the kernel that samples ``first .. first+count-1`` of a local shard will be read soon
    (``posix_fadvise`` WILLNEED: it starts reading them from disk in the background); a no-op for
    object stores, and wherever the hint is not available or the file cannot be opened."""
    if not storage.is_local(url) or not hasattr(os, "posix_fadvise") or not count:
        return
    start = index.offsets[first]
    end = index.offsets[first + count] if first + count < len(index) else index.num_bytes
    try:
        fd = _descriptor(storage.local_path(url))
        if fd is not None:
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass  # only a hint: the read itself reports what is wrong


_OPEN: dict[str, tuple[int, int, int]] = {}  # local shard path -> (fd, st_dev, st_ino), per process
_OPEN_LOCK = threading.Lock()
_MAX_OPEN = 256


def _fresh_lock_after_fork() -> None:  # a lock held by another thread at a fork would stay held in the child
    global _OPEN_LOCK
    _OPEN_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_lock_after_fork)


def _pread(path: str, start: int, end: int) -> bytes:
    """A local read with ``os.pread`` on a descriptor kept open: a third of fsspec's open + seek +
    read + close for a piece of 8 objects. A shard replaced on disk (another inode) is opened
    afresh; a descriptor is never closed while another thread might read with it (a replaced
    shard leaves its old one open); past ``_MAX_OPEN`` shards, each read opens and closes its own.
    """
    fd = _descriptor(path)
    if fd is not None:
        return os.pread(fd, end - start, start)
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, end - start, start)
    finally:
        os.close(fd)


def _descriptor(path: str) -> int | None:
    """The kept-open descriptor of a local shard (see _pread), or None past _MAX_OPEN shards."""
    stat = os.stat(path)
    with _OPEN_LOCK:
        known = _OPEN.get(path)
        if known is not None and known[1:] == (stat.st_dev, stat.st_ino):
            return known[0]
        if len(_OPEN) < _MAX_OPEN or known is not None:
            fd = os.open(path, os.O_RDONLY)
            _OPEN[path] = (fd, stat.st_dev, stat.st_ino)
            return fd
    return None


def groups_from_table(index: ShardIndex, first: int, count: int, buffer: bytes) -> list | None:
    """The range's groups from the member table, or None when its headers do not bear it out.

    Each member's tar header (the block before its data) must give the table's size, and each
    sample's first header must name its key: a table of another shard, a garbled name or size, or
    a rewritten shard fails this and is walked (and diagnosed) instead. Header checksums are not
    checked here (the walk checks them): a header garbled elsewhere than its name or size no
    longer costs the samples after it, and the data itself is checked as before (PNG chunk CRCs,
    the JSON parse).
    """
    table = index.members
    bounds = table.first[first:first + count + 1]
    rows = slice(int(bounds[0]), int(bounds[-1]))
    base = np.asarray(index.offsets[first:first + count], dtype=np.int64) - index.offsets[first]
    at = np.repeat(base, np.diff(bounds)) + table.data_at[rows]  # each member's data, in the buffer
    size = table.size[rows]
    if len(at) and (at.min() < 512 or (at + size).max() > len(buffer) or not sizes_match(buffer, at - 512, size)):
        return None
    keys = index.keys[first:first + count]
    # each sample's first member is named "KEY.suffix" (a long name: its first 100 bytes, the name
    # field, as tarfile and GNU tar write it beside the pax / long-name header)
    for key, data_at in zip(keys, at[bounds[:-1] - bounds[0]].tolist()):
        if not buffer.startswith((key.encode() + b".")[:100], data_at - 512):
            return None
    spans = ((at << 32) | size).tolist()
    groups, row = [], 0
    for key, layout_id in zip(keys, table.layout_of[first:first + count].tolist()):
        layout = table.layouts[layout_id]
        groups.append((key, dict(zip(layout, spans[row:row + len(layout)]))))
        row += len(layout)
    return groups


def _walk(url: str, index: ShardIndex, first: int, count: int, buffer: bytes, start: int, end: int) -> RawRange:
    """The range's groups from its tar headers (indices without a member table, or damage)."""
    found, _, damage, _ = parse_members(buffer, start, final=True)
    groups = [(key, members) for key, _, members in group_members(found)]
    if damage is None and len(buffer) < end - start:
        damage = f"the shard ends at byte {start + len(buffer)}, before byte {end} where its index says sample {first + count} starts"
    return RawRange(url, buffer, groups, damage)


def read_sample_range(url: str, index: ShardIndex, first: int, count: int,
                      storage_options: dict | None = None) -> Iterator[tuple[str, int, dict[str, bytes]]]:
    """Samples ``first .. first+count-1`` of a shard as (key, offset, {suffix: bytes}), one ranged read."""
    raw = read_raw_range(url, index, first, count, storage_options)
    for (key, members), offset in zip(raw.groups, index.offsets[first:first + count]):
        yield key, offset, {suffix: span_bytes(raw.buffer, span) for suffix, span in members.items()}
    if raw.damage:
        raise TarDamage(f"{url}: {raw.damage}")
