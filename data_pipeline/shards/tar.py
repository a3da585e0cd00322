"""The project's one tar parser: tar members and webdataset sample groups from bytes.

Used by every reader of shards: the streaming reader's ranged reads (:mod:`.ranges`), the index
scan (:mod:`.index`), validation and the tools. Stricter than ``tarfile``: a garbled header, a cut
inside a member or at a member boundary, or a zero block in the middle of an archive is damage,
reported with its byte offset, after every sample before it has been handed out.
"""

from __future__ import annotations

import os
import tarfile
from typing import Iterator

import numpy as np


def group_key(name: str) -> tuple[str, str]:
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


def parse_members(buffer: bytes, base: int, final: bool) -> tuple[list[tuple[str, int, int]], int, str | None, bool]:
    """Parse the tar members of ``buffer`` (which starts at byte ``base`` of the shard).

    The one tar parser of the project (the reader's ranged reads directly; the index scan,
    validation and the tools through :func:`iter_tar_groups`). Cheaper than ``tarfile`` for many small members (header checksums
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


_OCTAL_11 = 8 ** np.arange(10, -1, -1, dtype=np.int64)


def sizes_match(buffer: bytes, headers: np.ndarray, sizes: np.ndarray) -> bool:
    """Whether the tar headers at these offsets of ``buffer`` (a run of whole members from a
    header on) all give these member sizes: how a ranged read checks a member table, vectorised,
    reading 12 bytes per header."""
    if not len(headers):
        return True
    if (headers & 511).any():  # headers lie on 512-byte blocks from the buffer's first header
        return False
    blocks = np.frombuffer(buffer, dtype=np.uint8, count=len(buffer) // 512 * 512).reshape(-1, 512)
    field = blocks[:, 124:136][headers // 512]
    digits = field[:, :11] - np.uint8(48)  # (wraps round below "0")
    end = field[:, 11]
    if (digits <= 7).all() and ((end == 0) | (end == 32)).all():  # "%011o" and NUL or space: tarfile, GNU tar
        return bool((digits.astype(np.int64) @ _OCTAL_11 == sizes).all())
    # other writers: leading spaces or NULs, a shorter number; a base-256 size never matches
    digit = (field >= 48) & (field <= 55)
    blank = (field == 0) | (field == 32)
    after = digit[:, ::-1].cumsum(axis=1)[:, ::-1] - digit  # digits to the right of each byte
    stored = np.where(digit, (field.astype(np.int64) - 48) << (3 * after), 0).sum(axis=1)
    return bool((digit | blank).all() and (stored == sizes).all())


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


def group_members(members) -> Iterator[tuple[str, int, dict]]:
    """Consecutive members with the same key as (key, offset of its first header, {suffix: data}).

    A group is handed out as soon as the next key begins, before reading on, so damage further
    along cannot take it down too; the group in progress when the members end or break off is
    handed out last (it may be incomplete: the schema check finds what it lacks).
    """
    key, offset, group = None, 0, {}
    for name, at, data in members:
        member_key, suffix = group_key(name)
        if member_key != key:
            if key is not None:
                yield key, offset, group
            key, offset, group = member_key, at, {}
        group[suffix] = data
    if key is not None and group:
        yield key, offset, group


def iter_tar_groups(fileobj, start_offset: int = 0, until_end_marker: bool = True,
                    positions: bool = False) -> Iterator[tuple[str, int, dict]]:
    """Yield (key, offset, {suffix: bytes}) for consecutive sample groups, from a byte offset.

    With ``positions``, each member is given as (byte offset of its data in the shard, size)
    instead of its bytes (what the index scan records, see :class:`.index.MemberTable`).
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
            found, consumed, damage, ended = parse_members(buffer, base, final)
            for name, at, span in found:
                yield name, at, (base + (span >> 32), span & 0xFFFFFFFF) if positions else span_bytes(buffer, span)
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

    yield from group_members(members_until_damage())
    if failure:  # after every group before the damage, the one in progress too
        raise failure[0]


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
