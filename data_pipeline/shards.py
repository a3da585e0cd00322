"""Writing shards, their sample indices, and reading samples back from any byte offset.

Shards are plain tar files (see schema.py). Beside each shard ``X.tar`` the writer puts
``X.tar.idx.json``: the byte offset of every sample's first member. The reader uses it to
split an epoch at sample granularity (equal batches on every rank, whatever the shard sizes)
and to resume mid-shard with one ranged read instead of re-reading the shard from the start.
Shards written by other tools have no index; :func:`load_or_build_index` scans them once.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
import tarfile
from dataclasses import dataclass
from typing import Iterator

from data_pipeline import storage
from data_pipeline.schema import ObjectSample

INDEX_SUFFIX = ".idx.json"
INDEX_FORMAT = "goembed-shard-index/1"
# Fixed header fields make shards byte-for-byte deterministic for a given input.
_TAR_MTIME = 1_700_000_000


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


class ShardWriter:
    """Writes ObjectSamples into ``{out}/{prefix}-{000000}.tar`` shards (local or any fsspec URL).

    A shard is closed when it holds ``max_objects`` samples or would exceed ``max_bytes``.
    Local shards are written under a temporary name and renamed when complete, so a crash never
    leaves a shard that looks finished; object stores commit an upload only on close.
    """

    def __init__(self, out: str, prefix: str = "shard", max_objects: int = 1000, max_bytes: int = 1 << 30,
                 storage_options: dict | None = None):
        if max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {max_objects}")
        self.out, self.prefix = out, prefix
        self.max_objects, self.max_bytes = max_objects, max_bytes
        self.storage_options = storage_options
        self.shard_urls: list[str] = []
        self.num_objects = 0
        self.num_bytes = 0
        self._file = self._tar = None
        self._keys: list[str] = []
        self._offsets: list[int] = []
        storage.makedirs(out, storage_options)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def pattern(self) -> str:
        """A brace pattern naming every shard written so far."""
        if not self.shard_urls:
            return ""
        last = len(self.shard_urls) - 1
        return storage.join(self.out, f"{self.prefix}-{{{0:06d}..{last:06d}}}.tar") if last else self.shard_urls[0]

    def write(self, sample: ObjectSample) -> None:
        members = sample.to_members()
        size = sum(512 + (len(data) + 511) // 512 * 512 for _, data in members)
        if self._tar is not None and (len(self._keys) >= self.max_objects or (self._keys and self._tar.offset + size > self.max_bytes)):
            self._close_shard()
        if self._tar is None:
            self._open_shard()
        self._keys.append(sample.key)
        self._offsets.append(self._tar.offset)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self.num_objects += 1

    def _open_shard(self) -> None:
        url = storage.join(self.out, f"{self.prefix}-{len(self.shard_urls):06d}.tar")
        self._url = url
        self._write_url = url + ".partial" if storage.is_local(url) else url
        self._file = storage.open_url(self._write_url, "wb", self.storage_options)
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._keys, self._offsets = [], []

    def _close_shard(self) -> None:
        self._tar.close()  # writes the end-of-archive blocks and pads to a full tar record
        num_bytes = self._file.tell()
        self._file.close()
        if self._write_url != self._url:
            storage.rename(self._write_url, self._url, self.storage_options)
        index = ShardIndex(self._url, tuple(self._keys), tuple(self._offsets), num_bytes)
        write_index(index, self.storage_options)
        self.shard_urls.append(self._url)
        self.num_bytes += num_bytes
        self._file = self._tar = None

    def close(self) -> list[str]:
        if self._tar is not None:
            self._close_shard()
        return self.shard_urls


def write_index(index: ShardIndex, storage_options: dict | None = None) -> None:
    with storage.open_url(index.url + INDEX_SUFFIX, "wb", storage_options) as f:
        f.write(json.dumps(index.to_json()).encode("utf-8"))


def _group_key(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is everything before the first dot of the basename."""
    directory, base = os.path.split(name)
    key, _, suffix = base.partition(".")
    return os.path.join(directory, key) if directory else key, suffix.lower()


class TarDamage(tarfile.ReadError):
    """Truncated or garbled tar data; the message gives the byte offset where it starts."""


_ZERO_BLOCK = bytes(512)
_CHECKSUM_LAYOUT = struct.Struct("148B8x356B")  # a header's bytes except its checksum field


class _FileSource:
    """Members of a tar stream read from a file object: ``take`` returns the member's bytes."""

    def __init__(self, fileobj, offset: int):
        self.fileobj, self.offset = fileobj, offset

    def read(self, size: int) -> bytes:
        data = self.fileobj.read(size)
        self.offset += len(data)
        return data

    take = read


class _BufferSource:
    """Members of an in-memory slice of a tar file: ``take`` returns a packed span, not a copy.

    A span is ``start << 32 | size`` (start in the buffer): a plain int, so the dict of a sample's
    members holds no objects the garbage collector has to track while a block waits to be used.
    """

    def __init__(self, buffer: bytes, base_offset: int):
        self.buffer, self.base, self.pos = buffer, base_offset, 0

    @property
    def offset(self) -> int:
        return self.base + self.pos

    def read(self, size: int) -> bytes:
        data = self.buffer[self.pos:self.pos + size]
        self.pos += len(data)
        return data

    def take(self, size: int) -> int:
        available = min(size, len(self.buffer) - self.pos)
        span = self.pos << 32 | available
        self.pos += available
        return span if available == size else -1


