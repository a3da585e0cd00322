"""Check shards end to end before a training run trusts them.

Usage::

    python -m data_pipeline.validate 'URL_PATTERN' [--max-problems N] [--workers W]

URL_PATTERN is a local path or any fsspec URL (s3://...) with braces and/or globs, e.g.
``s3://bucket/omni/shard-{000000..000123}.tar``. Every shard is read through once, and for every
object the validator checks: the schema version and metadata (schema.parse_sample), every camera
(cameras.check_camera: orthonormal rotation with det +1, positive intrinsics), that every view
decodes at the declared size (and every mask, when the sample has masks, as 8-bit grey), that no stray member sits in the sample, and that keys are unique
across the whole dataset. Per shard it checks the tar structure (truncated or corrupt data, a cut at a
member boundary, a garbled member header — which ``tarfile`` takes silently for the end of the
archive — a missing end-of-archive marker) and that the sidecar index, when there is one, lists exactly the
shard's sample keys and byte offsets.

Exit status: 0 when no problem was found, 1 when some were (each listed with shard URL, object
key and reason), 2 on usage errors (e.g. the pattern names nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

from tqdm import tqdm

from data_pipeline import storage
from data_pipeline.cli_types import nonnegative_int, usage_errors
from data_pipeline.cameras import CameraError, check_camera
from data_pipeline.parallel import map_in_order
from data_pipeline.schema import IMAGE_FORMATS, META_SUFFIX, SampleError, decode_image, decode_mask, mask_name, object_key, parse_sample
from data_pipeline.shards import INDEX_SUFFIX, ShardIndex, iter_tar_groups, read_index, scan_index

# A tar archive ends with two zero blocks; a shard cut at a member boundary reads as a shorter,
# "valid" archive to tarfile's stream mode, so this marker is the only sign of the cut.
_END_OF_ARCHIVE = b"\0" * 1024
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError)


@dataclass(frozen=True)
class Problem:
    url: str
    key: str | None  # None for a problem with the shard as a whole
    reason: str

    def __str__(self) -> str:
        return f"{self.url} [{self.key}]: {self.reason}" if self.key is not None else f"{self.url}: {self.reason}"


@dataclass
class ShardReport:
    url: str
    num_bytes: int = 0
    keys: list[str] = field(default_factory=list)
    num_views: int = 0
    resolutions: Counter = field(default_factory=Counter)  # "WxH" -> objects
    image_formats: Counter = field(default_factory=Counter)
    has_index: bool = False
    problems: list[Problem] = field(default_factory=list)

    @property
    def num_objects(self) -> int:
        return len(self.keys)


@dataclass
class ValidationReport:
    shards: list[ShardReport] = field(default_factory=list)
    extra_problems: list[Problem] = field(default_factory=list)  # problems across shards

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def num_objects(self) -> int:
        return sum(s.num_objects for s in self.shards)

    @property
    def num_views(self) -> int:
        return sum(s.num_views for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.num_bytes for s in self.shards)

    @property
    def resolutions(self) -> Counter:
        return sum((s.resolutions for s in self.shards), Counter())

    @property
    def image_formats(self) -> Counter:
        return sum((s.image_formats for s in self.shards), Counter())

    @property
    def problems(self) -> list[Problem]:
        return [p for s in self.shards for p in s.problems] + self.extra_problems

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def format(self, max_problems: int = 50) -> str:
        resolutions = ", ".join(f"{r} ({n} objects)" for r, n in sorted(self.resolutions.items())) or "none"
        formats = ", ".join(f"{f} ({n})" for f, n in sorted(self.image_formats.items())) or "none"
        indexed = sum(s.has_index for s in self.shards)
        lines = [
            f"shards: {self.num_shards} ({indexed} with an index), {self.num_bytes} bytes",
            f"objects: {self.num_objects}",
            f"views: {self.num_views}",
            f"resolutions: {resolutions}",
            f"image formats: {formats}",
        ]
        problems = self.problems
        if not problems:
            lines.append("OK: no problems found")
            return "\n".join(lines)
        lines.append(f"PROBLEMS: {len(problems)}")
        lines += [f"  {p}" for p in problems[:max_problems]]
        if len(problems) > max_problems:
            lines.append(f"  ... and {len(problems) - max_problems} more (raise --max-problems to list them)")
        return "\n".join(lines)


# --------------------------------------------------------------------------- one object


def check_sample(url: str, key: str, members: dict[str, bytes], report: ShardReport) -> None:
    """Check one tar group and add what it finds (counts, problems) to ``report``."""
    def problem(reason: str) -> None:
        report.problems.append(Problem(url, key, reason))

    try:
        # Cameras are checked below, one by one, so that every bad view is reported.
        sample = parse_sample(key, members, check_cameras=False)
    except SampleError as error:
        problem(str(error))
        return
    if sample.num_views == 0:
        problem("sample has no views")
    try:
        expected_key = object_key(sample.object_id)
    except SampleError as error:
        expected_key = None
        problem(str(error))
    if expected_key is not None and expected_key != key:
        problem(f"key does not match object_id {sample.object_id!r} (expected key {expected_key!r})")
    if sample.image_format not in IMAGE_FORMATS:
        problem(f"image_format {sample.image_format!r} is not one of {IMAGE_FORMATS}")
    report.num_views += sample.num_views
    report.resolutions[f"{sample.width}x{sample.height}"] += 1
    report.image_formats[sample.image_format] += 1
    for i in range(sample.num_views):
        try:
            check_camera(sample.intrinsics[i], sample.c2w[i], where=f"views[{i}]")
        except CameraError as error:
            problem(str(error))
    for i, data in enumerate(sample.images):
        name = sample.view_name(i)
        try:
            decode_image(data, sample.width, sample.height, where=f"{key}.{name}")
        except SampleError as error:
            problem(str(error))
    # parse_sample found every view by the name meta.json gives it; those names must follow the
    # schema (readers may rely on view000.png, ...) and nothing else may hide in the sample.
    views = json.loads(members[META_SUFFIX].decode("utf-8"))["views"]
    names = [str(view["name"]) for view in views]
    if names != [sample.view_name(i) for i in range(sample.num_views)]:
        problem(f"view names in {META_SUFFIX} do not follow the schema (view000.{sample.image_format}, ...): {names[:3]}")
    # masks are optional (renders of meshes have them): 8-bit grey, the view's size, schema names
    mask_names = [str(view["mask"]) for view in views if "mask" in view]
    for i, data in enumerate(sample.masks or ()):
        try:
            decode_mask(data, sample.width, sample.height, where=f"{key}.{mask_names[i]}")
        except SampleError as error:
            problem(str(error))
    if mask_names and mask_names != [mask_name(i) for i in range(sample.num_views)]:
        problem(f"mask names in {META_SUFFIX} do not follow the schema (view000.mask.png, ...): {mask_names[:3]}")
    stray = sorted(set(members) - {META_SUFFIX} - set(names) - set(mask_names))
    if stray:
        problem(f"unexpected members not listed in {META_SUFFIX}: {', '.join(key + '.' + s for s in stray)}")


# --------------------------------------------------------------------------- one shard


def check_end_of_archive(url: str, size: int, storage_options: dict | None) -> str | None:
    """None when the shard ends like a complete tar archive, else the reason it does not."""
    if size % 512:
        return f"size {size} is not a multiple of 512 bytes: the shard is truncated"
    if size < len(_END_OF_ARCHIVE):
        return f"size {size} is too small for a tar archive"
    with storage.open_url(url, "rb", storage_options) as f:
        f.seek(size - len(_END_OF_ARCHIVE))
        tail = f.read(len(_END_OF_ARCHIVE))
    if tail != _END_OF_ARCHIVE:
        return "no end-of-archive marker (two zero blocks): the shard is truncated or was not closed"
    return None


def check_index(url: str, keys: list[str], offsets: list[int], size: int, storage_options: dict | None) -> tuple[bool, list[Problem]]:
    """(has an index, problems): the sidecar index must list exactly the keys and offsets found."""
    try:
        index: ShardIndex | None = read_index(url, storage_options)
    except (ValueError, KeyError, TypeError) as error:
        return True, [Problem(url, None, f"index {url}{INDEX_SUFFIX} is malformed ({type(error).__name__}: {error})")]
    if index is None:
        return False, []
    problems = []
    if index.num_bytes != size:
        problems.append(Problem(url, None, f"index says the shard has {index.num_bytes} bytes, it has {size}"))
    found = list(zip(keys, offsets))
    listed = list(zip(index.keys, index.offsets))
    if found != listed:
        first = next((i for i, (a, b) in enumerate(zip(listed, found)) if a != b), min(len(listed), len(found)))
        at_index = f"{listed[first][0]}@{listed[first][1]}" if first < len(listed) else "(end)"
        at_shard = f"{found[first][0]}@{found[first][1]}" if first < len(found) else "(end)"
        key = listed[first][0] if first < len(listed) else (found[first][0] if first < len(found) else None)
        problems.append(Problem(url, key, f"index does not match the shard: it lists {len(listed)} samples, the shard has "
                                          f"{len(found)}; first difference at sample #{first}: index {at_index}, shard {at_shard}"))
    if index.note:  # a member table set aside (malformed)
        problems.append(Problem(url, None, index.note))
    elif index.members is not None and not problems:  # where each member lies: checked against a scan
        scanned = scan_index(url, storage_options).members
        if scanned is None or scanned.to_json() != index.members.to_json():
            problems.append(Problem(url, None, f"index {url}{INDEX_SUFFIX}: its member table does not match the shard's "
                                               f"members (readers walk the tar headers where they differ: slower)"))
    return True, problems


def validate_shard(url: str, storage_options: dict | None = None) -> ShardReport:
    report = ShardReport(url)
    offsets: list[int] = []
    try:
        fs, path = storage.filesystem(url, storage_options)
        report.num_bytes = int(fs.size(path))
        with fs.open(path, "rb") as f:
            try:
                for key, offset, members in iter_tar_groups(f):
                    report.keys.append(key)
                    offsets.append(offset)
                    try:
                        check_sample(url, key, members, report)
                    except Exception as error:  # a malformed sample must not hide the rest of the shard
                        report.problems.append(Problem(url, key, f"cannot check sample ({type(error).__name__}: {error})"))
                truncated = False
            except _TAR_ERRORS as error:
                truncated = True
                report.problems.append(Problem(url, None, f"truncated or corrupt tar data after {len(report.keys)} complete samples "
                                                          f"({type(error).__name__}: {error})"))
    except (OSError, ValueError) as error:
        report.problems.append(Problem(url, None, storage.explain_storage_error(url, error)))
        return report
    if not truncated:
        reason = check_end_of_archive(url, report.num_bytes, storage_options)
        if reason:
            report.problems.append(Problem(url, None, reason))
        if not report.keys:
            report.problems.append(Problem(url, None, "shard holds no samples"))
    report.has_index, index_problems = check_index(url, report.keys, offsets, report.num_bytes, storage_options)
    report.problems += index_problems
    return report


def _validate_shard_task(task: tuple[str, dict | None]) -> ShardReport:
    url, storage_options = task
    return validate_shard(url, storage_options)


# --------------------------------------------------------------------------- all shards


def _reports(urls: list[str], storage_options: dict | None, workers: int) -> Iterator[ShardReport]:
    return map_in_order(_validate_shard_task, [(url, storage_options) for url in urls], workers)


def duplicate_key_problems(shards: list[ShardReport]) -> list[Problem]:
    """A key seen twice (in one shard or two) makes samples ambiguous for readers and indices."""
    first_seen: dict[str, str] = {}
    problems = []
    for shard in shards:
        for key in shard.keys:
            if key in first_seen:
                problems.append(Problem(shard.url, key, f"duplicate key (first seen in {first_seen[key]})"))
            else:
                first_seen[key] = shard.url
    return problems


def validate(pattern: str | list[str], storage_options: dict | None = None, workers: int = 1, progress: bool = False) -> ValidationReport:
    """Validate every shard the pattern names. Raises FileNotFoundError when it names none."""
    urls = storage.expand_urls(pattern, storage_options)
    report = ValidationReport()
    bar = tqdm(total=len(urls), desc="validate", unit="shard", disable=not progress, file=sys.stderr)
    try:
        for shard in _reports(urls, storage_options, workers):
            report.shards.append(shard)
            bar.update(1)
            bar.set_postfix(objects=report.num_objects, problems=len(report.problems), refresh=False)
    finally:
        bar.close()
    report.extra_problems = duplicate_key_problems(report.shards)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.validate", description="Check WebDataset shards of posed multi-view objects.")
    parser.add_argument("pattern", metavar="URL_PATTERN", help="shard URL(s) with braces/globs, local or s3://..., e.g. 'out/shard-{000000..000009}.tar'")
    parser.add_argument("--max-problems", type=nonnegative_int, default=50, help="problems to list (all are counted; default 50)")
    parser.add_argument("--workers", type=nonnegative_int, default=1, help="shards checked in parallel (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with usage_errors(parser, FileNotFoundError):
        report = validate(args.pattern, workers=args.workers, progress=not args.no_progress)
    print(report.format(args.max_problems))
    return report.exit_code


if __name__ == "__main__":
    # Run through the package module so worker processes and pickles see one copy of its classes.
    from data_pipeline.validate import main as _main

    sys.exit(_main())
