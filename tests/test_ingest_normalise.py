"""Ingest normalises render folders into the box from the data (visual hull of the alpha masks).

The object is an analytic sphere in centimetre-like units far off the origin (centre (12, -5, 3),
radius 4), "rendered" here exactly: a pixel is opaque when its centre's ray hits the sphere.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from PIL import Image

from data_pipeline.cameras import intrinsics_from_fov, look_at_c2w, project_points
from data_pipeline.ingest import ingest
from data_pipeline.schema import decode_mask, parse_sample
from data_pipeline.shards import iter_tar_groups
from data_pipeline.validate import validate
from data_pipeline.visual_hull import visual_hull_box

CENTRE = np.array([12.0, -5.0, 3.0])
RADIUS = 4.0
SIZE = 64
ANGLE_X = 0.7


def sphere_views(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    K = intrinsics_from_fov(SIZE, SIZE, ANGLE_X)
    cams, masks = [], []
    jj, ii = np.meshgrid(np.arange(SIZE) + 0.5, np.arange(SIZE) + 0.5)
    for i in range(n):
        az, el = 2 * math.pi * i / n, rng.uniform(-0.5, 1.0)
        eye = CENTRE + 30.0 * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
        c2w = look_at_c2w(eye, CENTRE)
        dirs = np.stack([(jj - K[0, 2]) / K[0, 0], (ii - K[1, 2]) / K[1, 1], np.ones_like(jj)], -1) @ c2w[:3, :3].T
        dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
        oc = eye - CENTRE
        b = dirs @ oc
        masks.append(b * b - (oc @ oc - RADIUS**2) >= 0)
        cams.append(c2w)
    return K, np.stack(cams), np.stack(masks)


def write_folder(folder: str, n: int = 16) -> tuple[np.ndarray, np.ndarray]:
    K, cams, masks = sphere_views(n)
    os.makedirs(os.path.join(folder, "train"), exist_ok=True)
    frames = []
    for i, (c2w, mask) in enumerate(zip(cams, masks)):
        rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
        rgba[mask] = (200, 120, 40, 255)
        Image.fromarray(rgba, "RGBA").save(os.path.join(folder, "train", f"r_{i}.png"))
        frames.append({"file_path": f"./train/r_{i}", "transform_matrix": (c2w @ np.diag([1.0, -1, -1, 1])).tolist()})
    with open(os.path.join(folder, "transforms_train.json"), "w") as f:
        json.dump({"camera_angle_x": ANGLE_X, "frames": frames}, f)
    return K, cams


def test_visual_hull_box_of_a_sphere():
    K, cams, masks = sphere_views(16)
    lo, hi = visual_hull_box(masks, np.repeat(K[None], len(cams), 0), cams)
    np.testing.assert_allclose((lo + hi) / 2, CENTRE, atol=0.3)
    half = (hi - lo) / 2
    assert (half >= RADIUS - 0.1).all() and (half <= RADIUS * 1.15).all(), half  # a hull contains the object


def test_ingest_normalises_into_the_box_and_keeps_masks(tmp_path):
    K, cams = write_folder(str(tmp_path / "src" / "ball"))
    out = str(tmp_path / "out")
    summary = ingest([str(tmp_path / "src")], out, progress=False)
    assert summary.objects_written == 1 and not summary.skipped
    assert validate(os.path.join(out, "*.tar")).ok
    with open(summary.shards[0], "rb") as f:
        (key, _, members), = list(iter_tar_groups(f))
    sample = parse_sample(key, members)
    norm, bbox = sample.extra["normalisation"], np.asarray(sample.extra["object_bbox"])
    assert norm["method"] == "visual-hull"
    assert np.abs(bbox).max() <= 0.9 + 1e-9 and np.abs(bbox).max() > 0.85
    M = np.asarray(sample.extra["source_to_world"])
    centre_world = M[:3, :3] @ CENTRE + M[:3, 3]
    np.testing.assert_allclose(centre_world, 0.0, atol=0.08)  # the sphere is centred
    assert 0.8 < sample.scale * RADIUS <= 0.9  # and fills the box (hull slightly larger than the sphere)
    # the cameras moved with the object: any source point projects where it did
    points = CENTRE + np.array([[0.0, 0, 0], [RADIUS, 0, 0], [0, 2.0, -3.0]])
    for i in range(len(cams)):
        before, _ = project_points(points, K, cams[i])
        after, _ = project_points(points @ M[:3, :3].T + M[:3, 3], sample.intrinsics[i], sample.c2w[i])
        np.testing.assert_allclose(after, before, atol=1e-6)
    mask = decode_mask(sample.masks[0], SIZE, SIZE)
    assert set(np.unique(mask)) == {0, 255}


def test_normalize_none_keeps_the_native_scale(tmp_path):
    write_folder(str(tmp_path / "src" / "ball"), n=4)
    summary = ingest([str(tmp_path / "src")], str(tmp_path / "out"), normalize="none", progress=False)
    with open(summary.shards[0], "rb") as f:
        (key, _, members), = list(iter_tar_groups(f))
    sample = parse_sample(key, members)
    assert sample.scale == 1.0 and sample.extra["normalisation"]["method"] == "none"
    np.testing.assert_allclose(np.asarray(sample.extra["source_to_world"]), np.eye(4))


def test_the_reader_warns_once_when_objects_do_not_fit_the_box(tmp_path, caplog):
    """Native-scale objects far off the origin: one warning naming the first, none once normalised."""
    import logging

    from data_pipeline.reader import ReaderConfig, StreamingReader

    for name in ("a", "b", "c"):
        write_folder(str(tmp_path / "src" / name), n=4)
    native = ingest([str(tmp_path / "src")], str(tmp_path / "native"), normalize="none", progress=False)
    fitted = ingest([str(tmp_path / "src")], str(tmp_path / "fitted"), progress=False)

    def read_all(pattern: str) -> list[str]:
        caplog.clear()
        config = ReaderConfig(urls=pattern, batch_size=1, context_views_min=1, context_views_max=1, num_workers=0,
                              box_half_size=1.0)
        with caplog.at_level(logging.WARNING, logger="data_pipeline.box_fit"):
            for _ in StreamingReader(config, rank=0, world_size=1):
                pass
        return [r.getMessage() for r in caplog.records if r.name == "data_pipeline.box_fit"]

    warnings = read_all(native.pattern)
    assert len(warnings) == 1 and "does not fit the model's box" in warnings[0] and "do not see the box centre" in warnings[0]
    assert read_all(fitted.pattern) == []
