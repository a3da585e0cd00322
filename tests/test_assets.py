"""Meshes, turntables and single-image-to-3D: iso-surfaces against analytic shapes, files (written
by trimesh) checked at the byte level and read back, and the whole image -> mesh + GIF path on the
tiny model."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image
from torch import nn

from data_pipeline.synthetic import make_object
from model_zoo.assets import choose_level, default_level, extract_mesh, turntable
from model_zoo.goembedfusion import GOEmbedFusion, ModelConfig
from model_zoo.image_to_3d import corner_background, image_to_3d, load_image, main
from model_zoo.marching_tetrahedra import edge_use_counts, marching_tetrahedra
from model_zoo.mesh import density_grid, marching_cubes, write_glb, write_ply


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def grid(resolution=64):
    axis = np.linspace(-1.0, 1.0, resolution)
    return np.meshgrid(axis, axis, axis, indexing="ij"), 2.0 / (resolution - 1)


def assert_closed_and_outward(vertices, faces):
    assert len(faces) > 0
    assert (edge_use_counts(faces) == 2).all(), "every edge must be shared by exactly two faces"
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    assert mesh.is_winding_consistent
    assert mesh.volume > 0, "outward normals give a positive signed volume"
    return mesh


# -- marching cubes -----------------------------------------------------------------------------

def test_sphere_radius_closed_and_outward():
    (x, y, z), spacing = grid(64)
    radius = 0.6
    density = radius - np.sqrt(x * x + y * y + z * z)  # > 0 inside
    start = time.perf_counter()
    vertices, faces = marching_tetrahedra(density, 0.0, spacing, -1.0)
    assert time.perf_counter() - start < 10  # 64^3: well under a second idle
    distances = np.linalg.norm(vertices, axis=1)
    assert abs(distances.mean() - radius) < 0.02 * radius
    assert np.abs(distances - radius).max() < spacing
    mesh = assert_closed_and_outward(vertices, faces)
    assert mesh.volume == pytest.approx(4 / 3 * np.pi * radius ** 3, rel=0.02)
    # every face normal points away from the centre
    assert (np.einsum("ij,ij->i", mesh.face_normals, mesh.triangles_center) > 0).all()


def test_cube_and_border_are_closed():
    (x, y, z), spacing = grid(33)
    cube = np.maximum(np.maximum(np.abs(x), np.abs(y)), np.abs(z))
    vertices, faces = marching_tetrahedra(0.5 - cube, 0.0, spacing, -1.0)
    mesh = assert_closed_and_outward(vertices, faces)
    assert mesh.volume == pytest.approx(1.0, rel=0.02)
    # the faces pass exactly through grid points (values equal to the level): still closed, and no
    # two vertices share a position (a reader that merges duplicates keeps them all)
    np.testing.assert_allclose(vertices.min(0), -0.5, atol=1e-4 * spacing)
    np.testing.assert_allclose(vertices.max(0), 0.5, atol=1e-4 * spacing)
    assert len(np.unique(vertices, axis=0)) == len(vertices)
    # A field that fills the whole grid is closed at the border (within half a cell outside it)...
    vertices, faces = marching_tetrahedra(np.ones((6, 7, 8)), 0.5)
    mesh = assert_closed_and_outward(vertices, faces)
    np.testing.assert_allclose(vertices.min(0), -0.5, atol=1e-6)
    np.testing.assert_allclose(vertices.max(0), [5.5, 6.5, 7.5], atol=1e-6)
    # ...or left open without close_boundary; an empty field gives an empty mesh.
    assert len(marching_tetrahedra(np.ones((6, 7, 8)), 0.5, close_boundary=False)[1]) == 0
    vertices, faces = marching_tetrahedra(np.zeros((5, 5, 5)), 0.5)
    assert vertices.shape == (0, 3) and faces.shape == (0, 3)


def test_axis_order_spacing_and_origin():
    # density rises along axis 0 only: the surface is the plane x = 0.3 (inside where x > 0.3)
    (x, _, _), spacing = grid(17)
    vertices, faces = marching_tetrahedra(x - 0.3, 0.0, spacing, -1.0, close_boundary=False)
    np.testing.assert_allclose(vertices[:, 0], 0.3, atol=1e-6)
    normals = trimesh.Trimesh(vertices, faces, process=False).face_normals
    np.testing.assert_allclose(normals, np.tile([[-1.0, 0.0, 0.0]], (len(faces), 1)), atol=1e-6)


def test_noise_is_closed_and_consistently_wound():
    # white noise: every inside/outside pattern, saddles everywhere, many separate pieces
    density = np.random.default_rng(0).standard_normal((40, 40, 40))
    start = time.perf_counter()
    vertices, faces = marching_tetrahedra(density, 0.0)
    assert time.perf_counter() - start < 30  # about 1 s on an idle 2-core machine (400k faces)
    assert (edge_use_counts(faces) == 2).all()
    assert trimesh.Trimesh(vertices, faces, process=False).is_winding_consistent


# -- files --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ellipsoid():
    (x, y, z), spacing = grid(40)
    density = 1.0 - (((x - 0.2) / 0.5) ** 2 + (y / 0.3) ** 2 + ((z + 0.1) / 0.7) ** 2)
    vertices, faces = marching_tetrahedra(density, 0.0, spacing, -1.0)
    colours = np.round((vertices - vertices.min(0)) / np.ptp(vertices, 0) * 255).astype(np.uint8)
    return vertices, faces, colours


def test_ply_reads_back_in_trimesh(tmp_path, ellipsoid):
    vertices, faces, colours = ellipsoid
    assert marching_cubes is marching_tetrahedra  # the old name still imports from model_zoo.mesh
    write_ply(tmp_path / "m.ply", vertices, faces, colours)
    mesh = trimesh.load(tmp_path / "m.ply", process=False)
    assert mesh.vertices.shape == vertices.shape and mesh.faces.shape == faces.shape
    np.testing.assert_allclose(mesh.vertices, vertices, atol=1e-6)
    np.testing.assert_array_equal(mesh.faces, faces)
    np.testing.assert_array_equal(mesh.visual.vertex_colors[:, :3], colours)
    assert trimesh.load(tmp_path / "m.ply").vertices.shape == vertices.shape  # default processing merges nothing
    write_ply(tmp_path / "empty.ply", np.zeros((0, 3)), np.zeros((0, 3), int))  # an empty surface: still a valid file
    header = (tmp_path / "empty.ply").read_bytes().split(b"end_header")[0]
    assert b"element vertex 0" in header and b"element face 0" in header


def test_glb_reads_back_in_trimesh(tmp_path, ellipsoid):
    vertices, faces, colours = ellipsoid
    path = tmp_path / "m.glb"
    write_glb(path, vertices, faces, colours)
    data = path.read_bytes()
    magic, version, length = struct.unpack_from("<III", data, 0)
    assert (magic, version, length) == (0x46546C67, 2, len(data))
    json_length, json_type = struct.unpack_from("<II", data, 12)
    assert json_type == 0x4E4F534A and json_length % 4 == 0
    document = json.loads(data[20:20 + json_length])
    bin_length, bin_type = struct.unpack_from("<II", data, 20 + json_length)
    assert bin_type == 0x004E4942 and bin_length % 4 == 0 and 28 + json_length + bin_length == len(data)
    assert document["asset"]["version"] == "2.0"
    (primitive,) = document["meshes"][0]["primitives"]
    assert set(primitive["attributes"]) == {"POSITION", "COLOR_0"} and primitive["mode"] == 4  # triangles
    assert document["accessors"][primitive["indices"]]["componentType"] == 5125  # uint32 indices
    pbr = document["materials"][primitive["material"]]["pbrMetallicRoughness"]
    assert (pbr["metallicFactor"], pbr["roughnessFactor"]) == (0.0, 1.0)  # matte: the colours show
    assert all(view["byteOffset"] % 4 == 0 for view in document["bufferViews"])
    position = document["accessors"][document["meshes"][0]["primitives"][0]["attributes"]["POSITION"]]
    np.testing.assert_allclose(position["min"], vertices.min(0), atol=1e-6)

    scene = trimesh.load(path)
    (mesh,) = scene.geometry.values()
    assert len(mesh.vertices) == len(vertices) and len(mesh.faces) == len(faces)
    np.testing.assert_allclose(mesh.bounds, [vertices.min(0), vertices.max(0)], atol=1e-5)
    # the node turns +z (this project's up) into glTF's +y: world (x, y, z) shows as (x, z, -y)
    lo, hi = vertices.min(0), vertices.max(0)
    np.testing.assert_allclose(scene.bounds, [[lo[0], lo[2], -hi[1]], [hi[0], hi[2], -lo[1]]], atol=1e-5)
    # with a material, trimesh keeps COLOR_0 as a vertex attribute of the textured visual
    np.testing.assert_array_equal(np.asarray(mesh.visual.vertex_attributes["color"])[:, :3], colours)
    # an empty mesh is still a valid file
    write_glb(tmp_path / "empty.glb", np.zeros((0, 3)), np.zeros((0, 3), int))
    assert len(trimesh.load(tmp_path / "empty.glb").geometry) == 0


# -- the model's fields -------------------------------------------------------------------------

class _PointFeatures(nn.Module):
    """A stand-in representation whose feature at a point is the point itself."""

    state_shape = (1,)

    def sample(self, state, points):
        return points


class _SphereDecoder(nn.Module):
    """σ = 100 · (0.4 − |p − c|) inside (c off-centre), colour = (p + 1) / 2."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(100.0))

    def forward(self, features):
        centre = torch.tensor([0.3, 0.1, -0.2])
        density = torch.relu(0.4 - (features - centre).norm(dim=-1)) * self.scale
        return density, (features + 1) / 2


