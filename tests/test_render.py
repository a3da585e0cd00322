"""data_pipeline.render with real Blender (bpy): cameras proved independently of Blender.

Meshes are made here with trimesh (a box, an off-centre scaled ellipsoid in a GLB scene with a node
transform, a textured sphere as GLB and OBJ, tiny and huge scales), rendered through the real
command, and each view's mask is compared with the silhouette of the *file's* mesh, loaded by
trimesh, moved by the recorded ``mesh_to_world`` and projected through the recorded K and c2w
with a rasteriser written here (pixel centres at (j + 0.5, i + 0.5)). A pair of tiny cubes checks
that a known 3D point lands on the expected pixel to a fraction of a pixel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import trimesh  # noqa: E402  (the dev extra; bpy, the [render] extra, is used by the command under test)

from data_pipeline.render.example_meshes import make_meshes, textured_sphere  # noqa: E402
from data_pipeline.schema import decode_image, decode_mask, parse_sample  # noqa: E402
from data_pipeline.shards import iter_tar_groups  # noqa: E402
from data_pipeline.storage import expand_urls  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESOLUTION = 128
VIEWS = 6


RENDER = [sys.executable, "-m", "data_pipeline.render"]


def render_env() -> dict:
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_render(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*RENDER, *args, "--no-progress"], cwd=ROOT, env=render_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


def start_render(*args: str, **popen) -> subprocess.Popen:
    """A render in the background, in its own process group (a test can kill it with its Blender workers)."""
    return subprocess.Popen([*RENDER, *args, "--no-progress"], cwd=ROOT, env=render_env(), start_new_session=True,
                            **popen)


def write_stretched_spheres(folder, count: int, axis: int, prefix: str) -> None:
    """``count`` distinct meshes in a new ``folder``: icospheres, the i-th stretched by 1 + i along ``axis``."""
    folder.mkdir()
    for i in range(count):
        scale = [1.0, 1.0, 0.5]
        scale[axis] += i
        mesh = trimesh.creation.icosphere(subdivisions=2)
        mesh.apply_scale(scale)
        mesh.export(str(folder / f"{prefix}{i}.ply"))


def read_samples(out: str) -> dict:
    samples = {}
    for url in expand_urls(os.path.join(out, "shard-*.tar")):
        with open(url, "rb") as f:
            for key, _, members in iter_tar_groups(f):
                sample = parse_sample(key, members)
                samples[sample.object_id] = sample
    return samples


def make_points_mesh(path: str) -> np.ndarray:
    """Two small cubes far apart; returns their centres (the known points), in file coordinates."""
    centres = np.array([[-1.0, 0.3, 0.2], [1.0, -0.3, -0.2]])
    cubes = [trimesh.creation.box((0.1, 0.1, 0.1)) for _ in centres]
    for cube, centre in zip(cubes, centres):
        cube.apply_translation(centre)
    trimesh.util.concatenate(cubes).export(path)
    return centres


def load_file_mesh(path: str):
    """The file's scene as trimesh loads it: node transforms applied, the file's own axes."""
    return trimesh.load(path, force="mesh", process=False)


def silhouette(vertices: np.ndarray, faces: np.ndarray, K: np.ndarray, c2w: np.ndarray, size: int) -> np.ndarray:
    """Pixels whose centre lies inside a projected triangle (every vertex in front of the camera)."""
    w2c = np.linalg.inv(c2w)
    cam = vertices @ w2c[:3, :3].T + w2c[:3, 3]
    assert (cam[:, 2] > 0).all(), "the object must be in front of the camera"
    uv = (cam @ K.T)[:, :2] / (cam @ K.T)[:, 2:3]
    mask = np.zeros((size, size), bool)
    for a, b, c in uv[faces]:
        lo = np.floor(np.minimum(np.minimum(a, b), c) - 0.5).astype(int).clip(0, size - 1)
        hi = np.ceil(np.maximum(np.maximum(a, b), c) - 0.5).astype(int).clip(0, size - 1)
        if (hi < lo).any():
            continue
        jj, ii = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1))
        p = np.stack([jj + 0.5, ii + 0.5], axis=-1)
        def edge(p0, p1):
            return (p1[0] - p0[0]) * (p[..., 1] - p0[1]) - (p1[1] - p0[1]) * (p[..., 0] - p0[0])
        e0, e1, e2 = edge(a, b), edge(b, c), edge(c, a)
        inside = ((e0 >= 0) & (e1 >= 0) & (e2 >= 0)) | ((e0 <= 0) & (e1 <= 0) & (e2 <= 0))
        mask[ii[inside], jj[inside]] = True
    return mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("meshes"))
    paths = make_meshes(folder)
    out = str(tmp_path_factory.mktemp("renders"))
    done = run_render(folder, "--out", out, "--engine", "workbench", "--views", str(VIEWS), "--resolution",
                      str(RESOLUTION), "--maxcount", "2", "--workers", "2", "--seed", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    return paths, out, read_samples(out), done


def test_every_mesh_is_rendered_with_masks_and_metadata(rendered):
    paths, out, samples, done = rendered
    assert sorted(samples) == sorted(paths)
    for object_id, sample in samples.items():
        assert sample.num_views == VIEWS and sample.masks is not None and len(sample.masks) == VIEWS
        assert sample.extra["source_file"] == paths[object_id]
        assert np.asarray(sample.extra["mesh_to_world"]).shape == (4, 4)
        assert sample.extra["warnings"] == []
        for i in range(VIEWS):
            mask = decode_mask(sample.masks[i], RESOLUTION, RESOLUTION)
            assert mask.max() == 255 and mask.min() == 0
            # the automatic distance keeps the whole object in view, filling it
            assert mask[[0, -1], :].max() == 0 and mask[:, [0, -1]].max() == 0
            rows, cols = np.nonzero(mask)
            assert max(rows.max() - rows.min(), cols.max() - cols.min()) > 0.3 * RESOLUTION
    validate = subprocess.run([sys.executable, "-m", "data_pipeline.validate", os.path.join(out, "shard-*.tar"),
                               "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert validate.returncode == 0, validate.stdout


@pytest.mark.parametrize("object_id", ["box", "ellipsoid", "textured_glb", "obj/textured_obj"])
def test_mask_matches_the_file_mesh_projected_through_the_recorded_cameras(rendered, object_id):
    paths, _, samples, _ = rendered
    sample = samples[object_id]
    mesh = load_file_mesh(paths[object_id])
    M = np.asarray(sample.extra["mesh_to_world"])
    world = mesh.vertices @ M[:3, :3].T + M[:3, 3]
    # normalised into the box: centred, largest half-extent fit * box = 0.9
    lo, hi = world.min(0), world.max(0)
    np.testing.assert_allclose((lo + hi) / 2, 0.0, atol=1e-4)
    assert abs((hi - lo).max() / 2 - 0.9) < 1e-4
    for i in range(VIEWS):
        expected = silhouette(world, mesh.faces, sample.intrinsics[i], sample.c2w[i], RESOLUTION)
        mask = decode_mask(sample.masks[i]) >= 128
        score = iou(mask, expected)
        assert score >= 0.95, f"{object_id} view {i}: silhouette IoU {score:.3f}"


def test_known_points_land_on_the_expected_pixels(tmp_path):
    """The centres of two small cubes, moved by mesh_to_world and projected, hit their blobs' centroids.

    Cycles (pixel-centred antialiasing): measured within 0.11 px on every view. Workbench's
    antialiasing jitter is biased by about -0.1 px, which is why this check uses Cycles.
    """
    path = str(tmp_path / "points.obj")
    known = make_points_mesh(path)
    out = str(tmp_path / "out")
    done = run_render(path, "--out", out, "--engine", "cycles", "--samples", "16", "--views", "4",
                      "--resolution", str(RESOLUTION), "--seed", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    sample = read_samples(out)["points"]
    M = np.asarray(sample.extra["mesh_to_world"])
    centres = np.c_[known, np.ones(len(known))] @ M.T
    for i in range(sample.num_views):
        alpha = decode_mask(sample.masks[i]).astype(np.float64) / 255.0
        w2c = np.linalg.inv(sample.c2w[i])
        cam = centres @ w2c.T
        uvw = cam[:, :3] @ sample.intrinsics[i].T
        uv = uvw[:, :2] / uvw[:, 2:3]
        ii, jj = np.indices(alpha.shape)
        for u, v in uv:
            near = (np.abs(jj + 0.5 - u) < 12) & (np.abs(ii + 0.5 - v) < 12)
            weight = alpha * near
            assert weight.sum() > 1.0, f"view {i}: nothing rendered near the expected pixel ({u:.1f}, {v:.1f})"
            centroid = np.array([(weight * (jj + 0.5)).sum(), (weight * (ii + 0.5)).sum()]) / weight.sum()
            assert np.abs(centroid - [u, v]).max() < 0.2, f"view {i}: blob at {centroid}, expected ({u:.2f}, {v:.2f})"


def test_cameras_come_from_the_seed_and_object_id_and_look_at_the_box(rendered):
    _, _, samples, _ = rendered
    from data_pipeline.render.settings import RenderSettings, camera_positions

    settings = RenderSettings(views=VIEWS, resolution=RESOLUTION, engine="workbench", seed=3)
    for object_id, sample in samples.items():
        lo, hi = np.asarray(sample.extra["object_bbox"])
        positions, _ = camera_positions(settings, object_id, float(np.linalg.norm((hi - lo) / 2)))
        np.testing.assert_allclose(sample.c2w[:, :3, 3], positions, atol=1e-5)
        # OpenCV: +z looks at the origin
        forward = sample.c2w[:, :3, 2]
        np.testing.assert_allclose(forward, -positions / np.linalg.norm(positions, axis=1, keepdims=True), atol=1e-5)
        fx = 0.5 * RESOLUTION / np.tan(np.radians(settings.fov_deg) / 2)
        np.testing.assert_allclose(sample.intrinsics[:, 0, 0], fx, rtol=1e-5)
        np.testing.assert_allclose(sample.intrinsics[:, :2, 2], RESOLUTION / 2, atol=1e-6)
    assert not np.allclose(samples["box"].c2w, samples["ellipsoid"].c2w)  # the object id enters the seed


def test_textures_are_rendered(rendered):
    _, _, samples, _ = rendered
    for object_id in ("textured_glb", "obj/textured_obj"):
        sample = samples[object_id]
        rgb = decode_image(sample.images[0]).astype(int)
        inside = decode_mask(sample.masks[0]) == 255
        red = ((rgb[..., 0] > rgb[..., 2] + 40) & inside).sum()
        blue = ((rgb[..., 2] > rgb[..., 0] + 40) & inside).sum()
        assert red > 0.1 * inside.sum() and blue > 0.1 * inside.sum(), f"{object_id}: checker texture not visible"


def test_background_compositing_and_cycles(tmp_path):
    """Cycles renders too, the views are composited on --background, and the mask still fits."""
    mesh = trimesh.creation.icosphere(subdivisions=2)
    mesh.apply_scale([2.0, 1.0, 1.0])
    path = str(tmp_path / "blob.stl")
    mesh.export(path)
    out = str(tmp_path / "out")
    done = run_render(path, "--out", out, "--engine", "cycles", "--samples", "4", "--views", "2", "--resolution", "48",
                      "--background", "0,1,0")
    assert done.returncode == 0, done.stderr[-3000:]
    sample = read_samples(out)["blob"]
    assert sample.background == (0.0, 1.0, 0.0)
    rgb = decode_image(sample.images[0])
    mask = decode_mask(sample.masks[0])
    assert (rgb[mask == 0] == [0, 255, 0]).all()
    M = np.asarray(sample.extra["mesh_to_world"])
    world = mesh.vertices @ M[:3, :3].T + M[:3, 3]
    for i in range(2):
        assert iou(decode_mask(sample.masks[i]) >= 128, silhouette(world, mesh.faces, sample.intrinsics[i], sample.c2w[i], 48)) >= 0.9


def test_bad_inputs_are_skipped_named_and_counted(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    trimesh.creation.box().export(str(folder / "good.glb"))
    (folder / "notamesh.obj").write_text("this is not a mesh\n")
    (folder / "broken.glb").write_bytes(b"glTF\x02\x00\x00\x00garbage")
    trimesh.PointCloud(np.random.default_rng(0).normal(size=(50, 3))).export(str(folder / "points.ply"))
    trimesh.creation.icosphere(subdivisions=4).export(str(folder / "huge.ply"))  # 5120 faces > --max-faces
    missing = folder / "missing"
    missing.mkdir()
    trimesh.exchange.export.export_mesh(textured_sphere(), str(missing / "untextured.obj"))
    os.remove(missing / "material_0.png")
    out = str(tmp_path / "out")
    done = run_render(str(folder), "--out", out, "--engine", "workbench", "--views", "2", "--resolution", "32",
                      "--max-faces", "2000")
    assert done.returncode == 1, done.stderr[-3000:]
    for name, reason in (("notamesh", "no mesh"), ("broken", "cannot import"), ("points", "no faces"),
                         ("huge", "more than --max-faces")):
        assert any(line.startswith(f"render: skipped {name} ") and reason in line for line in done.stderr.splitlines()), \
            f"{name}: {done.stderr[-2000:]}"
    assert "missing texture material_0.png: rendered untextured" in done.stderr
    samples = read_samples(out)
    assert sorted(samples) == ["good", "missing/untextured"]
    summary = json.load(open(os.path.join(out, "manifest", "summary.json")))
    assert summary["written"] == 2 and len(summary["skipped"]) == 4
    assert "4 skipped" in done.stdout


def test_missing_bpy_names_the_extra(tmp_path):
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nclass _Block:\n    def find_spec(self, name, path=None, target=None):\n"
        "        return None if name != 'bpy' else (_ for _ in ()).throw(ModuleNotFoundError('No module named bpy'))\n"
        "sys.meta_path.insert(0, _Block())\n")
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{ROOT}"}
    done = subprocess.run([sys.executable, "-m", "data_pipeline.render", str(tmp_path), "--out", str(tmp_path / "o")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "[render]" in done.stderr and "bpy" in done.stderr


def tree_bytes(folder: str) -> dict[str, bytes]:
    """Every shard, index and manifest part record under folder (the run summary excluded)."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel != os.path.join("manifest", "summary.json"):
                files[rel] = open(path, "rb").read()
    return files


