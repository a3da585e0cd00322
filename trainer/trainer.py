"""The training run as one small object, shared by the CLI (trainer/train.py), the launchers
(launch/local.py through the CLI, launch/slurm.py, launch/ray_job.py), bench/trainer.py and the tests.

    trainer = Trainer(config)          # set-up: process group, engine, EMA, reader, checkpoints
    trainer.restore()                  # from `latest`, if the run has one (rank 0 decides which)
    result = trainer.train_step(trainer.next_micro_batches()[0])   # one optimizer step
    trainer.save()                     # DeepSpeed shards + trainer state + portable weights
    trainer.fit()                      # all of the above, the loop top to bottom

One optimizer step = ``distributed.gradient_accumulation_steps`` micro-batches, each followed by
``engine.backward`` and ``engine.step`` (DeepSpeed counts accumulation boundaries per ``step()``
call and updates the weights, the LR schedule and its own ``global_steps`` at the boundary only).
The trainer's step counter, its EMA and its finiteness check advance once per optimizer step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import sys
import time
from dataclasses import dataclass, replace

import torch
import yaml

from data_pipeline import preflight, storage
from data_pipeline.reader import StreamingReader, ViewBatch, merge_skip_stats, skip_metrics, skip_summary
from model_zoo.checkpoint_layout import METRICS, RUN_CONFIG
from model_zoo.goembedfusion import Views
from trainer.checkpoint import Checkpointer, TrainerState, capture_rng, restore_rng
from trainer.config import RunConfig, check_runnable, save_config, to_dict
from trainer.distributed import DistEnv, all_gather_objects, all_true, init_distributed
from trainer.ema import EMA
from trainer.engine import build_engine
from trainer.loss_plot import plot_loss_curves
from trainer.metrics_logger import MetricsLogger
from trainer.progress import ProgressBar
from trainer.previews import save_preview_grid, save_turntable_gif, turntable_cameras
from trainer.run_lock import RunLock, RunLockedError

log = logging.getLogger("trainer")

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteError(RuntimeError):
    pass


class TrainHooks:
    """What a launcher may add to the loop without the trainer knowing which launcher it is.

    The default does nothing. ``launch/ray_job.py`` reports checkpoints to Ray Train and injects
    test failures through it.
    """

    # True when the launcher deletes old checkpoints itself (Ray's checkpoint manager does): the
    # trainer then removes only incomplete saves, never complete ones.
    manages_checkpoint_retention = False

    def on_step(self, step: int, logged: dict | None) -> None:
        """After every step, on every rank; ``logged`` is what was written to metrics.jsonl, if anything."""

    def on_checkpoint(self, step: int, tag: str, url: str, local_dir: str) -> None:
        """After a checkpoint is complete and ``latest`` points at it, on every rank."""


@dataclass
class StepResult:
    """What one optimizer step did (metrics are detached tensors, averaged over the micro-batches)."""

    taken: bool  # False: non-finite loss or gradients somewhere, the step was skipped on every rank
    metrics: dict[str, torch.Tensor]
    objects: int  # over all ranks
    rays: int  # over all ranks
    seconds: float = 0.0
    data_seconds: float = 0.0


def check_before_start(config: RunConfig) -> None:
    """Refuse missing data, buckets, credentials and too few views before anything expensive starts."""
    storage.set_retry_seconds(config.data.storage_retry_seconds)  # inherited by loader workers
    preflight.check_run(config)


def lock_run_dir(run_dir: str, env: DistEnv) -> RunLock | None:
    """Rank 0 takes the run directory's lock; every rank stops if it could not."""
    lock, refused = None, None
    if env.is_main and storage.is_local(run_dir):
        try:
            lock = RunLock(storage.local_path(run_dir)).acquire()
        except RunLockedError as error:
            refused = error
    if not all_true(refused is None, env.device):
        raise refused or RunLockedError(f"run directory {run_dir} is in use by another run (see rank 0's message)")
    return lock


@dataclass
class _Window:
    """Sums over the steps since the last logged one."""

    seconds: float = 0.0
    data_seconds: float = 0.0
    objects: int = 0
    rays: int = 0
    steps: int = 0

    def add(self, result: StepResult) -> None:
        self.seconds += result.seconds
        self.data_seconds += result.data_seconds
        self.objects += result.objects
        self.rays += result.rays
        self.steps += 1


