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
import tarfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np

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
    if "/" not in name:  # the common case, without os.path's overhead (the reader calls this per member)
        key, _, suffix = name.partition(".")
        return key, suffix.lower()
    directory, base = os.path.split(name)
    key, _, suffix = base.partition(".")
    return os.path.join(directory, key) if directory else key, suffix.lower()


class TarDamage(tarfile.ReadError):
    """Truncated or garbled tar data; the message gives the byte offset where it starts."""


_ZERO_BLOCK = bytes(512)
_CHUNK = 1 << 22  # bytes read at a time when streaming a shard from a file object


def span_bytes(buffer: bytes, span: int) -> bytes:
    """The bytes of a member: a span is ``start << 32 | size``, start counted in ``buffer``.

    A plain int, so a sample's dict of members holds nothing the garbage collector must track
    while a block of samples waits to be used.
    """
    start = span >> 32
    return buffer[start:start + (span & 0xFFFFFFFF)]


def _parse_members(buffer: bytes, base: int, final: bool) -> tuple[list[tuple[str, int, int]], int, str | None, bool]:
    """Parse the tar members of ``buffer`` (which starts at byte ``base`` of the shard).

    The one tar parser of the project (the reader's ranged reads; scan and validate through
    :func:`iter_tar_groups`). Cheaper than ``tarfile`` for many small members (header checksums
    are checked together, vectorised) and stricter: ``tarfile`` ends an archive silently at a
    garbled header or at a cut on a member boundary; here both are damage, with the byte offset.
    Handles ustar, pax and GNU long names.

    Returns (members as (name, header offset in the shard, span), bytes consumed, damage, ended):
    without ``final``, parsing stops before a member that does not fit whole (more data follows);
    ``ended`` says an end-of-archive block was met.
    """
    members, headers = [], []
    pos, size_of, damage, ended = 0, len(buffer), None, False
    long_name, long_name_at = None, 0
    while True:
        if pos + 512 > size_of:
            if final and pos < size_of:
                damage = f"truncated tar header at byte {base + pos}"
            break
        if buffer[pos] == 0 and buffer[pos:pos + 512] == _ZERO_BLOCK:  # end-of-archive marker
            ended = True
            break
        field = buffer[pos + 124:pos + 136]
        try:
            size = int.from_bytes(field[1:], "big") if field[0] & 0x80 else int(field.strip(b" \0") or b"0", 8)
        except ValueError:
            damage = f"garbled tar member header at byte {base + pos} (size field {field!r})"
            break
        data_at = pos + 512
        end = data_at + (size + 511) // 512 * 512
        if data_at + size > size_of:
            if final:
                damage = f"tar member at byte {base + pos} is truncated (the shard ends inside its {size} bytes)"
            break
        headers.append(pos)
        kind = buffer[pos + 156]
        if kind in (0x78, 0x4C):  # "x": pax extended header / "L": GNU long name; they name the next member
            raw = buffer[data_at:data_at + size]
            long_name = _pax_path(raw) if kind == 0x78 else raw.rstrip(b"\0").decode("utf-8", "replace")
            long_name_at = pos
        elif kind in (0x30, 0, 0x37):  # regular files ("0", NUL, "7"); directories, links etc. carry no data
            if long_name is not None:
                name, at = long_name, long_name_at
            else:
                name = buffer[pos:pos + 100].split(b"\0", 1)[0].decode("utf-8", "replace")
                if buffer[pos + 257:pos + 262] == b"ustar" and buffer[pos + 345] != 0:
                    name = buffer[pos + 345:pos + 500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
                at = pos
            members.append((name, base + at, data_at << 32 | size))
            long_name = None
        else:
            long_name = None
        pos = min(end, size_of)
    bad = _first_bad_checksum(buffer, headers)
    if bad is not None:
        at = headers[bad]
        members = [m for m in members if m[2] >> 32 < at]
        while members and members[-1][1] - base >= at:  # a member named by a garbled pax header
            members.pop()
        return members, at, f"garbled tar member header at byte {base + at} (bad checksum)", False
    return members, pos, damage, ended


def _first_bad_checksum(buffer: bytes, headers: list[int]) -> int | None:
    """Index in ``headers`` of the first header whose checksum is wrong, or None (vectorised)."""
    if not headers:
        return None
    starts = np.asarray(headers)
    if not (starts % 512).any():  # headers sit on 512-byte blocks of the buffer (it starts at a member)
        blocks = np.frombuffer(buffer, dtype=np.uint8, count=len(buffer) // 512 * 512).reshape(-1, 512)
        rows = blocks[starts // 512]
    else:
        rows = np.frombuffer(buffer, dtype=np.uint8)[starts[:, None] + np.arange(512)]
    computed = rows.sum(axis=1, dtype=np.int64) - rows[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * 32  # field = 8 spaces
    # The stored checksum: octal digits, maybe led by spaces or NULs and ended by a NUL and/or a
    # space ("%06o\0 " from tarfile and GNU tar); anything else in the field makes it wrong.
    field = rows[:, 148:156]
    digit = (field >= 48) & (field <= 55)
    blank = (field == 0) | (field == 32)
    after = digit[:, ::-1].cumsum(axis=1)[:, ::-1] - digit  # digits to the right of each byte
    stored = np.where(digit, (field.astype(np.int64) - 48) << (3 * after), 0).sum(axis=1)
    stored[~(digit | blank).all(axis=1) | ~digit.any(axis=1)] = -1
    wrong = np.flatnonzero(computed != stored)
    return int(wrong[0]) if len(wrong) else None


def _groups(members) -> Iterator[tuple[str, int, dict]]:
    """Consecutive members with the same key as (key, offset of its first header, {suffix: data}).

    A group is handed out as soon as the next key begins, before reading on, so damage further
    along cannot take it down too; the group in progress when the members end or break off is
    handed out last (it may be incomplete: the schema check finds what it lacks).
    """
    key, offset, group = None, 0, {}
    for name, at, data in members:
        member_key, suffix = _group_key(name)
        if member_key != key:
            if key is not None:
                yield key, offset, group
            key, offset, group = member_key, at, {}
        group[suffix] = data
    if key is not None and group:
        yield key, offset, group


def iter_tar_groups(fileobj, start_offset: int = 0, until_end_marker: bool = True) -> Iterator[tuple[str, int, dict[str, bytes]]]:
    """Yield (key, offset, {suffix: bytes}) for consecutive sample groups, from a byte offset.

    Truncated or garbled tar data (a cut inside a member or at a member boundary, a bad header,
    a zero block in the middle) raises :class:`TarDamage` (a ``tarfile.ReadError``) where it is
    found, after every group before it has been yielded (the one in progress too: the schema
    check finds what it lacks).
    """
    if start_offset:
        fileobj.seek(start_offset)

    def members() -> Iterator[tuple[str, int, bytes]]:
        pending, base, want = b"", start_offset, _CHUNK
        while True:
            chunk = fileobj.read(want)
            buffer, final = pending + chunk, not chunk
            found, consumed, damage, ended = _parse_members(buffer, base, final)
            for name, at, span in found:
                yield name, at, span_bytes(buffer, span)
            if damage:
                raise TarDamage(damage)
            if ended:
                if until_end_marker and buffer[consumed + 512:consumed + 1024] not in (_ZERO_BLOCK, b"") \
                        and len(buffer) >= consumed + 1024:
                    raise TarDamage(f"a zero block at byte {base + consumed} in the middle of the archive (garbled member header)")
                return
            if final:
                if until_end_marker:
                    raise TarDamage(f"the shard ends at byte {base + consumed} with no end-of-archive marker (cut at a member boundary)")
                return
            pending, base = buffer[consumed:], base + consumed
            want = max(_CHUNK, 2 * len(pending))  # a member larger than a chunk: read more at once

    failure: list[TarDamage] = []

    def members_until_damage() -> Iterator[tuple[str, int, bytes]]:
        try:
            yield from members()
        except TarDamage as error:
            failure.append(error)

    yield from _groups(members_until_damage())
    if failure:  # after every group before the damage, the one in progress too
        raise failure[0]


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
    found, _, damage, _ = _parse_members(buffer, start, final=True)
    groups: list[tuple[str, dict[str, int]]] = []
    last = None
    for name, _, span in found:  # _groups, inlined: this runs for every member the reader reads
        key, suffix = _group_key(name)
        if key != last:
            groups.append((key, {}))
            last = key
        groups[-1][1][suffix] = span
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
