"""Which sample each (rank, loader worker) reads, in which order, in one epoch — pure arithmetic.

Vocabulary:

* **piece**: up to ``piece_size`` consecutive samples of one shard, fetched with one (ranged)
  read. Every shard is cut into pieces.
* **position**: the place of a sample in the epoch's *sequence*: the pieces in a seeded
  permutation (seed, epoch), each piece's samples in file order. Without shuffling the sequence
  is the shards in list order, each in file order.
* **slot**: one (rank, worker) pair; ``slot = rank * workers_per_rank + worker``. Each slot owns
  a contiguous run of the sequence. Because the sequence is a permutation of small pieces, a
  run holds pieces of many shards, so every slot sees the whole dataset's variety.
* **block**: ``block_size`` consecutive positions of a slot's run, read together. A block is
  emitted *interleaved*: its pieces in a seeded random order, one sample of each piece in turn
  (each piece's samples shuffled too). Consecutive samples, hence the objects of one batch, come
  from different pieces, i.e. (mostly) different shards — as well mixed as a uniform shuffle of
  the epoch when a block holds at least a batch's worth of pieces — while memory stays one block
  of samples per worker and reads stay one ranged read per piece.
* **quota**: samples each slot emits per epoch. Every slot has the same quota, so every rank
  yields the same number of batches, whatever the shard sizes.

Splitting (``S`` samples, ``N`` slots, batch size ``B``):

* ``drop_last=True`` (training default): every slot gets ``S // N`` distinct positions and emits
  ``(S // N) // B`` full batches. At most ``S mod N + N * (B - 1)`` samples are left out of an
  epoch; because the order is reshuffled every epoch, different samples are left out each time.
* ``drop_last=False`` (evaluation): every slot gets ``ceil(S / N)`` positions; the last
  ``ceil(S / N) * N - S`` of them wrap round to the start of the epoch order (documented padding,
  fewer than N duplicates), and the last batch of every slot may be short.

**Unreadable samples take their quota from elsewhere.** A slot reads along its *extended run*:
its own run, then the rest of the epoch's sequence from where its run ends, wrapping round (and
round again if need be). When a sample is unreadable the slot skips it and simply reads on, so it
still emits its quota: first from its own leftover positions, then from other slots' runs
(repeats of samples that belong to the rest of the epoch). This depends only on (plan, slot,
cursor) — no communication — so every rank emits the same number of batches and a resume is
exact. Only when no sample of the whole epoch is readable does the reader give up.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

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
    piece_size: int = 8
    # Restricts the epoch to these positions (after an elastic resume): None means all of them.
    subset: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.batch_size < 1 or self.num_slots < 1 or self.block_size < 1 or self.piece_size < 1:
            raise ValueError("batch_size, num_slots, block_size and piece_size must be >= 1")
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

    # -- the sequence: pieces in a seeded order ----------------------------------------------
    @cached_property
    def _pieces(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard, first sample, end position in the sequence) of every piece, in sequence order."""
        counts = np.asarray(self.counts, dtype=np.int64)
        per_shard = -(-counts // self.piece_size)
        shard = np.repeat(np.arange(len(counts)), per_shard)
        first_piece = np.cumsum(per_shard) - per_shard
        first = (np.arange(len(shard)) - first_piece[shard]) * self.piece_size
        length = np.minimum(self.piece_size, counts[shard] - first)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch, 0x5A4D]).permutation(len(shard))
            shard, first, length = shard[order], first[order], length[order]
        return shard, first, np.cumsum(length)

    def piece_of(self, positions: np.ndarray) -> np.ndarray:
        """Index (in sequence order) of the piece each position falls in."""
        return np.searchsorted(self._pieces[2], positions, side="right")

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index into ``counts``, sample index inside that shard) for epoch positions."""
        shard, first, ends = self._pieces
        piece = self.piece_of(positions)
        lengths = np.diff(ends, prepend=0)
        return shard[piece], first[piece] + positions - (ends[piece] - lengths[piece])

    # -- one slot's reading order --------------------------------------------------------------
    def _extended(self, slot: int, start: int, stop: int) -> np.ndarray:
        """Positions ``start..stop-1`` of the slot's extended run (its run, then the rest of the epoch)."""
        universe = self.num_samples
        run = (slot * self.samples_per_slot + np.arange(start, stop)) % universe
        return run if self.subset is None else np.asarray(self.subset, dtype=np.int64)[run]

    def block_bounds(self, cursor: int) -> tuple[int, int]:
        """[start, stop) of the block holding a slot's ``cursor``-th read (cursor counts across wraps).

        The slot's own run is cut into blocks first; the rest of the epoch after it, separately,
        so that the first pass covers exactly the slot's own positions.
        """
        universe, own = self.num_samples, self.samples_per_slot
        lap, within = divmod(cursor, universe)
        if within < own:
            start, end = within // self.block_size * self.block_size, own
        else:
            start, end = own + (within - own) // self.block_size * self.block_size, universe
        return lap * universe + start, lap * universe + min(start + self.block_size, end)

    def block(self, slot: int, cursor: int) -> tuple[int, np.ndarray]:
        """(first cursor of the block holding ``cursor``, the block's positions in reading order)."""
        start, stop = self.block_bounds(cursor)
        lap = start // self.num_samples * self.num_samples
        positions = self._extended(slot, start - lap, stop - lap)
        if not self.shuffle:
            return start, positions
        rng = np.random.default_rng([self.seed, self.epoch, slot, start, 0xB10C])
        pieces = self.piece_of(positions)
        # Round-robin over the block's pieces in a random order, each piece's samples shuffled:
        # sort by (turn, piece rank), where turn = the sample's rank inside its own piece.
        within = rng.random(len(positions))
        by_piece = np.lexsort((within, pieces))
        turn = np.empty(len(positions), dtype=np.int64)
        piece_sorted = pieces[by_piece]
        group_start = np.r_[0, np.flatnonzero(np.diff(piece_sorted)) + 1]
        sizes = np.diff(np.r_[group_start, len(positions)])
        turn[by_piece] = np.arange(len(positions)) - np.repeat(group_start, sizes)
        _, piece_ids = np.unique(pieces, return_inverse=True)
        piece_rank = rng.permutation(len(group_start))[piece_ids]
        return start, positions[np.lexsort((piece_rank, turn))]

    def read_order(self, slot: int, stop: int) -> np.ndarray:
        """The first ``stop`` positions the slot reads (its own run first, then the rest of the epoch)."""
        out, cursor = [], 0
        while cursor < stop:
            start, positions = self.block(slot, cursor)
            out.append(positions[cursor - start:stop - start])
            cursor = start + len(positions)
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def slot_positions(self, slot: int) -> np.ndarray:
        """The positions slot ``slot`` owns, in reading order (block-interleaved)."""
        return self.read_order(slot, self.samples_per_slot)


def consumed_positions(plan: EpochPlan, cursors: dict[int, int]) -> set[int]:
    """Positions already read by each slot, given how far (cursor) each slot has got."""
    seen: set[int] = set()
    for slot, cursor in cursors.items():
        seen.update(plan.read_order(slot, min(cursor, plan.num_samples)).tolist())
    return seen


def remaining_positions(plan: EpochPlan, cursors: dict[int, int]) -> tuple[int, ...]:
    """Positions of the epoch not read by any slot yet, in epoch order."""
    universe = range(plan.total_samples) if plan.subset is None else plan.subset
    seen = consumed_positions(plan, cursors)
    return tuple(p for p in universe if p not in seen)
