"""Gradient accumulation (defect 2 of issue 10), in process on a one-rank group with real engines.

DeepSpeed counts accumulation boundaries per ``engine.step()`` call, so the trainer calls it after
every backward. One trainer step with g = 2 on 2 x B objects must then equal one step with g = 1 on
the same 2B objects (a batch's loss is a mean over equally many rays per object, and DeepSpeed
divides each micro-batch's loss by g). The model runs deterministically here (eval mode: bin-centre
samples, first-order GOEmbed; reconstruction mode so no noise enters; every pixel is a loss ray),
so the only difference is how the same sum is accumulated.

Adam's update m̂/(√v̂ + ε) is about sign(g) where |g| ≫ ε: rounding-level differences in gradient
entries near zero become learning-rate-sized weight differences (measured: a few entries in 10^4
differ by ~1% of the step at ε = 1e-8). With ε = 1 the update is ≈ lr·g, linear in the gradient,
so comparing the weights compares the accumulated gradients at fp32 tolerance.
"""

from __future__ import annotations

import pytest
import torch

from data_pipeline.reader import ReaderConfig, StreamingReader, ViewBatch
from data_pipeline.synthetic import generate_dataset
from tests.test_trainer_collectives import small_settings
from trainer.config import load_config
from trainer.engine import lr_multiplier
from trainer.portable import gather_weights
from trainer.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def one_process_group(monkeypatch):
    """A one-rank group in this process; the variables are undone after the test, so processes
    started by later tests (launchers, Ray workers) do not inherit RANK=0 WORLD_SIZE=1."""
    from trainer.distributed import free_port

    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", str(free_port()))):
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("data"))
    return generate_dataset(out, objects=12, views=4, resolution=16, seed=7, holdout_fraction=0.0,
                            progress=False)["train_pattern"]


def trainer(shards, run_dir, batch_size, accumulation, **extra) -> Trainer:
    values = small_settings(shards, **{
        "run_dir": run_dir, "data.batch_size": batch_size, "data.resolution": 16, "data.context_views_min": 2,
        "data.context_views_max": 2, "model.encode_resolution": 16, "model.rays_per_view": 16 * 16,
        "model.reconstruction_prob": 1.0, "model.context_dropout": 0.0, "optim.grad_clip": 0.0,
        "optim.ema_decay": 0.9, "optim.lr": 1.0, "optim.eps": 1.0, "distributed.zero_stage": 2,
        "distributed.gradient_accumulation_steps": accumulation, "train.max_steps": 10, **extra})
    result = Trainer(load_config(None, [f"{k}={v}" for k, v in values.items()]))
    result.model.eval()  # deterministic forward (see the module docstring)
    return result


def batches(shards, size: int, count: int) -> list[ViewBatch]:
    reader = StreamingReader(ReaderConfig(urls=shards, batch_size=size, context_views_min=2, context_views_max=2,
                                          target_views=1, resolution=16, num_workers=0, seed=0, shuffle=False,
                                          drop_last=True), rank=0, world_size=1)
    return [batch for batch, _ in zip(reader, range(count))]


def halves(batch: ViewBatch) -> list[ViewBatch]:
    def part(sl):
        return ViewBatch(**{name: None if value is None else value[sl] for name, value in batch.__dict__.items()})
    n = batch.num_objects // 2
    return [part(slice(0, n)), part(slice(n, None))]


def test_two_micro_batches_equal_one_batch_of_both(shards, tmp_path):
    whole = batches(shards, 4, 3)
    one = trainer(shards, str(tmp_path / "g1"), 4, 1)
    two = trainer(shards, str(tmp_path / "g2"), 2, 2)
    start_one, _ = gather_weights(one.engine, None, one.env.device)
    start_two, _ = gather_weights(two.engine, None, two.env.device)
    assert all(torch.equal(start_one[k], start_two[k]) for k in start_one)  # same seed, same initial weights
    for step, batch in enumerate(whole, start=1):
        result_one = one.train_step([batch])
        result_two = two.train_step(halves(batch))
        assert result_one.taken and result_two.taken
        torch.testing.assert_close(result_two.metrics["loss"], result_one.metrics["loss"], rtol=1e-5, atol=0)
        after_one, _ = gather_weights(one.engine, None, one.env.device)
        after_two, _ = gather_weights(two.engine, None, two.env.device)
        changed = max(float((after_two[k] - start_two[k]).abs().max()) for k in after_two)
        assert changed > 1e-4, "the weights must change after every trainer step"
        for name in after_one:
            torch.testing.assert_close(after_two[name], after_one[name], rtol=1e-5, atol=1e-6, msg=name)
        # DeepSpeed's optimizer steps, the LR schedule and the EMA advance once per trainer step
        assert one.engine.global_steps == two.engine.global_steps == step
        assert one.ema.updates == two.ema.updates == step
        expected_lr = 1.0 * lr_multiplier(step, 2, 10, 0.1)
        assert one.engine.get_lr()[0] == pytest.approx(expected_lr) and two.engine.get_lr()[0] == pytest.approx(expected_lr)
        start_two = after_two
    two.engine.destroy()
    one.engine.destroy()


def test_train_step_refuses_the_wrong_number_of_micro_batches(shards, tmp_path):
    two = trainer(shards, str(tmp_path / "g2"), 2, 2)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2"):
        two.train_step(batches(shards, 2, 1))
    two.engine.destroy()
