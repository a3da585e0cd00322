"""Ingest of NeRF-synthetic/Blender folders: layouts, images, cameras, errors, determinism.

Every object is built here, in tmp_path, with PIL/numpy. Cameras are checked three ways: the
ingested OpenCV camera against an independent Blender-convention projection of the ORIGINAL
transform_matrix, against a hand-derived camera, and against the image itself (a red marker
drawn where the Blender camera sees a known 3D point must end up where the ingested camera
projects that point, also after resizing).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np
import pytest
from PIL import Image

from data_pipeline import storage
from data_pipeline.cameras import project_points, project_points_blender, scale_intrinsics
import functools

from data_pipeline.ingest import IngestError, IngestOptions, SourceError
from data_pipeline.ingest import ingest as _ingest
from data_pipeline.ingest import load_nerf_synthetic_object as _load_object
from data_pipeline.ingest import main as _main

# These tests check cameras against the files exactly: native scale (normalisation has its own
# tests in test_ingest_normalise.py).
ingest = functools.partial(_ingest, normalize="none")
def load_nerf_synthetic_object(folder, **options):
    return _load_object(folder, IngestOptions(normalize="none", **options))


def main(argv):
    return _main([*argv, "--normalize", "none"])
from data_pipeline.schema import ObjectSample, decode_image, parse_sample
from data_pipeline.shards import iter_tar_groups, read_index
from data_pipeline.validate import validate

MARKER_POINT = np.array([0.3, -0.2, 0.25])  # world point every test object shows as a red disc
MARKER_RADIUS = 4.0
RED = (255, 0, 0, 255)
GREY = (128, 128, 128, 255)


# --------------------------------------------------------------------------- building objects


def blender_look_at(eye) -> np.ndarray:
    """Blender/OpenGL c2w of a camera at ``eye`` looking at the origin, +z up, posed the way Blender
    poses one (not from cameras.py, and not by cross products as cameras.py does): a camera looks
    along its -z with +y up, rotated by Euler XYZ angles (90° - elevation, 0, azimuth + 90°)."""
    eye = np.asarray(eye, dtype=np.float64)
    elevation = math.asin(eye[2] / np.linalg.norm(eye))
    azimuth = math.atan2(eye[1], eye[0])

    def rotation(axis: int, angle: float) -> np.ndarray:
        c, s = math.cos(angle), math.sin(angle)
        i, j = [k for k in range(3) if k != axis]
        matrix = np.eye(3)
        matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
        return matrix

    c2w = np.eye(4)
    c2w[:3, :3] = rotation(2, azimuth + math.pi / 2) @ rotation(0, math.pi / 2 - elevation)
    c2w[:3, 3] = eye
    return c2w


def orbit_cameras(n: int, radius: float = 4.0, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    cams = []
    for i in range(n):
        azimuth = 2 * math.pi * i / n + rng.uniform(0, 0.3)
        elevation = rng.uniform(-0.6, 0.9)
        eye = radius * np.array([math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth), math.sin(elevation)])
        cams.append(blender_look_at(eye))
    return cams


def draw_disc(rgba: np.ndarray, u: float, v: float, radius: float, colour) -> None:
    """Colour every pixel whose centre (j + 0.5, i + 0.5) lies within ``radius`` of (u, v)."""
    rows, cols = np.mgrid[0 : rgba.shape[0], 0 : rgba.shape[1]]
    inside = (cols + 0.5 - u) ** 2 + (rows + 0.5 - v) ** 2 <= radius**2
    rgba[inside] = colour


def render_view(width: int, height: int, marker_uv: tuple[float, float] | None) -> np.ndarray:
    """RGBA: transparent background, an opaque grey block, a red disc at the marker's pixel."""
    rgba = np.zeros((height, width, 4), dtype=np.uint8)
    rgba[: height // 6, : width // 6] = GREY
    if marker_uv is not None:
        draw_disc(rgba, marker_uv[0], marker_uv[1], MARKER_RADIUS, RED)
    return rgba


@dataclass
class BuiltObject:
    folder: str
    width: int
    height: int
    K: np.ndarray  # original-grid intrinsics as the files describe them
    c2w_blender: list[np.ndarray] = field(default_factory=list)  # in the order ingest must keep
    image_paths: list[str] = field(default_factory=list)


def make_object(
    folder,
    n_views: int = 3,
    width: int = 64,
    height: int = 48,
    splits: tuple[str, ...] = ("",),
    extensionless: bool = False,
    focal: dict | None = None,
    seed: int = 0,
) -> BuiltObject:
    """A NeRF-synthetic object folder. ``splits`` "" -> transforms.json, "train" -> transforms_train.json.

    ``focal`` = {"fl_x", "fl_y", "cx", "cy"} writes nerfstudio-style intrinsics (with w, h)
    instead of camera_angle_x.
    """
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    if focal is None:
        angle_x = 0.8
        fx = 0.5 * width / math.tan(0.5 * angle_x)
        K = np.array([[fx, 0, width / 2], [0, fx, height / 2], [0, 0, 1.0]])
        top: dict = {"camera_angle_x": angle_x}
    else:
        K = np.array([[focal["fl_x"], 0, focal["cx"]], [0, focal["fl_y"], focal["cy"]], [0, 0, 1.0]])
        top = {**focal, "w": width, "h": height}
    built = BuiltObject(folder, width, height, K)
    cams = orbit_cameras(n_views, seed=seed)
    for s, split in enumerate(splits):
        frames = []
        subdir = split or "images"
        os.makedirs(os.path.join(folder, subdir), exist_ok=True)
        for i in range(s, n_views, len(splits)):
            c2w = cams[i]
            uv = project_points_blender(MARKER_POINT[None], K, c2w)[0]
            stem = f"{subdir}/r_{i}"
            path = os.path.join(folder, stem + ".png")
            Image.fromarray(render_view(width, height, tuple(uv)), mode="RGBA").save(path)
            frames.append({"file_path": "./" + stem if extensionless else stem + ".png", "rotation": 0.01, "transform_matrix": c2w.tolist()})
            built.c2w_blender.append(c2w)
            built.image_paths.append(path)
        name = "transforms.json" if not split else f"transforms_{split}.json"
        with open(os.path.join(folder, name), "w") as f:
            json.dump({**top, "frames": frames}, f, indent=1)
    return built


def make_dataset(root) -> dict[str, BuiltObject]:
    """Three objects, one per layout this ingest must understand."""
    return {
        "plain": make_object(root / "plain", n_views=4, extensionless=True, seed=1),
        "split": make_object(root / "split", n_views=5, splits=("train", "test"), seed=2),
        "focal": make_object(root / "focal", n_views=3, width=80, height=60,
                             focal={"fl_x": 70.0, "fl_y": 72.0, "cx": 37.5, "cy": 31.0}, seed=3),
    }


def read_shards(urls: list[str]) -> list[ObjectSample]:
    samples = []
    for url in urls:
        with storage.open_url(url, "rb") as f:
            samples += [parse_sample(key, members) for key, _, members in iter_tar_groups(f)]
    return samples


def red_centroid(rgb: np.ndarray) -> np.ndarray:
    """Centroid (u, v) of the red marker in continuous pixel coordinates (centres at +0.5)."""
    weight = np.clip(rgb[..., 0].astype(np.float64) - rgb[..., 1].astype(np.float64), 0, None)
    rows, cols = np.mgrid[0 : rgb.shape[0], 0 : rgb.shape[1]]
    total = weight.sum()
    assert total > 0, "no red marker in the image"
    return np.array([((cols + 0.5) * weight).sum() / total, ((rows + 0.5) * weight).sum() / total])


def by_id(samples: list[ObjectSample]) -> dict[str, ObjectSample]:
    return {s.object_id: s for s in samples}


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    """The three-layout dataset ingested at width 32 into shards of at most 2 objects."""
    root = tmp_path_factory.mktemp("src")
    built = make_dataset(root)
    out = tmp_path_factory.mktemp("out")
    summary = ingest([str(root)], str(out), resolution=32, max_objects=2)
    return built, summary, read_shards(summary.shards), out


def test_round_trip_all_layouts(ingested):
    built, summary, samples, out = ingested
    assert summary.exit_code == 0 and not summary.skipped
    assert summary.objects_written == 3 and summary.views_written == 4 + 5 + 3
    assert len(summary.shards) == 2 and summary.pattern == os.path.join(str(out), "shard-{000000..000001}.tar")
    assert summary.num_bytes == sum(os.path.getsize(u) for u in summary.shards)
    assert [s.object_id for s in samples] == ["focal", "plain", "split"]  # sorted folder order
    assert read_index(summary.shards[0]).keys == ("focal", "plain")

    for sample in samples:
        obj = built[sample.object_id]
        assert sample.num_views == len(obj.c2w_blender)
        assert (sample.width, sample.height) == (32, round(obj.height * 32 / obj.width))
        assert sample.source == "nerf-synthetic" and sample.category is None
        assert sample.scale == 1.0 and sample.background == (1.0, 1.0, 1.0)
        assert "scale_reason" in sample.extra
        expected_K = scale_intrinsics(obj.K, 32 / obj.width, sample.height / obj.height)
        for i in range(sample.num_views):
            np.testing.assert_allclose(sample.intrinsics[i], expected_K, rtol=1e-12)
            # OpenCV axes: x as in Blender, y and z flipped; position unchanged.
            b = obj.c2w_blender[i]
            np.testing.assert_allclose(sample.c2w[i][:3, 0], b[:3, 0], atol=1e-12)
            np.testing.assert_allclose(sample.c2w[i][:3, 1], -b[:3, 1], atol=1e-12)
            np.testing.assert_allclose(sample.c2w[i][:3, 2], -b[:3, 2], atol=1e-12)
            np.testing.assert_allclose(sample.c2w[i][:3, 3], b[:3, 3], atol=1e-12)
            assert decode_image(sample.images[i], sample.width, sample.height).shape == (sample.height, sample.width, 3)

    split = by_id(samples)["split"]
    assert split.extra["transforms_files"] == ["transforms_train.json", "transforms_test.json"]
    assert split.extra["view_splits"] == ["train"] * 3 + ["test"] * 2
    # the shards pass the validator
    report = validate(summary.pattern)
    assert report.ok, report.format()
    assert report.num_objects == 3 and report.num_views == 12


def test_ingested_cameras_project_like_the_blender_cameras(ingested):
    built, _, samples, _ = ingested
    points = np.random.default_rng(7).uniform(-0.6, 0.6, size=(50, 3))
    for sample in samples:
        obj = built[sample.object_id]
        sx, sy = sample.width / obj.width, sample.height / obj.height
        for i in range(sample.num_views):
            blender_px = project_points_blender(points, obj.K, obj.c2w_blender[i]) * [sx, sy]
            opencv_px, depth = project_points(points, sample.intrinsics[i], sample.c2w[i])
            assert (depth > 0).all()  # in front of the camera: +z is forward in OpenCV
            np.testing.assert_allclose(opencv_px, blender_px, atol=1e-9)


def test_marker_in_the_image_lands_where_the_ingested_camera_projects(ingested):
    """Image and camera agree after compositing and a 2x/2.5x resize (antialiased)."""
    built, _, samples, _ = ingested
    for sample in samples:
        for i in range(sample.num_views):
            rgb = decode_image(sample.images[i], sample.width, sample.height)
            expected, _ = project_points(MARKER_POINT[None], sample.intrinsics[i], sample.c2w[i])
            np.testing.assert_allclose(red_centroid(rgb), expected[0], atol=0.2, err_msg=f"{sample.object_id} view {i}")


def test_hand_derived_camera(tmp_path):
    """A camera whose pixels are derived by hand, not by any code under test.

    Blender camera at (0, -4, 0) looking at the origin, z up: it looks along world +y, its
    image right is world +x and image up is world +z. The point (1, 0, 0.5) is 4 units in front,
    so it appears fx/4 right of and fx/8 above the image centre.
    """
    width, height, angle_x = 64, 64, 0.9
    fx = 0.5 * width / math.tan(0.5 * angle_x)
    c2w = np.array([[1.0, 0, 0, 0], [0, 0, -1, -4], [0, 1, 0, 0], [0, 0, 0, 1]])  # columns: right, up, back, eye
    u, v = width / 2 + fx / 4, height / 2 - fx / 8
    rgba = np.zeros((height, width, 4), dtype=np.uint8)
    draw_disc(rgba, u, v, MARKER_RADIUS, RED)
    folder = tmp_path / "hand"
    folder.mkdir()
    Image.fromarray(rgba, mode="RGBA").save(folder / "r_0.png")
    (folder / "transforms.json").write_text(json.dumps({"camera_angle_x": angle_x, "frames": [{"file_path": "r_0", "transform_matrix": c2w.tolist()}]}))

    sample = load_nerf_synthetic_object(str(folder), resolution=32)
    K, cv = sample.intrinsics[0], sample.c2w[0]
    np.testing.assert_allclose(cv[:3, 0], [1, 0, 0], atol=1e-12)  # image right = world +x
    np.testing.assert_allclose(cv[:3, 1], [0, 0, -1], atol=1e-12)  # image down = world -z
    np.testing.assert_allclose(cv[:3, 2], [0, 1, 0], atol=1e-12)  # forward = world +y
    np.testing.assert_allclose(K, [[fx / 2, 0, 16], [0, fx / 2, 16], [0, 0, 1]], rtol=1e-12)
    pixel, depth = project_points(np.array([[1.0, 0.0, 0.5]]), K, cv)
    np.testing.assert_allclose(pixel[0], [u / 2, v / 2], atol=1e-9)
    np.testing.assert_allclose(depth, [4.0])
    np.testing.assert_allclose(red_centroid(decode_image(sample.images[0])), [u / 2, v / 2], atol=0.2)
    full = load_nerf_synthetic_object(str(folder))  # no resize: the intrinsics are the file's own
    np.testing.assert_allclose(project_points(np.array([[1.0, 0.0, 0.5]]), full.intrinsics[0], full.c2w[0])[0][0], [u, v], atol=1e-9)
    np.testing.assert_allclose(red_centroid(decode_image(full.images[0])), [u, v], atol=0.1)


def test_background_compositing_and_rgb_kept(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[0:4, :] = (255, 0, 0, 128)  # half-transparent red
    rgba[4:6, :] = (0, 255, 0, 255)  # opaque green
    # rows 6-7: fully transparent, with colour that must not leak through
    rgba[6:8, :] = (200, 100, 50, 0)
    alpha_obj = tmp_path / "alpha"
    alpha_obj.mkdir()
    Image.fromarray(rgba, mode="RGBA").save(alpha_obj / "a.png")
    rgb = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    rgb_obj = tmp_path / "rgb"
    rgb_obj.mkdir()
    Image.fromarray(rgb, mode="RGB").save(rgb_obj / "a.png")
    for folder in (alpha_obj, rgb_obj):
        frame = {"file_path": "a", "transform_matrix": blender_look_at((0, -3, 1)).tolist()}
        (folder / "transforms.json").write_text(json.dumps({"camera_angle_x": 0.7, "frames": [frame]}))

    out = tmp_path / "out"
    summary = ingest([str(tmp_path / "alpha"), str(tmp_path / "rgb")], str(out), background=(0.0, 0.0, 1.0))
    samples = by_id(read_shards(summary.shards))
    image = decode_image(samples["alpha"].images[0])
    assert samples["alpha"].background == (0.0, 0.0, 1.0)
    assert tuple(image[0, 0]) == (128, 0, 127)  # 255*a + 0*(1-a), 0, 0*a + 255*(1-a), a = 128/255
    assert tuple(image[4, 0]) == (0, 255, 0)
    assert tuple(image[7, 7]) == (0, 0, 255)
    np.testing.assert_array_equal(decode_image(samples["rgb"].images[0]), rgb)


def test_scale_category_and_format_from_the_cli(tmp_path, capsys):
    obj = make_object(tmp_path / "src" / "obj", n_views=2)
    out = tmp_path / "out"
    code = main([str(tmp_path / "src"), "--format", "nerf-synthetic", "--out", str(out), "--scale", "0.5",
                 "--category", "chair", "--image-format", "webp", "--background", "0,0,0", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "wrote 1 of 1 objects (2 views) into 1 shards" in printed and "shard-000000.tar" in printed
    (sample,) = read_shards([str(out / "shard-000000.tar")])
    assert sample.object_id == "obj" and sample.category == "chair" and sample.image_format == "webp"
    assert sample.scale == 0.5 and "--scale" in sample.extra["scale_reason"]
    for i in range(2):
        np.testing.assert_allclose(sample.c2w[i][:3, 3], 0.5 * obj.c2w_blender[i][:3, 3])
        np.testing.assert_allclose(sample.c2w[i][:3, :3] @ np.diag([1, -1, -1]), obj.c2w_blender[i][:3, :3])


def test_missing_image_and_malformed_json_skip_only_that_object(tmp_path):
    root = tmp_path / "src"
    make_object(root / "good", n_views=2)
    missing = make_object(root / "missing", n_views=3, extensionless=True)
    os.remove(missing.image_paths[1])
    make_object(root / "badjson", n_views=2)
    bad_json = root / "badjson" / "transforms.json"
    bad_json.write_text(bad_json.read_text()[:-20])
    out = tmp_path / "out"

    result = subprocess.run(
        [sys.executable, "-m", "data_pipeline.ingest", str(root), "--format", "nerf-synthetic", "--out", str(out), "--workers", "2", "--normalize", "none"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1, result.stderr
    text = result.stdout + result.stderr
    missing_stem = os.path.splitext(missing.image_paths[1])[0]
    assert f"skipped missing: {missing_stem}: image not found" in text
    assert f"skipped badjson: {bad_json}: malformed JSON" in text
    assert "wrote 1 of 3 objects" in result.stdout and "skipped 2 objects" in result.stdout
    assert [s.object_id for s in read_shards([str(out / "shard-000000.tar")])] == ["good"]


def test_bad_matrix_and_bad_camera_skip_that_object(tmp_path):
    root = tmp_path / "src"
    make_object(root / "a_good", n_views=2)
    for name, mangle in (("b_3x4", lambda m: m[:3]), ("c_skewed", lambda m: [[v * 1.2 for v in row[:3]] + row[3:] for row in m[:3]] + m[3:]),
                         ("d_ragged", lambda m: m[:3] + [[0, 0, 1]])):
        make_object(root / name, n_views=2)
        path = root / name / "transforms.json"
        doc = json.loads(path.read_text())
        doc["frames"][1]["transform_matrix"] = mangle(doc["frames"][1]["transform_matrix"])
        path.write_text(json.dumps(doc))
    make_object(root / "e_nofov", n_views=1)
    path = root / "e_nofov" / "transforms.json"
    path.write_text(json.dumps({"frames": json.loads(path.read_text())["frames"]}))

    lines: list[str] = []
    summary = ingest([str(root)], str(tmp_path / "out"), log=lines.append)
    assert summary.exit_code == 1 and summary.objects_written == 1
    reasons = {s.object_id: s.reason for s in summary.skipped}
    assert set(reasons) == {"b_3x4", "c_skewed", "d_ragged", "e_nofov"}
    assert reasons["b_3x4"] == f"{root / 'b_3x4' / 'transforms.json'} frames[1].transform_matrix must be 4x4, got shape (3, 4)"
    assert f"{root / 'c_skewed' / 'transforms.json'} frames[1].c2w: rotation is not orthonormal" in reasons["c_skewed"]
    assert "d_ragged" in reasons["d_ragged"] and "transform_matrix must be a 4x4 matrix" in reasons["d_ragged"]
    assert "neither camera_angle_x nor fl_x" in reasons["e_nofov"]
    assert lines == [f"skipped {k}: {v}" for k, v in reasons.items()]
    with pytest.raises(IngestError, match="must be 4x4"):
        load_nerf_synthetic_object(str(root / "b_3x4"))


def test_folder_of_object_folders(tmp_path):
    root = tmp_path / "omni"
    make_object(root / "toy_car" / "toy_car_001" / "render", n_views=2, seed=4)
    make_object(root / "apple" / "apple_002", n_views=2, seed=5)
    make_object(root / "apple" / "apple_001", n_views=2, seed=6)
    (root / "apple" / "notes").mkdir()  # a folder without transforms is not an object
    single = make_object(tmp_path / "lone_object", n_views=1)

    summary = ingest([str(root), single.folder], str(tmp_path / "out"))
    samples = read_shards(summary.shards)
    assert [s.object_id for s in samples] == ["apple/apple_001", "apple/apple_002", "toy_car/toy_car_001/render", "lone_object"]
    assert [s.key for s in samples] == ["apple_apple_001", "apple_apple_002", "toy_car_toy_car_001_render", "lone_object"]

    with pytest.raises(SourceError, match="no folder with a transforms"):
        ingest([str(root / "apple" / "notes")], str(tmp_path / "out2"))
    for bad in ([str(root / "apple" / "notes")], [str(tmp_path / "nowhere")], [str(root), "--background", "2,0,0"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*bad, "--out", str(tmp_path / "out3"), "--no-progress"])
        assert exit_info.value.code == 2


def test_duplicate_keys_are_skipped(tmp_path):
    make_object(tmp_path / "src" / "a" / "b", n_views=1)
    make_object(tmp_path / "src" / "a_b", n_views=1)
    summary = ingest([str(tmp_path / "src")], str(tmp_path / "out"))
    assert summary.objects_written == 1 and summary.exit_code == 1
    assert "sample key 'a_b' is already used" in summary.skipped[0].reason


def test_two_workers_write_byte_identical_shards(tmp_path):
    root = tmp_path / "src"
    make_dataset(root)
    make_object(root / "zeta", n_views=2, seed=9)
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        summary = ingest([str(root)], str(out), resolution=40, max_objects=3, workers=workers)
        assert summary.objects_written == 4 and len(summary.shards) == 2
        outputs[workers] = {name: (out / name).read_bytes() for name in sorted(os.listdir(out))}
    assert list(outputs[1]) == ["shard-000000.tar", "shard-000000.tar.idx.json", "shard-000001.tar", "shard-000001.tar.idx.json"]
    assert outputs[1] == outputs[2]


def test_ingest_to_an_fsspec_url_and_maxsize(tmp_path):
    make_dataset(tmp_path / "src")
    out = f"memory://ingest-{tmp_path.name}/shards"
    summary = ingest([str(tmp_path / "src")], out, max_bytes=1, prefix="omni")
    # max_bytes=1: every object gets its own shard (a shard always takes at least one object)
    assert summary.shards == [f"{out}/omni-{i:06d}.tar" for i in range(3)]
    assert summary.pattern == f"{out}/omni-{{000000..000002}}.tar"
    report = validate(summary.pattern)
    assert report.ok, report.format()
    assert report.num_objects == 3 and all(shard.has_index for shard in report.shards)


def test_declared_grid_differs_from_image_size(tmp_path):
    """fl_x/cx/... are in the grid of the declared w, h: an image stored at half size halves them."""
    obj = make_object(tmp_path / "half", n_views=2, width=80, height=60, focal={"fl_x": 140.0, "fl_y": 144.0, "cx": 75.0, "cy": 62.0})
    path = tmp_path / "half" / "transforms.json"
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "w": 160, "h": 120}))
    sample = load_nerf_synthetic_object(obj.folder)
    np.testing.assert_allclose(sample.intrinsics[0], [[70.0, 0, 37.5], [0, 72.0, 31.0], [0, 0, 1]])
    path.write_text(json.dumps({**doc, "w": 160, "h": 60}))
    with pytest.raises(IngestError, match="different aspect ratios"):
        load_nerf_synthetic_object(obj.folder)


def test_ingest_and_validate_on_s3(tmp_path, s3_env, s3_bucket):
    """Both commands against a real S3 server (SeaweedFS on loopback), settings from AWS_* only."""
    make_dataset(tmp_path / "src")
    out = f"{s3_bucket}/omni/v1"
    ingested = subprocess.run([sys.executable, "-m", "data_pipeline.ingest", str(tmp_path / "src"), "--format", "nerf-synthetic",
                               "--out", out, "--maxcount", "2", "--resolution", "32", "--workers", "2", "--no-progress",
                               "--normalize", "none"],
                              capture_output=True, text=True, timeout=120)
    assert ingested.returncode == 0, ingested.stdout + ingested.stderr
    pattern = f"{out}/shard-{{000000..000001}}.tar"
    assert f"shards: {pattern}" in ingested.stdout
    checked = subprocess.run([sys.executable, "-m", "data_pipeline.validate", f"{out}/*.tar", "--no-progress"],
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "objects: 3" in checked.stdout and "views: 12" in checked.stdout and "32x24 (3 objects)" in checked.stdout

    # a shard cut short in the bucket is caught through ranged reads as well
    with storage.open_url(f"{out}/shard-000001.tar", "rb") as f:
        data = f.read()
    with storage.open_url(f"{out}/cut-000000.tar", "wb") as f:
        f.write(data[: len(data) // 2])
    report = validate(f"{out}/cut-000000.tar")
    assert not report.ok and any("truncated" in p.reason for p in report.problems), report.format()
