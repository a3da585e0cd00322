"""Meshes from a model's density field: iso-surface extraction, vertex colours, PLY and GLB files.

* :func:`marching_cubes` extracts the iso-surface ``density = level`` of a regular grid. It is
  *marching tetrahedra* on the Kuhn (Freudenthal) split of every cube into 6 tetrahedra around
  its main diagonal: adjacent cubes split their shared face along the same diagonal, and inside a
  tetrahedron the trilinear field is replaced by the linear one through its 4 corners, so the
  surface in each tetrahedron is one planar triangle or quad. There are no ambiguous cases (the
  table has 16 entries, built below), so the mesh is watertight by construction: every edge of
  the surface lies on exactly one tetrahedron face crossed by the surface, and that face is shared
  by exactly two tetrahedra. Vertices sit on grid edges (and cube/face diagonals), shared through
  one key per grid edge. Triangles are wound counter-clockwise seen from outside (normals point
  from density above ``level`` to density below it). With ``close_boundary`` the grid is padded
  with empty space, so a surface cut by the grid's border is closed there too.
* :func:`density_grid` samples a model's decoder density σ on a grid over its box [-h, h]^3;
  :func:`vertex_colours` reads the decoder colour at vertices (ψ's colour is view-independent).
* :func:`write_ply` (binary little-endian, per-vertex RGB) and :func:`write_glb` (glTF 2.0
  binary: one primitive with POSITION, COLOR_0, uint32 indices) write the result.

Everything is vectorised numpy: a 64^3 grid takes well under a second.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import torch

# ------------------------------------------------------------------------------------------
# Marching tetrahedra
# ------------------------------------------------------------------------------------------

# Cube corner c (0..7) sits at offset (c & 1, (c >> 1) & 1, (c >> 2) & 1) along grid axes (0, 1, 2).
_CORNER_OFFSETS = np.array([[c & 1, (c >> 1) & 1, (c >> 2) & 1] for c in range(8)], dtype=np.int64)

# Kuhn split: one tetrahedron per order in which the path 0 -> 7 steps along the three axes. A
# cube face is cut along the diagonal from its lowest to its highest corner, the same diagonal
# the neighbouring cube uses, so tetrahedra of adjacent cubes meet face to face.
_TETS = []
for _axes in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)):
    _corner, _path = 0, [0]
    for _axis in _axes:
        _corner |= 1 << _axis
        _path.append(_corner)
    _TETS.append(_path)
_TETS = np.array(_TETS, dtype=np.int64)  # (6, 4) cube-corner indices


def _build_tet_table():
    """For each of the 16 inside/outside patterns of a tetrahedron's corners (bit i: corner i inside):
    up to two triangles, each a triple of tetrahedron edges (corner pairs), plus one inside and one
    outside corner used to orient the triangles (:func:`_oriented_tables`)."""
    triangles = np.full((16, 2, 3, 2), -1, dtype=np.int64)  # (case, triangle, vertex, edge end)
    count = np.zeros(16, dtype=np.int64)
    inside_corner = np.zeros(16, dtype=np.int64)
    outside_corner = np.zeros(16, dtype=np.int64)
    for case in range(16):
        inside = [i for i in range(4) if case >> i & 1]
        outside = [i for i in range(4) if not case >> i & 1]
        if not inside or not outside:
            continue
        inside_corner[case], outside_corner[case] = inside[0], outside[0]
        if len(inside) == 1 or len(outside) == 1:  # one corner cut off: one triangle
            lone, others = (inside[0], outside) if len(inside) == 1 else (outside[0], inside)
            triangles[case, 0] = [(lone, o) for o in others]
            count[case] = 1
        else:  # two and two: the quad p-r, p-s, q-s, q-r (cyclic), as two triangles
            (p, q), (r, s) = inside, outside
            quad = [(p, r), (p, s), (q, s), (q, r)]
            triangles[case, 0] = [quad[0], quad[1], quad[2]]
            triangles[case, 1] = [quad[0], quad[2], quad[3]]
            count[case] = 2
    return triangles, count, inside_corner, outside_corner


def _oriented_tables():
    """The table per Kuhn tetrahedron (6, 16, 2, 3, 2), each triangle wound so that its normal points
    from the inside corner to the outside one. Decided on the triangle whose vertices are the edge
    midpoints (never degenerate; in a tetrahedron the linear iso-surface is a plane separating the
    inside corners from the outside ones, and moving the vertices along their edges to the
    interpolated points never flips a triangle), so the winding holds for any values."""
    triangles, count, inside_corner, outside_corner = _build_tet_table()
    oriented = np.repeat(triangles[None], len(_TETS), axis=0)
    for kind, tet in enumerate(_TETS):
        corners = _CORNER_OFFSETS[tet].astype(np.float64)  # (4, 3) positions in the cube
        for case in range(16):
            for slot in range(count[case]):
                edges = triangles[case, slot]
                mid = 0.5 * (corners[edges[:, 0]] + corners[edges[:, 1]])
                normal = np.cross(mid[1] - mid[0], mid[2] - mid[0])
                if normal @ (corners[outside_corner[case]] - corners[inside_corner[case]]) < 0:
                    oriented[kind, case, slot] = edges[::-1]
    return oriented, count


_TRIANGLES, _TRIANGLE_COUNT = _oriented_tables()


def _as_triple(value, name: str) -> np.ndarray:
    array = np.broadcast_to(np.asarray(value, dtype=np.float64), (3,)).copy()
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must be finite, got {value}")
    return array


def marching_cubes(density: np.ndarray, level: float, spacing=1.0, origin=0.0,
                   close_boundary: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The iso-surface ``density = level`` of a grid: (vertices (V, 3) float32, faces (F, 3) int64).

    ``density[i, j, k]`` is the value at ``origin + spacing * (i, j, k)`` (``spacing`` and
    ``origin`` are scalars or 3-vectors), so axis 0 is x, 1 is y and 2 is z. Values above
    ``level`` are inside. Faces are counter-clockwise seen from outside (outward normals by the
    right-hand rule). The mesh is closed wherever the surface stays inside the grid; with
    ``close_boundary`` (default) the grid is padded by one layer of empty space first, so a
    surface that reaches the border is closed as well (its vertices there lie at most half a cell
    outside the grid). Non-finite values count as outside. An empty surface gives (0, 3) arrays.
    """
    values = np.asarray(density, dtype=np.float64)
    if values.ndim != 3 or min(values.shape) < 1:
        raise ValueError(f"density must be a 3D grid, got shape {values.shape}")
    level = float(level)
    if not math.isfinite(level):
        raise ValueError(f"level must be finite, got {level}")
    spacing, origin = _as_triple(spacing, "spacing"), _as_triple(origin, "origin")
    if (spacing <= 0).any():
        raise ValueError(f"spacing must be positive, got {spacing}")
    finite = np.isfinite(values)
    high = float(values[finite].max()) if finite.any() else level
    # Outside value: below the level by as much as the highest value is above it, so a vertex on
    # an edge to the padding lands within half a cell of the border.
    empty = level - max(high - level, 1e-6 * max(1.0, abs(level)))
    values = np.where(finite, values, empty)
    if close_boundary:
        values = np.pad(values, 1, mode="constant", constant_values=empty)
        origin = origin - spacing
    shape = values.shape
    empty_result = (np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64))
    if min(shape) < 2:
        return empty_result

    inside = values > level
    # Cubes whose 8 corners are not all on one side: the only ones the surface crosses.
    any_in = np.zeros(tuple(n - 1 for n in shape), dtype=bool)
    all_in = np.ones_like(any_in)
    for dx, dy, dz in _CORNER_OFFSETS:
        corner = inside[dx:dx + shape[0] - 1, dy:dy + shape[1] - 1, dz:dz + shape[2] - 1]
        any_in |= corner
        all_in &= corner
    active = np.argwhere(any_in & ~all_in)  # (C, 3) lowest-corner grid indices
    if len(active) == 0:
        return empty_result

    strides = np.array([shape[1] * shape[2], shape[2], 1], dtype=np.int64)
    flat_inside = inside.ravel()
    base = active @ strides  # (C,)
    corner_ids = base[:, None] + (_CORNER_OFFSETS @ strides)[None, :]  # (C, 8) flat grid indices
    tet_ids = corner_ids[:, _TETS].reshape(-1, 4)  # (C*6, 4)
    kind = np.tile(np.arange(len(_TETS)), len(active))  # which of the 6 tetrahedra of its cube
    tet_inside = flat_inside[tet_ids]
    case = tet_inside[:, 0] + 2 * tet_inside[:, 1] + 4 * tet_inside[:, 2] + 8 * tet_inside[:, 3]
    counts = _TRIANGLE_COUNT[case]
    keep = counts > 0
    tet_ids, case, counts, kind = tet_ids[keep], case[keep], counts[keep], kind[keep]

    # One row per triangle: its tetrahedron and its slot (0 or 1) in the table.
    tet_of = np.repeat(np.arange(len(case)), counts)
    slot = np.arange(len(tet_of)) - np.repeat(np.cumsum(counts) - counts, counts)
    edges = _TRIANGLES[kind[tet_of], case[tet_of], slot]  # (F, 3, 2) corner pairs, wound outward
    ends = np.take_along_axis(tet_ids[tet_of][:, None, :], edges.reshape(len(tet_of), 1, 6), axis=2).reshape(-1, 3, 2)
    low, high_end = ends.min(-1), ends.max(-1)
    total = values.size
    keys = low * total + high_end  # one key per grid edge (< total^2: fits int64 far beyond 1024^3)
    unique_keys, faces = np.unique(keys.ravel(), return_inverse=True)
    faces = faces.reshape(-1, 3).astype(np.int64)

    # Vertices: linear interpolation of the level on each crossed edge.
    a, b = unique_keys // total, unique_keys % total
    flat_values = values.ravel()
    va, vb = flat_values[a], flat_values[b]
    # va, vb lie on opposite sides, so vb != va. A value exactly at the level would put the
    # vertices of several edges on one grid point (zero-area triangles, duplicate positions that
    # readers merge); keeping t a hair (1e-4 of the edge) from the ends keeps them all distinct.
    t = np.clip((level - va) / (vb - va), 1e-4, 1.0 - 1e-4)
    pa = np.stack(np.unravel_index(a, shape), 1).astype(np.float64)
    pb = np.stack(np.unravel_index(b, shape), 1).astype(np.float64)
    grid_points = pa + t[:, None] * (pb - pa)
    vertices = origin + grid_points * spacing

    return vertices.astype(np.float32), faces


