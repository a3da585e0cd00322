"""The streaming reader: round trip, epoch coverage across ranks x workers, exact and elastic resume,
corrupt data, and S3 (real SeaweedFS server from conftest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from data_pipeline.cameras import intrinsics_from_fov, look_at_c2w
from data_pipeline.reader import ReaderConfig, StreamingReader
from data_pipeline.schema import ObjectSample, decode_image, encode_image, parse_sample
from data_pipeline.shards import ShardWriter, iter_tar_groups, write_index, ShardIndex

SIZE = 8  # pixels: tiny images keep these tests fast


def toy_object(index: int, views: int = 4) -> tuple[ObjectSample, np.ndarray]:
    """An object whose every pixel encodes (object, view), so a test can tell which view it got."""
    rng = np.random.default_rng(index)
    rgb = rng.integers(0, 256, size=(views, SIZE, SIZE, 3), dtype=np.uint8)
    rgb[:, 0, 0, 0] = index % 256  # object id in pixel (0, 0)
    rgb[:, 0, 0, 1] = index // 256
    rgb[:, 0, 0, 2] = np.arange(views)  # view index
    angles = np.linspace(0, 2 * np.pi, views, endpoint=False) + 0.1 * index
    c2w = np.stack([look_at_c2w(np.array([2.5 * np.cos(a), 2.5 * np.sin(a), 0.7]), np.zeros(3)) for a in angles])
    K = np.stack([intrinsics_from_fov(SIZE, SIZE, 0.8)] * views)
    sample = ObjectSample(f"toy-{index:05d}", [encode_image(im) for im in rgb], K, c2w, SIZE, SIZE, source="test")
    return sample, rgb


def write_toy_shards(out: str, counts: list[int], views: int = 4, storage_options=None) -> str:
    """One shard per entry of ``counts`` (uneven on purpose); returns a brace pattern."""
    index = 0
    urls = []
    for shard, count in enumerate(counts):
        if count == 0:  # an empty (but valid) tar, as another tool might leave behind
            path = os.path.join(out, f"part{shard:03d}-000000.tar")
            tarfile.open(path, "w").close()
            write_index(ShardIndex(path, (), (), os.path.getsize(path)))
            continue
        with ShardWriter(out, prefix=f"part{shard:03d}", max_objects=count, storage_options=storage_options) as writer:
            for _ in range(count):
                writer.write(toy_object(index, views)[0])
                index += 1
        urls += writer.shard_urls
    base = out.rstrip("/")
    if len(counts) == 1:
        return base + "/part000-000000.tar"
    return base + "/part{" + ",".join(f"{i:03d}" for i in range(len(counts))) + "}-000000.tar"


def ids_of(batch) -> list[int]:
    """Object ids decoded from the pixels (not from metadata), so images are checked too."""
    pixel = (batch.target_images[:, 0, :, 0, 0] * 255).round().long()
    return (pixel[:, 0] + 256 * pixel[:, 1]).tolist()


def fingerprint(batch) -> tuple:
    return (tuple(batch.object_ids), tuple(batch.context_view_indices.flatten().tolist()),
            tuple(batch.target_view_indices.flatten().tolist()), round(float(batch.target_images.sum()), 3))


def test_shard_round_trip_is_bit_exact(tmp_path):
    samples = [toy_object(i) for i in range(5)]
    with ShardWriter(str(tmp_path), "rt", max_objects=2) as writer:
        for sample, _ in samples:
            writer.write(sample)
    assert len(writer.shard_urls) == 3
    read = []
    for url in writer.shard_urls:
        with open(url, "rb") as f:
            read += [parse_sample(key, members) for key, _, members in iter_tar_groups(f)]
    assert [s.object_id for s in read] == [s.object_id for s, _ in samples]
    for got, (want, rgb) in zip(read, samples):
        assert got.images == want.images  # encoded PNG bytes identical
        assert np.array_equal(got.intrinsics, want.intrinsics) and got.intrinsics.dtype == np.float64
        assert np.array_equal(got.c2w, want.c2w)  # bit-exact float64
        for view in range(want.num_views):
            assert np.array_equal(decode_image(got.images[view], SIZE, SIZE), rgb[view])
    # Plain tools can read the shards: tar lists members, webdataset groups them.
    listing = subprocess.run(["tar", "tf", writer.shard_urls[0]], capture_output=True, text=True, check=True).stdout.split()
    assert listing[:2] == ["toy-00000.meta.json", "toy-00000.view000.png"]
    import webdataset as wds
    keys = [s["__key__"] for s in wds.WebDataset(writer.shard_urls, shardshuffle=False)]
    assert keys == [s.key for s, _ in samples]


def test_reader_images_and_cameras_match_the_stored_object(tmp_path):
    pattern = write_toy_shards(str(tmp_path), [3, 4])
    config = ReaderConfig(pattern, batch_size=2, context_views_min=1, context_views_max=2, target_views=1,
                          num_workers=0, drop_last=False)
    for batch in StreamingReader(config):
        for b, object_id in enumerate(batch.object_ids):
            index = int(object_id.split("-")[1])
            sample, rgb = toy_object(index)
            for images, Ks, c2ws, views in ((batch.context_images, batch.context_K, batch.context_c2w, batch.context_view_indices),
                                            (batch.target_images, batch.target_K, batch.target_c2w, batch.target_view_indices)):
                for j, view in enumerate(views[b].tolist()):
                    expected = torch.from_numpy(rgb[view]).permute(2, 0, 1).float() / 255
                    assert torch.equal(images[b, j], expected)
                    assert torch.allclose(c2ws[b, j], torch.from_numpy(sample.c2w[view]).float())
                    assert torch.allclose(Ks[b, j], torch.from_numpy(sample.intrinsics[view]).float())
        assert set(batch.context_view_indices[0].tolist()).isdisjoint(batch.target_view_indices[0].tolist())


def test_resize_scales_intrinsics(tmp_path):
    pattern = write_toy_shards(str(tmp_path), [4])
    config = ReaderConfig(pattern, batch_size=2, context_views_min=0, context_views_max=0, target_views=2,
                          resolution=4, num_workers=0)
    batch = next(iter(StreamingReader(config)))
    assert batch.target_images.shape == (2, 2, 3, 4, 4)
    assert batch.context_images.shape == (2, 0, 3, 4, 4)
    full = intrinsics_from_fov(SIZE, SIZE, 0.8)
    assert torch.allclose(batch.target_K[0, 0], torch.tensor(full * np.array([[0.5], [0.5], [1.0]])).float())


UNEVEN = [1, 9, 2, 13, 3, 0, 6]  # 34 objects; one empty shard


@pytest.mark.parametrize("drop_last", [False, True])
def test_two_ranks_two_workers_cover_the_epoch_once(tmp_path, drop_last):
    pattern = write_toy_shards(str(tmp_path), UNEVEN)
    total = sum(UNEVEN)
    per_rank = []
    for rank in range(2):
        config = ReaderConfig(pattern, batch_size=3, context_views_min=0, context_views_max=2, target_views=1,
                              num_workers=2, seed=7, drop_last=drop_last, shuffle_block_objects=4)
        reader = StreamingReader(config, rank=rank, world_size=2)
        batches = list(reader)
        assert len(batches) == len(reader)
        per_rank.append(batches)
        for batch in batches:
            assert ids_of(batch) == [int(i.split("-")[1]) for i in batch.object_ids]
    assert len(per_rank[0]) == len(per_rank[1])  # equal batch counts: no rank can hang the others
    seen = Counter(i for batches in per_rank for b in batches for i in ids_of(b))
    slots = 4
    if drop_last:
        # No duplicates; at most (total mod slots) + slots * (batch_size - 1) left out.
        assert max(seen.values()) == 1
        assert total - len(seen) <= total % slots + slots * 2
    else:
        # Every object at least once; padding repeats fewer than `slots` objects (documented).
        assert set(seen) == set(range(total))
        assert sum(seen.values()) - total == -(-total // slots) * slots - total < slots
    # Context sizes vary across batches (k drawn per batch, 0 included).
    ks = {b.num_context_views for batches in per_rank for b in batches}
    assert len(ks) > 1


def test_shuffling_is_deterministic_per_seed_and_epoch(tmp_path):
    pattern = write_toy_shards(str(tmp_path), [5, 5, 6])

    def epochs(seed):
        reader = StreamingReader(ReaderConfig(pattern, batch_size=2, num_workers=0, seed=seed, target_views=1))
        return [[fingerprint(b) for b in reader] for _ in range(2)]

    first = epochs(1)
    assert first == epochs(1)
    assert first[0] != first[1]  # a new order each epoch
    assert first != epochs(2)


RESUME_SCRIPT = r"""
import json, sys
from data_pipeline.reader import ReaderConfig, StreamingReader
from tests.test_reader import fingerprint
config = ReaderConfig(**json.loads(sys.argv[1]))
reader = StreamingReader(config, rank=int(sys.argv[3]), world_size=int(sys.argv[4]))
reader.load_state_dict(json.load(open(sys.argv[2])))
out = []
for _ in range(2):  # finish this epoch and run the next
    out += [fingerprint(b) for b in reader]
