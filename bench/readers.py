"""This project's streaming reader against its peers, on the same work, measured in one run.

    python bench/readers.py [--objects 512 --views 24 --resolution 64 --passes 4]
    pip install -e '.[bench]'   # the peers: plain webdataset is a dependency; MosaicML streaming, litdata

The work: synthetic objects (``--objects`` x ``--views`` views at ``--resolution`` px, 64 objects
per shard, so a shard is like one category), parse each object's metadata, pick 3 context + 1
target views with a seeded RNG, decode those 4 PNGs, build the cameras, batch 8 objects. Every
reader runs that same per-object function (``decode_object`` below) except this project's, which
is the thing measured. Readers:

* ``project``: ``data_pipeline.reader.StreamingReader`` on the tar shards;
* ``webdataset``: plain ``webdataset.WebDataset`` (shard shuffle, shuffle buffer 1000) + DataLoader;
* ``mosaicml``: MosaicML ``streaming.StreamingDataset`` on the same objects written as MDS;
* ``litdata``: ``litdata.StreamingDataset`` on the same objects written by ``litdata.optimize``.

Each (reader, workers, source) runs in a fresh process (so peak memory is its own, and no
reader's global state — litdata's ``spawn``, MosaicML's shared memory — touches another's). It
reports: steady objects/s (median of ``--passes`` epochs after a warm-up epoch), first-batch
latency (a fresh reader: from ``iter()`` to the first batch), distinct source shards per batch of
8 (categories per batch; a uniform shuffle gives 5.35 on the default data), and peak RSS (the
main process and the largest loader worker). Sources: local disk, and the real local S3 server
(SeaweedFS on loopback; MosaicML and litdata download chunks into a local cache first).

Ceilings, in one process, from bytes already in memory: ``decode`` (the 4 PNG decodes per object
only), ``in_memory`` (the shards' bytes in RAM, members found as the project's reader finds them —
sliced by the index's member table where the index has one, else by walking the tar headers with
the project's parser — then the per-object function and batching: metadata, cameras, decode,
collate) and ``in_memory_preparsed`` (the same from members already split). Machine load
drifts while the children run one after another, so each child also times ``in_memory`` right
after each of its epochs; ``vs_in_memory_ceiling`` is the median of those paired ratios (wall
clock), ``cpu_vs_in_memory_ceiling`` the same in CPU time of the process (0 workers only: it
ignores other jobs' load), and the ``project_vs_<peer>`` ratios divide the project's paired ratio
by the peer's. Readers missing here are reported as "not installed". The machine may be shared
with other jobs: compare ratios within one run, not absolute numbers across runs. MosaicML and
litdata copy chunks from S3 into a local cache during the warm-up epoch and read that cache
afterwards; this project's reader and webdataset read from S3 in every epoch.

Prints one JSON line, and with ``--markdown`` the README table too.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import orjson  # noqa: E402
import torch  # noqa: E402

from data_pipeline.schema import decode_image  # noqa: E402

BATCH, CONTEXT, TARGET = 8, 3, 1
PEERS = ("webdataset", "mosaicml", "litdata")


# --------------------------------------------------------------------------- the shared per-object work


def decode_object(meta_bytes, view_bytes, rng: np.random.Generator) -> dict:
    """What every peer does per object: metadata, 4 seeded views, cameras, PNG decodes (uint8 HWC)."""
    meta = orjson.loads(meta_bytes)
    views = meta["views"]
    chosen = rng.permutation(len(views))[:CONTEXT + TARGET]
    K = np.array([views[i]["K"] for i in chosen], dtype=np.float32)
    c2w = np.array([views[i]["c2w"] for i in chosen], dtype=np.float32)
    images = [decode_image(view_bytes(views[i]["name"])) for i in chosen]  # the project's decoder, for everyone
    return {"images": np.stack(images), "K": K, "c2w": c2w, "object_id": meta["object_id"]}


def collate(items: list[dict]) -> dict:
    images = torch.from_numpy(np.stack([item["images"] for item in items])).permute(0, 1, 4, 2, 3).float().div_(255)
    return {"images": images, "K": torch.from_numpy(np.stack([i["K"] for i in items])),
            "c2w": torch.from_numpy(np.stack([i["c2w"] for i in items])), "object_ids": [i["object_id"] for i in items]}


# --------------------------------------------------------------------------- data in each format


def load_objects(tar_urls: list[str]) -> list[tuple[int, str, dict[str, bytes]]]:
    """(source shard, key, {suffix: bytes}) of every object, read from the tar shards."""
    from data_pipeline.shards import iter_tar_groups

    out = []
    for shard, url in enumerate(tar_urls):
        with open(url, "rb") as f:
            out += [(shard, key, members) for key, _, members in iter_tar_groups(f)]
    return out


def _columns(members: dict[str, bytes]) -> dict[str, bytes]:
    """An object as one column per member (MDS column names: no dots)."""
    return {suffix.replace(".", "_"): data for suffix, data in members.items()}


def _member(raw: dict):
    return lambda name: raw[name.replace(".", "_")]


def write_mds(objects, out: str) -> None:
    _torchvision_placeholder()
    from streaming import MDSWriter

    columns = {name: "bytes" for name in _columns(objects[0][2])}
    with MDSWriter(out=out, columns=columns, size_limit=1 << 26) as writer:
        for _, _, members in objects:
            writer.write(_columns(members))


def write_litdata(objects, out: str) -> None:
    import litdata

    previous = multiprocessing.get_start_method(allow_none=True)
    litdata.optimize(fn=_litdata_item, inputs=[_columns(m) for _, _, m in objects], output_dir=out,
                     chunk_bytes="64MB", num_workers=1)
    # litdata.optimize switches the process to "spawn"; the rest of this process expects fork
    multiprocessing.set_start_method(previous or "fork", force=True)


def _litdata_item(columns: dict) -> dict:
    return columns


# --------------------------------------------------------------------------- one measurement (child process)


def _peer_loader(name: str, spec: dict, workers: int):
    seed = spec["seed"]
    if name == "webdataset":
        import webdataset as wds

        from data_pipeline import storage

        storage.register_webdataset_s3()

        def work(sample):
            rng = np.random.default_rng([seed, int.from_bytes(sample["__key__"].encode()[-6:], "big")])
            return decode_object(sample["meta.json"], lambda n: sample[n], rng)

        urls = spec["urls"]
        dataset = (wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=wds.split_by_node, empty_check=False, seed=seed)
                   .shuffle(1000).map(work).batched(BATCH, collation_fn=collate, partial=False))
        return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                           multiprocessing_context="fork" if workers else None)
    if name == "mosaicml":
        _torchvision_placeholder()
        from streaming import StreamingDataset
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()

        class Decoded(StreamingDataset):
            def __getitem__(self, index):
                raw = super().__getitem__(index)
                return decode_object(raw["meta_json"], _member(raw), np.random.default_rng([seed, index]))

        kwargs = {"local": spec["path"]} if spec["source"] == "local" else {"remote": spec["path"], "local": spec["cache"]}
        dataset = Decoded(**kwargs, batch_size=BATCH, shuffle=True, shuffle_seed=seed)
        return torch.utils.data.DataLoader(dataset, batch_size=BATCH, num_workers=workers, collate_fn=collate,
                                           multiprocessing_context="fork" if workers else None)
    if name == "litdata":
        import litdata

        class Decoded(litdata.StreamingDataset):
            def __getitem__(self, index):
                raw = super().__getitem__(index)
                position = index.index if hasattr(index, "index") else int(index)
                return decode_object(raw["meta_json"], _member(raw), np.random.default_rng([seed, position]))

        kwargs = {}
        if spec["source"] == "s3":  # litdata hands these to boto3's client()
            options = spec["storage_options"]
            # litdata fetches chunks with obstore, which refuses plain-http endpoints (the local
            # server) unless told otherwise; litdata has no setting for it
            from litdata.streaming import downloader

            if isinstance(getattr(downloader, "_OBSTORE_CLIENT_OPTIONS", None), dict):
                downloader._OBSTORE_CLIENT_OPTIONS["allow_http"] = "true"
            kwargs = {"storage_options": {"endpoint_url": options["endpoint_url"], "aws_access_key_id": options["key"],
                                          "aws_secret_access_key": options["secret"]}, "cache_dir": spec["cache"]}
        dataset = Decoded(spec["path"], shuffle=True, seed=seed, **kwargs)
        return litdata.StreamingDataLoader(dataset, batch_size=BATCH, num_workers=workers, collate_fn=collate)
    raise ValueError(name)


def _torchvision_placeholder() -> None:
    """MosaicML streaming imports torchvision at import time (for its vision datasets, unused here);
    torchvision's PyPI wheel does not import against this machine's CPU torch, so an empty module
    stands in for it when the real one cannot be imported."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        import types

        import importlib.machinery

        for name in ("torchvision", "torchvision.datasets", "torchvision.transforms", "torchvision.transforms.functional"):
            sys.modules[name] = types.ModuleType(name)
            sys.modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules["torchvision.datasets"].VisionDataset = object
        sys.modules["torchvision.transforms.functional"].to_tensor = None


