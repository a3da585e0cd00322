"""The shard validator: passes good shards, names shard + object + reason for each bad one.

Shards are written here directly (ShardWriter, or tarfile for hand-manipulated members), so
these tests do not depend on the ingest code.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.cameras import intrinsics_from_fov, look_at_c2w
from data_pipeline.schema import ObjectSample, encode_image
from data_pipeline.shards import INDEX_SUFFIX, ShardWriter, read_index
from data_pipeline.validate import main, validate, validate_shard


def make_sample(object_id: str, n_views: int = 2, size: int = 16, seed: int = 0) -> ObjectSample:
    rng = np.random.default_rng(seed)
    images = [encode_image(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)) for _ in range(n_views)]
    eyes = [np.array([3.0 * np.cos(a), 3.0 * np.sin(a), 1.0]) for a in np.linspace(0, 2 * np.pi, n_views, endpoint=False)]
    return ObjectSample(
        object_id=object_id,
        images=images,
        intrinsics=np.stack([intrinsics_from_fov(size, size, 0.8)] * n_views),
        c2w=np.stack([look_at_c2w(eye, np.zeros(3)) for eye in eyes]),
        width=size,
        height=size,
        source="test",
    )


def write_shards(out, samples: list[ObjectSample], max_objects: int = 2) -> list[str]:
    with ShardWriter(str(out), max_objects=max_objects) as writer:
        for sample in samples:
            writer.write(sample)
    return writer.shard_urls


def rewrite_member(src: str, dst: str, name: str, change) -> None:
    """Copy a shard with tarfile, passing member ``name``'s bytes through ``change``."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tout:
        for info in tin.getmembers():
            data = tin.extractfile(info).read()
            if info.name == name:
                data = change(data)
                info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


def change_meta(change):
    def apply(raw: bytes) -> bytes:
        meta = json.loads(raw)
        change(meta)
        return json.dumps(meta).encode()

    return apply


def reasons(report) -> list[str]:
    return [str(p) for p in report.problems]


@pytest.fixture
def good(tmp_path):
    """Two shards, three objects (2 + 1), written by ShardWriter with their indices."""
    return write_shards(tmp_path / "good", [make_sample(f"obj_{i}", n_views=2 + i, seed=i) for i in range(3)])


def test_good_shards_pass(good, tmp_path):
    report = validate(os.path.join(os.path.dirname(good[0]), "shard-{000000..000001}.tar"))
    assert report.ok, report.format()
    assert (report.num_shards, report.num_objects, report.num_views) == (2, 3, 2 + 3 + 4)
    assert report.resolutions == {"16x16": 3} and all(s.has_index for s in report.shards)
    text = report.format()
    assert "objects: 3" in text and "views: 9" in text and "16x16 (3 objects)" in text and "OK" in text
    # a glob works too, and so does a shard without its index (it is optional)
    os.remove(good[1] + INDEX_SUFFIX)
    report = validate(os.path.join(os.path.dirname(good[0]), "*.tar"), workers=2)
    assert report.ok and report.num_objects == 3 and [s.has_index for s in report.shards] == [True, False]


def test_non_orthonormal_rotation_is_rejected(tmp_path):
    bad = make_sample("skewed", n_views=3)
    bad.c2w[1][:3, :3] *= 1.1  # a scaled rotation: not orthonormal
    (url,) = write_shards(tmp_path / "a", [make_sample("fine"), bad])
    report = validate(url)
    assert not report.ok
    (problem,) = report.problems
    assert (problem.url, problem.key) == (url, "skewed")
    assert "views[1].c2w: rotation is not orthonormal" in problem.reason


def test_mirrored_rotation_in_a_hand_edited_meta_is_rejected(good, tmp_path):
    def mirror_view0(meta):
        c2w = np.array(meta["views"][0]["c2w"])
        c2w[:3, 0] *= -1  # still orthonormal, but det -1: a mirrored camera
        meta["views"][0]["c2w"] = c2w.tolist()

    bad = str(tmp_path / "mirrored.tar")
    rewrite_member(good[0], bad, "obj_1.meta.json", change_meta(mirror_view0))
    report = validate(bad)
    assert [(p.key, "determinant must be +1" in p.reason) for p in report.problems] == [("obj_1", True)]
    assert not report.shards[0].has_index  # written by tarfile: no index, and none is needed


