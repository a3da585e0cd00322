"""Shard indices: the byte offset of every sample, saved beside each shard or found by a scan.

Beside each shard ``X.tar`` the writer puts ``X.tar.idx.json``: the byte offset of every sample's
first member. The reader uses it to split an epoch at sample granularity (equal batches on every
rank, whatever the shard sizes) and to resume mid-shard with one ranged read instead of re-reading
the shard from the start. Shards written by other tools have no index; :func:`load_or_build_index`
scans them once.

Since this round the index may also hold a *member table* (``"members"``, see
:class:`MemberTable`): where each member's data lies and how long it is, so that a ranged read
slices the members out of its buffer instead of walking their tar headers. The writer and the
scan record it; an index without it (written before) is read as before, by the header walk, and
readers before this round ignore the field (the format name is unchanged).
"""

from __future__ import annotations

import dataclasses
import json
import tarfile
from dataclasses import dataclass, field

import numpy as np

from data_pipeline import storage
from data_pipeline.shards.tar import iter_tar_groups

INDEX_SUFFIX = ".idx.json"
INDEX_FORMAT = "goembed-shard-index/1"
_U32 = 1 << 32


@dataclass(frozen=True, eq=False)
class MemberTable:
    """Where the members of every sample lie, relative to the sample's offset (its first header).

    Sample ``i``'s members are ``layouts[layout_of[i]]`` (their suffixes, in the order and with
    the values that the header walk's grouping gives: :func:`.tar.group_members`), and rows
    ``first[i]:first[i + 1]`` of ``data_at`` (where the member's data starts, counted from the
    sample's offset) and ``size``. Memory: 8 bytes per member (most shards have one layout).
    JSON: ``{"layouts": [[suffix, ...], ...], "layout_of": [...], "data_at": [...], "size": [...]}``,
    the last two flat over all members in file order.
    """

    layouts: tuple[tuple[str, ...], ...]
    layout_of: np.ndarray  # (samples,) int32
    data_at: np.ndarray  # (members,) uint32
    size: np.ndarray  # (members,) uint32
    first: np.ndarray = field(init=False)  # (samples + 1,) int64: each sample's first row

    def __post_init__(self):
        lengths = np.array([len(layout) for layout in self.layouts], dtype=np.int64)
        object.__setattr__(self, "first", np.r_[0, np.cumsum(lengths[self.layout_of])].astype(np.int64))
        if self.first[-1] != len(self.data_at) or len(self.data_at) != len(self.size):
            raise ValueError(f"the member table lists {self.first[-1]} members by its layouts, "
                             f"{len(self.data_at)} data offsets and {len(self.size)} sizes")

    def __len__(self) -> int:
        return len(self.layout_of)

    @staticmethod
    def build(groups: list[dict[str, tuple[int, int]]], offsets) -> "MemberTable | None":
        """From each sample's {suffix: (data offset in the shard, size)}; None if one does not fit 32 bits."""
        layouts: dict[tuple[str, ...], int] = {}
        layout_of, data_at, size = [], [], []
        for members, offset in zip(groups, offsets):
            layout_of.append(layouts.setdefault(tuple(members), len(layouts)))
            for at, n in members.values():
                data_at.append(at - offset)
                size.append(n)
        if any(not 0 <= v < _U32 for v in data_at) or any(not 0 <= v < _U32 for v in size):
            return None
        return MemberTable(tuple(layouts), np.array(layout_of, dtype=np.int32),
                           np.array(data_at, dtype=np.uint32), np.array(size, dtype=np.uint32))

    def to_json(self) -> dict:
        return {"layouts": [list(layout) for layout in self.layouts], "layout_of": self.layout_of.tolist(),
                "data_at": self.data_at.tolist(), "size": self.size.tolist()}

    @staticmethod
    def from_json(raw: dict) -> "MemberTable":
        layouts = tuple(tuple(str(s) for s in layout) for layout in raw["layouts"])
        layout_of = np.array(raw["layout_of"], dtype=np.int64)
        if len(layout_of) and not (0 <= layout_of.min() and layout_of.max() < len(layouts)):
            raise ValueError("layout_of names a layout that is not listed")
        data_at, size = (np.array(raw[name], dtype=np.int64) for name in ("data_at", "size"))
        if any(len(a) and not (0 <= a.min() and a.max() < _U32) for a in (data_at, size)):
            raise ValueError("a data offset or size outside 0 .. 2**32 - 1")
        return MemberTable(layouts, layout_of.astype(np.int32), data_at.astype(np.uint32), size.astype(np.uint32))