def _peak_rss_mb(pid: int | str = "self") -> float:
    """A process's peak RSS since exec (VmHWM). Not ru_maxrss: Linux carries that over from
    the forking parent across exec, so every child would report the driver's peak."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:  # a child that has just exited
        return 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child_pids() -> list[int]:
    """The live child processes of this process (loader workers)."""
    pids = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids += [int(pid) for pid in f.read().split()]
        except FileNotFoundError:
            pass
    return pids


def measure(spec: dict) -> dict:
    """Runs in a child process: one reader, one worker count, one source."""
    name, workers, passes = spec["reader"], spec["workers"], spec["passes"]
    shard_of = spec["shard_of"]
    if name == "project":
        from data_pipeline.reader import ReaderConfig, StreamingReader

        def make():
            return StreamingReader(ReaderConfig(spec["pattern"], batch_size=BATCH, context_views_min=CONTEXT,
                                                context_views_max=CONTEXT, target_views=TARGET, num_workers=workers,
                                                seed=spec["seed"], storage_options=spec.get("storage_options")))

        def ids(batch):
            return batch.object_ids
    else:
        def make():
            return _peer_loader(name, spec, workers)

        def ids(batch):
            return batch["object_ids"]

    loader = make()
    start = time.perf_counter()
    first = next(iter(loader))
    first_batch_s = time.perf_counter() - start
    del first
    rates, ceiling_rates, distinct, epoch_objects, cpu_rates, ceiling_cpu_rates = [], [], [], [], [], []
    for epoch in range(passes + 1):  # the first full epoch is the warm-up (workers, caches, downloads)
        if epoch == 1:
            # Peak memory of the reader alone: after the warm-up epoch, before the ceiling's data.
            peak_rss = _peak_rss_mb()
            # workers: the largest one, counting the pages it shares with the main process (as top does)
            # (finished loader workers, as getrusage counts them; persistent workers are still alive)
            peak_worker_rss = max([resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024]
                                  + [_peak_rss_mb(pid) for pid in _child_pids()])
            # Machine load drifts while children run one after another, so each child also times
            # the in-memory ceiling right after each of its epochs: the paired ratio is robust to it.
            objects_in_memory = load_objects(spec["tar_local"])
            in_memory = _in_memory_pass(_shard_bytes(spec["tar_local"]), spec["seed"], spec["tar_local"])
            in_memory()  # warm-up
        if name == "project":
            loader.set_epoch(epoch + 1)
        elif name == "mosaicml" or name == "litdata":
            if hasattr(loader.dataset, "set_epoch"):
                loader.dataset.set_epoch(epoch + 1)
        start, cpu_start, objects = time.perf_counter(), time.process_time(), 0
        for batch in loader:
            batch_ids = ids(batch)
            objects += len(batch_ids)
            distinct.append(len({shard_of[i] for i in batch_ids}))
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        if epoch:
            rates.append(objects / seconds)
            cpu_rates.append(objects / cpu_seconds)
            epoch_objects.append(objects)
            start, cpu_start = time.perf_counter(), time.process_time()
            in_memory()
            ceiling_rates.append(len(objects_in_memory) / (time.perf_counter() - start))
            ceiling_cpu_rates.append(len(objects_in_memory) / (time.process_time() - cpu_start))
    # A fresh reader's first batch in this (now warm) process: what each epoch start or resume costs.
    warm_loader = make()
    start = time.perf_counter()
    next(iter(warm_loader))
    warm_first_batch_s = time.perf_counter() - start
    del warm_loader
    return {"objects_per_s": round(statistics.median(rates), 1), "objects_per_s_passes": [round(r, 1) for r in rates],
            "vs_in_memory_ceiling": round(statistics.median(r / c for r, c in zip(rates, ceiling_rates)), 3),
            # objects per CPU-second of this process vs the ceiling's: insensitive to other jobs'
            # load, and meaningful only without loader workers (their CPU is not in this process)
            "cpu_vs_in_memory_ceiling": (round(statistics.median(r / c for r, c in zip(cpu_rates, ceiling_cpu_rates)), 3)
                                         if not workers else None),
            "first_batch_warm_ms": round(warm_first_batch_s * 1000, 1),
            "objects_per_epoch": epoch_objects[0], "first_batch_cold_ms": round(first_batch_s * 1000, 1),
            "distinct_shards_per_batch": round(float(np.mean(distinct)), 2),
            "peak_rss_mb": round(peak_rss, 1), "peak_rss_worker_mb": round(peak_worker_rss, 1) if workers else None}


# --------------------------------------------------------------------------- ceilings (this process)


def _in_memory_pass(shard_bytes: list[bytes], seed: int, urls: list[str] | None = None):
    """One in-memory epoch: the shards' bytes already in RAM, parsed (members found as the
    project's reader finds them, metadata), 4 views decoded per object, batches of 8 collated —
    what a reader does minus the I/O and the sampling.

    Members are found with the shard index's member table when it has one (sliced by their
    offsets, the sizes and names checked against the tar headers: the reader's ranged-read path,
    here over a whole shard at once), else by walking the tar headers with the project's parser.
    """
    import io

    from data_pipeline.shards import iter_tar_groups, load_or_build_index, span_bytes
    from data_pipeline.shards.ranges import groups_from_table  # the reader's own member slicing

    indices = [load_or_build_index(url) for url in urls] if urls else [None] * len(shard_bytes)

    def groups(data: bytes, index):
        if index is not None and index.members is not None and len(index):
            base = data[index.offsets[0]:]
            found = groups_from_table(index, 0, len(index), base)
            if found is not None:
                return ({suffix: span_bytes(base, span) for suffix, span in members.items()} for _, members in found)
        return (members for _, _, members in iter_tar_groups(io.BytesIO(data)))

    def run():
        items, i = [], 0
        for data, index in zip(shard_bytes, indices):
            for members in groups(data, index):
                items.append(decode_object(members["meta.json"], members.__getitem__, np.random.default_rng([seed, i])))
                i += 1
                if len(items) == BATCH:
                    collate(items)
                    items = []
    return run


def _preparsed_pass(objects, seed: int):
    """The stricter ceiling: members already split (no tar parsing), then as _in_memory_pass."""
    def run():
        items = []
        for i, (_, _, members) in enumerate(objects):
            items.append(decode_object(members["meta.json"], members.__getitem__, np.random.default_rng([seed, i])))
            if len(items) == BATCH:
                collate(items)
                items = []
    return run


def _shard_bytes(urls: list[str]) -> list[bytes]:
    out = []
    for url in urls:
        with open(url, "rb") as f:
            out.append(f.read())
    return out


def ceilings(objects, tar_urls: list[str], passes: int, seed: int) -> dict:
    rng_for = [np.random.default_rng([seed, i]) for i in range(len(objects))]
    chosen = [rng_for[i].permutation(len(orjson.loads(m["meta.json"])["views"]))[:CONTEXT + TARGET]
              for i, (_, _, m) in enumerate(objects)]
    names = [[orjson.loads(m["meta.json"])["views"][v]["name"] for v in c] for c, (_, _, m) in zip(chosen, objects)]

    def decode_only():
        for (_, _, members), view_names in zip(objects, names):
            for name in view_names:
                decode_image(members[name])

    in_memory = _in_memory_pass(_shard_bytes(tar_urls), seed, tar_urls)
    preparsed = _preparsed_pass(objects, seed)

    out = {}
    for label, fn in (("decode", decode_only), ("in_memory", in_memory), ("in_memory_preparsed", preparsed)):
        fn()  # warm-up
        times = []
        for _ in range(passes):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[label] = round(len(objects) / statistics.median(times), 1)
    return out


# --------------------------------------------------------------------------- driver


def installed(name: str) -> bool:
    module = {"webdataset": "webdataset", "mosaicml": "streaming", "litdata": "litdata"}[name]
    try:
        if name == "mosaicml":
            _torchvision_placeholder()
        __import__(module)
        return True
    except Exception:
        return False


def run_child(spec: dict, timeout: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")])}
    env.update(spec.pop("env", {}))
    try:
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:  # the exception line of the child's traceback
        lines = [line for line in done.stderr.splitlines() if re.match(r"^[A-Za-z_.]+(Error|Exception)\b", line)]
        return {"error": (lines[-1] if lines else done.stderr.strip()[-300:] or f"exit {done.returncode}")[:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=512)
    parser.add_argument("--views", type=int, default=24)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--passes", type=int, default=4, help="timed epochs per measurement, after one warm-up epoch")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--readers", nargs="+", default=["project", *PEERS])
    parser.add_argument("--sources", nargs="+", default=["local", "s3"])
    parser.add_argument("--data", help="directory to keep the generated data in (default: a fresh temporary one)")
    parser.add_argument("--markdown", action="store_true", help="also print the README table")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return

    from launch.cluster.local_s3 import LocalS3Server
    from data_pipeline.synthetic import generate_dataset

    torch.set_num_threads(1)  # as in the measured children (OMP_NUM_THREADS=1): the ceilings' collate

    work = args.data or tempfile.mkdtemp(prefix="bench-readers-")
    shards = os.path.join(work, f"tar-{args.objects}x{args.views}x{args.resolution}")
    if not os.path.exists(os.path.join(shards, "done")):
        generate_dataset(shards, objects=args.objects, views=args.views, resolution=args.resolution, seed=0,
                         holdout_fraction=0.0, progress=False, objects_per_shard=64)
        open(os.path.join(shards, "done"), "w").close()
    tar_urls = sorted(os.path.join(shards, f) for f in os.listdir(shards) if f.endswith(".tar"))
    objects = load_objects(tar_urls)
    shard_of = {}
    for shard, key, members in objects:
        shard_of[orjson.loads(members["meta.json"])["object_id"]] = shard
    seed = 0
    result = {"bench": "readers", "objects": len(objects), "views": args.views, "resolution": args.resolution,
              "shards": len(tar_urls), "batch": BATCH, "views_decoded_per_object": CONTEXT + TARGET,
              "cpu_count": os.cpu_count(), "machine_shared": True, "passes": args.passes}
    uniform = []
    rng = np.random.default_rng(1)
    for _ in range(2000):
        uniform.append(len({objects[i][0] for i in rng.choice(len(objects), BATCH, replace=False)}))
    result["uniform_distinct_shards_per_batch"] = round(float(np.mean(uniform)), 2)
    result["ceilings_objects_per_s"] = ceilings(objects, tar_urls, args.passes, seed)

    available = {name: name == "project" or installed(name) for name in args.readers}
    formats = {}
    if available.get("mosaicml"):
        formats["mosaicml"] = os.path.join(work, "mds")
        if not os.path.exists(os.path.join(formats["mosaicml"], "index.json")):
            write_mds(objects, formats["mosaicml"])
    if available.get("litdata"):
        formats["litdata"] = os.path.join(work, "litdata")
        if not os.path.exists(os.path.join(formats["litdata"], "index.json")):
            write_litdata(objects, formats["litdata"])

    readers: dict = {name: ({} if ok else "not installed") for name, ok in available.items()}
    server = LocalS3Server() if "s3" in args.sources else None
    try:
        remote = {}
        if server is not None:
            options = server.storage_options()
            bucket = server.create_bucket("bench-readers")
            from data_pipeline import storage

            fs, _ = storage.filesystem(bucket, options)
            # File by file: a retried recursive put (the server slow to answer) copied the folder
            # *into* the half-made destination, one level too deep.
            for source, target in [(shards, "tar"), *((path, name) for name, path in formats.items())]:
                for file in sorted(os.listdir(source)):
                    if os.path.isfile(os.path.join(source, file)):
                        fs.put_file(os.path.join(source, file), f"bench-readers/{target}/{file}")
            remote = {"options": options, "bucket": bucket, "env": server.env()}
        for source in args.sources:
            for name, ok in available.items():
                if not ok:
                    continue
                for workers in args.workers:
                    spec = {"reader": name, "workers": workers, "passes": args.passes, "seed": seed, "source": source,
                            "shard_of": shard_of, "tar_local": tar_urls}
                    if name in ("project", "webdataset"):
                        base = shards if source == "local" else f"{remote['bucket']}/tar"
                        names = [os.path.basename(u) for u in tar_urls]
                        spec["urls"] = [f"{base}/{n}" for n in names]
                        spec["pattern"] = spec["urls"]
                    else:
                        spec["path"] = formats[name] if source == "local" else f"{remote['bucket']}/{name}"
                        spec["cache"] = tempfile.mkdtemp(prefix=f"bench-{name}-cache-")
                    if source == "s3":
                        spec["storage_options"] = remote["options"]
                        spec["env"] = {**remote["env"], "S3_ENDPOINT_URL": remote["options"]["endpoint_url"]}
                    cache = spec.get("cache")
                    readers[name].setdefault(source, {})[f"w{workers}"] = run_child(spec, timeout=600)
                    if cache:  # MosaicML's and litdata's local copies of the chunks
                        shutil.rmtree(cache, ignore_errors=True)
    finally:
        if server is not None:
            server.stop()
    result["readers"] = readers
    def entry(name, source, workers):
        one = readers.get(name)
        return one.get(source, {}).get(f"w{workers}", {}) if isinstance(one, dict) else {}

    # project / peer, each normalised by the in-memory ceiling timed beside it (see measure())
    ratios = {}
    for source in args.sources:
        for workers in args.workers:
            mine = entry("project", source, workers).get("vs_in_memory_ceiling")
            if mine:
                ratios[f"project_vs_in_memory_ceiling_{source}_w{workers}"] = mine
            for peer in PEERS:
                theirs = entry(peer, source, workers).get("vs_in_memory_ceiling")
                if mine and theirs:
                    ratios[f"project_vs_{peer}_{source}_w{workers}"] = round(mine / theirs, 2)
    result["ratios"] = ratios
    print(json.dumps(result))
    if args.markdown:
        print(markdown(result, args.sources, args.workers))


def markdown(result: dict, sources, workers) -> str:
    cols = [f"{s}, {w} workers" for s in sources for w in workers]
    lines = ["| reader | " + " | ".join(f"objects/s ({c})" for c in cols) + " | first batch (ms, local, 0 w) | "
             "distinct shards per batch of 8 | peak RSS MB (main / worker, local, 2 w) |",
             "|---" * (len(cols) + 4) + "|"]
    for name, entry in result["readers"].items():
        if not isinstance(entry, dict):
            lines.append(f"| {name} | " + " | ".join(entry for _ in cols) + f" | {entry} | {entry} | {entry} |")
            continue
        cells = []
        for s in sources:
            for w in workers:
                one = entry.get(s, {}).get(f"w{w}", {})
                cells.append(str(one.get("objects_per_s", one.get("error", "-"))))
        local0 = entry.get("local", {}).get(f"w{workers[0]}", {})
        local2 = entry.get("local", {}).get(f"w{workers[-1]}", {})
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {local0.get('first_batch_warm_ms', '-')} | "
                     f"{local0.get('distinct_shards_per_batch', '-')} | "
                     f"{local2.get('peak_rss_mb', '-')} / {local2.get('peak_rss_worker_mb', '-')} |")
    c = result["ceilings_objects_per_s"]
    lines.append(f"| (in-memory parse+decode+batch ceiling, 1 process) | {c['in_memory']} | | | | |")
    lines.append(f"| (decode-only ceiling, 1 process) | {c['decode']} | | | | |")
    lines.append(f"| (uniform random order) | | | | {result['uniform_distinct_shards_per_batch']} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