def test_a_killed_run_resumed_with_the_same_arguments_equals_an_uninterrupted_run(tmp_path):
    import signal
    import time

    folder = tmp_path / "in"
    write_stretched_spheres(folder, 4, axis=0, prefix="m")
    args = [str(folder), "--engine", "cycles", "--samples", "4", "--views", "4", "--resolution", "48", "--maxcount", "1"]
    whole = str(tmp_path / "whole")
    assert run_render(*args, "--out", whole).returncode == 0

    resumed = str(tmp_path / "resumed")
    process = start_render(*args, "--out", resumed, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = os.path.join(resumed, "manifest", "part-000000.json")
    deadline = time.monotonic() + 120
    while not os.path.exists(first) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the run and its Blender workers, mid-job
    process.wait()
    parts_done = len([n for n in os.listdir(os.path.join(resumed, "manifest")) if n.startswith("part-")])
    assert 1 <= parts_done < 4, f"the kill should land mid-run ({parts_done} parts done)"
    again = run_render(*args, "--out", resumed)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming: {parts_done} of 4 parts" in again.stderr
    assert tree_bytes(resumed) == tree_bytes(whole)
    # other arguments are refused rather than mixed into the same output
    other = run_render(*args[:-1], "2", "--out", resumed)
    assert other.returncode == 2 and "other" in other.stderr


def test_rendered_shards_train(rendered, tmp_path):
    """launch/local.py with data.train_urls pointing at the rendered shards runs training steps."""
    _, out, _, _ = rendered
    run_dir = str(tmp_path / "run")
    values = {"run_dir": run_dir, "data.train_urls": os.path.join(out, "shard-*.tar"), "data.holdout_urls": "null",
              "data.batch_size": 2, "data.resolution": 32, "data.num_workers": 0, "data.context_views_max": 2,
              "model.encode_resolution": 16, "model.rays_per_view": 64, "log.every_steps": 1,
              "log.preview_every_steps": 0, "log.tensorboard": "false", "checkpoint.every_steps": 100,
              "train.max_steps": 3, "train.device": "cpu"}
    env = {**render_env(), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "launch/local.py", "--nproc", "1", *[f"{k}={v}" for k, v in values.items()]],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps][-1] == 3 and all(np.isfinite(r["loss"]) for r in steps)


