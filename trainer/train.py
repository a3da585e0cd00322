"""Train GOEmbedFusion with DeepSpeed: ``python -m trainer.train [--config FILE] [key=value ...]``.

Run it through a launcher (``python launch/local.py --nproc 2 ...``, SLURM, Ray) or alone for a
single process. The distributed set-up comes only from RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT. The loop, top to bottom: restore from ``latest`` if the run has
one; then for each step read a batch, forward, skip the step everywhere if the loss is not
finite, backward, step, EMA, log, preview, checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time
from dataclasses import replace

import torch
import yaml

from data_pipeline import storage
from data_pipeline.reader import StreamingReader, merge_skip_stats, skip_metrics, skip_summary  # issue 13.3
from model_zoo.goembedfusion import Views
from trainer.checkpoint import Checkpointer, TrainerState, capture_rng, restore_rng
from trainer.config import RunConfig, load_config, save_config, to_dict
from trainer.distributed import DistEnv, all_gather_objects, all_true, init_distributed
from trainer.ema import EMA
from trainer.engine import build_engine
from trainer.logging_utils import MetricsLogger, ProgressBar, plot_loss_curves
from trainer.previews import save_preview_grid, save_turntable_gif, turntable_cameras

log = logging.getLogger("trainer")


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


def endless(reader: StreamingReader):
    """Batches across epoch boundaries; the reader's state always matches what was consumed."""
    while True:
        yield from reader


def train(config: RunConfig, hooks: TrainHooks | None = None) -> str:
    hooks = hooks or TrainHooks()
    env = init_distributed(config.train.device, config.distributed.backend)
    torch.manual_seed(config.train.seed + env.rank)
    run_dir = config.run_dir
    os.makedirs(run_dir, exist_ok=True)
    if env.is_main:
        save_config(config, os.path.join(run_dir, "config.yaml"))

    engine, model = build_engine(config, env.device)
    ema = EMA(model, config.optim.ema_decay) if config.optim.ema_decay > 0 else None
    reader = StreamingReader(config.data.reader_config(config.train.seed), env.rank, env.world_size)
    generator = torch.Generator(device=env.device).manual_seed(config.train.seed * 1000 + env.rank)
    checkpoints = Checkpointer(config.checkpoint.dir or os.path.join(run_dir, "checkpoints"), env,
                               0 if hooks.manages_checkpoint_retention else config.checkpoint.keep_last,
                               config.data.storage_options or None,
                               staging_root=os.path.join(run_dir, ".staging"))

    step, nonfinite_total = 0, 0
    if config.checkpoint.resume and checkpoints.latest_tag() is not None:
        step, nonfinite_total = restore(checkpoints, engine, ema, reader, generator, env)
        if env.is_main:
            print(f"resumed from {checkpoints.url}/{checkpoints.latest_tag()} at step {step}", file=sys.stderr)

    metrics_log = MetricsLogger(run_dir, enabled=env.is_main, tensorboard=config.log.tensorboard)
    metrics_log.truncate_after(step + 1)  # keep what was logged up to the checkpoint, drop the rest
    bar = ProgressBar(config.train.max_steps, step, enabled=env.is_main)
    config_yaml = yaml.safe_dump(to_dict(config), sort_keys=False)
    data = endless(reader)
    holdout = first_holdout_batch(config) if config.log.preview_every_steps and config.data.holdout_urls else None

    nonfinite_in_a_row = 0
    window = {"seconds": 0.0, "data_seconds": 0.0, "objects": 0, "rays": 0, "steps": 0}
    while step < config.train.max_steps:
        step_start = time.perf_counter()
        finite, metrics, data_seconds, objects, rays = True, {}, 0.0, 0, 0
        for _ in range(config.distributed.gradient_accumulation_steps):
            fetch_start = time.perf_counter()
            batch = next(data).to(env.device)
            data_seconds += time.perf_counter() - fetch_start
            loss, metrics = engine(batch, generator=generator)
            objects += batch.num_objects * env.world_size
            rays += rays_of(batch, model) * env.world_size
            if not all_true(bool(torch.isfinite(loss))):  # every rank must take the same branch
                finite = False
                continue
            engine.backward(loss)
        finite = finite and step_gradients(engine, config.distributed.zero_stage)
        step += 1
        if ema is not None and finite:
            ema.update()
        if finite:
            nonfinite_in_a_row = 0
        else:
            nonfinite_total += 1
            nonfinite_in_a_row += 1
            if env.is_main:
                log.warning("step %d: non-finite loss or gradients; the step was skipped (%d in a row, %d in all)",
                            step, nonfinite_in_a_row, nonfinite_total)

        seconds = time.perf_counter() - step_start
        for key, value in (("seconds", seconds), ("data_seconds", data_seconds), ("objects", objects), ("rays", rays), ("steps", 1)):
            window[key] += value
        bar.update(step, float(metrics.get("loss", float("nan"))), objects / seconds)
        record = None
        if step % config.log.every_steps == 0 or step == config.train.max_steps:
            record = {name: float(value) for name, value in metrics.items()}
            record.update(
                lr=engine.get_lr()[0], grad_norm=grad_norm(engine), nonfinite_steps=nonfinite_total,
                objects_per_s=window["objects"] / window["seconds"], rays_per_s=window["rays"] / window["seconds"],
                data_wait_fraction=window["data_seconds"] / window["seconds"], step_seconds=window["seconds"] / window["steps"],
                epoch=reader.epoch,
            )
            for rank, megabytes in enumerate(all_gather_objects(peak_memory_mb(env))):
                record[f"peak_memory_mb_rank{rank}"] = megabytes
            # >>> issue 13.3: skipped data (by reason, by shard), summed over ranks and loader workers
            record.update(skip_metrics(merge_skip_stats(all_gather_objects(reader.skip_stats()))))
            # <<< issue 13.3
            metrics_log.log(step, record)
            window = dict.fromkeys(window, 0.0)
        hooks.on_step(step, record)
        if nonfinite_in_a_row >= config.train.max_nonfinite_steps:  # after logging: the count is in metrics.jsonl
            raise NonFiniteError(f"{nonfinite_in_a_row} non-finite steps in a row (train.max_nonfinite_steps="
                                 f"{config.train.max_nonfinite_steps}); last metrics: "
                                 f"{ {name: float(value) for name, value in metrics.items()} }")
        if holdout is not None and (step % config.log.preview_every_steps == 0 or step == config.train.max_steps):
            write_previews(model, holdout, env, os.path.join(run_dir, "previews"), step, config.log.turntable_frames)
        if step % config.checkpoint.every_steps == 0 or step == config.train.max_steps:
            state = TrainerState(step, reader.state_dict(), capture_rng(generator), ema.state_dict() if ema else None,
                                 nonfinite_total)
            tag = checkpoints.save(engine, state, config_yaml)
            hooks.on_checkpoint(step, tag, storage.join(checkpoints.url, tag), checkpoints.local_dir(tag))

    bar.close()
    metrics_log.close()
    # >>> issue 13.3: end-of-run summary of skipped data (a collective: every rank calls it)
    skips = merge_skip_stats(all_gather_objects(reader.skip_stats()))
    if env.is_main:
        with open(os.path.join(run_dir, "skipped_data.json"), "w") as f:
            json.dump(skips, f, indent=1)
        print(skip_summary(skips), file=sys.stderr)
    # <<< issue 13.3
    if env.is_main:
        plot_loss_curves(os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "loss.png"))
    return run_dir


