"""Writing ObjectSamples into plain tar shards (see schema.py), each with its sample index."""

from __future__ import annotations

import io
import tarfile

from data_pipeline import storage
from data_pipeline.schema import ObjectSample
from data_pipeline.shards.index import MemberTable, ShardIndex, write_index
from data_pipeline.shards.tar import group_key

# Fixed header fields make shards byte-for-byte deterministic for a given input.
_TAR_MTIME = 1_700_000_000


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
        group: dict[str, tuple[int, int]] = {}  # suffix -> (data offset, size), as the header walk groups them
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o644
            self._tar.addfile(info, io.BytesIO(data))
            # the data ends the member, padded to a block (a pax header, if any, comes before)
            group[group_key(name)[1]] = (self._tar.offset - (len(data) + 511) // 512 * 512, len(data))
        self._groups.append(group)
        self.num_objects += 1

    def _open_shard(self) -> None:
        url = storage.join(self.out, f"{self.prefix}-{len(self.shard_urls):06d}.tar")
        self._url = url
        self._write_url = url + ".partial" if storage.is_local(url) else url
        self._file = storage.open_url(self._write_url, "wb", self.storage_options)
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._keys, self._offsets, self._groups = [], [], []

    def _close_shard(self) -> None:
        self._tar.close()  # writes the end-of-archive blocks and pads to a full tar record
        num_bytes = self._file.tell()
        self._file.close()
        if self._write_url != self._url:
            storage.rename(self._write_url, self._url, self.storage_options)
        index = ShardIndex(self._url, tuple(self._keys), tuple(self._offsets), num_bytes,
                           members=MemberTable.build(self._groups, self._offsets))
        write_index(index, self.storage_options)
        self.shard_urls.append(self._url)
        self.num_bytes += num_bytes
        self._file = self._tar = None

    def close(self) -> list[str]:
        if self._tar is not None:
            self._close_shard()
        return self.shard_urls
