"""Benchmark of the streaming reader, from local disk and from a real S3 server on loopback.

    python bench/data_pipeline.py [--objects 128 --views 24 --resolution 64]

Prints one JSON line. Every reader figure stands beside two ceilings measured in the same run,
on the same bytes, in one process: ``raw_read`` (read the shard files end to end, no parsing)
and ``decode`` (decode, from memory, exactly as many images per object as the reader decodes).
Ratios to those ceilings are what to compare across machines; absolute numbers are not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipeline import storage  # noqa: E402
from data_pipeline.reader import ReaderConfig, StreamingReader  # noqa: E402
from data_pipeline.schema import decode_image, parse_sample  # noqa: E402
from data_pipeline.shards import iter_tar_groups  # noqa: E402
from data_pipeline.synthetic import generate_dataset  # noqa: E402
from launch.cluster.local_s3 import LocalS3Server  # noqa: E402


def time_raw_read(urls: list[str], storage_options: dict | None) -> float:
    start = time.perf_counter()
    for url in urls:
        with storage.open_url(url, "rb", storage_options) as f:
            while f.read(1 << 22):
                pass
    return time.perf_counter() - start


def time_decode(urls: list[str], views_per_object: int) -> float:
    """Decode ``views_per_object`` images of every object from memory (bytes read beforehand)."""
    samples = []
    for url in urls:
        with open(url, "rb") as f:
            samples += [parse_sample(key, members) for key, _, members in iter_tar_groups(f)]
    start = time.perf_counter()
    for sample in samples:
        for view in range(views_per_object):
            decode_image(sample.images[view], sample.width, sample.height)
    return time.perf_counter() - start


def time_reader(pattern: str, workers: int, args, storage_options: dict | None) -> dict:
    """Objects/s over a whole epoch, and in steady state (after the first batch: workers started)."""
    config = ReaderConfig(pattern, batch_size=args.batch_size, context_views_min=args.context_views,
                          context_views_max=args.context_views, target_views=args.target_views,
                          num_workers=workers, drop_last=False, storage_options=storage_options)
    reader = StreamingReader(config)
    start = time.perf_counter()
    first_batch_s, objects, first_objects = None, 0, 0
    for batch in reader:
        objects += batch.num_objects
        if first_batch_s is None:
            first_batch_s, first_objects = time.perf_counter() - start, objects
    total_s = time.perf_counter() - start
    return {"objects": objects, "epoch_s": total_s, "first_batch_s": first_batch_s,
            "steady_objects_per_s": (objects - first_objects) / max(total_s - first_batch_s, 1e-9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=256)
    parser.add_argument("--views", type=int, default=24)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--context-views", type=int, default=3)
    parser.add_argument("--target-views", type=int, default=1)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="bench-data-")
    summary = generate_dataset(os.path.join(work, "shards"), objects=args.objects, views=args.views,
                               resolution=args.resolution, seed=0, holdout_fraction=0.0, progress=False,
                               objects_per_shard=16)
    local_urls = summary["train_shards"]
    num_bytes = sum(os.path.getsize(u) for u in local_urls)
    views_decoded = args.context_views + args.target_views
    decode_s = time_decode(local_urls, views_decoded)
    result = {
        "bench": "data_pipeline", "objects": summary["train_objects"], "views": args.views,
        "resolution": args.resolution, "views_decoded_per_object": views_decoded,
        "dataset_mb": round(num_bytes / 1e6, 2), "cpu_count": os.cpu_count(),
        "decode_ceiling_objects_per_s": round(summary["train_objects"] / decode_s, 1),
    }

    with LocalS3Server() as server:
        options = server.storage_options()
        bucket = server.create_bucket("bench")
        fs, _ = storage.filesystem(bucket, options)
        for url in local_urls:
            for suffix in ("", ".idx.json"):
                fs.put(url + suffix, f"bench/{os.path.basename(url)}{suffix}")
        remote_urls = [f"{bucket}/{os.path.basename(u)}" for u in local_urls]
        sources = {"local": (summary["train_pattern"], local_urls, None),
                   "s3": (bucket + "/" + os.path.basename(summary["train_pattern"]), remote_urls, options)}
        for name, (pattern, urls, opts) in sources.items():
            raw_s = time_raw_read(urls, opts)
            entry = {
                "raw_read_mb_per_s": round(num_bytes / 1e6 / raw_s, 1),
                "raw_read_objects_per_s": round(summary["train_objects"] / raw_s, 1),
                "decode_ceiling_objects_per_s": result["decode_ceiling_objects_per_s"],
            }
            for workers in args.workers:
                run = time_reader(pattern, workers, args, opts)
                per_s = run["objects"] / run["epoch_s"]
                entry[f"reader_w{workers}"] = {
                    "objects_per_s": round(per_s, 1),
                    "mb_per_s": round(num_bytes / 1e6 / run["epoch_s"], 1),
                    "first_batch_s": round(run["first_batch_s"], 3),
                    "steady_objects_per_s": round(run["steady_objects_per_s"], 1),
                    "steady_vs_decode_ceiling": round(run["steady_objects_per_s"] / result["decode_ceiling_objects_per_s"], 3),
                }
            result[name] = entry
    print(json.dumps(result))


if __name__ == "__main__":
    main()
