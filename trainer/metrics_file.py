"""A run's ``metrics.jsonl``: the source of truth for its metrics (one ``{"step": ..., name:
value, ...}`` object a line, readable without TensorBoard), appended as the run goes and cut
back on resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

from data_pipeline.atomic_files import atomic_write
from model_zoo.checkpoint_layout import METRICS

METRICS_FILE = METRICS


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


class MetricsFile:
    """Appends one JSON line a step to ``path`` (a resumed run keeps the lines of the run it continues)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, step: int, values: dict[str, float]) -> None:
        if self._file is None:
            raise RuntimeError("MetricsLogger.log() after close()")
        # NaN/inf are written as JSON's NaN/Infinity extensions: Python reads them back, and a
        # diverging loss is exactly what one wants to see in this file.
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        # Flushing hands the line to the OS, which keeps it if the process is SIGKILLed; only a
        # machine crash could lose it, and fsync on every step would cost more than it saves.
        self._file.flush()

    def truncate_after(self, step: int) -> int:
        """Drop the lines with step >= ``step``; returns how many were dropped."""
        if self._file is None:
            raise RuntimeError("MetricsLogger.truncate_after() after close()")
        self._file.close()
        lines = _parse_metrics_lines(self.path)
        kept = [line for line, record in lines if record["step"] < step]
        # Written aside and renamed: a kill during the rewrite leaves the old file whole.
        with atomic_write(self.path, fsync=True) as f:
            f.writelines(line + "\n" for line in kept)
        self._file = open(self.path, "a", encoding="utf-8")
        return len(lines) - len(kept)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


__all__ = ["METRICS_FILE", "MetricsFile", "read_metrics"]
