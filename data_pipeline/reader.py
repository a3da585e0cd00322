"""Streaming reader for training: shards (local, file://, s3://, any fsspec URL) -> batches of views.

    reader = StreamingReader(ReaderConfig(urls="s3://bucket/train-{000000..000099}.tar", batch_size=8))
    for epoch in range(epochs):
        for batch in reader:          # one epoch; every rank gets len(reader) batches
            ...
        # state = reader.state_dict() at any point; StreamingReader(...).load_state_dict(state)
        # continues with exactly the same objects, views and order

How the epoch is split and shuffled is in epoch_plan.py. This module reads and decodes:
each DataLoader worker plays one *slot* of the plan, reads its positions block by block (one
seek per shard run, thanks to the shard index), picks the context and target views of each
object from a seeded RNG, decodes only those views, and yields whole batches. Each batch carries
the worker's cursor, so the main process knows exactly what has been consumed (prefetched but
unconsumed batches do not count) and can save it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from data_pipeline import storage
from data_pipeline.box_fit import BoxFitWarner
from data_pipeline.cameras import CameraError, check_cameras, scale_intrinsics
from data_pipeline.epoch_plan import EpochPlan, remaining_positions
from data_pipeline.schema import ObjectSample, SampleError, decode_image, decode_mask, parse_sample
from data_pipeline.shards import ShardIndex, load_or_build_index, read_sample_range

log = logging.getLogger("data_pipeline.reader")
STATE_VERSION = 1


@dataclass
class ReaderConfig:
    urls: str | list[str]  # brace patterns / globs, e.g. "s3://b/train-{000000..000099}.tar"
    batch_size: int = 4  # objects per batch, per rank
    context_views_min: int = 0  # k is drawn per batch, uniformly from [min, max]; 0 = unconditional
    context_views_max: int = 3
    target_views: int = 1  # m target views per object, disjoint from the context views
    resolution: int | None = None  # output width in pixels (height keeps the aspect); None = as stored
    num_workers: int = 2  # DataLoader worker processes per rank (0 = read in the training process)
    seed: int = 0
    shuffle: bool = True
    shuffle_block_objects: int = 64  # samples permuted together inside each worker's run
    drop_last: bool = True  # see epoch_plan.py for what is dropped or padded
    storage_options: dict | None = None  # fsspec options (endpoint, key, ...); env vars otherwise
    warn_every_s: float = 30.0  # rate limit of warnings about skipped samples
    prefetch_batches: int = 2  # per worker
    box_half_size: float | None = None  # the model's box: warn once if an object or camera misses it
    masks: bool = False  # also decode the chosen views' masks (KEY.viewNNN.mask.png); objects without are skipped

    def __post_init__(self):
        checks = {
            "batch_size": self.batch_size >= 1,
            "context_views_min": 0 <= self.context_views_min <= self.context_views_max,
            "target_views": self.target_views >= 0 and self.context_views_max + self.target_views >= 1,
            "num_workers": self.num_workers >= 0,
            "shuffle_block_objects": self.shuffle_block_objects >= 1,
            "resolution": self.resolution is None or self.resolution >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"ReaderConfig.{name} is invalid: {getattr(self, name)!r}")


@dataclass
class ViewBatch:
    """A batch of B objects, each with k context views and m target views (images in [0, 1])."""

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
    """Counts of what was skipped; kept per slot, summed per rank."""

    samples: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    shards_with_errors: list[str] = field(default_factory=list)

    def add(self, other: "SkipStats") -> None:
        self.samples += other.samples
        for reason, n in other.by_reason.items():
            self.by_reason[reason] = self.by_reason.get(reason, 0) + n
        self.shards_with_errors = sorted(set(self.shards_with_errors) | set(other.shards_with_errors))


@dataclass
class SlotState:
    """How far one slot has got in the current epoch."""

    cursor: int = 0  # positions processed (read or skipped), counting over passes
    emitted: int = 0  # samples put into batches
    batches: int = 0
    skipped: SkipStats = field(default_factory=SkipStats)

    @staticmethod
    def from_dict(raw: dict) -> "SlotState":
        return SlotState(raw["cursor"], raw["emitted"], raw["batches"], SkipStats(**raw["skipped"]))


class DatasetIndex:
    """Sample counts and offsets of every shard, loaded (or scanned) once per process."""

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
        for shard in self.shards:
            if shard.error:
                log.warning("shard %s is damaged: only its first %d samples are readable (%s)", shard.url, len(shard), shard.error)
        self.counts = tuple(len(s) for s in self.shards)
        if sum(self.counts) == 0:
            raise ValueError(f"no samples in {len(urls)} shard(s) starting with {urls[0]}")

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
                 slot_states: dict[int, SlotState], rotation: int):
        self.config, self.index, self.plan = config, index, plan
        self.rank, self.workers = rank, workers
        self.slot_states, self.rotation = slot_states, rotation

    def __iter__(self) -> Iterator[tuple["_PackedBatch", int, SlotState]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        logical = (worker + self.rotation) % self.workers
        slot = self.rank * self.workers + logical
        state = self.slot_states.get(slot) or SlotState()
        yield from self._batches(slot, state)

    def _batches(self, slot: int, state: SlotState) -> Iterator[tuple["_PackedBatch", int, SlotState]]:
        config, plan = self.config, self.plan
        positions = plan.slot_positions(slot)
        run_length = len(positions)
        sizes = plan.batch_sizes()
        warn = _RateLimitedWarning(config.warn_every_s)
        loaded_block, block_data = None, {}
        since_last_emit = 0
        needed = config.context_views_max + config.target_views
        while state.batches < len(sizes):
            # The number of context views depends only on the rank-level batch number, not on the
            # rank: every rank's n-th batch has the same k, so ranks run the same computation
            # (ZeRO-3 gathers parameters per module call: diverging calls would deadlock).
            rank_batch = state.batches * self.workers + slot % self.workers
            k_rng = np.random.default_rng([config.seed, plan.epoch, rank_batch, 0x7E5])
            k = int(k_rng.integers(config.context_views_min, config.context_views_max + 1))
            rng = np.random.default_rng([config.seed, plan.epoch, slot, state.batches, 0x71E])  # which views
            pending: list[_LoadedObject] = []
            while len(pending) < sizes[state.batches]:
                if since_last_emit >= run_length:
                    raise RuntimeError(f"reader slot {slot}: none of its {run_length} samples is readable "
                                       f"({state.skipped.by_reason})")
                within = state.cursor % run_length
                block = within // config.shuffle_block_objects
                if block != loaded_block:
                    start = block * config.shuffle_block_objects
                    block_data = self._read_positions(positions[start:start + config.shuffle_block_objects])
                    loaded_block = block
                item = block_data[int(positions[within])]
                state.cursor += 1
                since_last_emit += 1
                if isinstance(item, ObjectSample):
                    if item.num_views < needed:
                        item = _tag(SampleError(f"object {item.object_id} has {item.num_views} views; the reader "
                                                f"needs context_views_max + target_views = {needed}"), "too few views", None)
                    else:
                        chosen = rng.permutation(item.num_views)[:k + config.target_views]
                        try:
                            loaded = self._load_object(item, chosen[:k], chosen[k:])
                            if pending and loaded.image_shape != pending[0].image_shape:
                                raise SampleError(f"{item.object_id}: views are {loaded.image_shape}, others in the batch "
                                                  f"{pending[0].image_shape}; set ReaderConfig.resolution")
                            pending.append(loaded)
                            state.emitted += 1
                            since_last_emit = 0
                            continue
                        except SampleError as error:
                            item = error if hasattr(error, "reason") else _tag(error, "undecodable image", None)
                if state.cursor <= run_length:  # count each bad sample once, not again on refill passes
                    self._count_skip(state, item, warn)
            state.batches += 1
            yield _collate(pending), slot, SlotState.from_dict(asdict(state))

    def _count_skip(self, state: SlotState, error: Exception, warn: _RateLimitedWarning) -> None:
        reason = getattr(error, "reason", None) or type(error).__name__
        state.skipped.samples += 1
        state.skipped.by_reason[reason] = state.skipped.by_reason.get(reason, 0) + 1
        url = getattr(error, "shard_url", None)
        if url and url not in state.skipped.shards_with_errors:
            state.skipped.shards_with_errors.append(url)
        warn(f"skipped a sample: {error}")

    def _read_positions(self, positions: np.ndarray) -> dict[int, ObjectSample | Exception]:
        """Read the samples at these epoch positions: one sequential read per run inside a shard."""
        ordered = np.unique(positions)
        shard_ids, local_ids = self.plan.locate(ordered)
        out: dict[int, ObjectSample | Exception] = {}
        start = 0
        while start < len(ordered):
            end = start + 1
            while end < len(ordered) and shard_ids[end] == shard_ids[start] and local_ids[end] == local_ids[end - 1] + 1:
                end += 1
            shard = self.index.shards[int(shard_ids[start])]
            run = ordered[start:end]
            out.update(self._read_run(shard, int(local_ids[start]), [int(p) for p in run]))
            start = end
        return out

    def _read_run(self, shard: ShardIndex, first: int, positions: list[int]) -> dict[int, ObjectSample | Exception]:
        out: dict[int, ObjectSample | Exception] = {}
        got = 0
        try:
            for key, _, members in read_sample_range(shard.url, shard, first, len(positions), self.config.storage_options):
                if got == len(positions):
                    break
                position = positions[got]
                expected = shard.keys[first + got]
                if key != expected:
                    raise tarfile.ReadError(f"found sample {key!r} where the index has {expected!r}")
                try:
                    # Cameras are checked only for the views the batch uses (in _load_object):
                    # checking all of them is the validator's job, and costs as much as a decode.
                    out[position] = parse_sample(key, members, check_cameras=False)
                except SampleError as error:
                    out[position] = _tag(error, "bad sample", shard.url)
                got += 1
        except (tarfile.TarError, EOFError, OSError, ValueError) as error:
            message = f"{shard.url}: unreadable from sample {first + got} ({type(error).__name__}: {error})"
            for position in positions[got:]:
                out[position] = _tag(SampleError(message), "damaged shard", shard.url)
        for position in positions[got:]:  # the shard ended before the index said it would
            out.setdefault(position, _tag(SampleError(f"{shard.url}: shorter than its index"), "damaged shard", shard.url))
        return out

    def _load_view(self, sample: ObjectSample, view: int) -> tuple[np.ndarray, np.ndarray]:
        rgb = decode_image(sample.images[view], sample.width, sample.height, where=f"{sample.object_id} view {view}")
        mask = None
        if self.config.masks:
            mask = decode_mask(sample.masks[view], sample.width, sample.height, where=f"{sample.object_id} mask {view}")
        K = sample.intrinsics[view]
        if self.config.resolution is not None and self.config.resolution != sample.width:
            width = self.config.resolution
            height = max(1, round(sample.height * width / sample.width))
            rgb = np.asarray(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))
            if mask is not None:
                mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.BILINEAR))
            K = scale_intrinsics(K, width / sample.width, height / sample.height)
        if mask is not None:  # the mask travels as a 4th channel until _collate splits it off
            rgb = np.concatenate([rgb, mask[..., None]], axis=-1)
        return rgb, K

    def _load_object(self, sample: ObjectSample, context: np.ndarray, target: np.ndarray) -> "_LoadedObject":
        """Decode (and resize) only the chosen views; raises SampleError for an undecodable one."""
        chosen = np.concatenate([context, target])
        if self.config.box_half_size is not None:
            if not hasattr(self, "_box_fit"):
                self._box_fit = BoxFitWarner(self.config.box_half_size)
            self._box_fit(sample)
        try:
            check_cameras(sample.intrinsics[chosen], sample.c2w[chosen], where=f"object {sample.object_id} views {chosen.tolist()}")
        except CameraError as error:
            raise _tag(SampleError(str(error)), "bad camera", None) from None
        if self.config.masks and sample.masks is None:
            raise _tag(SampleError(f"object {sample.object_id} has no masks (ReaderConfig.masks is set)"), "no masks", None)

        def views(indices: np.ndarray):
            loaded = [self._load_view(sample, int(v)) for v in indices]
            if not loaded:
                return None, np.zeros((0, 3, 3)), np.zeros((0, 4, 4))
            return np.stack([rgb for rgb, _ in loaded]), np.stack([K for _, K in loaded]), sample.c2w[indices]

        return _LoadedObject(sample.object_id, sample.background, context, target, *views(context), *views(target))


@dataclass
class _LoadedObject:
    object_id: str
    background: tuple[float, float, float]
    context_views: np.ndarray
    target_views: np.ndarray
    context_rgb: np.ndarray | None  # (k, H, W, 3) uint8
    context_K: np.ndarray
    context_c2w: np.ndarray
    target_rgb: np.ndarray | None
    target_K: np.ndarray
    target_c2w: np.ndarray

    @property
    def image_shape(self) -> tuple[int, int]:
        rgb = self.context_rgb if self.context_rgb is not None else self.target_rgb
        return rgb.shape[1:3]


@dataclass
class _PackedBatch:
    """A batch as ONE float32 tensor plus its layout, for the trip from a loader worker.

    Each tensor crossing a process boundary costs a shared-memory segment and a file-descriptor
    hand-over that needs the worker's GIL; with ten tensors per batch that was measured to halve
    the throughput of a busy worker (bench/data_pipeline.py). Unpacking makes zero-copy views.
    """

    buffer: torch.Tensor
    layout: list[tuple[str, tuple[int, ...]]]
    object_ids: list[str]

    def unpack(self) -> ViewBatch:
        fields, start = {}, 0
        for name, shape in self.layout:
            size = int(np.prod(shape))
            fields[name] = self.buffer[start:start + size].view(shape)
            start += size
        for name in ("context_view_indices", "target_view_indices"):
            fields[name] = fields[name].long()
        return ViewBatch(object_ids=self.object_ids, **fields)


def _collate(items: list[_LoadedObject]) -> _PackedBatch:
    count = len(items)
    height, width = items[0].image_shape
    k, m = len(items[0].context_views), len(items[0].target_views)
    rgb = items[0].context_rgb if k else items[0].target_rgb
    masks = rgb.shape[-1] == 4  # ReaderConfig.masks: RGB + mask channels
    layout = [
        ("context_images", (count, k, 3, height, width)), ("target_images", (count, m, 3, height, width)),
        *([("context_masks", (count, k, 1, height, width)), ("target_masks", (count, m, 1, height, width))] if masks else []),
        ("context_K", (count, k, 3, 3)), ("context_c2w", (count, k, 4, 4)),
        ("target_K", (count, m, 3, 3)), ("target_c2w", (count, m, 4, 4)),
        ("background", (count, 3)), ("context_view_indices", (count, k)), ("target_view_indices", (count, m)),
    ]
    buffer = np.empty(sum(int(np.prod(shape)) for _, shape in layout), dtype=np.float32)
    parts, start = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape))
        parts[name] = buffer[start:start + size].reshape(shape)
        start += size
    for i, item in enumerate(items):
        if k:
            parts["context_images"][i] = item.context_rgb[..., :3].transpose(0, 3, 1, 2)
        if m:
            parts["target_images"][i] = item.target_rgb[..., :3].transpose(0, 3, 1, 2)
        if masks and k:
            parts["context_masks"][i] = item.context_rgb[..., 3:].transpose(0, 3, 1, 2)
        if masks and m:
            parts["target_masks"][i] = item.target_rgb[..., 3:].transpose(0, 3, 1, 2)
        parts["context_K"][i], parts["context_c2w"][i] = item.context_K, item.context_c2w
        parts["target_K"][i], parts["target_c2w"][i] = item.target_K, item.target_c2w
        parts["background"][i] = item.background
        parts["context_view_indices"][i], parts["target_view_indices"][i] = item.context_views, item.target_views
    images_end = count * (k + m) * (4 if masks else 3) * height * width  # images (and masks) come first
    np.divide(buffer[:images_end], np.float32(255.0), out=buffer[:images_end])
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

    # -- the plan --------------------------------------------------------------------------
    def _plan(self, epoch: int | None = None, subset=None) -> EpochPlan:
        return EpochPlan(
            counts=self.index.counts, seed=self.config.seed, epoch=self.epoch if epoch is None else epoch,
            num_slots=self.world_size * self.workers, batch_size=self.config.batch_size,
            shuffle=self.config.shuffle, drop_last=self.config.drop_last,
            block_size=self.config.shuffle_block_objects, subset=self._subset if subset is None else subset,
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
        stream = _SlotStream(self.config, self.index, plan, self.rank, self.workers, dict(self._slot_states), rotation)
        loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=self.config.num_workers,
            prefetch_factor=self.config.prefetch_batches if self.config.num_workers else None,
            multiprocessing_context="fork" if self.config.num_workers and os.name == "posix" else None,
        )
        for packed, slot, state in loader:
            self._slot_states[slot] = state
            self.batches_consumed += 1
            yield packed.unpack()
        if self.batches_consumed != total:
            raise RuntimeError(f"internal: rank {self.rank} produced {self.batches_consumed} of {total} batches")
        self._finish_epoch()

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
            "block_size": self.config.shuffle_block_objects,
            "rank": self.rank, "world_size": self.world_size, "workers": self.workers,
            "epoch": self.epoch, "batches_consumed": self.batches_consumed,
            "subset": _ranges(self._subset) if self._subset is not None else None,
            "slots": {str(slot): asdict(state) for slot, state in self._slot_states.items()},
            "finished_skips": asdict(self._finished_skips),
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
            raise ValueError(f"reader state version {first.get('version')!r} is not supported (expected {STATE_VERSION})")
        for name, mine in (("fingerprint", self.index.fingerprint()), ("seed", self.config.seed),
                           ("batch_size", self.config.batch_size), ("shuffle", self.config.shuffle),
                           ("drop_last", self.config.drop_last), ("block_size", self.config.shuffle_block_objects)):
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
        self._finished_skips = SkipStats(**state["finished_skips"])

    def _restore_elastic(self, states: list[dict]) -> None:
        first = states[0]
        old_subset = _unranges(first["subset"]) if first["subset"] is not None else None
        old_plan = EpochPlan(
            counts=self.index.counts, seed=first["seed"], epoch=first["epoch"],
            num_slots=first["world_size"] * first["workers"], batch_size=first["batch_size"],
            shuffle=first["shuffle"], drop_last=first["drop_last"], block_size=first["block_size"], subset=old_subset,
        )
        cursors = {int(slot): raw["cursor"] for s in states for slot, raw in s["slots"].items()}
        remaining = remaining_positions(old_plan, cursors)
        self.set_epoch(first["epoch"])
        self._finished_skips = SkipStats()
        for s in states:  # the skips of the old ranks are accounted once, on the new rank 0
            if self.rank == 0:
                self._finished_skips.add(SkipStats(**s["finished_skips"]))
                for raw in s["slots"].values():
                    self._finished_skips.add(SkipStats(**raw["skipped"]))
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
