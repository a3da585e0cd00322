"""Synthetic data: determinism, split, camera framing, 3D consistency, and the command line."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import synthetic
from data_pipeline.cameras import project_points
from data_pipeline.primitives import Box, Cylinder, Ellipsoid, camera_rays, cast_rays, shade
from data_pipeline.schema import ObjectSample, decode_image, parse_sample
from data_pipeline.shards import iter_tar_groups
from data_pipeline.synthetic import ConfigError, generate_dataset, make_object

SEED, OBJECTS, VIEWS, RES = 7, 12, 4, 48


def read_samples(urls: list[str]) -> list[ObjectSample]:
    samples = []
    for url in urls:
        with open(url, "rb") as f:
            samples += [parse_sample(key, members) for key, _, members in iter_tar_groups(f)]
    return samples


def all_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def foreground(sample: ObjectSample, view: int) -> np.ndarray:
    """(H, W) bool: pixels whose colour differs from the background (PNG is lossless)."""
    rgb = decode_image(sample.images[view], sample.width, sample.height)
    background = np.round(np.asarray(sample.background) * 255).astype(np.uint8)
    return (rgb != background).any(axis=2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "w1"
    summary = generate_dataset(str(out), OBJECTS, VIEWS, RES, seed=SEED, holdout_fraction=0.25, workers=1,
                               objects_per_shard=5, progress=False)
    samples = read_samples(summary["train_shards"]) + read_samples(summary["holdout_shards"])
    return out, summary, sorted(samples, key=lambda s: s.object_id)


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


def test_make_object_is_deterministic_and_seed_dependent():
    a = make_object(3, 5, views=3, resolution=24)
    assert a.to_members() == make_object(3, 5, views=3, resolution=24).to_members()
    assert a.object_id == "synthetic-s3-000005" and a.source == "synthetic"
    for other in (make_object(4, 5, views=3, resolution=24), make_object(3, 6, views=3, resolution=24)):
        assert other.images != a.images
        assert other.extra["parts"] != a.extra["parts"]


def test_geometry_does_not_depend_on_views_or_resolution():
    a = make_object(1, 2, views=2, resolution=16)
    b = make_object(1, 2, views=5, resolution=32, image_format="jpg", background=(0.0, 0.0, 0.0))
    assert a.extra["parts"] == b.extra["parts"] and a.category == b.category
    assert len(b.images) == 5 and decode_image(b.images[0], 32, 32).shape == (32, 32, 3)


def test_output_is_byte_identical_for_any_worker_count(dataset, tmp_path):
    out, summary, _ = dataset
    again = generate_dataset(str(tmp_path / "w2"), OBJECTS, VIEWS, RES, seed=SEED, holdout_fraction=0.25,
                             workers=2, objects_per_shard=5, progress=False)
    assert again["num_bytes"] == summary["num_bytes"]
    assert all_files(tmp_path / "w2") == all_files(out)


def test_different_seed_gives_different_data(dataset, tmp_path):
    out, _, _ = dataset
    generate_dataset(str(tmp_path / "other"), OBJECTS, VIEWS, RES, seed=SEED + 1, holdout_fraction=0.25,
                     workers=1, objects_per_shard=5, progress=False)
    assert (tmp_path / "other" / "train-000000.tar").read_bytes() != (out / "train-000000.tar").read_bytes()


def test_writes_to_s3_with_the_same_bytes_as_locally(s3_server, s3_bucket, tmp_path):
    from data_pipeline import storage

    options = s3_server.storage_options()
    args = dict(objects=3, views=2, resolution=16, seed=1, holdout_fraction=0.34, objects_per_shard=2, progress=False)
    remote = generate_dataset(f"{s3_bucket}/synthetic", workers=2, storage_options=options, **args)
    local = generate_dataset(str(tmp_path / "local"), workers=1, **args)
    assert remote["train_pattern"] == f"{s3_bucket}/synthetic/train-000000.tar"  # 2 objects
    assert remote["holdout_pattern"] == f"{s3_bucket}/synthetic/holdout-000000.tar"
    for url in remote["train_shards"] + remote["holdout_shards"]:
        with storage.open_url(url, "rb", options) as f:
            assert f.read() == (tmp_path / "local" / storage.basename(url)).read_bytes()
    assert remote["num_bytes"] == local["num_bytes"]


# ---------------------------------------------------------------------------------------------
# Split, shards, metadata
# ---------------------------------------------------------------------------------------------


def test_holdout_and_train_are_disjoint_and_cover_all_objects(dataset):
    _, summary, _ = dataset
    train = {s.object_id for s in read_samples(summary["train_shards"])}
    holdout = {s.object_id for s in read_samples(summary["holdout_shards"])}
    assert not train & holdout
    assert train | holdout == {synthetic.object_id(SEED, i) for i in range(OBJECTS)}
    assert len(holdout) == round(0.25 * OBJECTS) == summary["holdout_objects"]
    expected = {synthetic.object_id(SEED, i) for i in synthetic.holdout_indices(OBJECTS, SEED, 0.25)}
    assert holdout == expected
    # 9 train objects at 5 per shard -> 2 shards, named by a brace pattern.
    assert summary["train_pattern"].endswith("train-{000000..000001}.tar")
    assert summary["holdout_pattern"].endswith("holdout-000000.tar")


def test_holdout_indices_edge_cases_and_stability():
    assert synthetic.holdout_indices(10, 0, 0.0) == frozenset()
    assert synthetic.holdout_indices(1, 0, 0.5) == frozenset()  # a lone object stays in train
    assert len(synthetic.holdout_indices(5, 0, 0.01)) == 1  # a positive fraction holds out at least one
    assert len(synthetic.holdout_indices(3, 0, 0.99)) == 2  # and keeps at least one for training
    small, large = synthetic.holdout_indices(200, 0, 0.1), synthetic.holdout_indices(400, 0, 0.1)
    assert len(small & large) >= 0.6 * len(small)  # growing the dataset mostly keeps the split


def test_metadata_records_the_unit_cube(dataset):
    _, _, samples = dataset
    for sample in samples:
        assert sample.scale == 1.0 and sample.category in synthetic.FAMILIES
        assert sample.extra["bbox"] == [[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]
        lo, hi = np.array(sample.extra["object_bbox"])
        assert (lo >= -1.0).all() and (hi <= 1.0).all()
        assert math.isclose(float(((hi - lo) / 2).max()), synthetic.OBJECT_FILL)
        assert 2 <= len(sample.extra["parts"]) <= 6


# ---------------------------------------------------------------------------------------------
# Cameras and framing
# ---------------------------------------------------------------------------------------------


def test_cameras_look_at_the_origin_and_frame_the_object_box(dataset):
    _, _, samples = dataset
    for sample in samples:
        lo, hi = (np.array(v) for v in sample.extra["object_bbox"])
        assert (lo >= -1).all() and (hi <= 1).all()  # inside the cube the renderer samples
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        for K, c2w in zip(sample.intrinsics, sample.c2w):
            uv, depth = project_points(np.zeros((1, 3)), K, c2w)
            np.testing.assert_allclose(uv[0], [RES / 2, RES / 2], atol=1e-9)
            assert math.isclose(depth[0], sample.extra["camera_radius"])
            uv, depth = project_points(corners, K, c2w)
            assert (depth > 0).all()
            assert (uv > 0).all() and (uv < RES).all(), "a corner of the object's box falls outside the image"


def test_object_covers_part_of_each_view_and_never_touches_the_border(dataset):
    _, _, samples = dataset
    for sample in samples:
        for view in range(sample.num_views):
            fg = foreground(sample, view)
            assert 0.01 < fg.mean() < 0.6, (sample.object_id, view, fg.mean())
            assert not (fg[0].any() or fg[-1].any() or fg[:, 0].any() or fg[:, -1].any())


# ---------------------------------------------------------------------------------------------
# 3D structure
# ---------------------------------------------------------------------------------------------


def dilate(mask: np.ndarray) -> np.ndarray:
    """Grow a mask by one pixel (8-neighbourhood)."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    return np.any([padded[1 + di:1 + di + h, 1 + dj:1 + dj + w] for di in (-1, 0, 1) for dj in (-1, 0, 1)], axis=0)


