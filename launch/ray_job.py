"""Train on a Ray cluster with Ray Train's TorchTrainer (Train V2): one DeepSpeed rank per Ray worker.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python launch/ray_job.py --num-workers 2 --config run.yaml --storage /shared/ray --name exp1 \\
        --max-failures 2 train.max_steps=1000

Each Ray worker runs ``trainer.trainer.Trainer(config, RayHooks(...)).fit()``: Ray's TorchTrainer sets up the
process group (gloo on CPU, NCCL with ``--use-gpu``) and RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT, which the trainer reads (it skips its own init when Ray already
initialised the group).

Where things go (``--storage`` is a local/NFS path or a URL Ray and fsspec both read, s3://...):

    <storage>/<name>/goembed_checkpoints/   checkpoint.dir: the trainer's own checkpoints + `latest`
    <storage>/<name>/run/                   run_dir (metrics.jsonl, config.yaml) when storage is a path;
                                            with a URL storage run_dir stays the config's (node-local)
    <storage>/<name>/...                    Ray's own run state

Resuming is the trainer's own: it restarts from ``latest`` in checkpoint.dir. So after a worker
failure (``--max-failures K``: Ray restarts all workers) and after re-submitting the same
``--storage`` and ``--name``, the run continues from its last complete checkpoint. After every
checkpoint save every rank also calls ``ray.train.report`` with that checkpoint (the tag
directory holding all ranks' shards), registered in place: nothing is copied a second time.
Ray's checkpoint manager then owns the deletion of old checkpoints (``num_to_keep`` =
``checkpoint.keep_last``), so that its run snapshot never names a deleted directory.
Explicit ``checkpoint.dir=`` / ``run_dir=`` overrides win over these defaults.

``--fail-once-at-step K`` (fault injection for tests): rank 0 raises at step K, once per run
name (a marker file in ``<storage>/<name>/`` remembers that it happened).

The worker runs the Trainer with :class:`RayHooks` (``trainer.trainer.TrainHooks``):
after each checkpoint every rank reports it to Ray Train, and ``--fail-once-at-step`` raises once
on rank 0 for recovery tests. The last line printed is ``run_dir: PATH``.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data_pipeline import storage  # noqa: E402
from launch.paths import describe, load_resolved  # noqa: E402
from trainer.config import RunConfig, config_help, to_dict  # noqa: E402
from trainer.trainer import TrainHooks  # noqa: E402

CHECKPOINT_SUBDIR = "goembed_checkpoints"
RUN_SUBDIR = "run"


class InjectedFailure(RuntimeError):
    """Raised by ``--fail-once-at-step``."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python launch/ray_job.py", description=__doc__, epilog=config_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-workers", type=int, required=True, help="Ray workers = DeepSpeed ranks")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker (default: %(default)s)")
    parser.add_argument("--config", default=None, help="YAML run config (default: built-in defaults)")
    parser.add_argument("--storage", required=True, help="Ray storage_path: shared local path or URL (s3://...)")
    parser.add_argument("--name", required=True, help="run name; re-submitting the same storage + name resumes")
    parser.add_argument("--max-failures", type=int, default=0,
                        help="worker-group restarts allowed, each from the last checkpoint (default: %(default)s; -1: unlimited)")
    parser.add_argument("--fail-once-at-step", type=int, default=None, metavar="K",
                        help="testing: rank 0 raises once at step K (once per run name)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    return parser


def resolve_storage(storage_url: str) -> str:
    if storage.is_local(storage_url):
        return os.path.abspath(storage.local_path(storage_url))
    return storage_url.rstrip("/")


def job_config(args: argparse.Namespace) -> RunConfig:
    """The run config with checkpoint.dir (and run_dir for path storage) placed under the run's storage."""
    base = storage.join(resolve_storage(args.storage), args.name)
    overrides = list(args.overrides)
    if not any(o.startswith("checkpoint.dir=") for o in overrides):
        overrides.append(f"checkpoint.dir={storage.join(base, CHECKPOINT_SUBDIR)}")
    if storage.is_local(base) and not any(o.startswith("run_dir=") for o in overrides):
        overrides.append(f"run_dir={os.path.join(base, RUN_SUBDIR)}")
    # Workers run in Ray's copy of the working directory: relative paths mean the driver's directory.
    return load_resolved(args.config, overrides)[2]


# -- inside each Ray worker ------------------------------------------------------------------------


def _set_dist_env() -> None:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* for trainer.distributed (Ray's TorchTrainer sets them; fill gaps)."""
    import ray.train

    context = ray.train.get_context()
    os.environ.setdefault("RANK", str(context.get_world_rank()))
    os.environ.setdefault("WORLD_SIZE", str(context.get_world_size()))
    os.environ.setdefault("LOCAL_RANK", str(context.get_local_rank()))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # only read if the group is not initialised yet
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = "29500"
    os.environ["GOEMBED_LAUNCHER"] = "ray"


def train_loop_per_worker(loop_config: dict) -> None:
    from trainer.trainer import Trainer

    _set_dist_env()
    config = RunConfig.from_dict(loop_config["config"])
    Trainer(config, RayHooks(loop_config.get("fail_once_at_step"), loop_config.get("fail_marker"))).fit()


class RayHooks(TrainHooks):
    """Reports every checkpoint to Ray Train, and injects one test failure if asked."""

    # Ray's checkpoint manager (CheckpointConfig(num_to_keep=checkpoint.keep_last)) deletes old
    # checkpoints and forgets them at the same time; if the trainer deleted them, Ray's run snapshot
    # would name missing directories and a re-submit of the run would refuse to start.
    manages_checkpoint_retention = True

    def __init__(self, fail_at: int | None, marker: str | None):
        self.fail_at, self.marker = fail_at, marker
        self.last_logged: dict = {}

    def on_step(self, step: int, logged: dict | None) -> None:
        if logged is not None:
            self.last_logged = {k: v for k, v in logged.items() if isinstance(v, (int, float))}
        if self.fail_at is not None and step == self.fail_at and int(os.environ["RANK"]) == 0 \
                and not storage.exists(self.marker):
            with storage.open_url(self.marker, "wb") as f:
                f.write(b"failed once\n")
            raise InjectedFailure(f"--fail-once-at-step: rank 0 fails at step {step} (once; marker {self.marker})")

    def on_checkpoint(self, step: int, tag: str, url: str, local_dir: str) -> None:
        import ray.train
        from ray.train import Checkpoint

        # Every rank reports (report is a barrier) the tag directory that holds all ranks' shards;
        # it is already in storage, so the "upload" only names it.
        ray.train.report({**self.last_logged, "step": step, "checkpoint": url},
                         checkpoint=Checkpoint.from_directory(local_dir),
                         checkpoint_upload_fn=lambda checkpoint, _name: Checkpoint(url),
                         delete_local_checkpoint_after_upload=False)


# -- driver ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = job_config(args)  # validated here, before any worker starts
    base = storage.join(resolve_storage(args.storage), args.name)

    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    loop_config = {"config": to_dict(config, redact_secrets=False),
                   "fail_once_at_step": args.fail_once_at_step,
                   "fail_marker": storage.join(base, f"fail_once_at_step_{args.fail_once_at_step}.done")}
    resources = {"CPU": args.cpus_per_worker}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=config.distributed.backend) if config.distributed.backend else None,
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu, resources_per_worker=resources),
        run_config=RayRunConfig(name=args.name, storage_path=resolve_storage(args.storage),
                                failure_config=FailureConfig(max_failures=args.max_failures),
                                checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoint.keep_last)),
    )
    print(f"ray_job: {args.num_workers} workers\n{describe(config)}", file=sys.stderr, flush=True)
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    print(f"final metrics: {result.metrics}")
    print(f"checkpoint: {result.checkpoint.path if result.checkpoint else None}")
    print(f"run_dir: {config.run_dir if not storage.is_local(config.run_dir) else os.path.abspath(config.run_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
