"""The shard index's member table: ranged reads that slice members by their offsets give exactly
what the tar-header walk gives; indices without a table (written before it) still read; a damaged
table or a shard that no longer matches it falls back to the walk (and its diagnosis); the reader's
lazy metadata view agrees with the schema's full parse."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest
import torch

from data_pipeline.meta_view import MetaError, MetaReader
from data_pipeline.reader import ReaderConfig, StreamingReader
from data_pipeline.schema import mask_name, parse_sample
from data_pipeline.shards import (INDEX_SUFFIX, MemberTable, ShardWriter, iter_tar_groups, load_or_build_index,
                                  read_index, read_raw_range, read_sample_range, scan_index)
from data_pipeline.shards.ranges import groups_from_table
from data_pipeline.shards.tar import span_bytes
from tests.test_reader import toy_object, write_toy_shards


def walked(url: str) -> list[tuple[str, int, dict[str, bytes]]]:
    with open(url, "rb") as f:
        return list(iter_tar_groups(f))


def without_table(index):
    return dataclasses.replace(index, members=None)


def strip_tables(pattern_dir: str) -> None:
    """Rewrite every sidecar index as the writer before member tables wrote it."""
    for name in os.listdir(pattern_dir):
        if name.endswith(INDEX_SUFFIX):
            path = os.path.join(pattern_dir, name)
            raw = json.loads(open(path).read())
            raw.pop("members")
            with open(path, "w") as f:
                f.write(json.dumps(raw))


def epoch_digest(pattern: str, **settings) -> str:
    """A hash of every tensor and id of two epochs (0 and 2 loader workers)."""
    digest = hashlib.sha256()
    for workers in (0, 2):
        reader = StreamingReader(ReaderConfig(pattern, batch_size=2, context_views_min=1, context_views_max=2,
                                              target_views=1, num_workers=workers, seed=4, shuffle_block_objects=4,
                                              **settings))
        for batch in reader:
            for name, value in sorted(vars(batch).items()):
                if isinstance(value, torch.Tensor):
                    digest.update(name.encode() + str(tuple(value.shape)).encode() + value.numpy().tobytes())
                elif value is not None:
                    digest.update(repr(value).encode())
    return digest.hexdigest()


def test_member_table_ranges_are_byte_identical_to_the_header_walk(tmp_path):
    # a long key (pax header before its members) and masks (more members per sample) included
    samples = [toy_object(i)[0] for i in range(7)]
    samples[2].object_id = "x" * 120
    for sample in samples[4:]:
        sample.masks = [img for img in sample.images]  # any bytes do for the table; only layout matters
    with ShardWriter(str(tmp_path), "t", max_objects=7) as writer:
        for sample in samples:
            writer.write(sample)
    (url,) = writer.shard_urls
    index = read_index(url)
    assert index.members is not None and len(index.members.layouts) == 2  # with and without masks
    # the writer's table is the scan's, and it survives JSON exactly
    assert index.members.to_json() == scan_index(url).members.to_json()
    assert MemberTable.from_json(json.loads(json.dumps(index.members.to_json()))).to_json() == index.members.to_json()
    groups = walked(url)
    for first in range(len(index)):
        for count in range(1, len(index) - first + 1):
            fast = list(read_sample_range(url, index, first, count))
            slow = list(read_sample_range(url, without_table(index), first, count))
            assert fast == slow == groups[first:first + count]
            # the fast path really sliced by the table (no walk): the sample with the pax header included
            raw = read_raw_range(url, index, first, count)
            assert [list(m) for _, m in raw.groups] == [list(g) for _, _, g in groups[first:first + count]]
    buffer = open(url, "rb").read()
    assert groups_from_table(index, 0, len(index), buffer) is not None


def test_an_index_without_member_table_still_reads_the_same_batches(tmp_path):
    new, old = tmp_path / "new", tmp_path / "old"
    new.mkdir(), old.mkdir()
    pattern_new = write_toy_shards(str(new), [5, 3, 6])
    pattern_old = write_toy_shards(str(old), [5, 3, 6])
    strip_tables(str(old))
    url = pattern_old.replace("{000,001,002}", "000")
    assert read_index(url).members is None and read_index(url).note is None
    assert epoch_digest(pattern_new) == epoch_digest(pattern_old)


def test_a_damaged_member_table_is_set_aside_and_the_headers_walked(tmp_path, caplog):
    pattern = write_toy_shards(str(tmp_path), [4, 4])
    reference = epoch_digest(pattern)
    url = str(tmp_path / "part000-000000.tar")
    raw = json.loads(open(url + INDEX_SUFFIX).read())
    raw["members"]["size"] = raw["members"]["size"][:-1]  # one member short
    with open(url + INDEX_SUFFIX, "w") as f:
        f.write(json.dumps(raw))
    index = load_or_build_index(url)
    assert index.members is None and "member table set aside" in index.note and len(index) == 4
    reader = StreamingReader(ReaderConfig(pattern, batch_size=2, num_workers=0))
    assert "member table set aside" in reader.skip_stats()["damaged_shards"][url]  # reported with the shard
    assert epoch_digest(pattern) == reference  # nothing lost


def test_a_table_that_the_headers_do_not_bear_out_is_walked(tmp_path):
    pattern = write_toy_shards(str(tmp_path), [4, 4])
    reference = epoch_digest(pattern)
    url = str(tmp_path / "part001-000000.tar")
    raw = json.loads(open(url + INDEX_SUFFIX).read())
    raw["members"]["size"][3] += 1  # a size the tar header does not give
    with open(url + INDEX_SUFFIX, "w") as f:
        f.write(json.dumps(raw))
    index = read_index(url)
    assert index.members is not None and groups_from_table(index, 0, 4, open(url, "rb").read()) is None
    assert list(read_sample_range(url, index, 0, 4)) == walked(url)
    assert epoch_digest(pattern) == reference


def test_a_garbled_size_field_with_a_table_is_found_by_the_walk(tmp_path):
    pattern = write_toy_shards(str(tmp_path), [6])
    index = read_index(pattern)
    header = index.offsets[3] + 512 + (index.members.size[int(index.members.first[3])] + 511) // 512 * 512  # 2nd member
    with open(pattern, "r+b") as f:
        f.seek(header + 124)
        f.write(b"zz")
    raw = read_raw_range(pattern, index, 2, 3)
    assert [key for key, _ in raw.groups] == [index.keys[2], index.keys[3]]  # sample 3 cut short, as by the walk
    assert raw.damage and "garbled tar member header" in raw.damage
    assert raw.groups == read_raw_range(pattern, without_table(index), 2, 3).groups


def test_meta_view_agrees_with_the_schema_parse(tmp_path):
    pattern = write_toy_shards(str(tmp_path), [3])
    reader = MetaReader()
    for key, _, members in walked(pattern):
        full = parse_sample(key, members)
        rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
        got = reader.read(members["meta.json"], key, rng_a, 3, 3)
        chosen = rng_b.permutation(full.num_views)[:3]  # the same draw as before this module
        assert got.chosen.tolist() == chosen.tolist()
        assert np.array_equal(got.K, full.intrinsics[chosen]) and np.array_equal(got.c2w, full.c2w[chosen])
        assert got.names == [full.view_name(int(v)) for v in chosen] and got.mask_names == [None] * 3
        assert (got.object_id, got.width, got.height, got.background) == (full.object_id, full.width, full.height,
                                                                          full.background)
    meta = json.loads(walked(pattern)[0][2]["meta.json"])
    bad = [(b"{not json", "bad sample", "not valid JSON"),
           (json.dumps({**meta, "schema_version": 9}).encode(), "bad sample", "schema_version 9"),
           (json.dumps({**meta, "views": meta["views"][:2]}).encode(), "too few views", "has 2 views"),
           (json.dumps({**meta, "views": [{**v, "K": [[1, 2], [3]]} for v in meta["views"]]}).encode(), "bad sample",
            "malformed meta.json field"),
           (json.dumps({**meta, "views": [{**v, "c2w": "x"} for v in meta["views"]]}).encode(), "bad sample",
            "malformed meta.json field")]
    for data, reason, words in bad:
        with pytest.raises(MetaError, match=words) as caught:
            reader.read(data, "k", np.random.default_rng(0), 3, 3)
        assert caught.value.reason == reason
    # after every failure the parser is free for the next document
    masked = {**meta, "views": [{**v, "mask": mask_name(i)} for i, v in enumerate(meta["views"])]}
    got = reader.read(json.dumps(masked).encode(), "k", np.random.default_rng(1), 2, 2)
    assert got.mask_names == [mask_name(int(v)) for v in got.chosen]


def test_batches_are_channels_last_views_of_the_same_values(tmp_path):
    pattern = write_toy_shards(str(tmp_path), [4])
    batch = next(iter(StreamingReader(ReaderConfig(pattern, batch_size=2, num_workers=0, context_views_min=2,
                                                   context_views_max=2))))
    images = batch.context_images
    assert images.shape == (2, 2, 3, 8, 8) and images.permute(0, 1, 3, 4, 2).is_contiguous()
    assert torch.equal(images.contiguous(), images) and images.reshape(4, 3, 64).shape == (4, 3, 64)
    assert batch.context_view_indices.dtype == torch.int64


def test_validate_checks_the_member_table(tmp_path):
    from data_pipeline.validate import validate

    pattern = write_toy_shards(str(tmp_path), [3])
    assert validate(pattern).problems == []
    raw = json.loads(open(pattern + INDEX_SUFFIX).read())
    raw["members"]["data_at"][1] += 512
    with open(pattern + INDEX_SUFFIX, "w") as f:
        f.write(json.dumps(raw))
    (problem,) = validate(pattern).problems
    assert "member table does not match" in problem.reason
    raw["members"]["layout_of"] = [5, 0, 0]
    with open(pattern + INDEX_SUFFIX, "w") as f:
        f.write(json.dumps(raw))
    (problem,) = validate(pattern).problems
    assert "member table set aside" in problem.reason