print(json.dumps(out))
"""


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_in_a_fresh_process_continues_exactly(tmp_path, workers):
    pattern = write_toy_shards(str(tmp_path / "shards"), [4, 11, 3, 7])
    settings = dict(urls=pattern, batch_size=2, context_views_min=0, context_views_max=3, target_views=1,
                    num_workers=workers, seed=3, shuffle_block_objects=3)
    for rank in range(2):
        full = StreamingReader(ReaderConfig(**settings), rank, 2)
        uninterrupted = [fingerprint(b) for _ in range(2) for b in full]
        reader = StreamingReader(ReaderConfig(**settings), rank, 2)
        head = []
        stop = 3  # not a multiple of the worker count: the next batch comes from worker 1
        for batch in reader:
            head.append(fingerprint(batch))
            if len(head) == stop:
                break
        state_path = tmp_path / f"state{rank}.json"
        state_path.write_text(json.dumps(reader.state_dict()))
        result = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, json.dumps(settings), str(state_path), str(rank), "2"],
                                capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
        assert result.returncode == 0, result.stderr
        tail = [tuple(tuple(x) if isinstance(x, list) else x for x in item) for item in json.loads(result.stdout)]
        assert head + tail == uninterrupted


def test_changed_world_size_continues_without_repeats_or_refuses(tmp_path):
    pattern = write_toy_shards(str(tmp_path), [5, 7, 4, 8])  # 24 objects
    settings = dict(urls=pattern, batch_size=2, target_views=1, num_workers=2, seed=5, drop_last=False)
    consumed, states = [], []
    for rank in range(2):
        reader = StreamingReader(ReaderConfig(**settings), rank, 2)
        for n, batch in enumerate(reader):
            consumed += ids_of(batch)
            if n == 1:
                break
        states.append(reader.state_dict())
    # One rank's state alone is refused with a message that says what to do.
    with pytest.raises(ValueError, match="world_size=2.*needs the states of all 2"):
        StreamingReader(ReaderConfig(**settings), 0, 4).load_state_dict(states[0])
    # With every rank's state the rest of the epoch is split over 4 ranks: nothing repeated or lost.
    rest = []
    lengths = set()
    for rank in range(4):
        reader = StreamingReader(ReaderConfig(**{**settings, "num_workers": 1}), rank, 4)
        reader.load_state_dict(states)
        batches = list(reader)
        lengths.add(len(batches))
        rest += [i for b in batches for i in ids_of(b)]
    assert len(lengths) == 1
    assert sorted(consumed + rest) == list(range(24))


def test_truncated_shard_and_corrupt_image_are_skipped_and_counted(tmp_path, caplog):
    pattern = write_toy_shards(str(tmp_path), [6, 6, 6])
    # Truncate the middle shard half-way through its 4th sample (its index still claims 6).
    middle = str(tmp_path / "part001-000000.tar")
    with open(middle + ".idx.json") as f:
        offsets = json.load(f)["offsets"]
    with open(middle, "r+b") as f:
        f.truncate(offsets[3] + 700)
    # Corrupt one image of object 1 in the first shard: rewrite the shard with garbage bytes.
    first = str(tmp_path / "part000-000000.tar")
    with open(first, "rb") as f:
        groups = list(iter_tar_groups(f))
    with ShardWriter(str(tmp_path), "part000", max_objects=6) as writer:
        for key, _, members in groups:
            sample = parse_sample(key, members)
            if sample.object_id == "toy-00001":
                sample.images = [b"\x89PNG garbage" for _ in sample.images]
            writer.write(sample)
    for workers in (0, 2):
        reader = StreamingReader(ReaderConfig(pattern, batch_size=2, target_views=1, num_workers=workers,
                                              drop_last=False, warn_every_s=60))
        seen = Counter(i for b in reader for i in ids_of(b))
        readable = set(range(18)) - {1, 9, 10, 11}  # object 1 has bad images; 9..11 are past the truncation
        assert set(seen) == readable
        skipped = reader.skipped
        assert skipped.samples == 4
        assert skipped.by_reason == {"undecodable image": 1, "damaged shard": 3}
        assert skipped.by_shard == {first: {"undecodable image": 1}, middle: {"damaged shard": 3}}
        stats = reader.skip_stats()  # the same, JSON-ready, plus what indexing found
        assert stats["by_shard"] == skipped.by_shard and list(stats["damaged_shards"]) == [middle]
        assert "truncated" in stats["damaged_shards"][middle]
    assert "skipped a sample" in caplog.text


def test_reader_streams_the_same_samples_from_s3(tmp_path, s3_server, s3_bucket):
    counts = [3, 5, 2]
    local = write_toy_shards(str(tmp_path), counts)
    remote = write_toy_shards(s3_bucket, counts, storage_options=s3_server.storage_options())
    settings = dict(batch_size=2, target_views=2, context_views_max=2, num_workers=2, seed=11, drop_last=False)
    disk_reader = StreamingReader(ReaderConfig(local, **settings))
    s3_reader = StreamingReader(ReaderConfig(remote, storage_options=s3_server.storage_options(), **settings))
    # two epochs: the second is read by the same (persistent) workers, through their open S3 sessions
    from_disk = [[fingerprint(b) for b in disk_reader] for _ in range(2)]
    from_s3 = [[fingerprint(b) for b in s3_reader] for _ in range(2)]
    assert from_s3 == from_disk and len(from_disk[0]) > 0 and from_disk[0] != from_disk[1]


def test_s3_wrong_credentials_give_a_clear_error(s3_server, s3_bucket):
    pattern = write_toy_shards(s3_bucket, [2], storage_options=s3_server.storage_options())
    bad = {**s3_server.storage_options(), "secret": "not-the-secret"}
    with pytest.raises(RuntimeError, match="denied") as error:
        StreamingReader(ReaderConfig(pattern, batch_size=1, storage_options=bad))
    assert "not-the-secret" not in str(error.value)


DDP_SCRIPT = r"""
import json, os, sys
import torch, torch.distributed as dist
from data_pipeline.reader import ReaderConfig, StreamingReader
from tests.test_reader import ids_of
dist.init_process_group("gloo")
reader = StreamingReader(ReaderConfig(sys.argv[1], batch_size=2, target_views=1, num_workers=2, drop_last=False))
ids, steps = [], 0
for batch in reader:
    # A collective per step, as a training step does: uneven batch counts would hang here.
    total = torch.tensor([float(batch.target_images.sum())])
    dist.all_reduce(total)
    ids += ids_of(batch)
    steps += 1
