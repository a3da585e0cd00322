"""Streaming reader for training: shards (local, file://, s3://, any fsspec URL) -> batches of views.

    reader = StreamingReader(ReaderConfig(urls="s3://bucket/train-{000000..000099}.tar", batch_size=8))
    for epoch in range(epochs):
        for batch in reader:          # one epoch; every rank gets len(reader) batches
            ...
        # state = reader.state_dict() at any point; StreamingReader(...).load_state_dict(state)
        # continues with exactly the same objects, views and order

How the epoch is split, shuffled and mixed is in epoch_plan.py. This module reads and decodes:
each DataLoader worker plays one *slot* of the plan and reads it block by block — one exact
ranged read per shard piece (in parallel on object stores), the next block read ahead (by a
thread from object stores, by the kernel from local files) — slicing members by the index's member
table (or walking tar headers) up front; a sample's metadata (simdjson, meta_view.py) and the arrays of its
chosen views are built only when it is used. It picks the context and target views of each
object from a seeded RNG, decodes only those views, checks their cameras once per batch, and
yields whole batches. Loader workers persist from epoch to epoch (ReaderConfig.persistent_workers).
Unreadable samples are skipped, counted by reason and shard, and replaced
by reading on (epoch_plan.py: quota from elsewhere). Each batch carries the worker's cursor, so
the main process knows exactly what has been consumed (prefetched but unconsumed batches do not
count) and can save it.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import logging
import math
import multiprocessing
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Annotated, Any, Iterator

import numpy as np
import pydantic
import pydantic.dataclasses
import torch
from PIL import Image
from pydantic import Field

from data_pipeline import storage
from data_pipeline.box_fit import BoxFitWarner
from data_pipeline.cameras import CameraError, check_cameras
from data_pipeline.epoch_plan import EpochPlan, remaining_positions
from data_pipeline.meta_view import MetaError, MetaReader
from data_pipeline.schema import META_SUFFIX, SampleError, decode_image, decode_mask
from data_pipeline.shards import ShardIndex, load_or_build_index, read_raw_range, span_bytes
from data_pipeline.shards.ranges import advise_will_read

log = logging.getLogger("data_pipeline.reader")
STATE_VERSION = 2  # 2: the epoch is a permutation of shard pieces (piece_objects)


# Strict: a value of the wrong type is refused (True is not 1, "4" is not 4), as is an unknown field.
STRICT = pydantic.ConfigDict(strict=True, extra="forbid")

# Declared once here; the trainer's data section (trainer.config.DataConfig) reuses them with
# its own defaults.
TargetViews = Annotated[int, Field(ge=0, description=(
    "m target views per object, disjoint from the context views (the trainer noises and encodes the first; "
    "the others are only rendered and scored, as in DFM)"))]
Resolution = Annotated[int | None, Field(ge=1, description=(
    "width in pixels the views are decoded at (height keeps the aspect); null = as stored"))]


@pydantic.dataclasses.dataclass(config=STRICT)
class ReaderSettings:
    """How batches are drawn and read: the part of the reader's config a run config chooses
    (trainer.config.DataConfig inherits these fields; the trainer sets the rest per reader)."""

    batch_size: int = Field(4, ge=1, description="objects per batch, per rank")
    context_views_min: int = Field(0, ge=0, description=(
        "k context views are drawn per batch, uniformly from [min, max]; 0 trains the unconditional case"))
    context_views_max: int = Field(3, ge=0, description="see context_views_min")
    target_views: TargetViews = 1
    resolution: Resolution = None
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes per rank (0 = read in the training process)")
    shuffle_block_objects: int = Field(64, ge=1, description=(
        "samples read together and interleaved by each worker (memory: one block)"))
    piece_objects: int | None = Field(None, ge=1, description=(
        "consecutive samples of a shard read with one ranged read (epoch_plan.py); null: shuffle_block_objects // "
        "batch_size, so that a block holds one batch's worth of pieces and every batch takes its objects from "
        "batch_size different pieces, i.e. (mostly) different shards"))
    storage_options: dict[str, Any] | None = Field(None, description=(
        "fsspec options (endpoint_url, key, secret, ...); null or {} = the environment (AWS_* variables)"))
    warn_every_s: float = Field(30.0, ge=0, description="rate limit (seconds) of warnings about skipped samples (0: every one)")
    prefetch_batches: int = Field(2, ge=1, description="batches each worker prepares ahead")
    persistent_workers: bool = Field(True, description=(
        "keep the loader workers (and their open S3 sessions, read-ahead threads) from one epoch to the next "
        "instead of forking new ones per epoch; an epoch continued mid-way (resume) gets a loader of its own; "
        "ignored with num_workers=0"))

    @property
    def piece_size(self) -> int:
        if self.piece_objects is not None:
            return self.piece_objects
        return max(1, self.shuffle_block_objects // self.batch_size)

    @pydantic.model_validator(mode="after")
    def _views(self):
        if self.context_views_min > self.context_views_max:
            raise ValueError(f"context_views_min ({self.context_views_min}) must be <= context_views_max "
                             f"({self.context_views_max})")
        if self.context_views_max + self.target_views < 1:
            raise ValueError("context_views_max + target_views must be >= 1: a batch needs at least one view")
        return self


@pydantic.dataclasses.dataclass(config=STRICT)
class _Shards:
    urls: str | list[str] = Field(description='brace patterns / globs, e.g. "s3://b/train-{000000..000099}.tar"')


# _Shards last among the bases puts `urls` first, so ReaderConfig("s3://...", batch_size=8) works.
@pydantic.dataclasses.dataclass(config=STRICT)
class ReaderConfig(ReaderSettings, _Shards):
    """Everything one reader needs; invalid values raise pydantic.ValidationError (a ValueError) naming the field."""

    seed: int = Field(0, ge=0, description="seeds the shuffle and the choice of views")
    shuffle: bool = Field(True, description="shuffle the epoch (False: shards and samples in order)")
    drop_last: bool = Field(True, description="see epoch_plan.py for what is dropped or padded")
    box_half_size: float | None = Field(None, gt=0, description="the model's box: warn once if an object or camera misses it")
    masks: bool = Field(False, description=(
        "also decode the chosen views' masks (KEY.viewNNN.mask.png); objects without are skipped"))


@dataclass
class ViewBatch:
    """A batch of B objects, each with k context views and m target views (images in [0, 1])."""

    # Images and masks are channels-last in memory, (B, V, C, H, W) views of (B, V, H, W, C) data,
    # as a decoder gives them (and as the peers' collate does): .contiguous() for channels-first memory.
    context_images: torch.Tensor  # (B, k, 3, H, W) float32
    context_K: torch.Tensor  # (B, k, 3, 3) float32, pixels of the output resolution
    context_c2w: torch.Tensor  # (B, k, 4, 4) float32, OpenCV camera-to-world
    target_images: torch.Tensor  # (B, m, 3, H, W)
    target_K: torch.Tensor  # (B, m, 3, 3)
    target_c2w: torch.Tensor  # (B, m, 4, 4)
    background: torch.Tensor  # (B, 3) in [0, 1]
    object_ids: list[str]
    context_view_indices: torch.Tensor  # (B, k) int64: which stored views were used
    target_view_indices: torch.Tensor  # (B, m)
    context_masks: torch.Tensor | None = None  # (B, k, 1, H, W) in [0, 1] (1 = object), with ReaderConfig.masks
    target_masks: torch.Tensor | None = None  # (B, m, 1, H, W)

    @property
    def num_objects(self) -> int:
        return len(self.object_ids)

    @property
    def num_context_views(self) -> int:
        return self.context_images.shape[1]

    def to(self, device, non_blocking: bool = False) -> "ViewBatch":
        moved = {
            name: value.to(device, non_blocking=non_blocking) if isinstance(value, torch.Tensor) else value
            for name, value in self.__dict__.items()
        }
        return ViewBatch(**moved)


@dataclass
class SkipStats:
    """Counts of skipped samples (by reason and by shard); kept per slot, summed per rank.

    Only samples of a slot's *own* run are counted, so summed over every slot and rank each
    unreadable sample of the epoch is counted once (refill reads of other slots' samples are not).
    """

    samples: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    by_shard: dict[str, dict[str, int]] = field(default_factory=dict)  # shard URL -> reason -> samples

    @property
    def shards_with_errors(self) -> list[str]:
        return sorted(self.by_shard)

    def count(self, reason: str, shard_url: str) -> None:
        self.samples += 1
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        shard = self.by_shard.setdefault(shard_url, {})
        shard[reason] = shard.get(reason, 0) + 1

    def add(self, other: "SkipStats") -> None:
        self.samples += other.samples
        for reason, n in other.by_reason.items():
            self.by_reason[reason] = self.by_reason.get(reason, 0) + n
        for url, reasons in other.by_shard.items():
            mine = self.by_shard.setdefault(url, {})
            for reason, n in reasons.items():
                mine[reason] = mine.get(reason, 0) + n

    def to_dict(self) -> dict:
        return {"samples": self.samples, "by_reason": dict(self.by_reason),
                "by_shard": {url: dict(reasons) for url, reasons in self.by_shard.items()}}

    @staticmethod
    def from_dict(raw: dict) -> "SkipStats":
        return SkipStats(raw["samples"], dict(raw["by_reason"]), {u: dict(r) for u, r in raw["by_shard"].items()})


def merge_skip_stats(stats: list[dict]) -> dict:
    """Sum :meth:`StreamingReader.skip_stats` of several ranks (e.g. from ``all_gather_object``)."""
    total, damaged = SkipStats(), {}
    for one in stats:
        total.add(SkipStats.from_dict(one))
        damaged.update(one.get("damaged_shards", {}))
    return {**total.to_dict(), "damaged_shards": damaged}


@dataclass
class SlotState:
    """How far one slot has got in the current epoch."""

    cursor: int = 0  # positions processed (read or skipped) along the slot's extended run
    emitted: int = 0  # samples put into batches
    batches: int = 0
    skipped: SkipStats = field(default_factory=SkipStats)

    def to_dict(self) -> dict:
        return {"cursor": self.cursor, "emitted": self.emitted, "batches": self.batches, "skipped": self.skipped.to_dict()}

    @staticmethod
    def from_dict(raw: dict) -> "SlotState":
        return SlotState(raw["cursor"], raw["emitted"], raw["batches"], SkipStats.from_dict(raw["skipped"]))


class DatasetIndex:
    """Sample counts and offsets of every shard, loaded (or scanned) once per process.

    A shard whose sidecar index is malformed or stale is scanned instead; a shard found damaged by
    the scan keeps the samples before the damage. Either way ``problems`` names the shard and the
    reason (and a warning says so): one bad shard never stops a run.
    """

    def __init__(self, urls: list[str], storage_options: dict | None = None, threads: int = 16):
        self.urls = urls

        def load(url: str) -> ShardIndex:
            try:
                return load_or_build_index(url, storage_options)
            except FileNotFoundError:
                raise FileNotFoundError(f"shard {url} does not exist") from None
            except (OSError, PermissionError) as error:
                raise RuntimeError(storage.explain_storage_error(url, error)) from None

        with ThreadPoolExecutor(max_workers=min(threads, len(urls))) as pool:
            self.shards: list[ShardIndex] = list(pool.map(load, urls))
        self.problems: dict[str, str] = {}  # shard URL -> what is wrong with it
        for shard in self.shards:
            reasons = [r for r in (shard.note, shard.error and f"damaged: only its first {len(shard)} samples are "
                                                                 f"readable ({shard.error})") if r]
            if reasons:
                self.problems[shard.url] = "; ".join(reasons)
                log.warning("shard %s: %s", shard.url, self.problems[shard.url])
        self.counts = tuple(len(s) for s in self.shards)
        if sum(self.counts) == 0:
            raise ValueError(f"no samples in {len(urls)} shard(s) starting with {urls[0]}"
                             + (f" (problems: {self.problems})" if self.problems else ""))

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for shard in self.shards:
            digest.update(f"{storage.basename(shard.url)}:{len(shard)}:{','.join(shard.keys)}\n".encode())
        return digest.hexdigest()[:16]


class _RateLimitedWarning:
    def __init__(self, every_s: float):
        self.every_s, self.last, self.suppressed = every_s, -float("inf"), 0

    def __call__(self, message: str) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s:
            extra = f" (and {self.suppressed} more skipped since the last warning)" if self.suppressed else ""
            log.warning("%s%s", message, extra)
            self.last, self.suppressed = now, 0
        else:
            self.suppressed += 1


class _SlotStream(torch.utils.data.IterableDataset):
    """Runs inside a DataLoader worker (or the main process) and yields the batches of one slot."""

    def __init__(self, config: ReaderConfig, index: DatasetIndex, plan: EpochPlan, rank: int, workers: int,
                 slot_states: dict[int, SlotState], rotation: int, epoch=None):
        self.config, self.index, self.plan = config, index, plan
        self.rank, self.workers = rank, workers
        self.slot_states, self.rotation = slot_states, rotation
        # Persistent workers keep this object from epoch to epoch: the main process announces each
        # new (fresh) epoch through shared memory (``epoch``, a ctypes int64 made before the fork),
        # and the worker makes that epoch's plan itself.
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple["_PackedBatch", int, SlotState]]:
        if self.epoch is not None and self.epoch.value != self.plan.epoch:
            self.plan = dataclasses.replace(self.plan, epoch=self.epoch.value)
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and not getattr(self, "_frozen", False):
            # A forked worker inherits the parent's whole heap (torch's modules: ~10^5 objects).
            # Frozen, the collections that each block's metadata triggers skip it, and the pages stay
            # shared with the parent instead of being copied when the collector touches them.
            gc.freeze()
            self._frozen = True
        logical = (worker + self.rotation) % self.workers
        slot = self.rank * self.workers + logical
        state = self.slot_states.get(slot) or SlotState()
        self._pool = None  # parallel ranged GETs of one block (object stores)
        self._meta = MetaReader()  # parses metadata in this (the batching) thread only
        # The next block is read ahead while this one is decoded: from object stores by a thread;
        # from local files by the kernel, asked with posix_fadvise (a thread there was measured to
        # cost 11% of the reader's CPU in GIL hand-overs, to hide no latency on a warm page cache).
        self._remote = not storage.is_local(self.index.shards[0].url)
        self._ahead = ThreadPoolExecutor(max_workers=1) if self._remote else None
        try:
            yield from self._batches(slot, SlotState.from_dict(state.to_dict()))
        finally:
            if self._ahead is not None:
                self._ahead.shutdown(wait=False, cancel_futures=True)
            if self._pool is not None:
                self._pool.shutdown(wait=False)

    def _fetch_block(self, slot: int, cursor: int) -> tuple[int, np.ndarray, dict]:
        start, block = self.plan.block(slot, cursor)
        return start, block, self._read_positions(block)

    def _read_ahead(self, slot: int, cursor: int):
        """The block at ``cursor``, being read ahead; ``.result()`` gives what _fetch_block gives."""
        if self._ahead is not None:
            return self._ahead.submit(self._fetch_block, slot, cursor)
        return _AdvisedBlock(self, slot, cursor)

    def _batches(self, slot: int, state: SlotState) -> Iterator[tuple["_PackedBatch", int, SlotState]]:
        config, plan = self.config, self.plan
        own, universe = plan.samples_per_slot, plan.num_samples
        sizes = plan.batch_sizes()
        warn = _RateLimitedWarning(config.warn_every_s)
        block_start, block, block_data = 0, np.zeros(0, dtype=np.int64), {}
        ahead = None  # (cursor, future) of the block after the current one
        since_last_emit = 0
        while state.batches < len(sizes):
            # Read the next block while this one is decoded; started after a batch is out, so that
            # it never delays the first batch.
            following = block_start + len(block)
            if len(block) and (ahead is None or ahead[0] != following):
                ahead = (following, self._read_ahead(slot, following))
            # The number of context views depends only on the rank-level batch number, not on the
            # rank: every rank's n-th batch has the same k, so ranks run the same computation
            # (ZeRO-3 gathers parameters per module call: diverging calls would deadlock).
            rank_batch = state.batches * self.workers + slot % self.workers
            k_rng = np.random.default_rng([config.seed, plan.epoch, rank_batch, 0x7E5])
            k = int(k_rng.integers(config.context_views_min, config.context_views_max + 1))
            rng = np.random.default_rng([config.seed, plan.epoch, slot, state.batches, 0x71E])  # which views
            pending: list[_LoadedObject] = []
            owners: list[tuple[bool, str]] = []  # (own sample?, shard URL) of each pending object
            while len(pending) < sizes[state.batches]:
                if since_last_emit >= universe:
                    problems = {**self.index.problems, **{u: str(r) for u, r in state.skipped.by_shard.items()}}
                    raise RuntimeError(f"reader slot {slot}: none of the {universe} samples of epoch {plan.epoch} is "
                                       f"readable (shards with problems: {problems})")
                if not block_start <= state.cursor < block_start + len(block):
                    # Memory: this block and the next one, encoded (2 x shuffle_block_objects samples).
                    if ahead is not None and ahead[0] == state.cursor:
                        block_start, block, block_data = ahead[1].result()
                    else:
                        block_start, block, block_data = self._fetch_block(slot, state.cursor)
                item = block_data[int(block[state.cursor - block_start])]
                mine = state.cursor < own  # skips of the slot's own samples are counted; refills' are not
                state.cursor += 1
                since_last_emit += 1
                if not isinstance(item, Exception):
                    try:
                        loaded = self._load_object(item, rng, k)
                        if pending and loaded.image_shape != pending[0].image_shape:
                            raise _tag(SampleError(f"{loaded.object_id}: views are {loaded.image_shape}, others in the "
                                                   f"batch {pending[0].image_shape}; set ReaderConfig.resolution"),
                                       "image size differs", item[0].url)
                        pending.append(loaded)
                        owners.append((mine, item[0].url))
                        state.emitted += 1
                        since_last_emit = 0
                        if len(pending) == sizes[state.batches]:
                            # Cameras are checked once per batch (one vectorised check); a bad one
                            # drops its object and the batch fills up again.
                            for bad in reversed(_bad_cameras(pending)):
                                error = _bad_camera_error(pending[bad])
                                if owners[bad][0]:
                                    self._count_skip(state, _tag(error, "bad camera", owners[bad][1]), warn)
                                del pending[bad], owners[bad]
                                state.emitted -= 1
                        continue
                    except SampleError as error:
                        item = error
                if mine:
                    self._count_skip(state, item, warn)
            state.batches += 1
            yield _collate(pending, k), slot, SlotState.from_dict(state.to_dict())

    def _count_skip(self, state: SlotState, error: Exception, warn: _RateLimitedWarning) -> None:
        reason = getattr(error, "reason", None) or type(error).__name__
        url = getattr(error, "shard_url", None) or "(unknown shard)"
        state.skipped.count(reason, url)
        warn(f"skipped a sample of {url} ({reason}): {error}")

    def _runs(self, positions: np.ndarray) -> list[tuple[int, int, list[int]]]:
        """(shard, first sample, epoch positions) of each run of consecutive samples of one shard."""
        ordered = np.sort(positions)
        shard_ids, local_ids = self.plan.locate(ordered)
        breaks = np.flatnonzero((np.diff(shard_ids) != 0) | (np.diff(local_ids) != 1)) + 1
        return [(int(shard_ids[s]), int(local_ids[s]), ordered[s:e].tolist())
                for s, e in zip(np.r_[0, breaks], np.r_[breaks, len(ordered)])]

    def _read_positions(self, positions: np.ndarray, runs: list | None = None) -> dict[int, tuple | Exception]:
        """The samples at these epoch positions, still encoded: one ranged read per run inside a shard."""
        runs = self._runs(positions) if runs is None else runs
        remote = not storage.is_local(self.index.shards[runs[0][0]].url)
        if remote and len(runs) > 1:  # object stores: the runs' ranged GETs in parallel
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=8)
            results = list(self._pool.map(lambda run: self._read_run(*run), runs))
        else:
            results = [self._read_run(*run) for run in runs]
        out: dict[int, tuple | Exception] = {}
        for result in results:
            out.update(result)
        return out

    def _read_run(self, shard_id: int, first: int, positions: list[int]) -> dict[int, tuple | Exception]:
        shard = self.index.shards[shard_id]
        out: dict[int, tuple | Exception] = {}
        try:
            raw = read_raw_range(shard.url, shard, first, len(positions), self.config.storage_options)
        except (OSError, ValueError) as error:
            message = f"{shard.url}: cannot read samples {first}..{first + len(positions) - 1} ({storage.explain_storage_error(shard.url, error)})"
            return {p: _tag(SampleError(message), "unreadable shard", shard.url) for p in positions}
        damage = None  # once set, the rest of the run is lost
        for got, position in enumerate(positions):
            expected = shard.keys[first + got]
            if damage is None and got < len(raw.groups) and raw.groups[got][0] != expected:
                damage = f"found sample {raw.groups[got][0]!r} where the index has {expected!r} (an index of another shard?)"
            if damage is None and got >= len(raw.groups):
                damage = raw.damage or "the shard is shorter than its index"
            if damage is not None:
                # (a sample cut short is still parsed above: its missing members make it a "bad sample")
                message = f"{shard.url}: sample {first + got} ({expected}) is unreadable: {damage}"
                out[position] = _tag(SampleError(message), "damaged shard", shard.url)
            else:
                out[position] = (raw, raw.groups[got][0], raw.groups[got][1])
        return out

    def _load_object(self, item: tuple, rng: np.random.Generator, k: int) -> "_LoadedObject":
        """Parse the metadata and decode (and resize) only the chosen views; raises a tagged SampleError."""
        raw, key, members = item
        config = self.config
        span = members.get(META_SUFFIX)
        if span is None:
            raise _tag(SampleError(f"sample {key!r}: missing {META_SUFFIX}"), "bad sample", raw.url)
        try:
            meta = self._meta.read(span_bytes(raw.buffer, span), key, rng, k + config.target_views,
                                   config.context_views_max + config.target_views, extra=config.box_half_size is not None)
        except MetaError as error:
            raise _tag(SampleError(str(error)), error.reason, raw.url) from None
        chosen, K, c2w, width, height = meta.chosen, meta.K, meta.c2w, meta.width, meta.height
        names, mask_names, object_id = meta.names, meta.mask_names, meta.object_id
        if config.box_half_size is not None:  # only the chosen cameras: the validator checks them all
            if not hasattr(self, "_box_fit"):
                self._box_fit = BoxFitWarner(config.box_half_size)
            self._box_fit(SimpleNamespace(object_id=object_id, extra=meta.extra, intrinsics=K, c2w=c2w,
                                          width=width, height=height))
        masks, buffer = config.masks, raw.buffer
        rgb = np.empty((len(chosen), height, width, 4 if masks else 3), dtype=np.uint8)  # filled view by view
        for j, (view, name, mask_name) in enumerate(zip(chosen.tolist(), names, mask_names)):
            span = members.get(name)
            if span is None:
                raise _tag(SampleError(f"sample {key!r}: view file {key}.{name} is missing from the shard"), "bad sample", raw.url)
            try:
                image = decode_image(span_bytes(buffer, span), width, height, where=f"{object_id} view {view}")
                if not masks:
                    rgb[j] = image
                    continue
                rgb[j, ..., :3] = image  # the mask travels as a 4th channel until _collate splits it off
                mask_span = members.get(mask_name) if mask_name else None
                if mask_span is None:
                    raise _tag(SampleError(f"object {object_id} has no mask for view {view} (ReaderConfig.masks "
                                           f"is set)"), "no masks", raw.url)
                rgb[j, ..., 3] = decode_mask(span_bytes(buffer, mask_span), width, height, where=f"{object_id} mask {view}")
            except SampleError as error:
                if getattr(error, "reason", None):
                    raise
                raise _tag(error, "undecodable image", raw.url) from None
        if config.resolution is not None and config.resolution != width:
            out_w = config.resolution
            out_h = max(1, round(height * out_w / width))
            rgb = np.stack([_resize(im, out_w, out_h) for im in rgb])
            K = K.copy()  # scale_intrinsics, for a stack of cameras
            K[:, 0, :] *= out_w / width
            K[:, 1, :] *= out_h / height
        return _LoadedObject(object_id, meta.background, chosen, rgb, K, c2w)


class _AdvisedBlock:
    """The next block of local shards: the kernel is asked to read its byte ranges ahead
    (posix_fadvise WILLNEED: asynchronous, no thread); they are read when the block is reached."""

    def __init__(self, stream: _SlotStream, slot: int, cursor: int):
        self.stream = stream
        self.start, self.block = stream.plan.block(slot, cursor)
        self.runs = stream._runs(self.block) if len(self.block) else []
        for shard_id, first, positions in self.runs:
            shard = stream.index.shards[shard_id]
            advise_will_read(shard.url, shard, first, len(positions))

    def result(self) -> tuple[int, np.ndarray, dict]:
        data = self.stream._read_positions(self.block, self.runs) if len(self.block) else {}
        return self.start, self.block, data


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of RGB or RGB + mask. The mask is resized on its own: Pillow would treat a
    4th channel as alpha and premultiply the colours by it."""
    rgb = np.asarray(Image.fromarray(image[..., :3]).resize((width, height), Image.BILINEAR))
    if image.shape[-1] == 3:
        return rgb
    mask = np.asarray(Image.fromarray(image[..., 3]).resize((width, height), Image.BILINEAR))
    return np.concatenate([rgb, mask[..., None]], axis=-1)


def _bad_cameras(items: list["_LoadedObject"]) -> list[int]:
    """Indices of the objects whose chosen cameras are invalid (one vectorised check for the batch)."""
    try:
        check_cameras(np.concatenate([item.K for item in items]), np.concatenate([item.c2w for item in items]), where="batch")
        return []
    except CameraError:
        return [i for i, item in enumerate(items) if _bad_camera_error(item) is not None]


def _bad_camera_error(item: "_LoadedObject") -> SampleError | None:
    try:
        check_cameras(item.K, item.c2w, where=f"object {item.object_id} views {item.views.tolist()}")
        return None
    except CameraError as error:
        return SampleError(str(error))


@dataclass
class _LoadedObject:
    object_id: str
    background: tuple[float, float, float]
    views: np.ndarray  # (k + m,) int64: the stored views chosen, context views first
    images: np.ndarray  # (k + m, H, W, 3 or 4) uint8 (4: RGB + mask, with ReaderConfig.masks)
    K: np.ndarray  # (k + m, 3, 3) float64
    c2w: np.ndarray  # (k + m, 4, 4) float64

    @property
    def image_shape(self) -> tuple[int, int]:
        return self.images.shape[1:3]


@dataclass
class _PackedBatch:
    """A batch as ONE float32 tensor plus its layout, for the trip from a loader worker.

    Each tensor crossing a process boundary costs a shared-memory segment and a file-descriptor
    hand-over that needs the worker's GIL; with ten tensors per batch that was measured to halve
    the throughput of a busy worker (bench/data_pipeline.py). Unpacking makes zero-copy views.
    Images are stored channels last, (B, V, H, W, C) as decoded, and handed out as (B, V, C, H, W)
    views of that memory (``_CHANNELS_FIRST``): the transposing copy into channels-first memory
    was the largest cost of collating (more than half of it) and nothing downstream needs it.
    """

    buffer: torch.Tensor
    layout: list[tuple[str, tuple[int, ...]]]  # (field, shape as stored)
    object_ids: list[str]

    def unpack(self) -> ViewBatch:
        # numpy views made tensors with from_numpy: a third of the time of torch's view / permute /
        # long calls for the 11 fields (torch's per-call overhead dominates at these sizes)
        flat, fields, start = self.buffer.numpy(), {}, 0
        for name, shape in self.layout:
            size = math.prod(shape)
            view = flat[start:start + size].reshape(shape)
            if name in _IMAGE_FIELDS:
                view = view.transpose(_CHANNELS_FIRST)
            elif name in _INDEX_FIELDS:
                view = view.astype(np.int64)
            fields[name] = torch.from_numpy(view)
            start += size
        return ViewBatch(object_ids=self.object_ids, **fields)


_IMAGE_FIELDS = ("context_images", "target_images", "context_masks", "target_masks")
_INDEX_FIELDS = ("context_view_indices", "target_view_indices")
_CHANNELS_FIRST = (0, 1, 4, 2, 3)  # (B, V, H, W, C) memory -> (B, V, C, H, W) view


def _collate(items: list[_LoadedObject], k: int) -> _PackedBatch:
    """The batch's objects into one float32 buffer (see _PackedBatch), each field in one vectorised copy."""
    count = len(items)
    views, height, width, channels = items[0].images.shape
    images = np.empty((count, views, height, width, channels), dtype=np.uint8)  # (np.stack costs more, in Python)
    K, c2w = np.empty((count, views, 3, 3)), np.empty((count, views, 4, 4))
    chosen = np.empty((count, views), dtype=np.int64)
    for i, item in enumerate(items):
        images[i], K[i], c2w[i], chosen[i] = item.images, item.K, item.c2w, item.views
    m = views - k
    masks = channels == 4  # ReaderConfig.masks: RGB + mask channels
    layout = [
        ("context_images", (count, k, height, width, 3)), ("target_images", (count, m, height, width, 3)),
        *([("context_masks", (count, k, height, width, 1)), ("target_masks", (count, m, height, width, 1))] if masks else []),
        ("context_K", (count, k, 3, 3)), ("context_c2w", (count, k, 4, 4)),
        ("target_K", (count, m, 3, 3)), ("target_c2w", (count, m, 4, 4)),
        ("background", (count, 3)), ("context_view_indices", (count, k)), ("target_view_indices", (count, m)),
    ]
    sizes = [math.prod(shape) for _, shape in layout]
    buffer = np.empty(sum(sizes), dtype=np.float32)
    parts, start = {}, 0
    for (name, shape), size in zip(layout, sizes):
        parts[name] = buffer[start:start + size].reshape(shape)
        start += size
    # uint8 -> float32 in [0, 1], one pass per field, in the order of memory (channels last)
    scale = np.float32(255.0)
    np.divide(images[:, :k, ..., :3], scale, out=parts["context_images"])
    np.divide(images[:, k:, ..., :3], scale, out=parts["target_images"])
    if masks:
        np.divide(images[:, :k, ..., 3:], scale, out=parts["context_masks"])
        np.divide(images[:, k:, ..., 3:], scale, out=parts["target_masks"])
    parts["context_K"][...], parts["target_K"][...] = K[:, :k], K[:, k:]
    parts["context_c2w"][...], parts["target_c2w"][...] = c2w[:, :k], c2w[:, k:]
    parts["context_view_indices"][...], parts["target_view_indices"][...] = chosen[:, :k], chosen[:, k:]
    parts["background"][...] = [item.background for item in items]
    return _PackedBatch(torch.from_numpy(buffer), layout, [item.object_id for item in items])


def _tag(error: Exception, reason: str, shard_url: str | None) -> Exception:
    error.reason, error.shard_url = reason, shard_url
    return error


class StreamingReader:
    """Iterates one epoch per ``iter()``; every rank yields exactly ``len(self)`` batches per epoch.

    ``rank`` and ``world_size`` default to the RANK and WORLD_SIZE environment variables.
    """

    def __init__(self, config: ReaderConfig, rank: int | None = None, world_size: int | None = None):
        self.config = config
        self.rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        self.world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        self.workers = max(config.num_workers, 1)  # logical workers (slots) per rank
        self.index = DatasetIndex(storage.expand_urls(config.urls, config.storage_options), config.storage_options)
        self.epoch = 0
        self.batches_consumed = 0  # in the current epoch, on this rank
        self._subset: tuple[int, ...] | None = None
        self._slot_states: dict[int, SlotState] = {}
        self._finished_skips = SkipStats()  # from completed epochs
        self._persistent = None  # (shared epoch, stream, loader) of the persistent workers, once made

    # -- the plan --------------------------------------------------------------------------
    def _plan(self, epoch: int | None = None, subset=None) -> EpochPlan:
        return EpochPlan(
            counts=self.index.counts, seed=self.config.seed, epoch=self.epoch if epoch is None else epoch,
            num_slots=self.world_size * self.workers, batch_size=self.config.batch_size,
            shuffle=self.config.shuffle, drop_last=self.config.drop_last,
            block_size=self.config.shuffle_block_objects, piece_size=self.config.piece_size,
            subset=self._subset if subset is None else subset,
        )

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return self._plan().batches_per_slot * self.workers

    @property
    def num_samples(self) -> int:
        return sum(self.index.counts)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (forgets any mid-epoch position)."""
        self.epoch, self.batches_consumed, self._subset, self._slot_states = epoch, 0, None, {}

    def skip_stats(self) -> dict:
        """What this rank has skipped so far (all epochs, all loader workers): samples, by reason, by
        shard URL and reason, and ``damaged_shards`` (URL -> reason) found while indexing. JSON-ready;
        sum the ranks' with :func:`merge_skip_stats`."""
        return {**self.skipped.to_dict(), "damaged_shards": dict(self.index.problems)}

    @property
    def skipped(self) -> SkipStats:
        total = SkipStats()
        total.add(self._finished_skips)
        for state in self._slot_states.values():
            total.add(state.skipped)
        return total

    # -- iteration -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[ViewBatch]:
        if self.batches_consumed >= len(self):  # restored from a state saved after an epoch's last batch
            self._finish_epoch()
        plan = self._plan()
        total = plan.batches_per_slot * self.workers
        # A DataLoader hands out batches round-robin from worker 0. After a resume at batch n the
        # next batch belongs to logical worker n % workers, so the new workers are rotated.
        rotation = self.batches_consumed % self.workers
        fresh = self.batches_consumed == 0 and not self._slot_states and self._subset is None
        if fresh and self.config.num_workers and self.config.persistent_workers:
            loader = self._persistent_loader(plan)
        else:  # an epoch continued mid-way: its own loader, with the saved slot states
            loader = self._loader(_SlotStream(self.config, self.index, plan, self.rank, self.workers,
                                              dict(self._slot_states), rotation), persistent=False)
        for packed, slot, state in loader:
            self._slot_states[slot] = state
            self.batches_consumed += 1
            yield packed.unpack()
        if self.batches_consumed != total:
            raise RuntimeError(f"internal: rank {self.rank} produced {self.batches_consumed} of {total} batches")
        self._finish_epoch()

    def _loader(self, stream: _SlotStream, persistent: bool):
        workers = self.config.num_workers
        if not workers:
            # In this process: the stream itself. A DataLoader without workers only adds, per batch,
            # a profiler record_function and a default_convert walk of the batch (~70 us measured).
            return stream
        return torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=workers, persistent_workers=persistent,
            prefetch_factor=self.config.prefetch_batches,
            multiprocessing_context="fork" if os.name == "posix" else None,
        )

    def _persistent_loader(self, plan: EpochPlan) -> torch.utils.data.DataLoader:
        """The loader whose workers live from one fresh epoch to the next (made on first use)."""
        if self._persistent is None:
            epoch = multiprocessing.get_context("fork").Value("q", plan.epoch, lock=False)
            stream = _SlotStream(self.config, self.index, plan, self.rank, self.workers, {}, 0, epoch)
            self._persistent = (epoch, stream, self._loader(stream, persistent=True))
        epoch, stream, loader = self._persistent
        if dataclasses.replace(plan, epoch=stream.plan.epoch) != stream.plan:
            raise RuntimeError("internal: the persistent loader's plan differs from this epoch's in more than the epoch")
        epoch.value = plan.epoch  # read by each worker when the loader starts its next pass
        return loader

    def _finish_epoch(self) -> None:
        for state in self._slot_states.values():
            self._finished_skips.add(state.skipped)
        self.set_epoch(self.epoch + 1)

    # -- resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "fingerprint": self.index.fingerprint(),
            "seed": self.config.seed, "batch_size": self.config.batch_size,
            "shuffle": self.config.shuffle, "drop_last": self.config.drop_last,
            "block_size": self.config.shuffle_block_objects, "piece_size": self.config.piece_size,
            "rank": self.rank, "world_size": self.world_size, "workers": self.workers,
            "epoch": self.epoch, "batches_consumed": self.batches_consumed,
            "subset": _ranges(self._subset) if self._subset is not None else None,
            "slots": {str(slot): state.to_dict() for slot, state in self._slot_states.items()},
            "finished_skips": self._finished_skips.to_dict(),
        }

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """Continue from a saved position.

        Pass this rank's own state, or the list of every rank's state. With the same world size
        and workers the stream continues exactly. With a different world size, the list of all
        ranks' states is required: the rest of the epoch (every sample not yet read by any rank)
        is then split afresh over the new ranks, so nothing is repeated or skipped.
        """
        states = state if isinstance(state, list) else [state]
        first = states[0]
        if first.get("version") != STATE_VERSION:
            saved, epoch = first.get("version"), first.get("epoch")
            why = ("it was saved by the reader before shard pieces (ReaderConfig.piece_objects), whose epoch order "
                   "is different, so its position in the epoch cannot be carried over" if saved == 1 else
                   "this reader does not know that version")
            raise ValueError(
                f"cannot resume the reader from a state of version {saved!r} (this reader writes and reads version "
                f"{STATE_VERSION}): {why}. Either continue with the code that saved it, or start the data afresh at "
                f"the next epoch: StreamingReader.set_epoch({'saved epoch + 1' if epoch is None else epoch + 1}) "
                f"instead of load_state_dict (model and optimizer state are unaffected)")
        for name, mine in (("fingerprint", self.index.fingerprint()), ("seed", self.config.seed),
                           ("batch_size", self.config.batch_size), ("shuffle", self.config.shuffle),
                           ("drop_last", self.config.drop_last), ("block_size", self.config.shuffle_block_objects),
                           ("piece_size", self.config.piece_size)):
            if first[name] != mine:
                what = "the shard list or its contents changed" if name == "fingerprint" else f"{name} changed"
                raise ValueError(f"cannot resume the reader: {what} since the state was saved "
                                 f"(saved {name}={first[name]!r}, now {mine!r})")
        same_layout = first["world_size"] == self.world_size and first["workers"] == self.workers
        if same_layout:
            mine = next((s for s in states if s["rank"] == self.rank), None)
            if mine is None:
                raise ValueError(f"no reader state for rank {self.rank} among ranks {[s['rank'] for s in states]}")
            self._restore_exact(mine)
            return
        if len(states) != first["world_size"] or sorted(s["rank"] for s in states) != list(range(first["world_size"])):
            raise ValueError(
                f"the reader state was saved with world_size={first['world_size']} and {first['workers']} worker(s) per "
                f"rank; now world_size={self.world_size} with {self.workers}. Continuing mid-epoch with a different "
                f"layout needs the states of all {first['world_size']} saved ranks (load_state_dict(list_of_states)); "
                f"or call set_epoch() to start a fresh epoch"
            )
        if len({(s["epoch"], s["subset"] is None) for s in states}) != 1:
            raise ValueError("the saved ranks' reader states are from different epochs")
        self._restore_elastic(states)

    def _restore_exact(self, state: dict) -> None:
        self.epoch, self.batches_consumed = state["epoch"], state["batches_consumed"]
        self._subset = _unranges(state["subset"]) if state["subset"] is not None else None
        self._slot_states = {int(slot): SlotState.from_dict(raw) for slot, raw in state["slots"].items()}
        self._finished_skips = SkipStats.from_dict(state["finished_skips"])

    def _restore_elastic(self, states: list[dict]) -> None:
        first = states[0]
        old_subset = _unranges(first["subset"]) if first["subset"] is not None else None
        old_plan = EpochPlan(
            counts=self.index.counts, seed=first["seed"], epoch=first["epoch"],
            num_slots=first["world_size"] * first["workers"], batch_size=first["batch_size"],
            shuffle=first["shuffle"], drop_last=first["drop_last"], block_size=first["block_size"],
            piece_size=first["piece_size"], subset=old_subset,
        )
        cursors = {int(slot): raw["cursor"] for s in states for slot, raw in s["slots"].items()}
        remaining = remaining_positions(old_plan, cursors)
        self.set_epoch(first["epoch"])
        self._finished_skips = SkipStats()
        for s in states:  # the skips of the old ranks are accounted once, on the new rank 0
            if self.rank == 0:
                self._finished_skips.add(SkipStats.from_dict(s["finished_skips"]))
                for raw in s["slots"].values():
                    self._finished_skips.add(SkipStats.from_dict(raw["skipped"]))
        self._subset = remaining
        try:
            self._plan()
        except ValueError:
            log.warning("only %d samples are left in epoch %d: too few for %d readers; starting epoch %d",
                        len(remaining), self.epoch, self.world_size * self.workers, self.epoch + 1)
            self.set_epoch(self.epoch + 1)