class Trainer:
    def __init__(self, config: RunConfig, hooks: TrainHooks | None = None):
        check_runnable(config)  # train.device=cuda without CUDA, fp16 on CPU: refused before any group exists
        check_before_start(config)  # missing data, buckets, credentials, too few views: before anything exists
        self.config, self.hooks = config, hooks or TrainHooks()
        self.env: DistEnv = init_distributed(config.train.device, config.distributed.backend)
        self.run_dir = config.run_dir
        self.run_lock = lock_run_dir(self.run_dir, self.env)  # one run per run directory; held until fit() ends
        os.makedirs(self.run_dir, exist_ok=True)
        if self.env.is_main:
            save_config(config, os.path.join(self.run_dir, RUN_CONFIG))

        torch.manual_seed(config.train.seed + self.env.rank)
        self.engine, self.model = build_engine(config, self.env.device)
        self.ema = EMA(self.model, config.optim.ema_decay) if config.optim.ema_decay > 0 else None
        self.reader = StreamingReader(replace(config.data.reader_config(config.train.seed), box_half_size=config.model.box_half_size),
                                      self.env.rank, self.env.world_size)
        self.generator = torch.Generator(device=self.env.device).manual_seed(config.train.seed * 1000 + self.env.rank)
        self.checkpoints = Checkpointer(
            config.checkpoint.dir or os.path.join(self.run_dir, "checkpoints"), self.env,
            0 if self.hooks.manages_checkpoint_retention else config.checkpoint.keep_last,
            config.data.storage_options or None, staging_root=os.path.join(self.run_dir, ".staging"))
        self.config_yaml = yaml.safe_dump(to_dict(config), sort_keys=False)
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self._data = None

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self) -> str:
        """Restore, then train to ``train.max_steps``: read, step, log, preview, checkpoint."""
        config = self.config
        if config.checkpoint.resume:
            self.restore()
        metrics_log = MetricsLogger(self.run_dir, enabled=self.env.is_main, tensorboard=config.log.tensorboard)
        metrics_log.truncate_after(self.step + 1)  # keep what was logged up to the checkpoint, drop the rest
        bar = ProgressBar(config.train.max_steps, self.step, enabled=self.env.is_main)
        holdout = self.holdout_batch() if config.log.preview_every_steps and config.data.holdout_urls else None
        window = _Window()
        while self.step < config.train.max_steps:
            started = time.perf_counter()
            micro_batches, data_seconds = self.next_micro_batches()
            result = self.train_step(micro_batches)
            result.seconds, result.data_seconds = time.perf_counter() - started, data_seconds
            window.add(result)
            bar.update(self.step, float(result.metrics.get("loss", float("nan"))), result.objects / result.seconds)
            record = None
            if self._due(config.log.every_steps):
                record = self.log_record(result, window)
                metrics_log.log(self.step, record)
                window = _Window()
            self.hooks.on_step(self.step, record)
            if self.nonfinite_in_a_row >= config.train.max_nonfinite_steps:  # after logging: the count is in metrics.jsonl
                raise NonFiniteError(f"{self.nonfinite_in_a_row} non-finite steps in a row (train.max_nonfinite_steps="
                                     f"{config.train.max_nonfinite_steps}); last metrics: "
                                     f"{ {name: float(value) for name, value in result.metrics.items()} }")
            if holdout is not None and self._due(config.log.preview_every_steps):
                self.previews(holdout)
            if self._due(config.checkpoint.every_steps):
                self.save()
        bar.close()
        metrics_log.close()
        skips = self.skip_stats()  # the end-of-run summary of skipped data
        if self.env.is_main:
            with open(os.path.join(self.run_dir, "skipped_data.json"), "w") as f:
                json.dump(skips, f, indent=1)
            print(skip_summary(skips), file=sys.stderr)
            plot_loss_curves(os.path.join(self.run_dir, METRICS), os.path.join(self.run_dir, "loss.png"))
        if self.run_lock is not None:
            self.run_lock.release()
        return self.run_dir

    def _due(self, every: int) -> bool:
        return self.step % every == 0 or self.step == self.config.train.max_steps

    # -- one optimizer step --------------------------------------------------------------------------
    def next_micro_batches(self) -> tuple[list[ViewBatch], float]:
        """The next optimizer step's micro-batches (across epoch boundaries) and the seconds spent waiting."""
        if self._data is None:
            self._data = _endless(self.reader)
        started = time.perf_counter()
        batches = [next(self._data) for _ in range(self.config.distributed.gradient_accumulation_steps)]
        return batches, time.perf_counter() - started

    def precision(self):
        """Autocast for bf16/fp16: DeepSpeed keeps the weights in that dtype, the batch stays fp32,
        matmuls and convolutions run in the low precision, everything else (the renderer's
        compositing, GOEmbed's normalisation, the losses) in the dtype of its fp32 inputs."""
        dtype = AUTOCAST_DTYPES.get(self.config.distributed.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.env.device.type, dtype=dtype)

    def train_step(self, micro_batches: list[ViewBatch]) -> StepResult:
        """Forward, backward and ``engine.step()`` for each micro-batch; the weights change once.

        Non-finite losses or gradients skip the optimizer step on every rank: under ZeRO 1-3
        DeepSpeed detects them itself (its overflow check is global), under stage 0 the trainer
        checks once, at the boundary: one host sync and one all-reduce per optimizer step.
        """
        engine, device = self.engine, self.env.device
        if len(micro_batches) != self.config.distributed.gradient_accumulation_steps:
            raise ValueError(f"train_step needs distributed.gradient_accumulation_steps="
                             f"{self.config.distributed.gradient_accumulation_steps} micro-batches, got {len(micro_batches)}")
        finite = torch.ones((), dtype=torch.bool, device=device)
        sums: dict[str, torch.Tensor] = {}
        objects = rays = 0
        taken = True
        for index, batch in enumerate(micro_batches):
            batch = batch.to(device)
            with self.precision():
                loss, metrics = engine(batch, generator=self.generator)
            finite &= torch.isfinite(loss.detach()).all()  # stays on the device: no sync per micro-batch
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0) + value.detach().float()
            objects += batch.num_objects * self.env.world_size
            rays += rays_of(batch, self.model) * self.env.world_size
            engine.backward(loss)
            if index == len(micro_batches) - 1:
                taken = self._boundary_step(finite)
            else:
                engine.step()  # not a boundary: DeepSpeed only counts the micro-step
        self.step += 1
        if taken:
            self.nonfinite_in_a_row = 0
            if self.ema is not None:
                self.ema.update()
        else:
            self.nonfinite_total += 1
            self.nonfinite_in_a_row += 1
            if self.env.is_main:
                log.warning("step %d: non-finite loss or gradients; the step was skipped (%d in a row, %d in all)",
                            self.step, self.nonfinite_in_a_row, self.nonfinite_total)
        metrics = {name: value / len(micro_batches) for name, value in sums.items()}
        return StepResult(taken, metrics, objects, rays)

    def _boundary_step(self, losses_finite: torch.Tensor) -> bool:
        """``engine.step()`` at the accumulation boundary; whether the weights were updated."""
        engine = self.engine
        if self.config.distributed.zero_stage == 0:
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            local = losses_finite & torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else losses_finite
            if not all_true(local, self.env.device):
                # torch optimizers skip parameters without gradients: the step (and the boundary
                # count) happens, the weights stay as they are.
                engine.optimizer.zero_grad(set_to_none=True)
                engine.step()
                return False
        skipped_before = engine.skipped_steps
        engine.step()
        return engine.skipped_steps == skipped_before

    def log_record(self, result: StepResult, window: _Window) -> dict:
        record = {name: float(value) for name, value in result.metrics.items()}
        record.update(
            lr=self.engine.get_lr()[0], grad_norm=grad_norm(self.engine), nonfinite_steps=self.nonfinite_total,
            objects_per_s=window.objects / window.seconds, rays_per_s=window.rays / window.seconds,
            data_wait_fraction=window.data_seconds / window.seconds, step_seconds=window.seconds / window.steps,
            epoch=self.reader.epoch, optimizer_steps=int(self.engine.global_steps),
        )
        for rank, megabytes in enumerate(all_gather_objects(peak_memory_mb(self.env))):
            record[f"peak_memory_mb_rank{rank}"] = megabytes
        # skipped data (by reason, by shard), summed over ranks and loader workers
        record.update(skip_metrics(self.skip_stats()))
        return record

    def skip_stats(self) -> dict:
        """The reader's skip counts summed over every rank (a collective: every rank calls it)."""
        return merge_skip_stats(all_gather_objects(self.reader.skip_stats()))

    # -- checkpoints -------------------------------------------------------------------------------
    def save(self) -> str:
        """A complete checkpoint of this step (every rank calls it); returns its tag."""
        state = TrainerState(self.step, self.reader.state_dict(), capture_rng(self.generator),
                             self.ema.state_dict() if self.ema else None, self.nonfinite_total)
        tag = self.checkpoints.save(self.engine, state, self.config_yaml, self.model, self.ema)
        self.hooks.on_checkpoint(self.step, tag, storage.join(self.checkpoints.url, tag), self.checkpoints.local_dir(tag))
        return tag

    def restore(self, tag: str | None = None) -> bool:
        """Continue from ``tag`` (default: ``latest``, as rank 0 reads it); False if there is none.

        A checkpoint written by a different number of ranks is loaded through DeepSpeed's
        universal checkpoint (trainer/elastic.py) and the reader resumes from every saved rank's
        state, so the rest of the epoch is read exactly once.
        """
        tag = tag or self.checkpoints.latest_tag()
        if tag is None:
            return False
        states, tag = self.checkpoints.load(self.engine, tag)
        same_world = len(states) == self.env.world_size
        own = states[self.env.rank] if same_world else states[0]
        # Same ranks: each continues its own stream exactly. Other ranks: the rest of the epoch
        # (what no saved rank has read yet) is split afresh over the new ranks.
        self.reader.load_state_dict([state.reader for state in states])
        if same_world:
            restore_rng(own.rng, self.generator)  # otherwise each new rank keeps its seeded generator
        if self.ema is not None and own.ema is not None:
            if same_world:
                self.ema.load_state_dict(own.ema)
            else:  # the EMA partitions belong to the old layout: cut the whole EMA anew
                self.ema.load_full_state_dict(self.checkpoints.portable_ema(tag))
        self.step, self.nonfinite_total = own.step, own.nonfinite_steps
        if self.env.is_main:
            print(f"resumed from {self.checkpoints.url}/{tag} at step {self.step}"
                  + (f" ({len(states)} ranks -> {self.env.world_size})" if len(states) != self.env.world_size else ""),
                  file=sys.stderr)
        return True

    # -- previews ------------------------------------------------------------------------------------
    def holdout_batch(self) -> ViewBatch:
        config = self.config
        reader_config = replace(config.data.reader_config(config.train.seed, holdout=True), num_workers=0,
                                context_views_min=min(3, config.data.context_views_max),
                                context_views_max=min(3, config.data.context_views_max))
        return next(iter(StreamingReader(reader_config, rank=0, world_size=1)))

    @torch.no_grad()
    def previews(self, batch: ViewBatch) -> None:
        """A PNG grid (context | target | reconstruction) and a turntable GIF of a conditional sample.

        Every rank runs the model (under ZeRO-3 its forward gathers parameters collectively);
        rank 0 writes the files.
        """
        model, env, step = self.model, self.env, self.step
        directory, frames = os.path.join(self.run_dir, "previews"), self.config.log.turntable_frames
        was_training = model.training
        model.eval()
        batch = batch.to(env.device)
        with self.precision():
            context = Views.from_batch(batch, "context")
            state = model.reconstruct(context, batch.background)
            height, width = batch.target_images.shape[-2:]
            prediction = model.render(state, batch.target_K[:, :1], batch.target_c2w[:, :1], height, width,
                                      batch.background, context)[:, 0]
            resolution = model.config.encode_resolution
            scale = torch.tensor([resolution / width, resolution / width, 1.0], device=env.device).view(3, 1)
            generator = torch.Generator(device=env.device).manual_seed(step)
            first = Views(context.images[:1], context.K[:1], context.c2w[:1])
            sample, sources = model.sample(batch.target_K[:1, 0] * scale, batch.target_c2w[:1, 0], batch.background[:1],
                                           context=first, steps=10, generator=generator, return_sources=True)
            radius = float(batch.target_c2w[0, 0, :3, 3].norm())
            K, c2w = turntable_cameras(frames, radius, 20.0, 50.0, resolution)
            turntable = model.render(sample, K.to(env.device)[None], c2w.to(env.device)[None], resolution, resolution,
                                     batch.background[:1], sources=sources)[0]
        if env.is_main:
            os.makedirs(directory, exist_ok=True)
            save_preview_grid(os.path.join(directory, f"grid_{step:08d}.png"), batch.context_images.cpu(),
                              batch.target_images[:, 0].cpu(), prediction.float().cpu())
            save_turntable_gif(os.path.join(directory, f"turntable_{step:08d}.gif"), turntable.float().cpu())
        model.train(was_training)


def _endless(reader: StreamingReader):
    """Batches across epoch boundaries; the reader's state always matches what was consumed."""
    while True:
        yield from reader


def grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    if norm is None:  # stage 0 does not record it; the gradients are gone after step, so report nan
        return float("nan")
    return float(norm)


def rays_of(batch, model) -> int:
    """Rays rendered for one micro-batch: every encoded pixel plus the loss's rays."""
    objects, context = batch.num_objects, batch.num_context_views
    encode = objects * (context + 1) * model.config.encode_resolution ** 2
    loss = objects * (context + batch.target_images.shape[1]) * model.rays_per_view
    return encode + loss


def peak_memory_mb(env: DistEnv) -> float:
    if env.device.type == "cuda":
        return torch.cuda.max_memory_allocated(env.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


__all__ = ["NonFiniteError", "StepResult", "TrainHooks", "Trainer", "grad_norm", "peak_memory_mb", "rays_of"]
