"""Meshes from a model's density field: sampling it, vertex colours, and the PLY and GLB files.

* :func:`density_grid` samples a model's decoder density σ on a grid over its box [-h, h]^3;
  :func:`vertex_colours` reads the decoder colour at vertices (ψ's colour is view-independent).
* The iso-surface comes from :func:`model_zoo.marching_tetrahedra.marching_tetrahedra`
  (watertight; re-exported here, also under its old name ``marching_cubes``).
* :func:`write_ply` (binary little-endian, per-vertex RGBA) and :func:`write_glb` (glTF 2.0
  binary: one primitive with POSITION, COLOR_0, uint32 indices and a matte material) are
  trimesh's exporters; the files are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from data_pipeline.atomic_files import write_atomic
from model_zoo.marching_tetrahedra import edge_use_counts, marching_tetrahedra

marching_cubes = marching_tetrahedra  # the old name (it never was marching cubes), kept for callers

# ------------------------------------------------------------------------------------------
# The model's fields
# ------------------------------------------------------------------------------------------


def _batched_state(model, state: torch.Tensor) -> torch.Tensor:
    shape = tuple(model.representation.state_shape)
    if tuple(state.shape) == shape:
        state = state.unsqueeze(0)
    if tuple(state.shape[1:]) != shape or state.shape[0] != 1:
        raise ValueError(f"state must be {shape} or (1, *{shape}), got {tuple(state.shape)}")
    return state


@torch.no_grad()
def decode_points(model, state: torch.Tensor, points: np.ndarray | torch.Tensor,
                  chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """The decoder's (density (N,), colour (N, 3)) at world points (N, 3) inside the box."""
    state = _batched_state(model, state)
    param = next(model.parameters())
    points = torch.as_tensor(np.asarray(points, dtype=np.float32)).to(param.device)
    half = float(model.renderer.box_half_size)
    densities, colours = [], []
    for start in range(0, len(points), chunk):
        normalised = (points[start:start + chunk] / half).clamp(-1.0, 1.0).unsqueeze(0).to(state.dtype)
        features = model.representation.sample(state, normalised)
        density, colour = model.renderer.decoder(features)
        densities.append(density[0].float().cpu())
        colours.append(colour[0].float().cpu())
    if not densities:
        return np.zeros(0, np.float32), np.zeros((0, 3), np.float32)
    return torch.cat(densities).numpy(), torch.cat(colours).numpy()


def grid_points(resolution: int, half_size: float) -> np.ndarray:
    """(R, R, R, 3) world points of the grid over [-h, h]^3, corners included, axis 0 = x."""
    axis = np.linspace(-half_size, half_size, resolution, dtype=np.float64)
    return np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1)


@torch.no_grad()
def density_grid(model, state: torch.Tensor, resolution: int = 64, chunk: int = 65536) -> tuple[np.ndarray, float, float]:
    """The decoder density σ (1/world units) on a resolution^3 grid over the box [-h, h]^3.

    Returns (grid (R, R, R) float32 with axis 0 = x, spacing, origin) — pass spacing and origin on
    to :func:`marching_tetrahedra` to get world coordinates.
    """
    if resolution < 2:
        raise ValueError(f"resolution must be >= 2, got {resolution}")
    half = float(model.renderer.box_half_size)
    points = grid_points(resolution, half).reshape(-1, 3)
    density, _ = decode_points(model, state, points, chunk)
    return density.reshape(resolution, resolution, resolution), 2.0 * half / (resolution - 1), -half


def vertex_colours(model, state: torch.Tensor, vertices: np.ndarray) -> np.ndarray:
    """(V, 3) uint8 colours of the decoder at the vertices."""
    _, colour = decode_points(model, state, vertices)
    return np.round(np.clip(np.nan_to_num(colour), 0.0, 1.0) * 255.0).astype(np.uint8)


# ------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------


def _check_mesh(vertices, faces, colors) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    vertices = np.ascontiguousarray(vertices, dtype=np.float32).reshape(-1, 3)
    faces = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    if len(faces) and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise ValueError(f"faces index vertices outside [0, {len(vertices)})")
    if colors is None:
        colors = np.full((len(vertices), 3), 200, np.uint8)
    colors = np.asarray(colors)
    if colors.dtype != np.uint8:  # floats are taken to be in [0, 1]
        colors = np.round(np.clip(np.nan_to_num(colors.astype(np.float64)), 0.0, 1.0) * 255.0).astype(np.uint8)
    colors = colors.reshape(-1, colors.shape[-1])[:, :3]
    if colors.shape != (len(vertices), 3):
        raise ValueError(f"colors must be (V, 3) for V={len(vertices)}, got {colors.shape}")
    return vertices, faces, np.ascontiguousarray(colors)


def _trimesh(vertices, faces, colors, visual=None):
    import trimesh

    # process=False: keep the vertices and faces exactly as given (no merging, no reordering)
    return trimesh.Trimesh(vertices=vertices, faces=faces, vertex_colors=None if visual else colors, visual=visual,
                           process=False, validate=False)


def write_ply(path: str | os.PathLike, vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None) -> None:
    """Binary little-endian PLY: vertex x, y, z (float32), red, green, blue, alpha (uint8); triangle faces."""
    vertices, faces, colors = _check_mesh(vertices, faces, colors)
    write_atomic(path, _trimesh(vertices, faces, colors).export(file_type="ply", encoding="binary"))


# glTF is +y up, this project's world +z up: the node maps (x, y, z) to (x, z, -y), -90° about x.
_Z_UP_TO_GLTF = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]], dtype=np.float64)


def write_glb(path: str | os.PathLike, vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None,
              z_up: bool = True) -> None:
    """glTF 2.0 binary: one mesh with POSITION, COLOR_0 (normalised uint8 RGBA) and uint32 indices.

    The material is matte (metallic 0, roughness 1), so viewers show the vertex colours (glTF's
    default material is fully metallic). With ``z_up`` the node carries the rotation -90° about x
    (positions stay exactly as given; viewers show the object upright). An empty mesh gives a
    valid file with an empty scene.
    """
    import trimesh  # here, not at the top: it takes a second or two to import (scipy)

    vertices, faces, colors = _check_mesh(vertices, faces, colors)
    scene = trimesh.Scene()
    if len(faces):
        material = trimesh.visual.material.PBRMaterial(name="vertex_colours", baseColorFactor=[255, 255, 255, 255],
                                                       metallicFactor=0.0, roughnessFactor=1.0)
        mesh = _trimesh(vertices, faces, None, visual=trimesh.visual.TextureVisuals(material=material))
        # a textured visual carries both the material and the colours (as COLOR_0)
        mesh.visual.vertex_attributes["color"] = np.concatenate([colors, np.full((len(colors), 1), 255, np.uint8)], 1)
        scene.add_geometry(mesh, node_name="object", geom_name="object",
                           transform=_Z_UP_TO_GLTF if z_up else np.eye(4))
    # the exporter itself: Scene.export refuses an empty scene, which is still a valid file
    write_atomic(path, trimesh.exchange.gltf.export_glb(scene))


__all__ = ["marching_tetrahedra", "marching_cubes", "edge_use_counts", "decode_points", "grid_points", "density_grid",
           "vertex_colours", "write_ply", "write_glb"]
