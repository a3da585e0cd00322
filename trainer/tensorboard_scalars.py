"""TensorBoard scalars of a run: a view of the numbers in ``metrics.jsonl``."""

from __future__ import annotations

import itertools
import os

TENSORBOARD_DIR = "tensorboard"
_writer_count = itertools.count()  # numbers this process's TensorBoard event files


class TensorBoardScalars:
    """Scalars into ``logdir``; the event writer opens on the first :meth:`add`, so a resume can
    hand it the step to purge from (:meth:`purge_from`)."""

    def __init__(self, logdir: str | os.PathLike, flush_secs: int = 30):
        self.logdir = str(logdir)
        self._flush_secs = flush_secs
        self._writer = None
        self._purge_step: int | None = None

    def add(self, step: int, values: dict[str, float]) -> None:
        writer = self._summary_writer()
        for name, value in values.items():
            writer.add_scalar(name, value, global_step=step)

    def purge_from(self, step: int) -> None:
        """Hide events at >= ``step`` from earlier event files (a resumed run logs those steps again)."""
        self._purge_step = int(step)
        self.close()  # reopened with the purge step on the next add()

    def _summary_writer(self):
        if self._writer is None:
            from tensorboardX import SummaryWriter  # imported late: disabled ranks never need it

            # purge_step tells TensorBoard to hide events at >= that step from earlier event
            # files: the TensorBoard counterpart of MetricsFile.truncate_after(). The writer's own
            # thread flushes every flush_secs, so scalars show up while the run goes on.
            # Event files are named by the second and host they were opened on, and opened with
            # "wb": a writer reopened within the same second would overwrite the earlier file.
            # The pid and a per-process count make every name unique.
            self._writer = SummaryWriter(logdir=self.logdir, purge_step=self._purge_step, flush_secs=self._flush_secs,
                                         filename_suffix=f".{os.getpid()}.{next(_writer_count)}")
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


__all__ = ["TENSORBOARD_DIR", "TensorBoardScalars"]
