"""The loss-curve PNG drawn at the end of a run from its ``metrics.jsonl`` (matplotlib, Agg)."""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from model_zoo.image_files import save_image_atomic
from trainer.metrics_file import read_metrics

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


__all__ = ["plot_loss_curves"]