def span_bytes(buffer: bytes, span: int) -> bytes:
    start = span >> 32
    return buffer[start:start + (span & 0xFFFFFFFF)]


def _members(source, until_end_marker: bool) -> Iterator[tuple[str, int, object]]:
    """(member name, header offset, data) of each regular-file member; raises TarDamage on damage.

    The one tar parser of the project (scan, validate and the reader's ranged reads), cheaper than
    ``tarfile`` for many small members and stricter: ``tarfile`` ends an archive silently at a
    garbled header or at a cut on a member boundary; here both are damage, with the byte offset.
    Handles ustar, pax and GNU long names; ``until_end_marker`` requires the end-of-archive blocks.
    """
    long_name, long_name_offset = None, 0
    while True:
        at = source.offset
        header = source.read(512)
        if not header:
            if until_end_marker:
                raise TarDamage(f"the shard ends at byte {at} with no end-of-archive marker (cut at a member boundary)")
            return
        if len(header) < 512:
            raise TarDamage(f"truncated tar header at byte {at}")
        if header == _ZERO_BLOCK:  # end-of-archive marker
            if until_end_marker and source.read(512) not in (_ZERO_BLOCK, b""):
                raise TarDamage(f"a zero block at byte {at} in the middle of the archive (garbled member header)")
            return
        try:
            checksum_ok = _octal(header[148:156]) == sum(_CHECKSUM_LAYOUT.unpack_from(header)) + 256
            size = _octal(header[124:136])
        except ValueError:
            checksum_ok = False
        if not checksum_ok:
            raise TarDamage(f"garbled tar member header at byte {at} (bad checksum)")
        kind = header[156:157]
        data = source.take(size)
        if (data == -1) if isinstance(data, int) else (len(data) < size):
            raise TarDamage(f"tar member at byte {at} is truncated (the shard ends inside its {size} bytes)")
        source.read((size + 511) // 512 * 512 - size)  # padding; a shard cut inside it lost no data
        if kind in (b"x", b"L"):  # pax extended header / GNU long name: names the next member
            raw = data if isinstance(data, bytes) else span_bytes(source.buffer, data)
            long_name = _pax_path(raw) if kind == b"x" else raw.rstrip(b"\0").decode("utf-8")
            long_name_offset = at
            continue
        if kind not in (b"0", b"\0", b"7"):  # directories, links, global headers: not sample data
            long_name = None
            continue
        if long_name is not None:
            name, start = long_name, long_name_offset
        else:
            name = header[:100].rstrip(b"\0").decode("utf-8", "replace")
            prefix = header[345:500].rstrip(b"\0").decode("utf-8", "replace") if header[257:262] == b"ustar" else ""
            name, start = (prefix + "/" + name if prefix else name), at
        long_name = None
        yield name, start, data


def _groups(members: Iterator[tuple[str, int, object]]) -> Iterator[tuple[str, int, dict]]:
    """Consecutive members with the same key as (key, offset of its first header, {suffix: data})."""
    key, offset, group = None, 0, {}
    try:
        for name, start, data in members:
            member_key, suffix = _group_key(name)
            if member_key != key:
                # Hand out the finished group before reading on, so damage further along the
                # shard cannot take it down too.
                if key is not None:
                    yield key, offset, group
                key, offset, group = member_key, start, {}
            group[suffix] = data
    except TarDamage:
        # The group being read may be incomplete; it is still handed out (the schema check finds
        # missing views), unless it has no member at all.
        if key is not None and group:
            yield key, offset, group
        raise
    if key is not None:
        yield key, offset, group


def iter_tar_groups(fileobj, start_offset: int = 0, until_end_marker: bool = True) -> Iterator[tuple[str, int, dict[str, bytes]]]:
    """Yield (key, offset, {suffix: bytes}) for consecutive sample groups, from a byte offset.

    Truncated or garbled tar data (a cut inside a member or at a member boundary, a bad header)
    raises :class:`TarDamage` (a ``tarfile.ReadError``) where it is found; groups before it are
    yielded normally.
    """
    if start_offset:
        fileobj.seek(start_offset)
    yield from _groups(_members(_FileSource(fileobj, start_offset), until_end_marker))

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


def _octal(field: bytes) -> int:
    field = field.rstrip(b" \0").strip()
    if field and field[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field[1:], "big")
    return int(field, 8) if field else 0


def _pax_path(records: bytes) -> str | None:
    """The 'path' record of a pax extended header ("LEN path=VALUE\\n" records)."""
    pos = 0
    while pos < len(records):
        space = records.index(b" ", pos)
        length = int(records[pos:space])
        keyword, _, value = records[space + 1:pos + length - 1].partition(b"=")
        if keyword == b"path":
            return value.decode("utf-8")
        pos += length
    return None


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
    """
    start = index.offsets[first]
    end = index.offsets[first + count] if first + count < len(index) else index.num_bytes
    fs, path = storage.filesystem(url, storage_options)
    # cat_file makes one exact ranged GET on object stores; a file object would read ahead blocks.
    buffer = fs.cat_file(path, start=start, end=end)
    groups, damage = [], None
    try:
        for key, _, members in _groups(_members(_BufferSource(buffer, start), until_end_marker=False)):
            groups.append((key, members))
    except TarDamage as error:
        damage = str(error)
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