def test_the_reader_delivers_masks_beside_the_views(rendered):
    """ReaderConfig.masks adds (B, k|m, 1, H, W) masks in [0, 1] that line up with the views."""
    import torch

    from data_pipeline.reader import ReaderConfig, StreamingReader

    _, out, _, _ = rendered
    pattern = os.path.join(out, "shard-*.tar")
    common = dict(urls=pattern, batch_size=2, context_views_min=2, context_views_max=2, target_views=1,
                  resolution=64, num_workers=0, seed=1)
    plain = list(StreamingReader(ReaderConfig(**common), rank=0, world_size=1))
    masked = list(StreamingReader(ReaderConfig(**common, masks=True), rank=0, world_size=1))
    assert plain[0].target_masks is None
    for a, b in zip(plain, masked):
        assert torch.equal(a.target_images, b.target_images) and torch.equal(a.context_images, b.context_images)
        assert b.target_masks.shape == (2, 1, 1, 64, 64) and b.context_masks.shape == (2, 2, 1, 64, 64)
        assert 0.0 <= float(b.target_masks.min()) and float(b.target_masks.max()) == 1.0
        # where the mask is empty the view shows the (white) background
        background = b.target_masks[:, :, 0] == 0
        assert torch.all(b.target_images.permute(0, 1, 3, 4, 2)[background] == 1.0)


