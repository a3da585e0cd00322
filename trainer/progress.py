"""The training progress bar (rank 0): a tqdm bar on stderr over steps."""

from __future__ import annotations

import sys

from tqdm import tqdm


class ProgressBar:
    """A tqdm bar on stderr over training steps: loss, objects/s and tqdm's own ETA."""

    def __init__(self, total_steps: int, initial_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self._bar = None
        if not enabled:
            return
        # Under SLURM or Ray stderr is a log file, where every refresh is a new line: refresh
        # rarely there so the log stays readable; a terminal gets the usual live bar.
        interactive = sys.stderr.isatty()
        # initial=initial_step: a resumed run starts the bar part-way, and tqdm computes the
        # rate (hence the ETA) only from the steps done in this process.
        self._bar = tqdm(total=total_steps, initial=initial_step, file=sys.stderr, unit="step",
                         dynamic_ncols=interactive, mininterval=0.5 if interactive else 30.0,
                         desc="train")

    def update(self, step: int, loss: float, objects_per_s: float) -> None:
        """Move the bar to ``step`` (the number of steps done) and show loss and throughput."""
        if self._bar is None:
            return
        self._bar.set_postfix({"loss": f"{float(loss):.4g}", "obj/s": f"{float(objects_per_s):.1f}"},
                              refresh=False)
        self._bar.update(int(step) - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


__all__ = ["ProgressBar"]
