"""Reading consecutive samples of a shard from any byte offset, with one exact ranged read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from data_pipeline import storage
from data_pipeline.shards.index import ShardIndex
from data_pipeline.shards.tar import TarDamage, group_members, parse_members, span_bytes


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
