"""One bad shard never ends a run: malformed, stale or foreign indices, empty and truncated shards,
garbled headers — with 2 ranks x 2 loader workers (real worker processes). Each rank still yields
the same number of batches, the quota of unreadable samples comes from the rest of the epoch, a
resume is still exact, and the skips are counted by reason and by shard URL."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter

import pytest

from data_pipeline.reader import ReaderConfig, StreamingReader, merge_skip_stats
from data_pipeline.shards import INDEX_SUFFIX, read_index
from tests.test_reader import fingerprint, ids_of, write_toy_shards

COUNTS = [6, 6, 6, 6, 6, 6]  # equal counts: the shards (tar records) have equal sizes too


def shard(tmp_path, i: int) -> str:
    return str(tmp_path / f"part{i:03d}-000000.tar")


def damage(tmp_path) -> dict[str, str]:
    """Four kinds of damage in shards 1..4 of COUNTS; returns URL -> what was done to it."""
    # 1: the index of shard 0 copied beside shard 1 (same size, other keys): found at read time
    shutil.copy(shard(tmp_path, 0) + INDEX_SUFFIX, shard(tmp_path, 1) + INDEX_SUFFIX)
    # 2: a 0-byte shard beside its old index
    open(shard(tmp_path, 2), "wb").close()
    # 3: malformed index JSON: the shard is scanned instead, nothing lost
    with open(shard(tmp_path, 3) + INDEX_SUFFIX, "w") as f:
        f.write('{"format": "goembed-shard-index/1", "keys": [')
    # 4: a garbled member header in the middle of the shard (samples from its 4th on are lost)
    offsets = read_index(shard(tmp_path, 4)).offsets
    with open(shard(tmp_path, 4), "r+b") as f:
        f.seek(offsets[3])
        f.write(b"\xff" * 100)
    return {shard(tmp_path, 1): "foreign index", shard(tmp_path, 2): "empty", shard(tmp_path, 3): "bad json",
            shard(tmp_path, 4): "garbled header"}


def test_bad_shards_are_skipped_counted_and_refilled_on_2_ranks_x_2_workers(tmp_path, caplog):
    pattern = write_toy_shards(str(tmp_path), COUNTS)
    damage(tmp_path)
    settings = dict(urls=pattern, batch_size=2, target_views=1, num_workers=2, seed=3, shuffle_block_objects=4,
                    piece_objects=2, warn_every_s=0)
    per_rank, stats = [], []
    for rank in range(2):
        reader = StreamingReader(ReaderConfig(**settings), rank, 2)
        batches = list(reader)
        assert len(batches) == len(reader) > 0  # every rank yields its full epoch
        per_rank.append([i for b in batches for i in ids_of(b)])
        stats.append(reader.skip_stats())
    assert len(per_rank[0]) == len(per_rank[1])
    seen = Counter(i for ids in per_rank for i in ids)
    # Shards 1 and 2 are lost whole; of shard 4 only the sample whose header is garbled (the index
    # lets the reader start again at the next sample).
    lost = set(range(6, 18)) | {27}
    assert not seen.keys() & lost
    total = merge_skip_stats(stats)
    # Every unreadable sample owned by some slot is counted once; the bad shards are named.
    assert set(total["by_shard"]) <= {shard(tmp_path, i) for i in (1, 2, 4)}
    assert {shard(tmp_path, 1), shard(tmp_path, 2)} <= set(total["by_shard"])
    assert total["samples"] == sum(sum(r.values()) for r in total["by_shard"].values()) > 0
    assert set(total["by_reason"]) == {"damaged shard"}
    # What indexing found is reported with the shard's URL and the reason.
    problems = total["damaged_shards"]
    assert set(problems) == {shard(tmp_path, 2), shard(tmp_path, 3)}
    assert "not valid JSON" in problems[shard(tmp_path, 3)] and "truncated" in problems[shard(tmp_path, 2)]
    # The shard with a malformed index is scanned and read whole.
    assert set(range(18, 24)) <= seen.keys()
    # Each skip warning names the shard and the reason (loader workers log in their own process: 0 workers here).
    list(StreamingReader(ReaderConfig(**{**settings, "num_workers": 0})))
    assert f"skipped a sample of {shard(tmp_path, 1)} (damaged shard)" in caplog.text
    assert "an index of another shard" in caplog.text
    assert f"{shard(tmp_path, 4)}: sample 3" in caplog.text and "garbled tar member header" in caplog.text


def test_a_slot_whose_whole_run_is_unreadable_takes_its_quota_from_elsewhere(tmp_path):
    """Without shuffling, rank 1 owns exactly the emptied shard: it reads rank 0's samples instead
    (this run used to end with 'reader slot 1: none of its 8 samples is readable')."""
    pattern = write_toy_shards(str(tmp_path), [8, 8])
    open(shard(tmp_path, 1), "wb").close()
    settings = dict(urls=pattern, batch_size=2, target_views=1, num_workers=1, shuffle=False, seed=0)
    out = []
    for rank in range(2):
        reader = StreamingReader(ReaderConfig(**settings), rank, 2)
        batches = list(reader)
        out.append(([i for b in batches for i in ids_of(b)], reader.skip_stats()))
    (ids0, stats0), (ids1, stats1) = out
    assert len(ids0) == len(ids1) == 8
    assert sorted(ids0) == list(range(8)) and set(ids1) <= set(range(8))
    assert stats0["samples"] == 0
    assert stats1["by_shard"] == {shard(tmp_path, 1): {"damaged shard": 8}}


def test_nothing_readable_fails_with_the_shards_and_reasons(tmp_path):
    pattern = write_toy_shards(str(tmp_path), [4, 4])
    for i in range(2):
        open(shard(tmp_path, i), "wb").close()
    reader = StreamingReader(ReaderConfig(pattern, batch_size=2, target_views=1, num_workers=0))
    with pytest.raises(RuntimeError, match="none of the 8 samples of epoch 0 is readable.*part000"):
        list(reader)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact_while_refilling_around_bad_shards(tmp_path, workers):
    pattern = write_toy_shards(str(tmp_path), COUNTS)
    damage(tmp_path)
    settings = dict(urls=pattern, batch_size=2, target_views=1, num_workers=workers, seed=9, shuffle_block_objects=4,
                    piece_objects=2)
    for rank in range(2):
        full = StreamingReader(ReaderConfig(**settings), rank, 2)
        uninterrupted = [fingerprint(b) for _ in range(2) for b in full]
        reader = StreamingReader(ReaderConfig(**settings), rank, 2)
        head = []
        for batch in reader:
            head.append(fingerprint(batch))
            if len(head) == 3:
                break
        resumed = StreamingReader(ReaderConfig(**settings), rank, 2)
        resumed.load_state_dict(json.loads(json.dumps(reader.state_dict())))
        tail = [fingerprint(b) for _ in range(2) for b in resumed]
        assert head + tail == uninterrupted
        assert resumed.skip_stats() == full.skip_stats()


def test_damaged_shard_counts_survive_an_elastic_resume(tmp_path):
    pattern = write_toy_shards(str(tmp_path), COUNTS)
    damage(tmp_path)
    settings = dict(urls=pattern, batch_size=2, target_views=1, num_workers=1, seed=2, drop_last=False)
    states = []
    for rank in range(2):
        reader = StreamingReader(ReaderConfig(**settings), rank, 2)
        for n, _ in enumerate(reader):
            if n == 2:
                break
        states.append(reader.state_dict())
    before = merge_skip_stats([{**s["finished_skips"]} for s in states] +
                              [raw["skipped"] for s in states for raw in s["slots"].values()])
    readers = [StreamingReader(ReaderConfig(**settings), rank, 3) for rank in range(3)]
    for r in readers:
        r.load_state_dict(states)
    assert len({len(r) for r in readers}) == 1
    for r in readers:
        list(r)
    after = merge_skip_stats([r.skip_stats() for r in readers])
    assert after["samples"] >= before["samples"]
    for url, reasons in before["by_shard"].items():
        for reason, n in reasons.items():
            assert after["by_shard"][url][reason] >= n


def test_missing_index_entirely_still_works_and_validates_nothing_lost(tmp_path):
    pattern = write_toy_shards(str(tmp_path), [5, 5])
    os.remove(shard(tmp_path, 0) + INDEX_SUFFIX)
    reader = StreamingReader(ReaderConfig(pattern, batch_size=2, target_views=1, num_workers=0, drop_last=False))
    assert set(i for b in reader for i in ids_of(b)) == set(range(10))
    assert reader.skip_stats() == {"samples": 0, "by_reason": {}, "by_shard": {}, "damaged_shards": {}}


@pytest.mark.parametrize("kind", ["cut at a member boundary", "garbled header"])
def test_shard_without_index_damaged_mid_way_is_reported(tmp_path, kind):
    """Without a sidecar the shard is scanned; tarfile would end such a shard silently, the scan does not."""
    pattern = write_toy_shards(str(tmp_path), [6, 6])
    url = shard(tmp_path, 1)
    offsets = read_index(url).offsets
    os.remove(url + INDEX_SUFFIX)
    data = bytearray(open(url, "rb").read())
    if kind == "garbled header":
        data[offsets[3]:offsets[3] + 64] = b"\x00\x01" * 32
    else:
        data = data[:offsets[4]]
    open(url, "wb").write(bytes(data))
    reader = StreamingReader(ReaderConfig(pattern, batch_size=2, target_views=1, num_workers=0, drop_last=False))
    assert len(reader.index.shards[1]) < 6
    problems = reader.skip_stats()["damaged_shards"]
    assert list(problems) == [url]
    assert ("no end-of-archive marker" if kind != "garbled header" else "garbled tar member header") in problems[url]
    assert set(i for b in reader for i in ids_of(b)) >= set(range(6))
