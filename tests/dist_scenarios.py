"""Multi-rank scenarios for the trainer tests: one process per rank, a real gloo group.

    python -m tests.dist_scenarios SCENARIO JSON_ARGS      (RANK, WORLD_SIZE, ... set by run_ranks)

Each scenario runs the real :class:`trainer.trainer.Trainer` (real DeepSpeed engines) and writes
``rank{r}.json`` into ``args["out"]`` for the test to check. :func:`run_ranks` starts the ranks.
Several scenarios build several Trainers in one process (one per ZeRO stage) to save the
process and group start-up, which is most of a tiny run's time on 2 shared cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_ranks(nproc: int, scenario: str, args: dict, timeout: float = 400) -> list[dict]:
    """Run ``scenario`` on ``nproc`` ranks; every rank's JSON result, in rank order."""
    from trainer.distributed import free_port

    os.makedirs(args["out"], exist_ok=True)
    port = free_port()
    processes = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "GOEMBED_LAUNCHER": "tests"}
        env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.expanduser("~"), ".cache", "goembed_torch_extensions"))
        processes.append(subprocess.Popen([sys.executable, "-m", "tests.dist_scenarios", scenario, json.dumps(args)],
                                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errors = []
    for rank, process in enumerate(processes):
        try:
            _, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise
        if process.returncode != 0:
            errors.append(f"rank {rank} exited with {process.returncode}:\n{err[-4000:]}")
    assert not errors, "\n".join(errors)
    results = []
    for rank in range(nproc):
        with open(os.path.join(args["out"], f"rank{rank}.json")) as f:
            results.append(json.load(f))
    return results


def _config(args: dict, run_dir: str, **extra):
    from trainer.config import load_config

    values = dict(args["settings"])
    values.update(run_dir=run_dir, **extra)
    return load_config(None, [f"{key}={value}" for key, value in values.items()])


# -- scenarios --------------------------------------------------------------------------------------


def guard(args: dict) -> dict:
    """Every collective checked against the rules the trainer promises (see tests/test_trainer_collectives.py)."""
    import torch
    import torch.distributed as dist

    from trainer import distributed as td
    from trainer.trainer import Trainer, _Window

    forced = torch.device(args["device"])
    report = {"violations": [], "calls": {}, "trainer_calls": {}, "per_step": []}
    tensor_ops = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                  "reduce_scatter_tensor", "reduce", "all_to_all_single", "gather", "scatter")
    object_ops = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list", "barrier")

    def tensors_in(values):
        for value in values:
            if isinstance(value, torch.Tensor):
                yield value
            elif isinstance(value, (list, tuple)):
                yield from tensors_in(value)

    def wrap(name, original):
        def guarded(*a, **kw):
            caller = sys._getframe(1).f_globals.get("__name__", "?")
            report["calls"][name] = report["calls"].get(name, 0) + 1
            if caller.startswith("trainer."):
                report["trainer_calls"][name] = report["trainer_calls"].get(name, 0) + 1
            if name in tensor_ops:
                for tensor in tensors_in(list(a) + list(kw.values())):
                    if tensor.device != forced:
                        report["violations"].append(f"{name} from {caller}: a tensor on {tensor.device}, not {forced}")
                        raise RuntimeError(report["violations"][-1])
            elif caller.startswith("trainer.") and kw.get("group") is not td.object_group():
                report["violations"].append(f"{name} from {caller}: not on the trainer's gloo object group")
                raise RuntimeError(report["violations"][-1])
            return original(*a, **kw)
        return guarded

    for name in tensor_ops + object_ops:
        if hasattr(dist, name):
            setattr(dist, name, wrap(name, getattr(dist, name)))

    trainer = Trainer(_config(args, os.path.join(args["out"], "run")))
    env = trainer.env
    assert td.object_group() is not None, "a multi-rank run must have the gloo object group"
    # On a GPU rank torch's default device is the CPU while the rank's device is cuda:N. Here the
    # rank's device is the CPU, so make the default device something else (meta): a helper that
    # builds its tensor without naming the device then puts it on the wrong device, visibly.
    with torch.device("meta"):
        flags = [td.all_true(True, env.device), td.all_true(env.rank == 0, env.device),
                 td.all_true(torch.tensor(True, device=env.device), env.device)]
        gathered = td.all_gather_objects(env.rank)
        broadcast = td.broadcast_object(f"from {env.rank}")
        td.barrier()
    report["helpers"] = {"flags": flags, "gathered": gathered, "broadcast": broadcast}
    # A control: the guard must refuse a tensor on another device (what NCCL would refuse).
    try:
        dist.all_reduce(torch.zeros(1, device="meta"))
        report["guard_refuses_wrong_device"] = False
    except RuntimeError:
        report["guard_refuses_wrong_device"] = True
        report["violations"].pop()
    # Who decides what `latest` is: rank 0 reads it, every rank gets its answer (here rank 1's own
    # reading is made to disagree, as it can on a shared filesystem with caching).
    if env.rank == 1:
        trainer.checkpoints.read_latest = lambda: "step_99999999"
    report["latest_seen"] = trainer.checkpoints.latest_tag()
    # The real loop: restore (rank 0 reads `latest`), steps, a log record, a checkpoint.
    trainer.restore()
    for _ in range(args["steps"]):
        before = dict(report["trainer_calls"])
        batches, _ = trainer.next_micro_batches()
        trainer.train_step(batches)
        report["per_step"].append({k: report["trainer_calls"].get(k, 0) - before.get(k, 0) for k in report["trainer_calls"]})
    trainer.log_record(trainer.train_step(trainer.next_micro_batches()[0]), _Window(seconds=1.0, steps=1))
    trainer.save()
    report["optimizer_steps"] = int(trainer.engine.global_steps)
    return report


def precision(args: dict) -> dict:
    """A few bf16 steps at each ZeRO stage: the losses, and which dtypes the parts ran in."""
    import torch

    from trainer.trainer import Trainer

    out = {}
    for stage in args["stages"]:
        trainer = Trainer(_config(args, os.path.join(args["out"], f"zero{stage}"), **{
            "distributed.zero_stage": stage, "distributed.precision": "bf16"}))
        losses = []
        for _ in range(args["steps"]):
            result = trainer.train_step(trainer.next_micro_batches()[0])
            losses.append(float(result.metrics["loss"]))
        out[f"zero{stage}"] = {"losses": losses, "param_dtype": str(next(trainer.engine.module.parameters()).dtype),
                               "optimizer_steps": int(trainer.engine.global_steps), "skipped": int(trainer.engine.skipped_steps)}
        trainer.engine.destroy()
        del trainer
        torch.manual_seed(0)
    return out


def elastic(args: dict) -> dict:
    """Train (or resume) one run per ZeRO stage, recording which objects each step read."""
    from model_zoo.loading import TRAINED_WEIGHTS
    from trainer.checkpoint import tag_for
    from trainer.portable import gather_weights, read_weights
    from trainer.trainer import Trainer

    class Recording(Trainer):
        def next_micro_batches(self):
            batches, seconds = super().next_micro_batches()
            self.read.append({"step": self.step + 1, "epoch": self.reader.epoch,
                              "ids": [i for b in batches for i in b.object_ids]})
            return batches, seconds

    out = {}
    for stage in args["stages"]:
        run_dir = os.path.join(args["runs"], f"zero{stage}")
        trainer = Recording(_config(args, run_dir, **{"distributed.zero_stage": stage,
                                                       "train.max_steps": args["max_steps"]}))
        trainer.read = []
        resumed = trainer.restore()
        start, weights_error = trainer.step, None
        if resumed:  # the engine's fp32 weights are the checkpoint's (its portable copy says what they were)
            trained, _ = gather_weights(trainer.engine, None, trainer.env.device)
            saved = read_weights(trainer.checkpoints.local_dir(tag_for(start)), TRAINED_WEIGHTS)
            weights_error = max(float((trained[k] - saved[k]).abs().max()) for k in saved)
        config = trainer.config
        while trainer.step < config.train.max_steps:  # fit()'s loop, without its logging
            trainer.train_step(trainer.next_micro_batches()[0])
            if trainer.step % config.checkpoint.every_steps == 0 or trainer.step == config.train.max_steps:
                trainer.save()
        out[f"zero{stage}"] = {"resumed": resumed, "start_step": start, "end_step": trainer.step,
                               "optimizer_steps": int(trainer.engine.global_steps), "read": trainer.read,
                               "weights_max_abs_error_after_restore": weights_error}
        trainer.engine.destroy()
    return out


SCENARIOS = {"guard": guard, "precision": precision, "elastic": elastic}


def main() -> int:
    warnings.simplefilter("ignore", FutureWarning)
    scenario, raw = sys.argv[1], json.loads(sys.argv[2])
    import torch

    torch.set_num_threads(1)
    result = SCENARIOS[scenario](raw)
    with open(os.path.join(raw["out"], f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
