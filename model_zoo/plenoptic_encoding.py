"""The Plenoptic-Encoding experiment, in miniature: how much does each encoder tell a network?

    python -m model_zoo.plenoptic_encoding --quick [--out results.json]     # < 15 min on 2 CPU cores
    python -m model_zoo.plenoptic_encoding --full  [--out results.json] [--jobs 2]  # 3 seeds, 96 held-out objects, 1000 steps

For each representation (triplane, voxel grid, per-object MLP) the same network — the preset's
denoiser as a reconstruction network, plus the field decoder ψ — is trained from scratch to
reconstruct objects from 3 context views, given the views encoded by

  (a) GOEmbed and its variants: the zero origin (closed form; rank ≤ 4 per plane/grid), ψ that
      also reads a positional encoding of the point, a fixed random grid origin, a learned one
      (``--full``), and the normalisations ``views`` and ``sum`` (``--full``, triplane);
  (b) unprojection (mean colour of the pixels whose rays cross each cell; grids only);
  (c) no encoding (zeros: the network can only learn an average object),

with ψ trained through the encoder (``create_graph``) wherever the encoder depends on ψ, and
scored by novel-view PSNR on the same held-out objects (same context views) of the synthetic
dataset. Comparisons are paired per object: for every GOEmbed row against unprojection and
against zeros of the same representation, the mean of the per-object PSNR differences (a − b,
each object's difference averaged over seeds first) with a two-sided 95% Student-t interval over
objects. Prints one JSON document: ``rows`` and ``comparisons``.

Every (row, seed) is an independent training run, deterministic given its seed (one torch thread
each), so ``--jobs N`` runs N of them at once in separate processes with the same results as one
at a time. With ``--out``, each finished run is also appended to ``<out>.runs.jsonl``; a rerun with
the same settings reads it and trains only what is missing, so a crash or a killed job loses at
most the runs in flight.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

import torch
from scipy import stats

from data_pipeline.synthetic import generate_dataset
from model_zoo.experiment import FitConfig, evaluate_novel_views, fit
from model_zoo.goembedfusion import GOEmbedFusion, ModelConfig


@dataclass(frozen=True)
class Run:
    representation: str
    encoder: str  # goembed | unprojection | zeros
    variant: str | None = None  # GOEmbed: zero origin | positional psi | random origin | learned origin
    normalisation: str | None = None  # GOEmbed only

    def key(self) -> dict:
        return {"representation": self.representation, "encoder": self.encoder, "variant": self.variant,
                "normalisation": self.normalisation}

    def model_config(self, resolution: int) -> ModelConfig:
        extra = {}
        if self.variant == "positional psi":
            extra["decoder_point_frequencies"] = 4
        elif self.variant in ("random origin", "learned origin"):
            extra["goembed_origin"] = self.variant.split()[0]
        return ModelConfig(representation=self.representation, encoder=self.encoder,
                           goembed_normalisation=self.normalisation or "coverage", encode_resolution=resolution,
                           reconstruction_prob=1.0, context_dropout=0.0, train_decoder_through_encoder=True,
                           rays_per_view=256, **extra)


def goembed(representation: str, variant: str = "zero origin", normalisation: str = "coverage") -> Run:
    return Run(representation, "goembed", variant, normalisation)


QUICK = [
    *(r for kind in ("triplane", "voxel") for r in (
        goembed(kind), goembed(kind, "positional psi"), goembed(kind, "random origin"),
        Run(kind, "unprojection"), Run(kind, "zeros"))),
    goembed("mlp"), Run("mlp", "zeros"),
]
FULL = QUICK + [goembed("triplane", "learned origin"), goembed("voxel", "learned origin"),
                goembed("triplane", normalisation="views"), goembed("triplane", normalisation="sum")]


def relative_cost(run: Run) -> float:
    """Seconds per step of the run's kind in the README's --quick table (rounded): used only to start
    the longest runs first, so parallel jobs finish together."""
    if run.encoder != "goembed":
        return 0.1 if run.encoder == "zeros" or run.representation == "triplane" else 0.25
    if run.variant == "positional psi":
        return 0.7
    return {"triplane": 0.3, "voxel": 0.35, "mlp": 0.45}[run.representation]


def run_one(run: Run, train: str, holdout: str, steps: int, seed: int, resolution: int, heldout: int,
            progress: bool = True) -> dict:
    torch.manual_seed(seed)
    model = GOEmbedFusion(run.model_config(resolution))
    start = time.perf_counter()
    history = fit(model, train, FitConfig(steps=steps, lr=2e-3, seed=seed), progress=progress)
    seconds = time.perf_counter() - start
    scores = evaluate_novel_views(model, holdout, context_views=3, max_objects=heldout, seed=seed)
    last = history[-10:]
    return {"psnr": scores["psnr"], "baseline": scores["baseline_mean_colour_psnr"], "per_object": scores["per_object"],
            "final_train_loss": sum(h["loss"] for h in last) / len(last), "seconds": seconds,
            "seconds_per_step": seconds / steps,
            "origin_opacity": (sum(h.get("origin_opacity", 0.0) for h in last) / len(last)) if run.encoder == "goembed" else None}


def paired(a: dict[str, list[float]], b: dict[str, list[float]]) -> dict:
    """Mean per-object difference a − b (each object's runs averaged over seeds) and its 95% t interval."""
    common = sorted(set(a) & set(b))
    deltas = [sum(a[o]) / len(a[o]) - sum(b[o]) / len(b[o]) for o in common]
    n = len(deltas)
    mean = sum(deltas) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in deltas) / (n - 1)) if n > 1 else float("nan")
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"delta_psnr": round(mean, 3), "ci95": [round(mean - half, 3), round(mean + half, 3)], "objects": n}