everyone = [None] * dist.get_world_size()
dist.all_gather_object(everyone, (steps, ids))
if dist.get_rank() == 0:
    print(json.dumps(everyone))
dist.destroy_process_group()
"""


def test_two_real_gloo_ranks_with_uneven_shards_do_not_hang(tmp_path):
    pattern = write_toy_shards(str(tmp_path), [1, 12, 2, 5])  # 20 objects, very uneven shards
    root = os.path.dirname(os.path.dirname(__file__))
    port = 29500 + os.getpid() % 1000
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", DDP_SCRIPT, pattern], env=env, cwd=root,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err
    (steps0, ids0), (steps1, ids1) = json.loads(outputs[0][0])
    assert steps0 == steps1 > 0
    assert set(ids0) | set(ids1) == set(range(20))


def test_bad_camera_is_skipped_with_its_reason(tmp_path):
    with ShardWriter(str(tmp_path), "part000", max_objects=10) as writer:
        for index in range(4):
            sample, _ = toy_object(index)
            if index == 2:
                sample.c2w[1, :3, :3] *= 1.5  # not a rotation any more
            writer.write(sample)
    reader = StreamingReader(ReaderConfig(str(tmp_path / "part000-000000.tar"), batch_size=1, target_views=4,
                                          context_views_max=0, num_workers=0, drop_last=False))
    seen = [i for b in reader for i in ids_of(b)]
    assert 2 not in seen and set(seen) == {0, 1, 3}
    assert reader.skipped.by_reason == {"bad camera": 1}


def test_state_saved_after_the_last_batch_resumes_at_the_next_epoch(tmp_path):
    pattern = write_toy_shards(str(tmp_path), [6])
    settings = dict(urls=pattern, batch_size=2, target_views=1, num_workers=0, seed=1)
    full = StreamingReader(ReaderConfig(**settings))
    first = [fingerprint(b) for b in full]
    second = [fingerprint(b) for b in full]
    reader = StreamingReader(ReaderConfig(**settings))
    iterator = iter(reader)
    for _ in range(len(reader)):
        next(iterator)  # the generator has not yet rolled over to the next epoch
    resumed = StreamingReader(ReaderConfig(**settings))
    resumed.load_state_dict(reader.state_dict())
    assert [fingerprint(b) for b in resumed] == second != first


def test_every_rank_draws_the_same_number_of_context_views_per_batch(tmp_path):
    pattern = write_toy_shards(str(tmp_path), [7, 9, 8])
    per_rank = []
    for rank in range(2):
        reader = StreamingReader(ReaderConfig(pattern, batch_size=2, context_views_min=0, context_views_max=3,
                                              target_views=1, num_workers=2, seed=4), rank, 2)
        per_rank.append([b.num_context_views for b in reader])
    assert per_rank[0] == per_rank[1] and len(set(per_rank[0])) > 1


def distinct_shards_per_batch(batches, per_shard: int) -> list[int]:
    return [len({i // per_shard for i in ids_of(b)}) for b in batches]


@pytest.mark.parametrize("ranks,workers", [(1, 0), (1, 2), (2, 2)])
def test_batches_mix_shards_written_one_category_each(tmp_path, ranks, workers):
    """Shards written category by category (here: shard = category) must not give one-category
    batches: with 8 categories a uniform shuffle of the epoch puts 5.35 distinct categories in a
    batch of 8 (on average); the reader must reach 4.5 however the epoch is split."""
    per_shard = 64 if ranks * workers > 2 else 32
    pattern = write_toy_shards(str(tmp_path), [per_shard] * 8, views=2)
    distinct = []
    for rank in range(ranks):
        for epoch in range(2):
            reader = StreamingReader(ReaderConfig(pattern, batch_size=8, context_views_max=0, target_views=1,
                                                  num_workers=workers, seed=epoch), rank, ranks)
            distinct += distinct_shards_per_batch(list(reader), per_shard)
    assert np.mean(distinct) >= 4.5, (np.mean(distinct), Counter(distinct))
    # The unshuffled order (evaluation) keeps shards whole: one category per batch.
    ordered = StreamingReader(ReaderConfig(pattern, batch_size=8, context_views_max=0, target_views=1, num_workers=0,
                                           shuffle=False))
    assert set(distinct_shards_per_batch(list(ordered), per_shard)) == {1}


def test_persistent_workers_serve_every_epoch_like_fresh_ones(tmp_path):
    """With persistent workers (the default) the same loader processes read epoch after epoch, and
    every epoch is the one fresh workers would read; a mid-epoch resume in between gets its own
    loader, and the epoch after it is served by the persistent workers again."""
    pattern = write_toy_shards(str(tmp_path), [6, 9, 5, 8])
    settings = dict(urls=pattern, batch_size=2, context_views_min=0, context_views_max=2, target_views=1,
                    num_workers=2, seed=5, shuffle_block_objects=4)
    fresh = StreamingReader(ReaderConfig(**settings, persistent_workers=False))
    expected = [[fingerprint(b) for b in fresh] for _ in range(4)]
    reader = StreamingReader(ReaderConfig(**settings))
    got, pids = [], []
    for epoch in range(4):
        if epoch == 2:  # stop after 3 batches, resume the same epoch from the saved state
            head = []
            for batch in reader:
                head.append(fingerprint(batch))
                if len(head) == 3:
                    break
            state = reader.state_dict()
            reader.load_state_dict(json.loads(json.dumps(state)))
            got.append(head + [fingerprint(b) for b in reader])
        else:
            got.append([fingerprint(b) for b in reader])
        pids.append(sorted(w.pid for w in reader._persistent[2]._iterator._workers))
    assert got == expected
    assert expected[0] != expected[1]  # epochs differ: the workers did take up the new epoch
    assert pids[0] == pids[1] == pids[3]  # the same worker processes in every fresh epoch


def test_state_of_an_older_version_is_refused_with_the_way_out(tmp_path):
    pattern = write_toy_shards(str(tmp_path), [6])
    reader = StreamingReader(ReaderConfig(pattern, batch_size=2, context_views_max=1, num_workers=0))
    old = {**reader.state_dict(), "version": 1, "epoch": 3}
    with pytest.raises(ValueError, match=r"version 1 .*before shard pieces.*set_epoch\(4\)"):
        reader.load_state_dict(old)
