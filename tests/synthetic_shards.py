"""The small synthetic datasets the trainer and launcher tests train on, made the same way everywhere."""

from __future__ import annotations

from data_pipeline.synthetic import generate_dataset


def synthetic_shards(tmp_path_factory, objects: int, views: int = 8, resolution: int = 32, seed: int = 2,
                     holdout_fraction: float = 0.125) -> tuple[str, str]:
    """(train pattern, held-out pattern) of a fresh synthetic dataset in a new temporary directory."""
    out = str(tmp_path_factory.mktemp("data"))
    summary = generate_dataset(out, objects=objects, views=views, resolution=resolution, seed=seed,
                               holdout_fraction=holdout_fraction, progress=False)
    return summary["train_pattern"], summary["holdout_pattern"]