def test_truncated_shard_is_rejected(good, tmp_path):
    data = Path(good[0]).read_bytes()
    cut = str(tmp_path / "cut.tar")
    Path(cut).write_bytes(data[: len(data) // 2 + 100])  # in the middle of a member
    report = validate(cut)
    assert any("truncated or corrupt tar data" in r for r in reasons(report)), reasons(report)

    # Cut exactly where the second sample starts: the tar stream alone looks complete.
    second = read_index(good[0]).offsets[1]
    at_boundary = str(tmp_path / "boundary.tar")
    Path(at_boundary).write_bytes(data[:second])
    report = validate(at_boundary)
    assert report.num_objects == 1
    assert any("no end-of-archive marker" in r for r in reasons(report)), reasons(report)

    # The same cut with the shard's original index beside it: the index disagrees as well.
    Path(at_boundary + INDEX_SUFFIX).write_bytes(Path(good[0] + INDEX_SUFFIX).read_bytes())
    report = validate(at_boundary)
    assert any("index says the shard has" in r for r in reasons(report))
    assert any("index does not match the shard: it lists 2 samples, the shard has 1" in r for r in reasons(report))


def test_undecodable_and_wrong_size_images_are_rejected(tmp_path):
    broken = make_sample("broken", n_views=3)
    broken.images[2] = b"\x89PNG\r\n\x1a\n this is not a png"
    small = make_sample("small", n_views=2)
    small.images[0] = encode_image(np.zeros((8, 16, 3), dtype=np.uint8))
    (url,) = write_shards(tmp_path / "a", [broken, small])
    report = validate(url)
    assert [p.key for p in report.problems] == ["broken", "small"]
    assert "broken.view002.png: cannot decode" in report.problems[0].reason
    assert "small.view000.png: decoded size 16x8 differs from declared 16x16" in report.problems[1].reason


def test_index_that_does_not_match_is_rejected(good):
    index_path = Path(good[0] + INDEX_SUFFIX)
    index = json.loads(index_path.read_text())
    index["offsets"][1] += 512
    index_path.write_text(json.dumps(index))
    (problem,) = validate(good[0]).problems
    assert problem.key == "obj_1" and "index does not match the shard" in problem.reason and "first difference at sample #1" in problem.reason

    index["keys"] = ["zzz"]
    index["offsets"] = [0]
    index_path.write_text(json.dumps(index))
    assert "it lists 1 samples, the shard has 2" in validate(good[0]).problems[0].reason

    index_path.write_text('{"format": "something else"')
    assert "is malformed" in validate(good[0]).problems[0].reason


def test_schema_version_stray_members_and_duplicate_keys(good, tmp_path):
    old = str(tmp_path / "old.tar")
    rewrite_member(good[0], old, "obj_0.meta.json", change_meta(lambda meta: meta.update(schema_version=0)))
    (problem,) = validate(old).problems
    assert problem.key == "obj_0" and "schema_version 0 is not supported" in problem.reason

    with tarfile.open(good[1]) as tin, tarfile.open(str(tmp_path / "stray.tar"), "w") as tout:
        for info in tin.getmembers():
            tout.addfile(info, tin.extractfile(info))
        info = tarfile.TarInfo("obj_2.depth000.png")
        info.size = 3
        tout.addfile(info, io.BytesIO(b"abc"))
    (problem,) = validate(str(tmp_path / "stray.tar")).problems
    assert problem.key == "obj_2" and "unexpected members not listed in meta.json: obj_2.depth000.png" in problem.reason

    (again,) = write_shards(tmp_path / "again", [make_sample("obj_0")])
    report = validate([good[0], again])
    assert [(p.url, p.key) for p in report.problems] == [(again, "obj_0")]
    assert f"duplicate key (first seen in {good[0]})" in report.problems[0].reason


def test_empty_and_garbage_files(tmp_path):
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(os.urandom(3000))
    assert any("truncated or corrupt" in r for r in reasons(validate_shard(str(garbage))))
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    assert reasons(validate_shard(str(empty))) == [f"{empty}: shard holds no samples"]


def test_fsspec_url(tmp_path):
    out = f"memory://validate-{tmp_path.name}/shards"
    urls = write_shards(out, [make_sample("a"), make_sample("b"), make_sample("c")], max_objects=1)
    assert urls[0] == f"{out}/shard-000000.tar"
    report = validate(f"{out}/shard-{{000000..000002}}.tar")
    assert report.ok and report.num_objects == 3, report.format()
    assert validate(f"{out}/*.tar").num_objects == 3


def test_cli_exit_status(good, tmp_path, capsys):
    pattern = os.path.join(os.path.dirname(good[0]), "shard-*.tar")
    assert main([pattern, "--no-progress"]) == 0
    assert "OK: no problems found" in capsys.readouterr().out

    broken = make_sample("broken", n_views=2)
    broken.images[1] = b"nope"
    bad = make_sample("bad_camera", n_views=2)
    bad.intrinsics[0][0, 0] = -5.0
    urls = write_shards(tmp_path / "bad", [broken, bad, make_sample("fine")], max_objects=2)
    result = subprocess.run([sys.executable, "-m", "data_pipeline.validate", os.path.join(tmp_path, "bad", "shard-{000000..000001}.tar"),
                             "--max-problems", "1"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "objects: 3" in result.stdout and "PROBLEMS: 2" in result.stdout
    assert f"{urls[0]} [broken]: broken.view001.png: cannot decode" in result.stdout
    assert "and 1 more" in result.stdout  # --max-problems 1 lists one of the two

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nothing-*.tar")])
    assert exit_info.value.code == 2


def test_garbled_member_header_is_a_problem_with_or_without_an_index(tmp_path):
    samples = [make_sample(f"obj_{i}", n_views=2, seed=i) for i in range(3)]
    (url,) = write_shards(tmp_path / "g", samples, max_objects=3)
    second = read_index(url).offsets[1]
    data = bytearray(Path(url).read_bytes())
    data[second:second + 100] = b"\xff" * 100  # the first header of the second sample
    Path(url).write_bytes(bytes(data))
    for with_index in (True, False):
        if not with_index:
            os.remove(url + INDEX_SUFFIX)
        report = validate(url)
        assert any(f"garbled tar member header at byte {second}" in r for r in reasons(report)), reasons(report)
        assert report.num_objects == 1

    # A header zeroed out in the middle reads as an early end of the archive to tarfile.
    data[second:second + 512] = bytes(512)
    Path(url).write_bytes(bytes(data))
    assert any(f"a zero block at byte {second} in the middle of the archive" in r for r in reasons(validate(url)))