def edge_use_counts(faces: np.ndarray) -> np.ndarray:
    """How many faces use each undirected edge of the mesh (2 everywhere for a closed manifold)."""
    faces = np.asarray(faces, dtype=np.int64)
    if len(faces) == 0:
        return np.zeros(0, np.int64)
    a = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2]])
    b = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0]])
    keys = np.minimum(a, b) * (int(faces.max()) + 1) + np.maximum(a, b)
    _, counts = np.unique(keys, return_counts=True)
    return counts


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
    to :func:`marching_cubes` to get world coordinates.
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


def _atomic_write(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_ply(path: str | os.PathLike, vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None) -> None:
    """Binary little-endian PLY: vertex x, y, z (float32), red, green, blue (uint8); faces as lists."""
    vertices, faces, colors = _check_mesh(vertices, faces, colors)
    header = (
        "ply\nformat binary_little_endian 1.0\ncomment GOEmbedFusion mesh (z up)\n"
        f"element vertex {len(vertices)}\nproperty float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\n"
        f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n"
    ).encode("ascii")
    vertex_rows = np.empty(len(vertices), dtype=[("p", "<f4", 3), ("c", "u1", 3)])
    vertex_rows["p"], vertex_rows["c"] = vertices, colors
    face_rows = np.empty(len(faces), dtype=[("n", "u1"), ("i", "<i4", 3)])
    face_rows["n"], face_rows["i"] = 3, faces
    _atomic_write(path, header + vertex_rows.tobytes() + face_rows.tobytes())


# glTF constants
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_UNSIGNED_BYTE, _UNSIGNED_INT, _FLOAT = 5121, 5125, 5126
_GLB_MAGIC, _CHUNK_JSON, _CHUNK_BIN = 0x46546C67, 0x4E4F534A, 0x004E4942


def _pad4(data: bytes, fill: bytes) -> bytes:
    return data + fill * (-len(data) % 4)


def write_glb(path: str | os.PathLike, vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None,
              z_up: bool = True) -> None:
    """glTF 2.0 binary: one mesh primitive with POSITION (min/max), COLOR_0 and uint32 indices.

    COLOR_0 is normalised uint8 RGBA (alpha 255; 4 bytes per vertex keeps attributes 4-byte
    aligned). The material is matte (metallic 0, roughness 1), so viewers show the vertex colours.
    glTF is +y up; this project's world is +z up, so with ``z_up`` the node carries a rotation of
    -90° about x (positions stay exactly as given; viewers show the object upright).
    """
    vertices, faces, colors = _check_mesh(vertices, faces, colors)
    document: dict = {
        "asset": {"version": "2.0", "generator": "GOEmbedFusion model_zoo.mesh"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"name": "object"}],
    }
    if z_up:
        half = math.sqrt(0.5)
        document["nodes"][0]["rotation"] = [-half, 0.0, 0.0, half]
    binary = b""
    if len(faces):
        rgba = np.concatenate([colors, np.full((len(colors), 1), 255, np.uint8)], 1)
        blobs = [vertices.astype("<f4").tobytes(), rgba.tobytes(), faces.astype("<u4").tobytes()]
        views = []
        for blob, target in zip(blobs, (_ARRAY_BUFFER, _ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER)):
            views.append({"buffer": 0, "byteOffset": len(binary), "byteLength": len(blob), "target": target})
            binary = _pad4(binary + blob, b"\x00")  # every view starts on a 4-byte boundary
        document.update(
            buffers=[{"byteLength": len(binary)}],
            bufferViews=views,
            accessors=[
                {"bufferView": 0, "componentType": _FLOAT, "count": len(vertices), "type": "VEC3",
                 "min": [float(x) for x in vertices.min(0)], "max": [float(x) for x in vertices.max(0)]},
                {"bufferView": 1, "componentType": _UNSIGNED_BYTE, "normalized": True, "count": len(vertices), "type": "VEC4"},
                {"bufferView": 2, "componentType": _UNSIGNED_INT, "count": int(faces.size), "type": "SCALAR"},
            ],
            materials=[{"name": "vertex_colours", "pbrMetallicRoughness": {
                "baseColorFactor": [1.0, 1.0, 1.0, 1.0], "metallicFactor": 0.0, "roughnessFactor": 1.0}}],
            meshes=[{"name": "object", "primitives": [
                {"attributes": {"POSITION": 0, "COLOR_0": 1}, "indices": 2, "material": 0, "mode": 4}]}],
        )
        document["nodes"][0]["mesh"] = 0
    json_chunk = _pad4(json.dumps(document, separators=(",", ":")).encode("utf-8"), b" ")
    chunks = struct.pack("<II", len(json_chunk), _CHUNK_JSON) + json_chunk
    if binary:
        chunks += struct.pack("<II", len(binary), _CHUNK_BIN) + binary
    _atomic_write(path, struct.pack("<III", _GLB_MAGIC, 2, 12 + len(chunks)) + chunks)


__all__ = ["marching_cubes", "edge_use_counts", "decode_points", "grid_points", "density_grid", "vertex_colours",
           "write_ply", "write_glb"]
