"""GPU benchmark of real bf16 training steps on one GPU (NCCL, world size 1), through the Trainer.

    python bench/gpu.py [--presets tiny,small,base] [--resolutions 64,128] [--steps 8] [--warmup 3]

Prints one JSON line. Per (preset, resolution): the median step time (``torch.cuda.synchronize``
around each step), objects/s, rays/s (every encoded pixel plus the loss's rays), peak GPU memory
per object (``torch.cuda.max_memory_allocated`` over the run / objects per step), the share of
the step spent waiting for data (time in ``next(batch)`` / step time), and the denoiser's MFU:
its forward + backward FLOPs for one step (counted by ``torch.utils.flop_counter`` on the step's
encoding) / step time / the GPU's dense bf16 peak (a table by device name; null when unknown).
bench/gpu_check.sh runs it; on a machine without CUDA it exits with an error saying so, unless
``--cpu-smoke`` (the same code on the CPU, tiny sizes: a check of this script, no GPU figure).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, from NVIDIA's data sheets (SXM parts).
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def peak_flops(name: str) -> float | None:
    return next((value for key, value in PEAK_BF16.items() if key in name), None)


def denoiser_flops(model_config, encoding, t) -> int:
    """FLOPs of one forward + backward of the denoiser on ``encoding``.

    Counted on a fresh copy of the same architecture (FLOPs do not depend on the weights), so the
    engine's gradient hooks never see this backward.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from model_zoo.goembedfusion import GOEmbedFusion

    model = GOEmbedFusion(model_config).to(encoding.device)
    x = encoding.detach().float().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        out = model.denoise(x, t)  # the denoiser with its conditioning (e.g. the reconstruction flag)
        out.float().sum().backward()
    del out, model
    _sync(encoding.device)
    return counter.get_total_flops()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def run_one(preset: str, resolution: int, data: str, steps: int, warmup: int, batch_size: int, workdir: str,
            device: str = "cuda") -> dict:
    import torch

    from trainer.config import load_config
    from trainer.trainer import Trainer, rays_of

    values = {"run_dir": os.path.join(workdir, f"{preset}_{resolution}"), "data.train_urls": data,
              "data.holdout_urls": "null", "data.batch_size": batch_size, "data.resolution": resolution,
              "data.num_workers": 4, "model.preset": preset, "distributed.precision": "bf16",
              "distributed.zero_stage": 2, "train.device": device, "log.tensorboard": "false"}
    if device == "cpu":
        values["data.num_workers"] = 0
    trainer = Trainer(load_config(None, [f"{k}={v}" for k, v in values.items()]))
    on_gpu = trainer.env.device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    seconds, waits, objects, rays = [], [], 0, 0
    for index in range(warmup + steps):
        _sync(trainer.env.device)
        started = time.perf_counter()
        batches, waited = trainer.next_micro_batches()
        result = trainer.train_step(batches)
        _sync(trainer.env.device)
        if index >= warmup:
            seconds.append(time.perf_counter() - started)
            waits.append(waited)
            objects = result.objects
            rays = result.rays
    batch = batches[0].to(trainer.env.device)
    with trainer.precision(), torch.no_grad():
        from model_zoo.goembedfusion import Views

        views = Views.from_batch(batch, "context")
        encoding = trainer.model.condition(views, None, batch.background)  # the denoiser's input
    t = torch.full((batch.num_objects,), 500, device=trainer.env.device, dtype=torch.long)
    with trainer.precision():
        flops = denoiser_flops(trainer.config.model, encoding, t)
    median = statistics.median(seconds)
    peak = peak_flops(torch.cuda.get_device_name()) if on_gpu else None
    result = {
        "preset": preset, "resolution": resolution, "objects_per_step": objects, "timed_steps": len(seconds),
        "step_seconds_median": round(median, 5), "objects_per_s": round(objects / median, 2),
        "rays_per_s": round(rays / median, 1),
        "peak_memory_mb_per_object": round(torch.cuda.max_memory_allocated() / 2**20 / objects, 2) if on_gpu else None,
        "data_wait_fraction": round(sum(waits) / sum(seconds), 4),
        "denoiser_flops_per_step": flops,
        "denoiser_mfu": round(flops / median / peak, 5) if peak else None,
        "final_loss": round(float(result.metrics["loss"]), 5),
        "rays_per_step_check": rays_of(batch, trainer.model),
    }
    trainer.engine.destroy()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,small,base")
    parser.add_argument("--resolutions", default="64,128")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--objects", type=int, default=64)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run the same code on the CPU (a check of this script; no GPU figure)")
    args = parser.parse_args(argv)
    import torch

    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: bench/gpu.py needs a CUDA GPU (--cpu-smoke runs the same code on the CPU)", file=sys.stderr)
        return 2
    from data_pipeline.synthetic import generate_dataset

    resolutions = [int(r) for r in args.resolutions.split(",") if r]
    started = time.perf_counter()
    stdout = sys.stdout
    sys.stdout = sys.stderr  # DeepSpeed prints to stdout: keep it for the one JSON line
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as workdir:
        data = generate_dataset(os.path.join(workdir, "data"), objects=args.objects, views=8,
                                resolution=max(resolutions), seed=0, holdout_fraction=0.0, progress=False)["train_pattern"]
        for preset in [p for p in args.presets.split(",") if p]:
            for resolution in resolutions:
                try:
                    runs.append(run_one(preset, resolution, data, args.steps, args.warmup, args.batch_size, workdir,
                                        device))
                except Exception as error:  # a preset that does not fit is a result, not a crash
                    runs.append({"preset": preset, "resolution": resolution, "error": repr(error)[-800:]})
                    if device == "cuda":
                        torch.cuda.empty_cache()
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    sys.stdout = stdout
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (--cpu-smoke: not a GPU figure)"
    print(json.dumps({"bench": "gpu", "device": name, "torch": torch.__version__,
                      "precision": "bf16", "zero_stage": 2, "world_size": 1, "runs": runs,
                      "peak_bf16_flops": peak_flops(name),
                      "total_wall_s": round(time.perf_counter() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