def _ranges(values: tuple[int, ...]) -> list[list[int]]:
    """Run-length form [[start, stop), ...] of a sorted tuple, to keep saved states small."""
    out: list[list[int]] = []
    for v in values:
        if out and out[-1][1] == v:
            out[-1][1] = v + 1
        else:
            out.append([v, v + 1])
    return out


def _unranges(ranges: list[list[int]]) -> tuple[int, ...]:
    return tuple(v for start, stop in ranges for v in range(start, stop))


def skip_metrics(stats: dict) -> dict[str, float]:
    """Flat float metrics (for metrics.jsonl / TensorBoard) from :func:`merge_skip_stats` output:
    ``skipped_samples``, ``skipped/<reason>``, ``skipped_shard/<url>`` and ``damaged_shards``."""
    out = {"skipped_samples": float(stats["samples"]), "damaged_shards": float(len(stats.get("damaged_shards", {})))}
    out.update({f"skipped/{reason}": float(n) for reason, n in sorted(stats["by_reason"].items())})
    out.update({f"skipped_shard/{url}": float(sum(r.values())) for url, r in sorted(stats["by_shard"].items())})
    return out


def skip_summary(stats: dict) -> str:
    """One line for the end of a run: what was skipped, why, and where."""
    if not stats["samples"] and not stats.get("damaged_shards"):
        return "data: no samples skipped"
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(stats["by_reason"].items())) or "none"
    worst = sorted(stats["by_shard"].items(), key=lambda item: -sum(item[1].values()))[:5]
    shards = "; ".join(f"{url}: {sum(r.values())}" for url, r in worst)
    damaged = "; ".join(f"{url}: {reason}" for url, reason in sorted(stats.get("damaged_shards", {}).items()))
    return (f"data: skipped {stats['samples']} samples ({reasons}) in {len(stats['by_shard'])} shard(s)"
            + (f" [{shards}]" if shards else "") + (f"; damaged shards: {damaged}" if damaged else ""))