@dataclass(frozen=True)
class ShardIndex:
    url: str
    keys: tuple[str, ...]
    offsets: tuple[int, ...]  # byte offset of each sample's first tar header
    num_bytes: int
    error: str | None = None  # set when a scan stopped early at corrupt or truncated data
    note: str | None = None  # why the sidecar index was not used, when it was not
    # where each sample's members lie (a ranged read then slices them without walking tar headers);
    # None for an index written before member tables: the reader walks the headers then
    members: MemberTable | None = field(default=None, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.keys)

    def to_json(self) -> dict:
        out = {"format": INDEX_FORMAT, "num_bytes": self.num_bytes, "keys": list(self.keys), "offsets": list(self.offsets)}
        if self.members is not None:
            out["members"] = self.members.to_json()
        return out


def write_index(index: ShardIndex, storage_options: dict | None = None) -> None:
    with storage.open_url(index.url + INDEX_SUFFIX, "wb", storage_options) as f:
        f.write(json.dumps(index.to_json()).encode("utf-8"))


def scan_index(url: str, storage_options: dict | None = None) -> ShardIndex:
    """Build a shard's index by reading it through once (for shards written by other tools)."""
    keys, offsets, groups, error = [], [], [], None
    fs, path = storage.filesystem(url, storage_options)
    with fs.open(path, "rb") as f:
        try:
            for key, offset, members in iter_tar_groups(f, positions=True):
                keys.append(key)
                offsets.append(offset)
                groups.append(members)
        except (tarfile.TarError, EOFError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            # The last group may be incomplete: it is where the damage starts.
            keys, offsets, groups = keys[:-1], offsets[:-1], groups[:-1]
    return ShardIndex(url, tuple(keys), tuple(offsets), fs.size(path), error, members=MemberTable.build(groups, offsets))


class IndexFileError(ValueError):
    """A sidecar index that cannot be used; the message names the file and the reason."""


def read_index(url: str, storage_options: dict | None = None) -> ShardIndex | None:
    """The shard's saved index, or None when it has none; :class:`IndexFileError` when it is malformed."""
    where = url + INDEX_SUFFIX
    try:
        with storage.open_url(where, "rb", storage_options) as f:
            raw = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IndexFileError(f"{where}: not valid JSON ({error})") from None
    try:
        if raw.get("format") != INDEX_FORMAT:
            raise IndexFileError(f"{where}: not a shard index (format {raw.get('format')!r}, expected {INDEX_FORMAT!r})")
        if len(raw["keys"]) != len(raw["offsets"]):
            raise IndexFileError(f"{where}: lists {len(raw['keys'])} keys but {len(raw['offsets'])} offsets")
        keys = tuple(str(k) for k in raw["keys"])
        index = ShardIndex(url, keys, tuple(int(o) for o in raw["offsets"]), int(raw["num_bytes"]))
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        if isinstance(error, IndexFileError):
            raise
        raise IndexFileError(f"{where}: malformed field ({type(error).__name__}: {error})") from None
    if raw.get("members") is None:  # an index written before member tables: the reader walks tar headers
        return index
    # A damaged member table costs only speed: it is set aside (the headers are walked, as for an
    # index without one), and the note says so (the reader reports it with the shard's problems).
    try:
        members = MemberTable.from_json(raw["members"])
        if len(members) != len(keys):
            raise ValueError(f"it lists {len(members)} samples, the index {len(keys)}")
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        return dataclasses.replace(index, note=f"{where}: member table set aside ({type(error).__name__}: {error}); "
                                               f"tar headers are walked instead")
    return dataclasses.replace(index, members=members)


def load_or_build_index(url: str, storage_options: dict | None = None) -> ShardIndex:
    """The shard's index: its sidecar when that is usable, else a scan of the shard.

    A malformed sidecar is not trusted: the shard is scanned instead. A sidecar whose byte count is
    not the shard's size is checked against a scan: when the shard's samples are a prefix of the
    sidecar's (the shard was truncated, or emptied), the sidecar is kept, so the reader knows
    exactly which samples are lost and counts them as it meets them; otherwise (another shard's
    index, a rewritten shard) the scan is used. ``ShardIndex.note`` keeps the reason either way.
    """
    try:
        index = read_index(url, storage_options)
    except IndexFileError as error:
        return dataclasses.replace(scan_index(url, storage_options), note=f"{error}; scanned the shard instead")
    if index is None:
        return scan_index(url, storage_options)
    fs, path = storage.filesystem(url, storage_options)
    size = int(fs.size(path))
    if size == index.num_bytes:
        return index
    scanned = scan_index(url, storage_options)
    mismatch = f"{url}{INDEX_SUFFIX} says {index.num_bytes} bytes, the shard has {size}"
    if index.keys[:len(scanned)] == scanned.keys and index.offsets[:len(scanned)] == scanned.offsets:
        # (its member table stays: ranged reads check it against the headers they meet, and a
        # read that comes up short walks the headers, so the lost samples are found as before)
        return dataclasses.replace(index, note=f"{mismatch}: truncated; only its first {len(scanned)} of "
                                               f"{len(index)} samples are certainly complete")
    return dataclasses.replace(scanned, note=f"{mismatch}, and lists other samples: it does not belong to this "
                                             f"shard; scanned the shard instead")
