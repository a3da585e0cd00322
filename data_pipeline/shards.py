"""Writing shards, their sample indices, and reading samples back from any byte offset.

Shards are plain tar files (see schema.py). Beside each shard ``X.tar`` the writer puts
``X.tar.idx.json``: the byte offset of every sample's first member. The reader uses it to
split an epoch at sample granularity (equal batches on every rank, whatever the shard sizes)
and to resume mid-shard with one ranged read instead of re-reading the shard from the start.
Shards written by other tools have no index; :func:`load_or_build_index` scans them once.
"""

from __future__ import annotations

import io
import json
import os
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


def iter_tar_groups(fileobj, start_offset: int = 0) -> Iterator[tuple[str, int, dict[str, bytes]]]:
    """Yield (key, offset, {suffix: bytes}) for consecutive sample groups, from a byte offset.

    Truncated or corrupt tar data raises ``tarfile.TarError`` / ``EOFError`` / ``OSError`` from
    the point where it is found; groups before it are yielded normally.
    """
    if start_offset:
        fileobj.seek(start_offset)
    key, offset, members = None, 0, {}
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r|")
        for info in tar:
            if not info.isfile():
                continue
            member_key, suffix = _group_key(info.name)
            if member_key != key:
                # Hand out the finished group before reading on, so damage further along the
                # shard cannot take it down too.
                if key is not None:
                    yield key, offset, members
                key, offset, members = member_key, start_offset + info.offset, {}
            data = tar.extractfile(info).read()
            if len(data) != info.size:
                raise EOFError(f"member {info.name} is truncated ({len(data)} of {info.size} bytes)")
            members[suffix] = data
    except (tarfile.TarError, EOFError, OSError):
        # The group being read may be incomplete; it is still handed out (the schema check finds
        # missing views), unless it has no member at all.
        if key is not None and members:
            yield key, offset, members
        raise
    if key is not None:
        yield key, offset, members


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


def read_index(url: str, storage_options: dict | None = None) -> ShardIndex | None:
    """The shard's saved index, or None when it has none."""
    try:
        with storage.open_url(url + INDEX_SUFFIX, "rb", storage_options) as f:
            raw = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    if raw.get("format") != INDEX_FORMAT or len(raw["keys"]) != len(raw["offsets"]):
        raise ValueError(f"{url}{INDEX_SUFFIX}: not a valid shard index (format {raw.get('format')!r})")
    return ShardIndex(url, tuple(raw["keys"]), tuple(int(o) for o in raw["offsets"]), int(raw["num_bytes"]))


def load_or_build_index(url: str, storage_options: dict | None = None) -> ShardIndex:
    index = read_index(url, storage_options)
    return index if index is not None else scan_index(url, storage_options)


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


def parse_tar_bytes(buffer: bytes, base_offset: int = 0) -> Iterator[tuple[str, int, dict[str, bytes]]]:
    """Yield (key, offset, {suffix: bytes}) groups from an in-memory slice of a tar file.

    A fast path for the reader: it reads a whole run of samples with one (ranged) read, found
    from the shard index, and parses the headers here, which is several times cheaper than
    ``tarfile`` for many small members. Handles ustar, pax and GNU long names; checks header
    checksums; raises ``tarfile.ReadError`` on damaged or truncated data after yielding every
    complete group before the damage.
    """
    view = memoryview(buffer)
    pos, key, offset, members = 0, None, 0, {}
    long_name, long_name_offset = None, 0
    damage: str | None = None
    while pos < len(buffer):
        if pos + 512 > len(buffer):
            damage = f"truncated tar header at byte {base_offset + pos}"
            break
        header = bytes(view[pos:pos + 512])
        if header == b"\0" * 512:  # end-of-archive marker
            break
        if _octal(header[148:156]) != sum(header[:148]) + 256 + sum(header[156:]):
            damage = f"bad tar header checksum at byte {base_offset + pos}"
            break
        size = _octal(header[124:136])
        kind = header[156:157]
        data_start, data_end = pos + 512, pos + 512 + size
        if data_end > len(buffer):
            damage = f"tar member at byte {base_offset + pos} is truncated"
            break
        header_start, pos = pos, data_start + (size + 511) // 512 * 512
        data = bytes(view[data_start:data_end])
        if kind in (b"x", b"L"):  # pax extended header / GNU long name: names the next member
            long_name = _pax_path(data) if kind == b"x" else data.rstrip(b"\0").decode("utf-8")
            long_name_offset = header_start
            continue
        if kind not in (b"0", b"\0", b"7"):  # directories, links, global headers: not sample data
            long_name = None
            continue
        if long_name is not None:
            name, start = long_name, long_name_offset
        else:
            name = header[:100].rstrip(b"\0").decode("utf-8")
            prefix = header[345:500].rstrip(b"\0").decode("utf-8") if header[257:262] == b"ustar" else ""
            name, start = (prefix + "/" + name if prefix else name), header_start
        long_name = None
        member_key, suffix = _group_key(name)
        if member_key != key:
            if key is not None:
                yield key, offset, members
            key, offset, members = member_key, base_offset + start, {}
        members[suffix] = data
    # The group in progress is handed out even after damage: the schema check finds missing views.
    if key is not None and members:
        yield key, offset, members
    if damage:
        raise tarfile.ReadError(damage)


def read_sample_range(url: str, index: ShardIndex, first: int, count: int,
                      storage_options: dict | None = None) -> Iterator[tuple[str, int, dict[str, bytes]]]:
    """Samples ``first .. first+count-1`` of a shard, fetched with a single (ranged) read."""
    start = index.offsets[first]
    end = index.offsets[first + count] if first + count < len(index) else index.num_bytes
    fs, path = storage.filesystem(url, storage_options)
    with fs.open(path, "rb") as f:
        f.seek(start)
        buffer = f.read(end - start)
    yield from parse_tar_bytes(buffer, start)