class _FieldModel(nn.Module):
    def __init__(self, half_size=2.0):
        super().__init__()
        self.representation = _PointFeatures()
        self.renderer = nn.Module()
        self.renderer.decoder, self.renderer.box_half_size, self.renderer.samples_per_ray = _SphereDecoder(), half_size, 16


def test_extract_mesh_from_a_decoder_field(tmp_path):
    model = _FieldModel(half_size=2.0)  # world point p is read at normalised p / 2
    state = torch.zeros(1)
    densities, spacing, origin = density_grid(model, state, 33)
    assert densities.shape == (33, 33, 33) and spacing == pytest.approx(4 / 32) and origin == -2.0
    level, rule = choose_level(model, densities)
    assert level == default_level(model) == pytest.approx(np.log(2) * 16 / 4) and "half-opaque" in rule
    result = extract_mesh(model, state, tmp_path, resolution=65, level=10.0)  # σ = 10 at |p/2 − c| = 0.3
    vertices = trimesh.load(result["ply"], process=False).vertices
    centre = 2.0 * np.array([0.3, 0.1, -0.2])
    assert np.linalg.norm(vertices - centre, axis=1).mean() == pytest.approx(0.6, rel=0.02)
    np.testing.assert_allclose(vertices.mean(0), centre, atol=0.01)
    colours = trimesh.load(result["ply"], process=False).visual.vertex_colors[:, :3].astype(float)
    np.testing.assert_allclose(colours, (vertices / 2 + 1) / 2 * 255, atol=1.0)
    (glb_mesh,) = trimesh.load(result["glb"]).geometry.values()
    assert len(glb_mesh.vertices) == len(vertices) == result["vertices"]
    # nothing reaches σ*: the level falls back to mid-range and says so
    assert "fallback" in choose_level(model, np.zeros((4, 4, 4)) + [[[0.0, 0.5, 1.0, 2.0]]])[1]  # σ* = 2.77