def compare(runs: list[Run], per_object: dict[Run, dict[str, list[float]]], seeds: int) -> list[dict]:
    comparisons = []
    for a in runs:
        if a.encoder != "goembed":
            continue
        for baseline in ("unprojection", "zeros"):
            b = Run(a.representation, baseline)
            if b not in per_object:
                continue
            result = paired(per_object[a], per_object[b])
            low, high = result["ci95"]
            verdict = "a better" if low > 0 else "b better" if high < 0 else "no difference resolved"
            comparisons.append({"a": a.key(), "b": b.key(), **result, "seeds": seeds, "verdict": verdict,
                                "interval": "two-sided 95% Student-t over per-object paired differences"})
    return comparisons


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_task(run: Run, seed: int, settings: dict, train: str, holdout: str) -> tuple[Run, int, dict]:
    result = run_one(run, train, holdout, settings["steps"], seed, settings["encode_resolution"],
                     settings["heldout"], progress=False)
    return run, seed, result


def run_all(tasks: list[tuple[Run, int]], settings: dict, train: str, holdout: str, jobs: int, threads: int,
            journal: str | None) -> dict[tuple[Run, int], dict]:
    """Train and score every (row, seed), ``jobs`` at a time; ``journal`` keeps finished ones across reruns."""
    done: dict[tuple[Run, int], dict] = {}
    if journal and os.path.exists(journal):
        wanted = {(json.dumps(run.key(), sort_keys=True), seed): (run, seed) for run, seed in tasks}
        with open(journal) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a crash mid-write
                    continue
                task = wanted.get((json.dumps(entry["run"], sort_keys=True), entry["seed"]))
                if task and entry["settings"] == settings:
                    done[task] = entry["result"]
        if done:
            print(f"{journal}: {len(done)} of {len(tasks)} runs already done", file=sys.stderr, flush=True)

    def record(run: Run, seed: int, result: dict) -> None:
        done[(run, seed)] = result
        print(json.dumps({"finished": {**run.key(), "seed": seed}, "psnr": round(result["psnr"], 2),
                          "seconds": round(result["seconds"], 1), "done": f"{len(done)}/{len(tasks)}"}),
              file=sys.stderr, flush=True)
        if journal:
            with open(journal, "a") as f:
                f.write(json.dumps({"settings": settings, "run": run.key(), "seed": seed, "result": result}) + "\n")

    todo = sorted((t for t in tasks if t not in done), key=lambda t: -relative_cost(t[0]))  # longest first
    if jobs <= 1:
        for run, seed in todo:
            record(run, seed, run_one(run, train, holdout, settings["steps"], seed, settings["encode_resolution"],
                                      settings["heldout"]))
        return done
    # spawn, not fork: a forked child of a process that has used torch's thread pool can hang.
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures = [pool.submit(_run_task, run, seed, settings, train, holdout) for run, seed in todo]
        for future in as_completed(futures):
            record(*future.result())
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="1 seed, 120 steps, 32 held-out objects, the QUICK rows")
    mode.add_argument("--full", action="store_true", help="3 seeds, 1000 steps, 96 held-out objects, the FULL rows")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (overrides the mode)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per run (overrides the mode)")
    parser.add_argument("--heldout", type=int, default=None, help="held-out objects scored (overrides the mode)")
    parser.add_argument("--resolution", type=int, default=32, help="image width in pixels (default %(default)s)")
    parser.add_argument("--encode-resolution", type=int, default=16,
                        help="views are resized to this width for every encoder (default %(default)s)")
    parser.add_argument("--data", default=None, help="directory of synthetic shards (default: a fresh temporary one)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per run (default 1: tiny ops on few cores)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once, each in its own process (default 1; use the core count / --threads)")
    parser.add_argument("--out", default=None, help="also write the JSON document here")
    args = parser.parse_args(argv)
    full = args.full
    steps = args.steps or (1000 if full else 120)
    seeds = args.seeds or (3 if full else 1)
    heldout = args.heldout or (96 if full else 32)
    runs = FULL if full else QUICK
    encode_resolution = args.encode_resolution
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    objects = heldout * 8  # 1/8 held out
    data = args.data or tempfile.mkdtemp(prefix="plenoptic-")
    if not os.path.exists(os.path.join(data, "train-000000.tar")):
        generate_dataset(data, objects=objects, views=16, resolution=args.resolution, seed=1,
                         holdout_fraction=0.125, progress=False)
    train, holdout = os.path.join(data, "train-*.tar"), os.path.join(data, "holdout-*.tar")
    settings = {"steps": steps, "heldout": heldout, "encode_resolution": encode_resolution,
                "resolution": args.resolution, "objects": objects}
    journal = args.out + ".runs.jsonl" if args.out else None
    finished = run_all([(run, seed) for run in runs for seed in range(seeds)], settings, train, holdout,
                       args.jobs, args.threads, journal)
    rows, per_object = [], {}
    for run in runs:
        results = [finished[(run, seed)] for seed in range(seeds)]
        per_object[run] = {}
        for result in results:
            for obj, value in result["per_object"].items():
                per_object[run].setdefault(obj, []).append(value)
        mean = lambda key: sum(r[key] for r in results) / len(results)  # noqa: E731
        row = {**run.key(), "heldout_psnr": round(mean("psnr"), 2), "heldout_psnr_per_seed": [round(r["psnr"], 2) for r in results],
               "mean_colour_baseline_psnr": round(mean("baseline"), 2), "final_train_loss": round(mean("final_train_loss"), 4),
               "origin_opacity": None if run.encoder != "goembed" else round(mean("origin_opacity"), 4),
               "steps": steps, "seeds": seeds, "seconds": round(sum(r["seconds"] for r in results), 1),
               "seconds_per_step": round(mean("seconds_per_step"), 3), "heldout_objects": len(per_object[run])}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    rows.append({"representation": "mlp", "encoder": "unprojection", "heldout_psnr": None,
                 "note": "an MLP's weights have no cells for rays to cross"})
    document = {"experiment": "plenoptic_encoding", "mode": "full" if full else "quick", "steps_per_run": steps,
                "seeds": seeds, "objects": objects, "heldout_objects": heldout, "resolution": args.resolution,
                "encode_resolution": encode_resolution,
                "context_views": 3, "decoder_trained_through_encoder": True, "rows": rows,
                "comparisons": compare(runs, per_object, seeds), "wall_seconds": round(time.perf_counter() - start, 1),
                "cpu_count": os.cpu_count(), "load_average_at_end": list(os.getloadavg())}
    text = json.dumps(document)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
