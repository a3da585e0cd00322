"""Benchmark of the model: renderer throughput, GOEmbed cost, and a training step split by part.

    python bench/model.py [--preset tiny] [--representation triplane|voxel|mlp|all]
                          [--device cpu|cuda] [--dtype fp32|bf16] [--batch-size 4] [--threads 1] [--repeats N]

Prints one JSON line (progress to stderr). Every figure is the median of ``--repeats`` timed runs
after warm-up, with a device synchronisation around each timed region on GPU. Per representation:

* ``render``: rays/s of ``VolumeRenderer.render_rays`` on a random state, forward only (no grad)
  and forward + backward (MSE on rgb, gradients to the state and the decoder ψ);
* ``goembed``: time of ``goembed(...)`` on the same rays, as a ratio to one forward render of those
  rays: plain, with ``create_graph`` (ψ trained through it), and with ``create_graph`` plus the
  backward of a loss on ζ_enc into ψ. For grids both the closed form (the default, ``auto``) and the
  autograd reference are timed in the same run (before/after); the MLP has only the autograd form.
  ``forward_backward_vs_forward`` (a render and its backward) is what autograd GOEmbed costs at least;
* ``train_step``: one step of the composed model on a real batch from the streaming reader,
  timed part by part through ``GOEmbedFusion.forward``'s ``on_part`` callback (the model's own
  code, no copy of it), and ``encoder_share``: 1 − (the same step with a zero encoding) / (this
  step), the encoder's forward and backward together.

Absolute numbers depend on the machine; ratios and fractions are what to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipeline.reader import ReaderConfig, StreamingReader
from data_pipeline.synthetic import generate_dataset
from model_zoo.goembed import RayBatch, closed_form_applies, goembed
from model_zoo.goembedfusion import GOEmbedFusion, ModelConfig

REPRESENTATIONS = ("triplane", "voxel", "mlp")
PARTS = ("prepare", "encode", "denoise", "render_loss", "backward", "optimizer")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Bench:
    """Device, precision and timing helpers shared by every measurement."""

    def __init__(self, device: torch.device, bf16: bool, repeats: int, warmup: int):
        self.device, self.bf16, self.repeats, self.warmup = device, bf16, repeats, warmup

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def median_s(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        self.sync()
        times = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def random_rays(batch: int, count: int, box_half_size: float, generator: torch.Generator, device):
    """Rays from a sphere of radius 3h around the box towards random points inside it (all hit)."""
    origins = F.normalize(torch.randn(batch, count, 3, generator=generator), dim=-1) * 3 * box_half_size
    aims = (torch.rand(batch, count, 3, generator=generator) * 2 - 1) * 0.9 * box_half_size
    return origins.to(device), F.normalize(aims - origins, dim=-1).to(device)


def bench_renderer(model: GOEmbedFusion, bench: Bench, batch: int, rays_per_object: int, views: int) -> dict:
    renderer, device = model.renderer, bench.device
    generator = torch.Generator().manual_seed(0)
    origins, directions = random_rays(batch, rays_per_object, model.config.box_half_size, generator, device)
    colours = torch.rand(batch, rays_per_object, 3, generator=generator).to(device)
    background = torch.rand(batch, 3, generator=generator).to(device)
    noise = torch.randn(batch, *renderer.representation.state_shape, generator=generator).to(device)
    # A random state near what the denoiser outputs: noise for grids, a perturbed origin for the MLP.
    state = renderer.representation.origin(batch, device=device) + (0.1 if model.config.representation == "mlp" else 1.0) * noise
    params = [p for p in renderer.parameters() if p.requires_grad]

    def forward():
        with torch.no_grad(), bench.autocast():
            renderer.render_rays(state, origins, directions, background)

    leaf = state.clone().requires_grad_(True)

    def forward_backward():
        with bench.autocast():
            out = renderer.render_rays(leaf, origins, directions, background)
            loss = F.mse_loss(out.rgb, colours.to(out.rgb.dtype))
        torch.autograd.grad(loss, [leaf, *params])

    # GOEmbed over the same rays, seen as `views` views of rays_per_object / views rays each.
    rays = RayBatch(origins, directions, colours, views)
    probe = torch.randn(batch, *renderer.representation.state_shape, generator=generator).to(device)
    decoder_params = list(renderer.decoder.parameters())

    def encode(method: str, create_graph: bool, backward: bool = False):
        def run():
            with bench.autocast():
                encoding = goembed(renderer, rays, background, create_graph=create_graph,
                                   normalisation=model.config.goembed_normalisation, method=method)
            if backward:  # ψ trained through the encoder: a loss on ζ_enc, back into ψ
                torch.autograd.grad((encoding.float() * probe).sum(), decoder_params)
        return run

    forward_s, forward_backward_s = bench.median_s(forward), bench.median_s(forward_backward)
    total_rays = batch * rays_per_object
    result = {
        "render": {
            "rays": total_rays, "samples_per_ray": renderer.samples_per_ray,
            "forward_ms": round(forward_s * 1e3, 2), "forward_backward_ms": round(forward_backward_s * 1e3, 2),
            "forward_rays_per_s": round(total_rays / forward_s), "forward_backward_rays_per_s": round(total_rays / forward_backward_s),
        },
        "goembed": {"normalisation": model.config.goembed_normalisation, "views": views,
                    "forward_backward_vs_forward": round(forward_backward_s / forward_s, 2)},
    }
    # "auto" is the closed form on grids with the zero origin; "autograd" is the reference (and the
    # only way for the MLP), measured in the same run as the before/after of the closed form.
    methods = ("auto", "autograd") if closed_form_applies(renderer) else ("autograd",)
    for method in methods:
        name = "closed_form" if method == "auto" else "autograd"
        plain = bench.median_s(encode(method, False))
        graph = bench.median_s(encode(method, True))
        trained = bench.median_s(encode(method, True, backward=True))
        result["goembed"][name] = {
            "ms": round(plain * 1e3, 2), "create_graph_ms": round(graph * 1e3, 2),
            "create_graph_and_backward_ms": round(trained * 1e3, 2),
            "vs_forward": round(plain / forward_s, 3), "create_graph_vs_forward": round(graph / forward_s, 3),
            "create_graph_and_backward_vs_forward": round(trained / forward_s, 3),
        }
    return result


def bench_train_step(model: GOEmbedFusion, bench: Bench, batch) -> dict:
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)  # Adam + clipping, as experiment.fit

    def seeded(seed: int) -> torch.Generator:
        torch.manual_seed(seed)  # dropout in bigger presets draws from the global generator
        return torch.Generator(device=bench.device).manual_seed(seed)

    def step(seed: int) -> dict[str, float]:
        generator = seeded(seed)
        times: dict[str, float] = {}
        bench.sync()
        start = last = time.perf_counter()

        def mark(part: str) -> None:
            nonlocal last
            bench.sync()
            now = time.perf_counter()
            times[part], last = now - last, now

        optimizer.zero_grad(set_to_none=True)
        with bench.autocast():
            loss, _ = model(batch, generator=generator, on_part=mark)
        loss.backward()
        mark("backward")
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        mark("optimizer")
        times["total"] = last - start
        return times

    for seed in range(bench.warmup):
        step(seed)
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(bench.device)
    else:
        rss_before = reset_peak_rss()
    runs = [step(1000 + seed) for seed in range(bench.repeats)]
    ms = {name: statistics.median(run[name] for run in runs) * 1e3 for name in (*PARTS, "total")}
    result = {
        "ms": {name: round(value, 2) for name, value in ms.items()},
        "fraction": {name: round(ms[name] / ms["total"], 3) for name in PARTS},
        "objects_per_s": round(batch.num_objects / ms["total"] * 1e3, 2),
    }
    if bench.device.type == "cuda":
        result["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(bench.device) / 2**20, 1)
    else:
        result.update(rss_before_mb=rss_before, peak_rss_mb=peak_rss_mb())
    return result


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            return next(round(int(line.split()[1]) / 1024, 1) for line in f if line.startswith(field))
    except (OSError, StopIteration):
        return None


def reset_peak_rss() -> float | None:
    """Reset the process's peak RSS to its current RSS (Linux clear_refs 5); returns the RSS in MiB.

    Memory the allocator kept from earlier phases stays in the baseline (``rss_before_mb``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status_mb("VmRSS:")


def peak_rss_mb() -> float:
    """Peak RSS since the last reset (VmHWM), else the process's lifetime maximum (ru_maxrss, KiB)."""
    return _status_mb("VmHWM:") or round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--representation", choices=(*REPRESENTATIONS, "all"), default="all")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rays-per-object", type=int, default=4096, help="renderer and GOEmbed figures")
    parser.add_argument("--objects", type=int, default=32)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--context-views", type=int, default=3)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    bench = Bench(device, dtype == "bf16", args.repeats, args.warmup)
    kinds = REPRESENTATIONS if args.representation == "all" else (args.representation,)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-model-") as work:
        log(f"generating {args.objects} objects x {args.views} views at {args.resolution} px")
        summary = generate_dataset(os.path.join(work, "shards"), objects=args.objects, views=args.views,
                                   resolution=args.resolution, seed=0, holdout_fraction=0.0, workers=1, progress=False)
        reader = StreamingReader(ReaderConfig(summary["train_pattern"], batch_size=args.batch_size,
                                              context_views_min=args.context_views, context_views_max=args.context_views,
                                              target_views=1, num_workers=0, seed=0))
        batch = next(iter(reader)).to(device)

    result = {
        "bench": "model", "device": device_name(device), "device_type": device.type, "dtype": dtype,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "preset": args.preset,
        "batch_size": batch.num_objects, "context_views": batch.num_context_views,
        "image_resolution": list(batch.target_images.shape[-2:]), "repeats": args.repeats, "warmup": args.warmup,
        "representations": {},
    }
    for kind in kinds:
        torch.manual_seed(0)
        model = GOEmbedFusion(ModelConfig(preset=args.preset, representation=kind)).to(device)
        described = model.describe()
        entry = {"parameters": described["parameters"], "state_shape": described["state_shape"],
                 "encode_resolution": model.config.encode_resolution, "rays_per_view": model.rays_per_view}
        log(f"{kind}: renderer and GOEmbed ({args.rays_per_object} rays/object)")
        entry.update(bench_renderer(model, bench, batch.num_objects, args.rays_per_object, batch.num_context_views + 1))
        log(f"{kind}: training step")
        entry["train_step"] = bench_train_step(model, bench, batch)
        # The encoder's whole share of a step (its forward and its part of the backward): the same
        # step with a zero encoding instead, same weights and batch.
        torch.manual_seed(0)
        plain = GOEmbedFusion(ModelConfig(preset=args.preset, representation=kind, encoder="zeros")).to(device)
        without = bench_train_step(plain, bench, batch)["ms"]["total"]
        entry["train_step"]["zero_encoding_total_ms"] = without
        entry["train_step"]["encoder_share"] = round(1 - without / entry["train_step"]["ms"]["total"], 3)
        result["representations"][kind] = entry
    result["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
