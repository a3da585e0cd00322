"""Which sample each (rank, loader worker) reads, in which order, in one epoch — pure arithmetic.

Vocabulary:

* **position**: the place of a sample in the epoch's order. The epoch's order is the shards in
  a seeded permutation (seed, epoch), each shard's samples in file order.
* **slot**: one (rank, worker) pair; ``slot = rank * workers_per_rank + worker``. Each slot reads
  its own contiguous run of positions, so a shard is read by at most a few slots and resuming
  needs one seek.
* **quota**: samples each slot emits per epoch. Every slot has the same quota, so every rank
  yields the same number of batches, whatever the shard sizes.

Splitting (``S`` samples, ``N`` slots, batch size ``B``):

* ``drop_last=True`` (training default): every slot gets ``S // N`` distinct positions and emits
  ``(S // N) // B`` full batches. At most ``S mod N + N * (B - 1)`` samples are left out of an
  epoch; because the order is reshuffled every epoch, different samples are left out each time.
* ``drop_last=False`` (evaluation): every slot gets ``ceil(S / N)`` positions; the last
  ``ceil(S / N) * N - S`` of them wrap round to the start of the epoch order (documented padding,
  fewer than N duplicates), and the last batch of every slot may be short.

Within its run a slot shuffles in blocks of ``block_size`` positions (a seeded permutation per
block), which mixes samples from neighbouring shards without a stateful shuffle buffer, so the
stream is a pure function of (seed, epoch, slot, cursor) and resuming is exact.

When a sample turns out to be unreadable the slot skips it and, after its run, continues from
the start of its run again (a second *pass*) until it has emitted its quota: skipped samples are
replaced by repeats of the same slot's samples, never by silence that would leave one rank short.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EpochPlan:
    counts: tuple[int, ...]  # samples per shard, in the shard list's order
    seed: int
    epoch: int
    num_slots: int
    batch_size: int
    shuffle: bool = True
    drop_last: bool = True
    block_size: int = 64
    # Restricts the epoch to these positions (after an elastic resume): None means all of them.
    subset: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.batch_size < 1 or self.num_slots < 1 or self.block_size < 1:
            raise ValueError("batch_size, num_slots and block_size must be >= 1")
        if self.samples_per_slot < 1 or self.batches_per_slot < 1:
            raise ValueError(
                f"the dataset has {self.num_samples} samples for {self.num_slots} readers "
                f"(ranks x loader workers) with batch_size={self.batch_size}: at least one full batch per "
                f"reader is needed; use fewer workers or ranks, a smaller batch, or drop_last=False"
            )

    @property
    def total_samples(self) -> int:
        return int(sum(self.counts))

    @property
    def num_samples(self) -> int:
        return self.total_samples if self.subset is None else len(self.subset)

    @property
    def samples_per_slot(self) -> int:
        if self.drop_last:
            return self.num_samples // self.num_slots
        return -(-self.num_samples // self.num_slots)

    @property
    def batches_per_slot(self) -> int:
        if self.drop_last:
            return self.samples_per_slot // self.batch_size
        return -(-self.samples_per_slot // self.batch_size)

    @property
    def quota(self) -> int:
        """Samples each slot emits this epoch."""
        return self.batches_per_slot * self.batch_size if self.drop_last else self.samples_per_slot

    def batch_sizes(self) -> list[int]:
        """Sizes of one slot's batches (the last may be short when drop_last=False)."""
        sizes = [self.batch_size] * (self.quota // self.batch_size)
        if self.quota % self.batch_size:
            sizes.append(self.quota % self.batch_size)
        return sizes

    def shard_order(self) -> np.ndarray:
        order = np.arange(len(self.counts))
        if self.shuffle:
            np.random.default_rng([self.seed, self.epoch, 0x5A4D]).shuffle(order)
        return order

    def slot_positions(self, slot: int) -> np.ndarray:
        """The positions slot ``slot`` reads, in reading order (block-shuffled)."""
        n = self.samples_per_slot
        universe = self.num_samples
        run = (slot * n + np.arange(n)) % universe
        if self.subset is not None:
            run = np.asarray(self.subset, dtype=np.int64)[run]
        if not self.shuffle:
            return run
        shuffled = run.copy()
        for start in range(0, n, self.block_size):
            block = shuffled[start:start + self.block_size]
            np.random.default_rng([self.seed, self.epoch, slot, start, 0xB10C]).shuffle(block)
        return shuffled

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index into ``counts``, sample index inside that shard) for epoch positions."""
        order = self.shard_order()
        ordered_counts = np.asarray(self.counts, dtype=np.int64)[order]
        ends = np.cumsum(ordered_counts)
        which = np.searchsorted(ends, positions, side="right")
        local = positions - (ends[which] - ordered_counts[which])
        return order[which], local


def consumed_positions(plan: EpochPlan, cursors: dict[int, int]) -> set[int]:
    """Positions already read by each slot, given how far (cursor) each slot has got."""
    seen: set[int] = set()
    for slot, cursor in cursors.items():
        positions = plan.slot_positions(slot)
        if cursor >= len(positions):
            seen.update(positions.tolist())
        else:
            seen.update(positions[:cursor].tolist())
    return seen


def remaining_positions(plan: EpochPlan, cursors: dict[int, int]) -> tuple[int, ...]:
    """Positions of the epoch not read by any slot yet, in epoch order."""
    universe = range(plan.total_samples) if plan.subset is None else plan.subset
    seen = consumed_positions(plan, cursors)
    return tuple(p for p in universe if p not in seen)
