"""Shard indices: the byte offset of every sample, saved beside each shard or found by a scan.

Beside each shard ``X.tar`` the writer puts ``X.tar.idx.json``: the byte offset of every sample's
first member. The reader uses it to split an epoch at sample granularity (equal batches on every
rank, whatever the shard sizes) and to resume mid-shard with one ranged read instead of re-reading
the shard from the start. Shards written by other tools have no index; :func:`load_or_build_index`
scans them once.
"""

from __future__ import annotations

import dataclasses
import json
import tarfile
from dataclasses import dataclass

from data_pipeline import storage
from data_pipeline.shards.tar import iter_tar_groups

INDEX_SUFFIX = ".idx.json"
INDEX_FORMAT = "goembed-shard-index/1"


@dataclass(frozen=True)
class ShardIndex:
    url: str
    keys: tuple[str, ...]
    offsets: tuple[int, ...]  # byte offset of each sample's first tar header
    num_bytes: int
    error: str | None = None  # set when a scan stopped early at corrupt or truncated data
    note: str | None = None  # why the sidecar index was not used, when it was not

    def __len__(self) -> int:
        return len(self.keys)

    def to_json(self) -> dict:
        return {"format": INDEX_FORMAT, "num_bytes": self.num_bytes, "keys": list(self.keys), "offsets": list(self.offsets)}


def write_index(index: ShardIndex, storage_options: dict | None = None) -> None:
    with storage.open_url(index.url + INDEX_SUFFIX, "wb", storage_options) as f:
        f.write(json.dumps(index.to_json()).encode("utf-8"))


def scan_index(url: str, storage_options: dict | None = None) -> ShardIndex:
    """Build a shard's index by reading it through once (for shards written by other tools)."""
    keys, offsets, error = [], [], None
    fs, path = storage.filesystem(url, storage_options)
    with fs.open(path, "rb") as f:
        try:
            for key, offset, _ in iter_tar_groups(f):
                keys.append(key)
                offsets.append(offset)
        except (tarfile.TarError, EOFError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            # The last group may be incomplete: it is where the damage starts.
            keys, offsets = keys[:-1], offsets[:-1]
    return ShardIndex(url, tuple(keys), tuple(offsets), fs.size(path), error)


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
        return ShardIndex(url, tuple(str(k) for k in raw["keys"]), tuple(int(o) for o in raw["offsets"]), int(raw["num_bytes"]))
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        if isinstance(error, IndexFileError):
            raise
        raise IndexFileError(f"{where}: malformed field ({type(error).__name__}: {error})") from None


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
        return dataclasses.replace(index, note=f"{mismatch}: truncated; only its first {len(scanned)} of "
                                               f"{len(index)} samples are certainly complete")
    return dataclasses.replace(scanned, note=f"{mismatch}, and lists other samples: it does not belong to this "
                                             f"shard; scanned the shard instead")