def step_gradients(engine, zero_stage: int) -> bool:
    """Take the optimizer step unless the gradients are non-finite; whether it was taken.

    ZeRO 1-3 check for overflow themselves and skip the step (counted in ``skipped_steps``);
    stage 0 does not, so its gradients are checked here, the same way on every rank.
    """
    if zero_stage == 0:
        local = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in engine.module.parameters())
        if not all_true(local):
            engine.optimizer.zero_grad(set_to_none=True)
            return False
    skipped_before = engine.skipped_steps
    engine.step()
    return engine.skipped_steps == skipped_before


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


def restore(checkpoints: Checkpointer, engine, ema, reader, generator, env: DistEnv) -> tuple[int, int]:
    states, tag = checkpoints.load(engine)
    if len(states) != env.world_size:
        raise RuntimeError(f"checkpoint {tag} was written by {len(states)} ranks, this run has {env.world_size}: "
                           f"DeepSpeed's optimizer shards need the same data-parallel size")
    own = states[env.rank]
    reader.load_state_dict(own.reader)
    restore_rng(own.rng, generator)
    if ema is not None and own.ema is not None:
        ema.load_state_dict(own.ema)
    return own.step, own.nonfinite_steps


def first_holdout_batch(config: RunConfig):
    reader_config = replace(config.data.reader_config(config.train.seed, holdout=True), num_workers=0,
                            context_views_min=min(3, config.data.context_views_max),
                            context_views_max=min(3, config.data.context_views_max))
    return next(iter(StreamingReader(reader_config, rank=0, world_size=1)))


@torch.no_grad()
def write_previews(model, batch, env: DistEnv, directory: str, step: int, frames: int) -> None:
    """A PNG grid (context | target | reconstruction) and a turntable GIF of a conditional sample.

    Every rank runs the model (under ZeRO-3 its forward gathers parameters collectively);
    rank 0 writes the files.
    """
    was_training = model.training
    model.eval()
    batch = batch.to(env.device)
    context = Views(batch.context_images, batch.context_K, batch.context_c2w)
    state = model.reconstruct(context, batch.background)
    height, width = batch.target_images.shape[-2:]
    prediction = model.render(state, batch.target_K[:, :1], batch.target_c2w[:, :1], height, width, batch.background)[:, 0]
    resolution = model.config.encode_resolution
    scale = torch.tensor([resolution / width, resolution / width, 1.0], device=env.device).view(3, 1)
    generator = torch.Generator(device=env.device).manual_seed(step)
    sample = model.sample(batch.target_K[:1, 0] * scale, batch.target_c2w[:1, 0], batch.background[:1],
                          context=Views(context.images[:1], context.K[:1], context.c2w[:1]), steps=10, generator=generator)
    radius = float(batch.target_c2w[0, 0, :3, 3].norm())
    K, c2w = turntable_cameras(frames, radius, 20.0, 50.0, resolution)
    turntable = model.render(sample, K.to(env.device)[None], c2w.to(env.device)[None], resolution, resolution,
                             batch.background[:1])[0]
    if env.is_main:
        os.makedirs(directory, exist_ok=True)
        save_preview_grid(os.path.join(directory, f"grid_{step:08d}.png"), batch.context_images.cpu(),
                          batch.target_images[:, 0].cpu(), prediction.float().cpu())
        save_turntable_gif(os.path.join(directory, f"turntable_{step:08d}.gif"), turntable.float().cpu())
    model.train(was_training)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML run config (default: the built-in defaults, see configs/tiny_cpu.yaml)")
    parser.add_argument("--run-dir", default=None, help="shorthand for run_dir=DIR")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100 distributed.zero_stage=3")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    config = load_config(args.config, overrides)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_dir = train(config)
    if int(os.environ.get("RANK", "0")) == 0 and not os.environ.get("GOEMBED_LAUNCHER"):  # the launcher prints it last
        print(f"run_dir: {os.path.abspath(run_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

