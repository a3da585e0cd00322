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

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from trainer.previews import save_image_atomic

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
# Drawn with Pillow (already a dependency) rather than matplotlib: one fewer heavy package on
# every training node, and no backend or font-cache set-up on headless machines.

_PLOT_SIZE = (1000, 620)
_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 100, 45, 56, 70
_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable font: Pillow >= 10.1 with FreeType
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, target: int = 6, min_step: float = 0.0) -> list[float]:
    """Round-numbered ticks (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    raw = max((hi - lo) / target, min_step, 1e-300)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values for a log axis spanning 10**lo .. 10**hi."""
    decades = range(math.floor(lo), math.ceil(hi) + 1)
    for multipliers in ((1,), (1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [m * 10.0 ** d for d in decades for m in multipliers if lo - 1e-9 <= math.log10(m) + d <= hi + 1e-9]
        if len(ticks) >= 3:
            return ticks
    return _nice_ticks(10.0 ** lo, 10.0 ** hi)  # less than a factor of ~3 in view: plain ticks


def _curve_names(records: list[dict]) -> list[str]:
    """``loss`` first, then the other loss-like metrics (``*loss``, ``*mse``) in name order."""
    names = {name for record in records for name in record if name != "step"}
    others = sorted(n for n in names if n != "loss" and (n.endswith("loss") or n.endswith("mse")))
    return (["loss"] if "loss" in names else []) + others


def plot_loss_curves(metrics_jsonl_path: str | os.PathLike, out_png: str | os.PathLike,
                     title: str | None = None) -> None:
    """Plot ``loss`` and the other loss-like metrics (e.g. ``target_mse``, ``context_mse``) over steps.

    The y axis is logarithmic when every value is positive, linear otherwise. Non-finite values
    (a diverged step) are left out of the curves. Raises ValueError if there is nothing to plot.
    """
    path = Path(metrics_jsonl_path)
    records = read_metrics(path)
    series: dict[str, list[tuple[float, float]]] = {}
    for name in _curve_names(records):
        points = [(float(r["step"]), float(r[name])) for r in records if name in r and math.isfinite(r[name])]
        if points:
            series[name] = points
    if not series:
        raise ValueError(f"{path}: no finite loss values to plot")

    all_steps = [s for pts in series.values() for s, _ in pts]
    all_values = [v for pts in series.values() for _, v in pts]
    log_y = min(all_values) > 0
    to_y = math.log10 if log_y else float  # the axis works in these units
    x_lo, x_hi = min(all_steps), max(all_steps)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    y_lo, y_hi = to_y(min(all_values)), to_y(max(all_values))
    pad = 0.05 * (y_hi - y_lo) or (0.5 if log_y else max(abs(y_lo) * 0.1, 1.0))
    y_lo, y_hi = y_lo - pad, y_hi + pad

    width, height = _PLOT_SIZE
    left, right, top, bottom = _MARGIN_LEFT, width - _MARGIN_RIGHT, _MARGIN_TOP, height - _MARGIN_BOTTOM

    def x_px(step: float) -> float:
        return left + (step - x_lo) / (x_hi - x_lo) * (right - left)

    def y_px(value: float) -> float:
        return bottom - (to_y(value) - y_lo) / (y_hi - y_lo) * (bottom - top)

    image = Image.new("RGB", _PLOT_SIZE, "white")
    draw = ImageDraw.Draw(image)
    font, title_font = _font(14), _font(18)
    grid, axis, text = (225, 225, 225), (60, 60, 60), (20, 20, 20)

    # grid lines and tick labels
    for step in _nice_ticks(x_lo, x_hi, min_step=1.0):
        x = x_px(step)
        draw.line([(x, top), (x, bottom)], fill=grid)
        draw.text((x, bottom + 6), f"{int(round(step)):,}", fill=text, font=font, anchor="mt")
    y_ticks = _log_ticks(y_lo, y_hi) if log_y else _nice_ticks(y_lo, y_hi)
    for value in y_ticks:
        y = y_px(value)
        draw.line([(left, y), (right, y)], fill=grid)
        draw.text((left - 6, y), f"{value:.3g}", fill=text, font=font, anchor="rm")
    draw.rectangle([left, top, right, bottom], outline=axis)

    # curves: the plot range covers every point, so nothing needs clipping
    colours = dict(zip(series, itertools.cycle(_COLOURS)))
    for name, points in series.items():
        xy = [(x_px(s), y_px(v)) for s, v in points]
        if len(xy) == 1:
            x, y = xy[0]
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colours[name])
        else:
            draw.line(xy, fill=colours[name], width=2, joint="curve")

    # legend, top right inside the plot, with each curve's last value
    entries = [(colours[name], f"{name}  (last {points[-1][1]:.4g})") for name, points in series.items()]
    line_h = 20
    legend_w = max(draw.textlength(label, font=font) for _, label in entries) + 46
    x0, y0 = right - legend_w - 10, top + 10
    draw.rectangle([x0, y0, right - 10, y0 + line_h * len(entries) + 8], fill="white", outline=(170, 170, 170))
    for i, (colour, label) in enumerate(entries):
        y = y0 + 4 + line_h * i + line_h / 2
        draw.line([(x0 + 8, y), (x0 + 32, y)], fill=colour, width=3)
        draw.text((x0 + 38, y), label, fill=text, font=font, anchor="lm")

    # title and axis labels; the y label is drawn horizontally and rotated into place
    title = title or f"Training losses: {path.parent.name or path.name}"
    draw.text(((left + right) / 2, top / 2), title, fill=text, font=title_font, anchor="mm")
    draw.text(((left + right) / 2, height - 22), "step", fill=text, font=font, anchor="mm")
    y_label = "loss (log scale)" if log_y else "loss"
    label_w = int(draw.textlength(y_label, font=font)) + 4
    label = Image.new("RGB", (label_w, 20), "white")
    ImageDraw.Draw(label).text((label_w / 2, 10), y_label, fill=text, font=font, anchor="mm")
    label = label.rotate(90, expand=True)
    image.paste(label, (14, int((top + bottom) / 2 - label.height / 2)))

    save_image_atomic(image, out_png)
