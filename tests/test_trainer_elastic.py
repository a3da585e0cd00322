"""Elastic resume (issue 10, item 7): a checkpoint written by N ranks resumes on M ranks.

Real runs through tests/dist_scenarios.py ("elastic"): 2 -> 1 and 1 -> 2 ranks, ZeRO-2 and ZeRO-3
(one process per rank runs both stages, one after the other). DeepSpeed's universal checkpoint
re-partitions the optimizer state; the reader's elastic resume splits what is left of the epoch
over the new ranks. 20 objects, 2 per micro-batch: the epoch divides evenly for 1 and 2 ranks, so
"the rest of the epoch" has no remainder that drop_last would legitimately drop.
"""

from __future__ import annotations

import pytest

from data_pipeline.synthetic import generate_dataset
from tests.dist_scenarios import run_ranks
from tests.test_trainer_collectives import small_settings

OBJECTS, SAVED_AT, RESUME_TO = 20, 2, 8
STAGES = [2, 3]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("data"))
    return generate_dataset(out, objects=OBJECTS, views=4, resolution=16, seed=11, holdout_fraction=0.0,
                            progress=False)["train_pattern"]


def epoch_reads(reports: list[dict], stage: int, epoch: int) -> list[str]:
    return [i for report in reports for record in report[f"zero{stage}"]["read"] if record["epoch"] == epoch
            for i in record["ids"]]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_a_different_number_of_ranks(shards, tmp_path, before, after):
    settings = small_settings(shards, **{"data.resolution": 16, "model.encode_resolution": 16,
                                         "model.rays_per_view": 32, "checkpoint.every_steps": SAVED_AT})
    runs = str(tmp_path / "runs")
    first = run_ranks(before, "elastic", {"out": str(tmp_path / "first"), "runs": runs, "stages": STAGES,
                                          "max_steps": SAVED_AT, "settings": settings})
    second = run_ranks(after, "elastic", {"out": str(tmp_path / "second"), "runs": runs, "stages": STAGES,
                                          "max_steps": RESUME_TO, "settings": settings})
    for stage in STAGES:
        for report in second:
            run = report[f"zero{stage}"]
            assert run["resumed"] and run["start_step"] == SAVED_AT and run["end_step"] == RESUME_TO
            assert run["optimizer_steps"] == RESUME_TO  # DeepSpeed's step count continues too
            # the engine holds exactly the checkpoint's weights (fp32 master copy, re-partitioned)
            assert run["weights_max_abs_error_after_restore"] == 0.0, run["weights_max_abs_error_after_restore"]
        read_before, read_after = epoch_reads(first, stage, 0), epoch_reads(second, stage, 0)
        assert len(read_before) == SAVED_AT * before * 2
        every = read_before + read_after
        assert len(every) == len(set(every)) == OBJECTS, (stage, sorted(read_before), sorted(read_after))
