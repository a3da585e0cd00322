"""Train on this machine with N processes (torchrun-style): the embedded default with no arguments.

    python launch/local.py                                   # tiny preset, CPU, synthetic data
    python launch/local.py --nproc 2 train.max_steps=50      # 2 ranks over gloo (or NCCL on GPUs)
    python launch/local.py --config configs/tiny_cpu.yaml --run-dir runs/exp1 distributed.zero_stage=3

With no ``--config`` the built-in defaults are used (see configs/tiny_cpu.yaml): if the data
they point at (data/synthetic) is absent it is generated first. Every process gets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT and runs ``python -m trainer.train``; if one
fails the others are stopped. The last line printed is ``run_dir: PATH``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data_pipeline import storage  # noqa: E402
from trainer.config import check_runnable, load_config  # noqa: E402
from trainer.distributed import free_port  # noqa: E402

EMBEDDED_DATA = "data/synthetic"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python launch/local.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=1, help="processes (ranks) to start (default: %(default)s)")
    parser.add_argument("--config", default=None, help="YAML run config (default: built-in defaults)")
    parser.add_argument("--run-dir", default=None, help="run directory (default: the config's run_dir, runs/tiny)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    return parser


def ensure_embedded_data(train_urls: str) -> None:
    """Generate the synthetic default dataset when the config points at it and it is not there."""
    if not train_urls.startswith(EMBEDDED_DATA):
        return
    try:
        storage.expand_urls(train_urls)
    except FileNotFoundError:
        from data_pipeline.synthetic import generate_dataset

        summary = generate_dataset(EMBEDDED_DATA, objects=160, views=24, resolution=64, seed=0)
        print(summary["summary"], file=sys.stderr)


def launch(nproc: int, trainer_args: list[str]) -> int:
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // nproc)
    processes = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GOEMBED_LAUNCHER": "local",
               # Ranks share the cores: one OpenMP pool each of the right size, not N oversubscribed ones.
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
        processes.append(subprocess.Popen([sys.executable, "-m", "trainer.train", *trainer_args], env=env, cwd=ROOT))
    try:
        while True:
            codes = [p.poll() for p in processes]
            failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                for p in processes:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                for p in processes:
                    p.wait()
                rank, code = failed[0]
                print(f"rank {rank} exited with status {code}; stopped the other ranks", file=sys.stderr)
                return code if code > 0 else 1
            if all(code == 0 for code in codes):
                return 0
            time.sleep(0.2)
    except KeyboardInterrupt:
        for p in processes:
            p.send_signal(signal.SIGINT)
        for p in processes:
            p.wait()
        return 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.nproc < 1:
        build_parser().error("--nproc must be >= 1")
    overrides = list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    config = load_config(args.config, overrides)  # fails here, once, on a bad config
    check_runnable(config)  # and on what this machine cannot run (train.device=cuda without CUDA, fp16 on CPU)
    ensure_embedded_data(config.data.train_urls)
    trainer_args = (["--config", args.config] if args.config else []) + overrides
    code = launch(args.nproc, trainer_args)
    if code == 0:
        print(f"run_dir: {os.path.abspath(config.run_dir)}")
    return code


if __name__ == "__main__":
    sys.exit(main())