def rebuilt_parts(sample: ObjectSample):
    """The object's parts, regenerated from (seed, index); they must match what the shard records."""
    obj = synthetic.build_object(synthetic.object_rng(sample.extra["seed"], sample.extra["index"]))
    assert obj.to_json() == sample.extra["parts"]
    return list(obj.parts)


def test_surface_points_reproject_consistently_into_other_views(dataset):
    """Ray-cast a view's foreground pixels, move the hit points into the other views.

    In every other view a surface point must be either visible (the ray through its projection
    hits at its depth) or occluded (hits earlier), never behind empty space; and it lands on (or,
    at a silhouette, beside) a foreground pixel of the stored image. Flat per-view pictures,
    wrong cameras or a half-pixel shift between rendering and cameras.py fail this.
    """
    _, _, samples = dataset
    visible_total = 0
    for sample in samples[:6]:
        parts = rebuilt_parts(sample)
        fg0 = foreground(sample, 0)
        rows, cols = np.nonzero(fg0)
        uv0 = np.stack([cols + 0.5, rows + 0.5], axis=1)
        origins, dirs = camera_rays(sample.intrinsics[0], sample.c2w[0], uv0)
        t, which = cast_rays(parts, origins, dirs)
        assert (which >= 0).all(), "a foreground pixel whose centre ray misses the geometry"
        points = origins + t[:, None] * dirs
        # The rendered colour is the shaded colour of that hit (exact up to 8-bit rounding).
        rgb0 = decode_image(sample.images[0])[rows, cols] / 255.0
        np.testing.assert_allclose(shade(parts, points, which), rgb0, atol=0.5 / 255 + 1e-9)
        for view in range(1, sample.num_views):
            K, c2w = sample.intrinsics[view], sample.c2w[view]
            uv, depth = project_points(points, K, c2w)
            o, d = camera_rays(K, c2w, uv)
            t_view, hit = cast_rays(parts, o, d)
            assert (hit >= 0).all()
            assert (t_view <= depth + 1e-7).all(), "a surface point seen through empty space"
            visible = np.abs(t_view - depth) < 1e-6
            visible_total += int(visible.sum())
            fg = foreground(sample, view)
            pixel = np.clip(np.floor(uv).astype(int), 0, RES - 1)
            on_fg = fg[pixel[:, 1], pixel[:, 0]]
            # Points near a silhouette (or on a surface seen edge-on, which packs many view-0
            # points into a sliver) can fall in a pixel whose centre ray just misses; such a
            # pixel is always next to a foreground one.
            assert on_fg.mean() > 0.75, (sample.object_id, view, on_fg.mean())
            assert dilate(fg)[pixel[:, 1], pixel[:, 0]].all(), (sample.object_id, view)
    assert visible_total > 100  # the views do share visible surface


