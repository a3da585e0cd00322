"""Rank-0 metrics of a training run: each logged step goes to ``metrics.jsonl``
(:mod:`trainer.metrics_file`, the source of truth) and to TensorBoard
(:mod:`trainer.tensorboard_scalars`, a view of the same numbers).

Every rank builds the same logger with ``enabled=(rank == 0)``; on the other ranks every method
is a no-op, so the training loop needs no ``if rank == 0`` around its logging calls.
"""

from __future__ import annotations

import os
from pathlib import Path

from trainer.metrics_file import METRICS_FILE, MetricsFile
from trainer.tensorboard_scalars import TENSORBOARD_DIR, TensorBoardScalars


class MetricsLogger:
    """Appends metrics to ``run_dir/metrics.jsonl`` and, optionally, ``run_dir/tensorboard``.

    On resume, call :meth:`truncate_after` with the step the run restarts from: lines logged at
    or after it by the interrupted run are dropped, so the restarted run does not log them twice.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool, tensorboard: bool = True,
                 tensorboard_flush_secs: int = 30):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self._file = MetricsFile(self.path) if enabled else None
        self._tensorboard = (TensorBoardScalars(self.run_dir / TENSORBOARD_DIR, tensorboard_flush_secs)
                             if enabled and tensorboard else None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one line ``{"step": step, **metrics}`` (values as floats) and the same scalars to TensorBoard."""
        if not self.enabled:
            return
        if "step" in metrics:
            raise ValueError("'step' is reserved for the step number; rename that metric")
        step = int(step)
        values = {name: float(value) for name, value in metrics.items()}  # also unwraps 0-d tensors
        self._file.write(step, values)
        if self._tensorboard is not None:
            self._tensorboard.add(step, values)

    def truncate_after(self, step: int) -> int:
        """Drop the lines with step >= ``step``; returns how many were dropped."""
        if not self.enabled:
            return 0
        dropped = self._file.truncate_after(step)
        if self._tensorboard is not None:
            self._tensorboard.purge_from(step)
        return dropped

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["MetricsLogger"]
