"""Turn a training checkpoint into a portable model directory (``python -m model_zoo.export``).

One job a module:

    checkpoints.py   find the checkpoint (run dir, checkpoints dir or tag dir; local or any URL),
                     check it against its manifest, download its portable files
    writer.py        the export: weights checked against their model config, cast, written
                     (or uploaded) with the configs and the model card
    model_card.py    MODEL_CARD.md
    cli.py           the command line and its --help (the format of a checkpoint and an export)

The file names are those of :mod:`model_zoo.checkpoint_layout`. The export reads only the
checkpoint's portable files (trainer/portable.py), so it needs neither DeepSpeed nor ``trainer/``.
"""

from model_zoo.export.checkpoints import ExportError, read_manifest, resolve_checkpoint
from model_zoo.export.cli import build_parser, main
from model_zoo.export.writer import DTYPES, EXPORT_FILES, ExportResult, export

__all__ = ["DTYPES", "EXPORT_FILES", "ExportError", "ExportResult", "build_parser", "export", "main", "read_manifest",
           "resolve_checkpoint"]
