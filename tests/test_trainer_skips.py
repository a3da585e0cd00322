"""Skipped data is visible in a real training run (2 ranks x 2 loader workers, DeepSpeed on gloo):
a 0-byte shard beside its old index and a shard with a malformed index do not end the run; the
skips are in metrics.jsonl (by reason and by shard), in skipped_data.json and in the summary line."""

from __future__ import annotations

import json
import os

from data_pipeline.synthetic import generate_dataset
from tests.test_trainer import launch, settings


def test_damaged_shards_are_counted_in_metrics_and_summary(tmp_path):
    out = str(tmp_path / "data")
    summary = generate_dataset(out, objects=48, views=8, resolution=32, seed=2, holdout_fraction=0.125, progress=False,
                               objects_per_shard=8, workers=1)
    shards = summary["train_shards"]
    assert len(shards) >= 4
    open(shards[1], "wb").close()  # emptied; its index still lists 8 samples
    with open(shards[2] + ".idx.json", "w") as f:
        f.write("{not json")
    run_dir = str(tmp_path / "run")
    process = launch(settings((summary["train_pattern"], summary["holdout_pattern"]), run_dir,
                              **{"data.num_workers": 2, "train.max_steps": 6, "checkpoint.every_steps": 6}))
    _, err = process.communicate(timeout=400)
    assert process.returncode == 0, err[-4000:]
    assert "data: skipped" in err and shards[1] in err  # the end-of-run summary line
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == list(range(1, 7))
    last = records[-1]
    assert last["damaged_shards"] == 2.0
    assert last["skipped_samples"] > 0 and last["skipped_samples"] == last["skipped/damaged shard"]
    assert last[f"skipped_shard/{shards[1]}"] == last["skipped_samples"]
    with open(os.path.join(run_dir, "skipped_data.json")) as f:
        skipped = json.load(f)
    assert set(skipped["damaged_shards"]) == {shards[1], shards[2]}
    assert "not valid JSON" in skipped["damaged_shards"][shards[2]]
    assert list(skipped["by_shard"]) == [shards[1]]
