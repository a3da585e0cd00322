"""Benchmark of real training under DeepSpeed ZeRO 0-3 on CPU: step time, objects/s, data wait,
and per-rank bytes of parameters + gradients + optimizer state beside the ZeRO paper's arithmetic.

    python bench/trainer.py [--presets tiny,small] [--stages 0,1,2,3] [--nprocs 1,2]
                            [--small-stages 2,3] [--small-nprocs 2] [--steps tiny=8,small=4]
                            [--warmup tiny=2,small=1] [--context-views K] [--omp-threads 1]
                            [--skip-memory] [--skip-checkpoint] [--keep DIR]

Prints one JSON line (progress to stderr). By default: tiny at every stage x {1, 2} processes,
and small (~13.2M parameters with the triplane) at stages 2 and 3 x 2 processes, since a small
step takes seconds to tens of seconds on 2 CPU cores (``--small-stages 0,1,2,3 --small-nprocs 1,2``
for all of them). Each rank gets one OpenMP thread (``--omp-threads``; see its help for why).
Three measurements, all of the real code:

* **timing**: the real trainer through the real launcher, ``python launch/local.py --nproc N
  run_dir=... distributed.zero_stage=S model.preset=P ...`` on a synthetic dataset generated once
  into a temporary directory; ``metrics.jsonl`` is logged every step and the first steps
  (warm-up: process start, loader workers, lazy allocations) are left out. ``step_seconds`` is the
  median of the remaining steps; objects/s = objects per step (batch x N) / that median. The data
  wait fraction is rank 0's time in ``next(batch)`` over its step time, for the same steps.
  Every stage runs with ``model.train_decoder_through_encoder=false``, so all stages train the
  same computation and compare with the earlier table (ZeRO-3 could not keep it on before
  GOEmbed's closed form); the ``zero3_joint`` variant measures ZeRO-3 with it on.
  With the same seed every stage draws the same context-view counts, timesteps and batches, so
  per-step times compare across stages step by step (``step_seconds_per_step``).
* **memory (in process)**: per (preset, N) the benchmark starts N processes of itself in a real
  gloo group (the launcher's variables); for each stage each rank builds the trainer's own
  ``trainer.trainer.Trainer`` (engine, EMA, reader), takes one real optimizer step
  (``Trainer.train_step``, hooked at the accumulation boundary), and sums the bytes it holds, by
  category, every storage counted once (views into a flat buffer count that buffer once):
  - ``params``: the module's materialised parameter storages (under ZeRO 1-2 the flat buffer
    the parameters are views of; under ZeRO-3 the parameters that are gathered at that moment,
    i.e. DeepSpeed's *persistent* ones, numel < param_persistence_threshold = 1e5) plus, under
    ZeRO-3, the rank's partition (``param.ds_tensor``);
  - ``fp32_master``: ZeRO's fp32 copy of the rank's partition (``single_partition_of_fp32_groups``
    for stages 1-2, ``fp32_partitioned_groups_flat`` for stage 3) where it is a separate storage;
  - ``grads`` (measured after backward, before the step): ``param.grad`` storages plus ZeRO's
    gradient partition buffers (``averaged_gradients``/``grads_in_partition``,
    ``grad_partitions_flat_buffer``);
  - ``optimizer_state``: the torch AdamW state (exp_avg, exp_avg_sq, step) of the (base) optimizer;
  - not in the total, reported beside it: ``ema`` (the trainer's EMA copy), ``comm_buckets``
    (ZeRO's reduce buckets: reduce_bucket_size elements, allocated with torch.empty; on CPU only
    the pages written become resident) and ``other`` (anything else reachable from the optimizer).
  These runs use batch_size 1 and a small ray budget to be quick: none of those settings changes
  a parameter, gradient or optimizer tensor.
* **memory (checkpoint cross-check)**: the final checkpoint of each timing run (the trainer saves
  at max_steps), loaded with ``torch.load(weights_only=False)`` (DeepSpeed pickles plain Python
  objects beside the tensors, which the weights-only unpickler refuses; these are files this
  benchmark's own runs just wrote into its temporary directory, so unpickling them is safe), tensor
  bytes summed per rank: the optimizer file (fp32 partition + Adam moments) and module weights.

* **variants** (``--variants``): for tiny at N = 2, the same timing and memory for ZeRO-2 with
  gradient accumulation 1 and 2 (``g1``, ``g2``; same micro-batch, so a g=2 step reads twice the
  objects) and ZeRO-3 with ``model.train_decoder_through_encoder=true`` (``zero3_joint``;
  ``train_decoder_through_encoder_effective`` says whether the engine kept it on).

Formulas (Ψ parameters, N ranks), per rank: the ZeRO paper's mixed-precision Adam (2Ψ fp16
params, 2Ψ fp16 grads, 12Ψ fp32 master + moments): stage 0 16Ψ, 1 4Ψ+12Ψ/N, 2 2Ψ+14Ψ/N, 3 16Ψ/N;
and the fp32 analogue these CPU runs correspond to (4Ψ params, 4Ψ grads, 8Ψ Adam moments, no
separate master copy): 0 16Ψ, 1 4Ψ+4Ψ+8Ψ/N, 2 4Ψ+(4Ψ+8Ψ)/N, 3 16Ψ/N.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import json
import os
import pickle
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# What the JSON's memory figures count (printed once, in "settings").
MEMORY_COUNTED = (
    "total = params (module storages + ZeRO-3 partition, after the step) + fp32_master (ZeRO's separate fp32 "
    "partition copy) + optimizer_state (AdamW exp_avg, exp_avg_sq, step) + grads (param.grad + ZeRO gradient "
    "partition buffers, after backward); ema, comm_buckets, other reported beside, not in the total")
CHECKPOINT_COUNTED = (
    "stage 0: tensors under 'optimizer' in mp_rank_00_model_states.pt (AdamW moments; rank 0 writes it, every "
    "rank holds the same); stages 1-3: every tensor in zero_pp_rank_{r}_mp_rank_00_optim_states.pt (fp32 "
    "partition + Adam moments); module_bytes: tensors under 'module' (stages 0-2 from mp_rank_00_model_states.pt, "
    "the same on every rank; stage 3 from the rank's own model_states file, where partitioned weights are "
    "empty); ema_bytes: the trainer's EMA in trainer_rank{r}.pt")
DEFAULT_STEPS = {"tiny": 8, "small": 4}
DEFAULT_WARMUP = {"tiny": 2, "small": 1}
BATCH_SIZE = 4  # data.batch_size of the timing runs (the config default)


def log(message: str) -> None:
    print(f"[bench/trainer] {message}", file=sys.stderr, flush=True)


# -- formulas -------------------------------------------------------------------------------------


def zero_formula(stage: int, psi: int, n: int, param_bytes: int, grad_bytes: int, optim_bytes: int) -> dict:
    """Per-rank bytes of parameters, gradients and optimizer state, partitioned as ZeRO stage ``stage``
    (stage >= 1 partitions the optimizer state, >= 2 the gradients, 3 the parameters too)."""
    params, grads, optim = param_bytes * psi, grad_bytes * psi, optim_bytes * psi
    if stage >= 1:
        optim /= n
    if stage >= 2:
        grads /= n
    if stage >= 3:
        params /= n
    return {"params": round(params), "grads": round(grads), "optimizer_state": round(optim),
            "total": round(params + grads + optim), "psi_multiple": round((params + grads + optim) / psi, 4)}


def fp32_formula(stage: int, psi: int, n: int) -> dict:
    """fp32 params (4Ψ) + fp32 grads (4Ψ) + Adam moments (8Ψ), partitioned as ZeRO stage ``stage``."""
    return zero_formula(stage, psi, n, 4, 4, 8)


def deepspeed_fp32_layout(stage: int, psi: int, n: int) -> dict:
    """What DeepSpeed 0.19 keeps per rank in fp32 (read from its code, checked by the measurement).

    Stages 1-2 (one optimizer class) keep the full module weights (4Ψ), a *separate* fp32 copy of
    the rank's partition (4Ψ/N), only the rank's gradient partition after reduction (4Ψ/N, stage
    1 too) and the moments (8Ψ/N): 4Ψ + 16Ψ/N. Stage 3: parameter partition + separate fp32 copy
    + gradient partition + moments = 20Ψ/N, plus the persistent parameters (numel < 1e5) that stay
    gathered in full on every rank (not in this formula; measured).
    """
    if stage == 0:
        total, text = 16 * psi, "16Ψ"
    elif stage in (1, 2):
        total, text = 4 * psi + 16 * psi / n, "4Ψ + 16Ψ/N"
    else:
        total, text = 20 * psi / n, "20Ψ/N + persistent params"
    return {"total": round(total), "formula": text}


def mixed_precision_formula(stage: int, psi: int, n: int) -> dict:
    """The ZeRO paper (K=12): fp16 params 2Ψ, fp16 grads 2Ψ, fp32 master + momentum + variance 12Ψ."""
    full = zero_formula(stage, psi, n, 2, 2, 12)
    return {"total": full["total"], "psi_multiple": full["psi_multiple"]}


# -- tensor accounting ----------------------------------------------------------------------------


def _storage(tensor):
    """(key, bytes) of a tensor's storage; None for an empty one."""
    storage = tensor.untyped_storage()
    nbytes = storage.nbytes()
    if nbytes == 0:
        return None
    return storage.data_ptr(), nbytes