# -- the model: turntable and image to 3D -----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return GOEmbedFusion(ModelConfig(encode_resolution=16)).eval()


def test_turntable_gif_has_the_frames(tmp_path, tiny_model):
    state = torch.randn(tiny_model.representation.state_shape, generator=torch.Generator().manual_seed(1))
    path = turntable(tiny_model, state, tmp_path / "t.gif", frames=6, resolution=20)
    with Image.open(path) as gif:
        assert gif.n_frames == 6 and gif.size == (20, 20)


def test_background_from_the_image(tmp_path):
    black = np.zeros((40, 40, 3), np.uint8)
    black[10:30, 10:30] = 200
    assert corner_background(black / 255.0) == (0.0, 0.0, 0.0)
    mixed = black.copy()
    mixed[:5, :5] = 255
    assert corner_background(mixed / 255.0) == (1.0, 1.0, 1.0)
    rgba = np.zeros((30, 50, 4), np.uint8)  # transparent, wider than high: composited on white, centre-cropped
    rgba[:, 20:30] = [255, 0, 0, 255]
    Image.fromarray(rgba).save(tmp_path / "a.png")
    image, colour = load_image(tmp_path / "a.png", 15)
    assert colour == (1.0, 1.0, 1.0) and image.shape == (15, 15, 3)
    np.testing.assert_allclose(image[:, 0], 1.0)
    np.testing.assert_allclose(image[7, 7], [1.0, 0.0, 0.0], atol=0.02)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "object.png"
    path.write_bytes(make_object(seed=0, index=3, views=1, resolution=48).images[0])
    return path