def test_part_centres_project_onto_the_silhouette_in_every_view(dataset):
    """An independent check from metadata and cameras.py only (no ray casting).

    A part's centre is inside a ball of its inscribed radius. When that radius exceeds the
    half-diagonal of a pixel at the centre's depth, the ray through the centre of the pixel the
    centre projects into passes through the ball, so that pixel must be foreground.
    """
    _, _, samples = dataset
    checked = 0
    for sample in samples:
        parts = sample.extra["parts"]
        for view in range(sample.num_views):
            K, c2w = sample.intrinsics[view], sample.c2w[view]
            fg = foreground(sample, view)
            for part in parts:
                inscribed = {"ellipsoid": lambda p: min(p["radii"]), "box": lambda p: min(p["half_size"]),
                             "cylinder": lambda p: min(p["radius"], p["half_height"])}[part["kind"]](part)
                uv, depth = project_points(np.array([part["center"]]), K, c2w)
                if inscribed <= math.sqrt(0.5) * depth[0] / K[0, 0]:
                    continue
                j, i = np.floor(uv[0]).astype(int)
                assert fg[i, j], (sample.object_id, view, part["kind"])
                checked += 1
    assert checked > 50


@pytest.mark.parametrize("shape, expected_depth", [
    (Ellipsoid(center=np.zeros(3), rotation=np.eye(3), radii=np.array([0.5, 0.5, 0.5])), 4.5),
    (Ellipsoid(center=np.zeros(3), rotation=np.eye(3), radii=np.array([0.2, 0.4, 0.7])), 4.8),  # seen along -x
    (Box(center=np.zeros(3), rotation=np.eye(3), half_size=np.array([0.3, 0.6, 0.9])), 4.7),
    (Cylinder(center=np.zeros(3), rotation=np.eye(3), radius=0.4, half_height=0.8), 4.6),
    (Cylinder(center=np.array([0.1, 0.0, 0.0]), rotation=np.array([[0.0, 0, 1], [0, 1, 0], [-1, 0, 0]]),
              radius=0.4, half_height=0.8), 4.1),  # axis along x: the ray meets a cap
])
def test_analytic_intersections_on_known_shapes(shape, expected_depth):
    # A camera on the +x axis at distance 5 looking at the origin; the centre ray is the -x axis.
    from data_pipeline.cameras import intrinsics_from_fov, look_at_c2w
    K = intrinsics_from_fov(32, 32, math.radians(50))
    c2w = look_at_c2w(np.array([5.0, 0.0, 0.0]), np.zeros(3))
    origins, dirs = camera_rays(K, c2w, np.array([[16.0, 16.0], [0.5, 0.5]]))
    t = shape.intersect(origins, dirs)
    assert math.isclose(t[0], expected_depth, abs_tol=1e-12) and t[1] == np.inf  # corner ray misses
    normal = shape.normal(origins[:1] + t[:1, None] * dirs[:1])
    np.testing.assert_allclose(normal[0], [1.0, 0.0, 0.0], atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Validation and command line
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, flag", [
    ({"objects": 0}, "--objects"),
    ({"views": 0}, "--views"),
    ({"resolution": 4}, "--resolution"),
    ({"seed": -1}, "--seed"),
    ({"holdout_fraction": 1.0}, "--holdout-fraction"),
    ({"workers": 0}, "--workers"),
    ({"objects_per_shard": 0}, "--objects-per-shard"),
    ({"image_format": "gif"}, "--image-format"),
    ({"background": (1.0, 2.0, 0.0)}, "--background"),
    ({"background": (1.0, 1.0)}, "--background"),
])
def test_invalid_parameters_name_the_flag(tmp_path, kwargs, flag):
    args = {"objects": 2, "views": 2, "resolution": 16} | kwargs
    with pytest.raises(ConfigError, match=flag):
        generate_dataset(str(tmp_path / "x"), progress=False, **args)
    assert not (tmp_path / "x").exists()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "data_pipeline.synthetic", *args],
                          capture_output=True, text=True, timeout=120, env=env)


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "cli"
    result = run_cli("--out", str(out), "--objects", "5", "--views", "3", "--resolution", "16", "--seed", "2",
                     "--workers", "2", "--objects-per-shard", "2", "--holdout-fraction", "0.2",
                     "--background", "0,0,0.5")
    assert result.returncode == 0, result.stderr
    assert "5 objects (4 train, 1 holdout)" in result.stdout
    assert f"{out}/train-{{000000..000001}}.tar" in result.stdout
    assert f"{out}/holdout-000000.tar" in result.stdout
    assert "objects/s" in result.stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == ["holdout-000000.tar", "holdout-000000.tar.idx.json", "train-000000.tar",
                     "train-000000.tar.idx.json", "train-000001.tar", "train-000001.tar.idx.json"]
    with tarfile.open(out / "train-000000.tar") as tar:
        members = tar.getnames()
    key = members[0].split(".")[0]
    assert key.startswith("synthetic-s2-")
    assert members[:4] == [f"{key}.{suffix}" for suffix in ("meta.json", "view000.png", "view001.png", "view002.png")]
    sample = read_samples([str(out / "holdout-000000.tar")])[0]
    assert sample.background == (0.0, 0.0, 0.5)
    assert tuple(decode_image(sample.images[0])[0, 0]) == (0, 0, 128)


def test_cli_rejects_bad_flags_with_a_clear_message(tmp_path):
    result = run_cli("--out", str(tmp_path / "bad"), "--objects", "2", "--views", "0", "--resolution", "16")
    assert result.returncode == 2
    assert "--views must be >= 1" in result.stderr
    result = run_cli("--out", str(tmp_path / "bad"), "--objects", "2", "--views", "2", "--resolution", "16",
                     "--background", "purple")
    assert result.returncode == 2 and "--background" in result.stderr
