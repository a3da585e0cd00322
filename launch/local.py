"""Run the main job on this machine, on the embedded default: a small synthetic dataset on CPU.

    python launch/local.py                      # build data/synthetic if absent, validate, stream it
    python launch/local.py --data-dir D --objects 256 --resolution 128

The trainer does not exist yet (it is the next piece of work); until it does, the main job builds
the embedded dataset, validates its shards and streams one epoch through the training reader
with loader workers, printing what a training step would receive. The last line printed is
``data_dir: PATH``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm  # noqa: E402

from data_pipeline import storage  # noqa: E402
from data_pipeline.reader import ReaderConfig, StreamingReader  # noqa: E402
from data_pipeline.synthetic import generate_dataset  # noqa: E402
from data_pipeline.validate import validate  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data/synthetic", help="where the synthetic shards live (default: %(default)s)")
    parser.add_argument("--objects", type=int, default=160, help="objects to generate when the data is absent (default: %(default)s)")
    parser.add_argument("--views", type=int, default=24, help="views per object (default: %(default)s)")
    parser.add_argument("--resolution", type=int, default=64, help="image width and height in pixels (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="dataset and reader seed (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="objects per batch (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    train_pattern = os.path.join(args.data_dir, "train-*.tar")
    try:
        storage.expand_urls(train_pattern)
        print(f"using the existing dataset in {args.data_dir}")
    except FileNotFoundError:
        summary = generate_dataset(args.data_dir, objects=args.objects, views=args.views,
                                   resolution=args.resolution, seed=args.seed)
        print(summary["summary"])

    report = validate(train_pattern, progress=True)
    print(report.format())
    if not report.ok:
        return report.exit_code

    reader = StreamingReader(ReaderConfig(train_pattern, batch_size=args.batch_size, context_views_min=0,
                                          context_views_max=3, target_views=1, num_workers=args.workers,
                                          seed=args.seed))
    start, objects, context_sizes = time.perf_counter(), 0, set()
    batch = None
    for batch in tqdm(reader, total=len(reader), unit="batch", desc="stream epoch 0"):
        objects += batch.num_objects
        context_sizes.add(batch.num_context_views)
    seconds = time.perf_counter() - start
    print(f"streamed {len(reader)} batches, {objects} objects in {seconds:.1f} s ({objects / seconds:.0f} objects/s) "
          f"with {args.workers} loader worker(s); context views per batch: {sorted(context_sizes)}; "
          f"skipped samples: {reader.skipped.samples}")
    if batch is not None:
        print(f"last batch: target_images {tuple(batch.target_images.shape)}, context_images "
              f"{tuple(batch.context_images.shape)}, target_K {tuple(batch.target_K.shape)}, "
              f"target_c2w {tuple(batch.target_c2w.shape)}, values in [{float(batch.target_images.min()):.2f}, "
              f"{float(batch.target_images.max()):.2f}]")
    print(f"data_dir: {os.path.abspath(args.data_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