def _walk(obj, path: str, out: list, seen: set, depth: int = 0) -> None:
    """Every tensor reachable from ``obj`` through containers and DeepSpeed/torch objects."""
    import torch

    if depth > 8:
        return
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
        return
    if isinstance(obj, (str, bytes, int, float, bool, type(None))) or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        return  # the model is accounted for through its parameters
    if isinstance(obj, dict):
        for key, value in obj.items():
            _walk(value, f"{path}[{key if isinstance(key, (str, int)) else type(key).__name__}]", out, seen, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for i, value in enumerate(obj):
            _walk(value, f"{path}[{i}]", out, seen, depth + 1)
    elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("deepspeed", "torch"):
        for key, value in vars(obj).items():
            _walk(value, f"{path}.{key}", out, seen, depth + 1)


class Ledger:
    """Bytes by category, each storage counted once (the first category that claims it)."""

    def __init__(self):
        self.owner: dict[int, str] = {}
        self.bytes: dict[str, int] = {}
        self.other_paths: dict[str, int] = {}

    def add(self, category: str, tensors, path: str | None = None) -> None:
        for tensor in tensors:
            if tensor is None:
                continue
            found = _storage(tensor)
            if found is None:
                continue
            key, nbytes = found
            if key in self.owner:
                continue
            self.owner[key] = category
            self.bytes[category] = self.bytes.get(category, 0) + nbytes
            if category == "other" and path is not None:
                root = path.split("[")[0]
                self.other_paths[root] = self.other_paths.get(root, 0) + nbytes

    def get(self, category: str) -> int:
        return self.bytes.get(category, 0)


def _tensors(obj) -> list:
    out: list = []
    _walk(obj, "", out, set())
    return [t for _, t in out]


def account(engine, ema, stage: int) -> dict:
    """Bytes this rank holds right now, by category (see the module docstring)."""
    zero = engine.optimizer if stage >= 1 else None
    base = engine.optimizer.optimizer if stage >= 1 else engine.optimizer
    params = list(engine.module.parameters())
    ledger = Ledger()
    ledger.add("params", [p.data for p in params if p.data.numel() > 0])
    ledger.add("param_partition", [p.ds_tensor for p in params if hasattr(p, "ds_tensor")])
    if zero is not None:
        ledger.add("fp32_master", _tensors(getattr(zero, "single_partition_of_fp32_groups", None)))
        ledger.add("fp32_master", _tensors(getattr(zero, "fp32_partitioned_groups_flat", None)))
    ledger.add("optimizer_state", _tensors(base.state))
    ledger.add("grads", [p.grad for p in params])
    if zero is not None:
        for name in ("averaged_gradients", "grads_in_partition", "grad_partitions_flat_buffer",
                     "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition"):
            ledger.add("grads", _tensors(getattr(zero, name, None)))
        buckets = getattr(zero, "ipg_buckets", None) or {}
        ledger.add("comm_buckets", _tensors([getattr(b, "buffer", None) for b in buckets.values()]))
        ledger.add("comm_buckets", _tensors(getattr(zero, "ipg_buffer", None)))
    if ema is not None:
        ledger.add("ema", ema.shadow)
    found: list = []
    _walk(engine.optimizer, "optimizer", found, set())
    for path, tensor in found:
        ledger.add("other", [tensor], path)
    counted = ("params", "param_partition", "fp32_master", "grads", "optimizer_state")
    result = {name: ledger.get(name) for name in counted + ("ema", "comm_buckets", "other")}
    result["total"] = sum(ledger.get(name) for name in counted)
    result["other_by_attribute"] = dict(sorted(ledger.other_paths.items(), key=lambda kv: -kv[1])[:6])
    gathered = [p for p in params if hasattr(p, "ds_tensor") and p.data.numel() > 0]
    if gathered:
        result["zero3_gathered_params"] = {"count": len(gathered), "of": len(params),
                                           "bytes": sum(p.data.numel() * p.data.element_size() for p in gathered)}
    return result


def memory_worker(args) -> int:
    """One rank of the in-process memory measurement (started by :func:`measure_memory`).

    The trainer's own :class:`trainer.trainer.Trainer` (set-up, one ``train_step``), with the
    accounting hooked in at the accumulation boundary: after the last backward, before the step.
    """
    import torch

    from trainer.config import load_config
    from trainer.distributed import barrier
    from trainer.trainer import Trainer

    class Measured(Trainer):
        def _boundary_step(self, losses_finite):
            self.after_backward = account(self.engine, self.ema, self.config.distributed.zero_stage)
            return super()._boundary_step(losses_finite)

    overrides = json.loads(args.worker_overrides)
    results = {}
    for stage in [int(s) for s in args.worker_stages.split(",")]:
        trainer = Measured(load_config(None, overrides + [f"distributed.zero_stage={stage}"]))
        batches, _ = trainer.next_micro_batches()
        result = trainer.train_step(batches)
        after_step = account(trainer.engine, trainer.ema, stage)
        results[stage] = {"after_backward": trainer.after_backward, "after_step": after_step, "step_taken": result.taken,
                          "loss": float(result.metrics["loss"]),
                          "train_decoder_through_encoder": trainer.model.config.train_decoder_through_encoder,
                          "optimizer_steps": int(trainer.engine.global_steps)}
        barrier()
        rank = trainer.env.rank
        trainer.engine.destroy()
        del trainer, batches, result
        gc.collect()
        torch.manual_seed(0)
    with open(os.path.join(args.worker_out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    return 0


def measure_memory(preset: str, nproc: int, stages: list[int], common: list[str], workdir: str,
                   timeout: float, omp_threads: int, extra: tuple[str, ...] = ()) -> dict:
    """Start ``nproc`` ranks of :func:`memory_worker` (the launcher's environment) and collect them."""
    from trainer.distributed import free_port

    out = tempfile.mkdtemp(prefix=f"mem_{preset}_n{nproc}_", dir=workdir)
    overrides = common + [f"model.preset={preset}", f"run_dir={out}/run", "data.batch_size=1", "data.num_workers=0",
                          "model.rays_per_view=64", "model.samples_per_ray=8", *extra]
    port = free_port()
    base_env = rank_environment(omp_threads)
    threads = str(max(1, (os.cpu_count() or 1) // nproc))
    processes = []
    with contextlib.ExitStack() as logs:
        for rank in range(nproc):
            env = {**base_env, "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "OMP_NUM_THREADS": base_env.get("OMP_NUM_THREADS", threads)}
            log_file = logs.enter_context(open(os.path.join(out, f"rank{rank}.log"), "w"))
            processes.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--_memory-worker", "--worker-out", out,
                 "--worker-stages", ",".join(map(str, stages)), "--worker-overrides", json.dumps(overrides)],
                cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True))
        codes = wait_all(processes, timeout)
    if any(code != 0 for code in codes):
        with open(os.path.join(out, "rank0.log")) as f:
            tail = f.read()[-1500:]
        raise RuntimeError(f"memory workers exited with {codes}: {tail}")
    per_rank = []
    for rank in range(nproc):
        with open(os.path.join(out, f"rank{rank}.json")) as f:
            per_rank.append({int(k): v for k, v in json.load(f).items()})
    return {stage: [per_rank[r][stage] for r in range(nproc)] for stage in stages}


def wait_all(processes, timeout: float) -> list[int]:
    """Exit codes; on a failure or the timeout the others (their process groups) are stopped.

    Each process was started with ``start_new_session=True``, so its group holds only it and its
    children (the launcher's ranks and loader workers): nothing else is signalled. A process
    stopped for the timeout reports 124.
    """
    deadline = time.monotonic() + timeout
    timed_out = False
    while True:
        codes = [p.poll() for p in processes]
        if all(c is not None for c in codes):
            break
        failed = any(c not in (None, 0) for c in codes)
        timed_out = time.monotonic() > deadline
        if failed or timed_out:
            for p in processes:
                if p.poll() is None:
                    try:
                        os.killpg(p.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            for p in processes:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            break
        time.sleep(0.2)
    return [124 if (timed_out and code is None) else p.returncode for p, code in zip(processes, codes)]


# -- checkpoint cross-check -----------------------------------------------------------------------


def _file_tensor_bytes(obj, keys_under: str | None = None) -> int:
    """Bytes of the distinct tensor storages in a loaded object (optionally only under key ``keys_under``)."""
    import torch

    if keys_under is not None:
        obj = obj.get(keys_under) if isinstance(obj, dict) else None
        if obj is None:
            return 0
    found: list = []
    _walk(obj, "", found, set())
    seen: dict = {}
    for _, tensor in found:
        if isinstance(tensor, torch.Tensor):
            s = _storage(tensor)
            if s is not None:
                seen[s[0]] = s[1]
    return sum(seen.values())


def checkpoint_bytes(run_dir: str, stage: int, nproc: int) -> dict:
    import torch

    tags = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "step_*")))
    if not tags:
        return {"error": "no checkpoint found"}
    directory = tags[-1]

    def load(name):
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            return None
        # weights_only=False: see the module docstring (our own, freshly written files).
        return torch.load(path, map_location="cpu", weights_only=False)

    shared = load("mp_rank_00_model_states.pt")  # stages 0-2: written by rank 0, the same on every rank
    ranks = []
    for rank in range(nproc):
        optim = load(f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        own_model = load(f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        trainer_state = load(f"trainer_rank{rank:05d}.pt")
        if stage == 0:
            optimizer_bytes = _file_tensor_bytes(shared, "optimizer") if shared is not None else 0
        else:
            optimizer_bytes = _file_tensor_bytes(optim) if optim is not None else 0
        module_source = own_model if own_model is not None else shared
        ranks.append({
            "optimizer_file_bytes": optimizer_bytes,
            "module_bytes": _file_tensor_bytes(module_source, "module") if module_source is not None else 0,
            "ema_bytes": _file_tensor_bytes(trainer_state, "ema") if trainer_state is not None else 0,
        })
        del optim, own_model, trainer_state
    del shared
    gc.collect()
    return {"tag": os.path.basename(directory), "per_rank": ranks}


# -- timing ---------------------------------------------------------------------------------------


def rank_environment(omp_threads: int) -> dict:
    env = dict(os.environ)
    if omp_threads > 0:
        env["OMP_NUM_THREADS"] = str(omp_threads)  # the launcher keeps a value it is given
    return env


def timing_run(preset: str, stage: int, nproc: int, steps: int, warmup: int, common: list[str],
               workdir: str, timeout: float, omp_threads: int, extra: tuple[str, ...] = (), name: str = "",
               accumulation: int = 1) -> dict:
    from trainer.metrics_file import read_metrics

    run_dir = os.path.join(workdir, f"run_{preset}_zero{stage}_n{nproc}{name}")
    overrides = common + [f"run_dir={run_dir}", f"distributed.zero_stage={stage}", f"model.preset={preset}",
                          f"train.max_steps={steps}", "log.every_steps=1", "log.preview_every_steps=0",
                          "log.tensorboard=false", "checkpoint.every_steps=100000", "checkpoint.resume=false",
                          f"data.batch_size={BATCH_SIZE}", f"distributed.gradient_accumulation_steps={accumulation}", *extra]
    command = [sys.executable, os.path.join(ROOT, "launch", "local.py"), "--nproc", str(nproc), *overrides]
    log_path = run_dir + ".log"
    load_before = os.getloadavg()
    start = time.perf_counter()
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, cwd=ROOT, env=rank_environment(omp_threads), stdout=log_file,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        code = wait_all([process], timeout)[0]
    wall = time.perf_counter() - start
    if code != 0:
        with open(log_path) as f:
            tail = f.read()[-2000:]
        return {"error": f"launcher exited with status {code}", "log_tail": tail, "wall_s": round(wall, 1)}
    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    timed = [r for r in records if r["step"] > warmup]
    seconds = [r["step_seconds"] for r in timed]
    median = statistics.median(seconds)
    objects_per_step = BATCH_SIZE * nproc * accumulation
    wait = sum(r["data_wait_fraction"] * r["step_seconds"] for r in timed) / sum(seconds)
    peak = {key: max(r[key] for r in records if key in r) for key in sorted(records[-1]) if key.startswith("peak_memory_mb_rank")}
    return {
        "stage": stage, "nproc": nproc, "gradient_accumulation_steps": accumulation,
        "optimizer_steps_logged": records[-1].get("optimizer_steps"), "steps": steps, "warmup_steps_excluded": warmup, "timed_steps": len(timed),
        "step_seconds_median": round(median, 4),
        "objects_per_s": round(objects_per_step / median, 3),
        "objects_per_s_mean": round(objects_per_step * len(timed) / sum(seconds), 3),
        "data_wait_fraction": round(wait, 4),
        "step_seconds_per_step": [round(r["step_seconds"], 3) for r in records],
        "final_loss": round(records[-1]["loss"], 5),
        "peak_rss_mb": {k.replace("peak_memory_mb_", ""): round(v, 1) for k, v in peak.items()},
        "launch_wall_s": round(wall, 1),
        "loadavg_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "_run_dir": run_dir,
    }


# -- main -----------------------------------------------------------------------------------------


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_per_preset(text: str | None, default: dict) -> dict:
    result = dict(default)
    for item in (text or "").split(","):
        if item.strip():
            name, _, value = item.partition("=")
            result[name.strip()] = int(value)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,small", help="model presets (default: %(default)s)")
    parser.add_argument("--representation", default="triplane", help="model.representation (default: %(default)s)")
    parser.add_argument("--stages", default="0,1,2,3", help="ZeRO stages for every preset but small (default: %(default)s)")
    parser.add_argument("--nprocs", default="1,2", help="process counts for every preset but small (default: %(default)s)")
    parser.add_argument("--small-stages", default="2,3",
                        help="ZeRO stages for small (default: %(default)s; a small step takes tens of seconds "
                             "on 2 CPU cores, so all of 0,1,2,3 x 1,2 takes half an hour or more)")
    parser.add_argument("--small-nprocs", default="2", help="process counts for small (default: %(default)s)")
    parser.add_argument("--steps", default=None, help="steps per run, e.g. tiny=8,small=4 (these are the defaults)")
    parser.add_argument("--warmup", default=None, help="leading steps left out of the timing, e.g. tiny=2,small=1 (defaults)")
    parser.add_argument("--objects", type=int, default=160, help="synthetic objects (default: %(default)s; 10%% held out)")
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--context-views", type=int, default=None,
                        help="pin the context-view count k (default: the config's 0..3, drawn per batch)")
    parser.add_argument("--omp-threads", type=int, default=1,
                        help="OMP_NUM_THREADS of every rank (default: %(default)s, one core per rank; 0: the "
                             "launcher's choice, cpu_count // N, which on a loaded 2-core machine makes the N=1 "
                             "runs' two OpenMP threads spin and ZeRO-3's many small ops up to 10x slower)")
    parser.add_argument("--variants", default="g1,g2,zero3_joint",
                        help="extra runs of --variants-preset at --variants-nproc ranks (default: %(default)s): g1 and "
                             "g2 = ZeRO-2 with gradient accumulation 1 and 2 (same micro-batch), zero3_joint = ZeRO-3 "
                             "with model.train_decoder_through_encoder=true; '' for none")
    parser.add_argument("--variants-preset", default="tiny")
    parser.add_argument("--variants-nproc", type=int, default=2)
    parser.add_argument("--skip-memory", action="store_true", help="leave out the in-process memory measurement")
    parser.add_argument("--skip-checkpoint", action="store_true", help="leave out the checkpoint cross-check")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds allowed per launch (default: %(default)s)")
    parser.add_argument("--keep", default=None, help="work in this directory and keep it (default: a temporary one, removed)")
    # internal: one rank of the memory measurement
    parser.add_argument("--_memory-worker", dest="memory_worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--worker-stages", help=argparse.SUPPRESS)
    parser.add_argument("--worker-overrides", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.memory_worker:
        return memory_worker(args)
    stdout = sys.stdout
    # DeepSpeed logs to stdout (e.g. when a checkpoint is unpickled): keep stdout for the JSON line.
    with contextlib.redirect_stdout(sys.stderr):
        result = run_benchmark(args)
    print(json.dumps(result), file=stdout, flush=True)
    return 0


def run_benchmark(args) -> dict:
    import shutil
    from importlib.metadata import version

    import torch

    from data_pipeline.synthetic import generate_dataset
    from model_zoo.goembedfusion import GOEmbedFusion, ModelConfig
    from model_zoo.presets import count_parameters

    presets = [p for p in args.presets.split(",") if p]
    steps = parse_per_preset(args.steps, DEFAULT_STEPS)
    warmup = parse_per_preset(args.warmup, DEFAULT_WARMUP)
    plan = []
    for preset in presets:
        stages = parse_ints(args.small_stages if preset == "small" else args.stages)
        nprocs = parse_ints(args.small_nprocs if preset == "small" else args.nprocs)
        n_steps = steps.get(preset, 4)
        n_warm = min(warmup.get(preset, 1), n_steps - 1)
        plan += [(preset, stage, n, n_steps, n_warm) for stage in stages for n in nprocs]

    workdir = os.path.abspath(args.keep) if args.keep else tempfile.mkdtemp(prefix="bench_trainer_")
    os.makedirs(workdir, exist_ok=True)
    started = time.perf_counter()
    load_start = os.getloadavg()
    try:
        data_dir = os.path.join(workdir, "data")
        if not glob.glob(os.path.join(data_dir, "train-*.tar")):
            log(f"generating {args.objects} objects x {args.views} views at {args.resolution} px into {data_dir}")
            summary = generate_dataset(data_dir, objects=args.objects, views=args.views, resolution=args.resolution,
                                       seed=0, holdout_fraction=0.1, progress=False)
            log(summary["summary"].splitlines()[0])
        common = [f"data.train_urls={data_dir}/train-*.tar", f"data.holdout_urls={data_dir}/holdout-*.tar",
                  "data.resolution=null", f"model.representation={args.representation}",
                  "model.train_decoder_through_encoder=false", "train.device=cpu"]
        if args.context_views is not None:
            common += [f"data.context_views_min={args.context_views}", f"data.context_views_max={args.context_views}"]

        result_presets: dict = {}
        for preset in presets:
            psi = count_parameters(GOEmbedFusion(ModelConfig(preset=preset, representation=args.representation)))
            result_presets[preset] = {"parameters": psi, "runs": {}}

        for preset, stage, nproc, n_steps, n_warm in plan:
            log(f"timing {preset} zero{stage} x{nproc}: {n_steps} steps ...")
            run = timing_run(preset, stage, nproc, n_steps, n_warm, common, workdir, args.timeout, args.omp_threads)
            psi = result_presets[preset]["parameters"]
            if "error" not in run:
                log(f"  median step {run['step_seconds_median']} s, {run['objects_per_s']} obj/s, "
                    f"data wait {run['data_wait_fraction']}, launch {run['launch_wall_s']} s")
                run_dir = run.pop("_run_dir")
                if not args.skip_checkpoint:
                    try:
                        run["checkpoint_bytes"] = checkpoint_bytes(run_dir, stage, nproc)
                    except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as error:
                        # a cross-check: report the problem, do not lose the run
                        run["checkpoint_bytes"] = {"error": repr(error)}
                if not args.keep:
                    shutil.rmtree(run_dir, ignore_errors=True)
            else:
                log(f"  FAILED: {run['error']}\n{run['log_tail']}")
            run["formula_fp32_bytes"] = fp32_formula(stage, psi, nproc)
            run["formula_mixed_precision_bytes"] = mixed_precision_formula(stage, psi, nproc)
            result_presets[preset]["runs"][f"zero{stage}_n{nproc}"] = run

        if not args.skip_memory:
            groups: dict = {}
            for preset, stage, nproc, _, _ in plan:
                groups.setdefault((preset, nproc), []).append(stage)
            for (preset, nproc), stages in groups.items():
                log(f"memory {preset} x{nproc}: stages {stages} ...")
                try:
                    measured = measure_memory(preset, nproc, sorted(stages), common, workdir, args.timeout,
                                              args.omp_threads)
                except (OSError, RuntimeError, ValueError, KeyError) as error:
                    log(f"  FAILED: {error}")
                    for stage in stages:
                        result_presets[preset]["runs"][f"zero{stage}_n{nproc}"]["memory"] = {"error": str(error)[-1500:]}
                    continue
                psi = result_presets[preset]["parameters"]
                for stage in stages:
                    ranks = measured[stage]
                    memory = summarise_memory(ranks, stage, psi, nproc)
                    result_presets[preset]["runs"][f"zero{stage}_n{nproc}"]["memory"] = memory
                    log(f"  zero{stage}: measured {memory['total_bytes_per_rank']} B/rank "
                        f"({memory['measured_psi_multiple']} Psi) vs fp32 formula {memory['formula_fp32_total']} "
                        f"({fp32_formula(stage, psi, nproc)['psi_multiple']} Psi)")

        variants = run_variants(args, common, workdir, steps, warmup, result_presets)

        result = {
            "bench": "trainer",
            "presets": result_presets,
            "variants": variants,
            "representation": args.representation,
            "dataset": {"objects": args.objects, "views": args.views, "resolution": args.resolution,
                        "holdout_fraction": 0.1},
            "settings": {
                "launcher": "python launch/local.py --nproc N (real trainer, gloo, fp32, torch AdamW)",
                "overrides": [o.replace(workdir, "$WORKDIR") for o in common] + [
                    f"data.batch_size={BATCH_SIZE}", "log.every_steps=1", "log.preview_every_steps=0",
                    "log.tensorboard=false", "checkpoint.every_steps=100000"],
                "fair_comparison": "model.train_decoder_through_encoder=false for every stage, so every stage "
                                   "trains the same computation (variant zero3_joint turns it on)",
                "context_views": (f"pinned to {args.context_views}" if args.context_views is not None else
                                  "config default: k drawn per batch from 0..3 (same draws for every stage at "
                                  "the same N, so steps compare one to one; N=1 and N=2 draw differently)"),
                "objects_per_step": f"data.batch_size ({BATCH_SIZE}) x N",
                "data_wait_fraction": "rank 0's next(batch) time / its step time, over the timed steps",
                "peak_rss_mb": "ru_maxrss of each rank (whole process: activations, loader, DeepSpeed buffers)",
                "memory_pass": "in-process: one real step per stage, batch_size 1, rays_per_view 64, "
                               "samples_per_ray 8 (no parameter/gradient/optimizer tensor depends on these)",
                "grads": "measured after backward, before the step (not formula)",
                "memory_counted": MEMORY_COUNTED,
                "checkpoint_bytes_counted": CHECKPOINT_COUNTED,
            },
            "formulas": {
                "mixed_precision_paper": "stage 0: 16Ψ; 1: 4Ψ+12Ψ/N; 2: 2Ψ+14Ψ/N; 3: 16Ψ/N (fp16 params+grads, fp32 master+moments)",
                "fp32_analogue": "params 4Ψ + grads 4Ψ + Adam moments 8Ψ: stage 0: 16Ψ; 1: 4Ψ+4Ψ+8Ψ/N; "
                                 "2: 4Ψ+4Ψ/N+8Ψ/N; 3: 16Ψ/N",
            },
            "cpu_count": os.cpu_count(),
            "omp_num_threads_per_rank": (args.omp_threads if args.omp_threads > 0 else
                                         os.environ.get("OMP_NUM_THREADS", "launcher default: cpu_count // N")),
            "loadavg_1min_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
            "torch": torch.__version__,
            "deepspeed": version("deepspeed"),
            "python": platform.python_version(),
            "total_wall_s": round(time.perf_counter() - started, 1),
        }
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return result


VARIANTS = {  # name -> (ZeRO stage, gradient accumulation, extra overrides)
    "g1": (2, 1, ()),
    "g2": (2, 2, ()),
    "zero3_joint": (3, 1, ("model.train_decoder_through_encoder=true",)),
}


def run_variants(args, common: list[str], workdir: str, steps: dict, warmup: dict, presets: dict) -> dict:
    """Step time and per-rank bytes for gradient accumulation 1 vs 2 and ZeRO-3 with the joint option."""
    import shutil

    preset, nproc = args.variants_preset, args.variants_nproc
    out = {}
    for name in [v for v in args.variants.split(",") if v]:
        if name not in VARIANTS:
            raise SystemExit(f"--variants: unknown variant {name!r} (known: {', '.join(VARIANTS)})")
        stage, accumulation, extra = VARIANTS[name]
        n_steps = steps.get(preset, 4)
        log(f"variant {name}: {preset} zero{stage} x{nproc}, accumulation {accumulation} ...")
        run = timing_run(preset, stage, nproc, n_steps, min(warmup.get(preset, 1), n_steps - 1), common, workdir,
                         args.timeout, args.omp_threads, extra, f"_{name}", accumulation)
        run_dir = run.pop("_run_dir", None)
        if run_dir and not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
        if not args.skip_memory:
            try:
                measured = measure_memory(preset, nproc, [stage], common + [
                    f"distributed.gradient_accumulation_steps={accumulation}"], workdir, args.timeout, args.omp_threads,
                    extra)[stage]
                psi = presets.get(preset, {}).get("parameters")
                run["memory"] = summarise_memory(measured, stage, psi, nproc) if psi else {"per_rank": measured}
                run["train_decoder_through_encoder_effective"] = measured[0]["train_decoder_through_encoder"]
            except (OSError, RuntimeError, ValueError, KeyError) as error:
                run["memory"] = {"error": str(error)[-1500:]}
        out[name] = run
    return out


def summarise_memory(ranks: list[dict], stage: int, psi: int, nproc: int) -> dict:
    """Per-rank bytes: params, fp32 master and optimizer state after the step; grads after backward."""
    fields = ("params", "fp32_master", "optimizer_state")
    per_rank = []
    for r in ranks:
        after = r["after_step"]
        entry = {"params": after["params"] + after["param_partition"]}
        if stage == 3:
            entry["params_zero3_partition"] = after["param_partition"]
            entry["params_zero3_gathered_persistent"] = after["params"]
        entry.update(fp32_master=after["fp32_master"], optimizer_state=after["optimizer_state"])
        entry["grads"] = r["after_backward"]["grads"]
        entry["total"] = sum(entry[name] for name in fields) + entry["grads"]
        entry["ema"] = r["after_step"]["ema"]
        entry["comm_buckets_allocated"] = max(r["after_step"]["comm_buckets"], r["after_backward"]["comm_buckets"])
        entry["other"] = r["after_step"]["other"]
        if r["after_step"]["other_by_attribute"]:
            entry["other_by_attribute"] = r["after_step"]["other_by_attribute"]
        if "zero3_gathered_params" in r["after_step"]:
            entry["zero3_gathered_params_after_step"] = r["after_step"]["zero3_gathered_params"]
        entry["grads_still_held_after_step"] = r["after_step"]["grads"]
        per_rank.append(entry)
    formula = fp32_formula(stage, psi, nproc)
    worst = max(e["total"] for e in per_rank)
    return {
        "per_rank": per_rank,
        "total_bytes_per_rank": [e["total"] for e in per_rank],
        "measured_psi_multiple": round(worst / psi, 3),
        "formula_fp32_total": formula["total"],
        "measured_over_fp32_formula": round(worst / formula["total"], 3),
        "formula_mixed_precision_total": mixed_precision_formula(stage, psi, nproc)["total"],
        "deepspeed_fp32_layout": deepspeed_fp32_layout(stage, psi, nproc),
    }


if __name__ == "__main__":
    sys.exit(main())
