"""Rank-0 logging of a training run: a JSON-lines metrics file, TensorBoard scalars, a progress
bar and a loss plot.

Every rank builds the same objects with ``enabled=(rank == 0)``; on the other ranks every method
is a no-op, so the training loop needs no ``if rank == 0`` around its logging calls.

``metrics.jsonl`` is the source of truth (one ``{"step": ..., name: value, ...}`` object a line,
readable without TensorBoard); the TensorBoard events are a view of the same numbers.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from model_zoo.image_files import save_image_atomic

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_writer_count = itertools.count()  # numbers this process's TensorBoard event files


def _parse_metrics_lines(path: Path) -> list[tuple[str, dict]]:
    """(raw line, record) pairs of a metrics file.

    A run killed in the middle of a write can leave a partial last line: that one is dropped.
    A bad line anywhere else means the file is corrupt, and that is an error.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not an object with a step")
        except ValueError as exc:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: bad metrics line ({exc}): {line[:200]!r}") from None
        out.append((line, record))
    return out


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl`` file, in file order."""
    return [record for _, record in _parse_metrics_lines(Path(path))]


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
        self._tensorboard = tensorboard
        self._flush_secs = tensorboard_flush_secs
        self._writer = None  # created on the first log(), so a resume can pass purge_step to it
        self._purge_step: int | None = None
        self._file = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # Append: a resumed run keeps the lines of the run it continues.
            self._file = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one line ``{"step": step, **metrics}`` (values as floats) and the same scalars to TensorBoard."""
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError("MetricsLogger.log() after close()")
        if "step" in metrics:
            raise ValueError("'step' is reserved for the step number; rename that metric")
        step = int(step)
        values = {name: float(value) for name, value in metrics.items()}  # also unwraps 0-d tensors
        # NaN/inf are written as JSON's NaN/Infinity extensions: Python reads them back, and a
        # diverging loss is exactly what one wants to see in this file.
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        # Flushing hands the line to the OS, which keeps it if the process is SIGKILLed; only a
        # machine crash could lose it, and fsync on every step would cost more than it saves.
        self._file.flush()
        if self._tensorboard:
            writer = self._summary_writer()
            for name, value in values.items():
                writer.add_scalar(name, value, global_step=step)

    def _summary_writer(self):
        if self._writer is None:
            from tensorboardX import SummaryWriter  # imported late: disabled ranks never need it

            # purge_step tells TensorBoard to hide events at >= that step from earlier event
            # files: the TensorBoard counterpart of truncate_after(). The writer's own thread
            # flushes every flush_secs, so scalars show up while the run goes on.
            # Event files are named by the second and host they were opened on, and opened with
            # "wb": a writer reopened within the same second would overwrite the earlier file.
            # The pid and a per-process count make every name unique.
            self._writer = SummaryWriter(logdir=str(self.run_dir / TENSORBOARD_DIR),
                                         purge_step=self._purge_step, flush_secs=self._flush_secs,
                                         filename_suffix=f".{os.getpid()}.{next(_writer_count)}")
        return self._writer

    def truncate_after(self, step: int) -> int:
        """Drop the lines with step >= ``step``; returns how many were dropped."""
        if not self.enabled:
            return 0
        if self._file is None:
            raise RuntimeError("MetricsLogger.truncate_after() after close()")
        self._file.close()
        lines = _parse_metrics_lines(self.path)
        kept = [line for line, record in lines if record["step"] < step]
        # Write the kept lines aside and rename: a kill during the rewrite leaves the old file whole.
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        self._purge_step = int(step)
        if self._writer is not None:  # reopen TensorBoard with the purge step on the next log()
            self._writer.close()
            self._writer = None
        return len(lines) - len(kept)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


# ----------------------------------------------------------------------------------- loss plot
_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]  # loss blue, then red, green, ...


def _curve_names(records: list[dict]) -> list[str]:
    """``loss`` first, then the other loss-like metrics (``*loss``, ``*mse``) in name order."""
    names = {name for record in records for name in record if name != "step"}
    others = sorted(n for n in names if n != "loss" and (n.endswith("loss") or n.endswith("mse")))
    return (["loss"] if "loss" in names else []) + others


def plot_loss_curves(metrics_jsonl_path: str | os.PathLike, out_png: str | os.PathLike,
                     title: str | None = None) -> None:
    """Plot ``loss`` and the other loss-like metrics (e.g. ``target_mse``, ``context_mse``) over steps
    with matplotlib (a 1000 x 620 px PNG, written atomically).

    The y axis is logarithmic when every value is positive, linear otherwise. Non-finite values
    (a diverged step) are left out of the curves. Raises ValueError if there is nothing to plot.
    """
    # Imported here: matplotlib takes a second to import and only the end of a run draws a plot.
    # Figure + the Agg canvas, not pyplot: no global figure state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(metrics_jsonl_path)
    records = read_metrics(path)
    series: dict[str, list[tuple[float, float]]] = {}
    for name in _curve_names(records):
        points = [(float(r["step"]), float(r[name])) for r in records if name in r and math.isfinite(r[name])]
        if points:
            series[name] = points
    if not series:
        raise ValueError(f"{path}: no finite loss values to plot")
    log_y = min(v for points in series.values() for _, v in points) > 0

    figure = Figure(figsize=(10, 6.2), dpi=100)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for (name, points), colour in zip(series.items(), itertools.cycle(_COLOURS)):
        steps, values = zip(*points)
        axes.plot(steps, values, color=colour, linewidth=2, marker="o" if len(points) == 1 else None,
                  label=f"{name}  (last {values[-1]:.4g})")
    if log_y:
        axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (log scale)" if log_y else "loss")
    axes.set_title(title or f"Training losses: {path.parent.name or path.name}")
    axes.grid(True, which="major", color="#e1e1e1")
    axes.legend(loc="upper right")
    figure.tight_layout()
    canvas.draw()
    save_image_atomic(Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB"), out_png)