def check_outputs(out, frames):
    for name in ("mesh.ply", "mesh.glb", "turntable.gif", "input.png", "summary.json"):
        assert (out / name).is_file(), name
    ply = trimesh.load(out / "mesh.ply", process=False)
    (glb,) = trimesh.load(out / "mesh.glb").geometry.values()
    assert len(ply.vertices) == len(glb.vertices) > 0
    with Image.open(out / "turntable.gif") as gif:
        assert gif.n_frames == frames


def test_image_to_3d_end_to_end(tmp_path, tiny_model, photo):
    progress = []
    result = image_to_3d(tiny_model, photo, tmp_path, steps=2, mesh_resolution=24, turntable_frames=4,
                         turntable_resolution=16, log=None, progress=lambda step, steps: progress.append((step, steps)))
    check_outputs(tmp_path, 4)
    assert progress == [(1, 2), (2, 2)]  # the sampler's callback, once per step
    assert set(result["timings"]) == {"preprocess", "sample", "mesh", "turntable", "total"}
    assert result["background"] == pytest.approx((1.0, 1.0, 1.0))  # the synthetic renders are on white
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["encode_resolution"] == 16 and summary["mesh"]["vertices"] == result["mesh"]["vertices"]
    with Image.open(tmp_path / "input.png") as image:
        assert image.size == (16, 16)


def test_cli(tmp_path, tiny_model, photo, monkeypatch, capsys):
    help_text = subprocess.run([sys.executable, "-m", "model_zoo.image_to_3d", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "--mesh-resolution" in help_text.stdout and "--model" in help_text.stdout
    loading = pytest.importorskip("model_zoo.loading")
    monkeypatch.setattr(loading, "load", lambda path, device: tiny_model)  # the CLI's own wiring, any export format
    assert main([str(photo), "--model", "unused", "--out", str(tmp_path), "--steps", "1", "--mesh-resolution", "16",
                 "--frames", "3", "--device", "cpu", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    for stage in ("load", "preprocess", "sample", "mesh", "turntable", "total", "with load"):
        assert stage in printed
    check_outputs(tmp_path, 3)
    assert main([str(tmp_path / "missing.png"), "--model", "x", "--out", str(tmp_path)]) == 2