def test_meshes_from_s3_to_s3(tmp_path, s3_env, s3_bucket):
    """Inputs and output on a real S3 server (SeaweedFS on loopback); settings from AWS_* only."""
    from data_pipeline import storage

    local = tmp_path / "meshes"
    paths = make_meshes(str(local))
    for object_id in ("textured_glb", "box"):
        with open(paths[object_id], "rb") as src, storage.open_url(f"{s3_bucket}/in/{os.path.basename(paths[object_id])}", "wb") as dst:
            dst.write(src.read())
    out = f"{s3_bucket}/renders"
    env = render_env()
    args = [f"{s3_bucket}/in", "--out", out, "--engine", "workbench", "--views", "2", "--resolution", "32", "--no-progress"]
    done = subprocess.run([sys.executable, "-m", "data_pipeline.render", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    checked = subprocess.run([sys.executable, "-m", "data_pipeline.validate", f"{out}/shard-*.tar", "--no-progress"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert checked.returncode == 0 and "objects: 2" in checked.stdout, checked.stdout + checked.stderr
    again = subprocess.run([sys.executable, "-m", "data_pipeline.render", *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0 and "resuming: 1 of 1 parts" in again.stderr, again.stderr[-3000:]


def test_a_blender_worker_that_dies_is_replaced_and_the_output_is_complete(tmp_path):
    """SIGKILL one of the --workers 2 Blender processes mid-run: its objects are rendered again."""
    import signal
    import time

    import psutil  # noqa: E402  (comes with ray[default])
    folder = tmp_path / "in"
    write_stretched_spheres(folder, 6, axis=1, prefix="w")  # enough work that a worker is still rendering when it is killed
    args = [str(folder), "--engine", "cycles", "--samples", "4", "--views", "4", "--resolution", "48", "--maxcount", "2"]
    whole = str(tmp_path / "whole")
    assert run_render(*args, "--out", whole).returncode == 0
    out = str(tmp_path / "out")
    process = start_render(*args, "--out", out, "--workers", "2", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and process.poll() is None and time.monotonic() < deadline:
        workers = [p for p in psutil.Process(process.pid).children()
                   if "spawn_main" in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline())]
        if len(workers) == 2 and os.path.isdir(os.path.join(out, "manifest")):
            time.sleep(0.5)  # let it start rendering
            try:
                workers[0].send_signal(signal.SIGKILL)
                killed = workers[0].pid
            except psutil.NoSuchProcess:  # it finished (or was replaced) meanwhile: look again
                pass
        time.sleep(0.05)
    stdout, stderr = process.communicate(timeout=300)
    assert killed is not None, "no worker was killed"
    assert process.returncode == 0, stderr[-3000:]
    assert "a Blender worker died" in stderr
    assert tree_bytes(out) == tree_bytes(whole)


def test_fbx_renders_in_its_own_axes(tmp_path):
    """FBX (trimesh cannot write it: Blender writes it here, from a PLY, axes unconverted): the PLY's
    vertices, moved by the recorded mesh_to_world, match the FBX's rendered masks."""
    mesh = trimesh.creation.icosphere(subdivisions=2)
    mesh.apply_scale([2.0, 0.6, 1.0])
    mesh.apply_translation([3.0, -1.0, 0.5])
    ply, fbx = str(tmp_path / "blob.ply"), str(tmp_path / "blob.fbx")
    mesh.export(ply)
    script = ("import sys, bpy\nbpy.ops.wm.read_factory_settings(use_empty=True)\n"
              "bpy.ops.wm.ply_import(filepath=sys.argv[1], forward_axis='Y', up_axis='Z')\n"
              "bpy.ops.export_scene.fbx(filepath=sys.argv[2], axis_forward='Y', axis_up='Z')\n")
    made = subprocess.run([sys.executable, "-c", script, ply, fbx], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0 and os.path.isfile(fbx), made.stderr[-2000:]
    out = str(tmp_path / "out")
    done = run_render(fbx, "--out", out, "--engine", "workbench", "--views", "3", "--resolution", "64")
    assert done.returncode == 0, done.stderr[-3000:]
    sample = read_samples(out)["blob"]
    M = np.asarray(sample.extra["mesh_to_world"])
    world = mesh.vertices @ M[:3, :3].T + M[:3, 3]
    for i in range(3):
        score = iou(decode_mask(sample.masks[i]) >= 128, silhouette(world, mesh.faces, sample.intrinsics[i], sample.c2w[i], 64))
        assert score >= 0.95, f"view {i}: IoU {score:.3f}"


def test_a_camera_too_close_is_warned_of(tmp_path):
    path = str(tmp_path / "cube.ply")
    trimesh.creation.box((1.0, 1.0, 1.0)).export(path)
    done = run_render(path, "--out", str(tmp_path / "out"), "--engine", "workbench", "--views", "2", "--resolution", "32",
                      "--camera-distance", "1.6")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "the object touches the image border in 2 view(s)" in done.stderr
