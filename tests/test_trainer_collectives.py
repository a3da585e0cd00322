"""Every collective the trainer issues is one NCCL would accept (defect 1 of issue 10).

NCCL refuses CPU tensors, and one lent GPU cannot run two NCCL ranks, so the rule is checked on
CPU: a real 2-rank gloo run with torch.distributed's collectives wrapped (tests/dist_scenarios.py,
scenario "guard"). A tensor collective must get tensors on the device the test forces (the
trainer's own device, here "cpu", while torch's default device is made "meta" around the helpers
so that a tensor built without naming its device shows up on the wrong device, as a CPU tensor
does on a GPU rank); the trainer's object collectives and barriers must use its gloo object group.
The same run checks that ``latest`` is what rank 0 reads (defect 4), whatever another rank reads.
"""

from __future__ import annotations

import pytest

from tests.dist_scenarios import run_ranks
from tests.synthetic_shards import synthetic_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synthetic_shards(tmp_path_factory, objects=16, views=6, seed=5, holdout_fraction=0.0)[0]


def small_settings(train_urls: str, **extra) -> dict:
    values = {"data.train_urls": train_urls, "data.holdout_urls": "null", "data.batch_size": 2, "data.resolution": 32,
              "data.num_workers": 0, "data.context_views_max": 2, "model.encode_resolution": 16,
              "model.rays_per_view": 64, "optim.lr": 3e-3, "optim.lr_warmup_steps": 2, "log.every_steps": 1,
              "log.preview_every_steps": 0, "log.tensorboard": "false", "checkpoint.every_steps": 100,
              "train.max_steps": 100, "train.device": "cpu"}
    values.update(extra)
    return values


@pytest.mark.parametrize("stage", [0, 3])
def test_every_collective_is_on_the_device_or_the_gloo_object_group(shards, tmp_path, stage):
    steps = 2
    settings = small_settings(shards, **{"distributed.zero_stage": stage, "distributed.gradient_accumulation_steps": 2})
    reports = run_ranks(2, "guard", {"out": str(tmp_path), "device": "cpu", "steps": steps, "settings": settings})
    for rank, report in enumerate(reports):
        assert report["guard_refuses_wrong_device"], "the guard must be able to fail"
        assert report["violations"] == [], report["violations"]
        assert report["latest_seen"] is None, "rank 0 found no checkpoint; rank 1's own reading must not count"
        assert report["helpers"] == {"flags": [True, False, True], "gathered": [0, 1], "broadcast": "from 0"}
        # the trainer's own collectives were seen (restore broadcasts `latest`, the log gathers memory, save barriers)
        assert report["trainer_calls"].get("broadcast_object_list", 0) >= 1
        assert report["trainer_calls"].get("all_gather_object", 0) >= 1 and report["trainer_calls"].get("barrier", 0) >= 1
        # the finiteness check: one all-reduce per optimizer step under stage 0 (not one per micro-batch),
        # none under ZeRO 1-3 (DeepSpeed's own overflow check is global)
        assert [step.get("all_reduce", 0) for step in report["per_step"]] == [1 if stage == 0 else 0] * steps
        assert report["optimizer_steps"] == steps + 1
        if stage == 3:  # DeepSpeed's own collectives went through the guard too
            assert report["calls"].get("all_gather_into_tensor", 0) + report["calls"].get("all_gather", 0) > 0
