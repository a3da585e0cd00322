"""The file names of a run directory, its checkpoints and a model export, declared once.

The trainer writes them (trainer/checkpoint.py, trainer/portable.py, the metrics file) and the
library reads them (model_zoo.loading, model_zoo.export); this module lives in the library so
that both sides can import it without the library importing the trainer.

    RUN_DIR/config.yaml, metrics.jsonl, checkpoints/latest, checkpoints/step_00000300/...
    step_00000300/MANIFEST.json, config.yaml, model.safetensors, model_trained.safetensors,
                  model_config.json, trainer_rank00000.pt ..., DeepSpeed's files
    EXPORT_DIR/model.safetensors, model_config.json, config.yaml, MODEL_CARD.md
"""

from __future__ import annotations

# -- a run directory
RUN_CONFIG = "config.yaml"  # the run's config, credentials removed (also in every checkpoint and export)
METRICS = "metrics.jsonl"  # one JSON object a logged step
CHECKPOINTS = "checkpoints"  # the default checkpoint.dir inside a run directory

# -- a checkpoints directory
LATEST = "latest"  # names the newest complete checkpoint's tag; written last
TAG_PREFIX = "step_"

# -- one checkpoint (a tag directory)
MANIFEST = "MANIFEST.json"  # every file and its size; written after every rank finished
WEIGHTS = "model.safetensors"  # the EMA weights when the run kept an EMA, else the trained ones
TRAINED_WEIGHTS = "model_trained.safetensors"  # checkpoints only: the trained weights beside their EMA
MODEL_CONFIG = "model_config.json"  # the ModelConfig the weights load into
DEEPSPEED_MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's module weights (ZeRO 0-2)

# -- an export
MODEL_CARD = "MODEL_CARD.md"


def tag_for(step: int) -> str:
    """The tag (directory name) of the checkpoint saved after ``step`` steps."""
    return f"{TAG_PREFIX}{step:08d}"


def rank_file(rank: int) -> str:
    """The trainer state one rank saves into every checkpoint (step, reader, RNG, EMA)."""
    return f"trainer_rank{rank:05d}.pt"


# Files that only a checkpoint directory has (what tells a step directory from anything else).
CHECKPOINT_MARKERS = (rank_file(0), DEEPSPEED_MODEL_STATES, TRAINED_WEIGHTS)

__all__ = ["CHECKPOINTS", "CHECKPOINT_MARKERS", "DEEPSPEED_MODEL_STATES", "LATEST", "MANIFEST", "METRICS",
           "MODEL_CARD", "MODEL_CONFIG", "RUN_CONFIG", "TAG_PREFIX", "TRAINED_WEIGHTS", "WEIGHTS", "rank_file",
           "tag_for"]
