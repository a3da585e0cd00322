"""Assets a person can open from a 3D state ζ: a turntable GIF and a coloured mesh (PLY + GLB).

``turntable(model, state, path)`` renders ζ from cameras circling the world z axis (the up axis of
the synthetic data and of :func:`data_pipeline.cameras.turntable_cameras`). ``extract_mesh(model,
state, out_dir)`` samples the decoder density σ on a grid over the object's box, extracts the
iso-surface with :func:`model_zoo.marching_tetrahedra.marching_tetrahedra`, colours the vertices with the decoder
colour there, and writes ``mesh.ply`` and ``mesh.glb``.

The iso-level, when not given, is physical rather than relative: σ* = ln 2 / δ, where δ = 2h / S
is the renderer's step (box side over samples per ray). At σ* one rendering step absorbs half the
light, so the surface sits where the renderer starts to see the object as opaque; it does not move
with the mesh resolution or with how dense the densest point happens to be (a fraction of the
maximum would shrink a solid object whose core is very dense). If nothing in the box reaches σ*
(an untrained or empty model), the level falls back to the midpoint of the grid's range, and the
returned ``level_rule`` says so.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from data_pipeline.cameras import turntable_cameras
from model_zoo.image_files import save_turntable_gif
from model_zoo.marching_tetrahedra import marching_tetrahedra
from model_zoo.mesh import density_grid, vertex_colours, write_glb, write_ply

DEFAULT_RADIUS_FACTOR = 2.6  # camera distance in box half-sizes: the box's inscribed object fills a 50° view
DEFAULT_FOV_DEG = 50.0  # the synthetic data's field of view


def _batched(model, state: torch.Tensor) -> torch.Tensor:
    shape = tuple(model.representation.state_shape)
    return state.unsqueeze(0) if tuple(state.shape) == shape else state


def _param(model) -> torch.Tensor:
    return next(model.parameters())


@torch.no_grad()
def render_turntable(model, state: torch.Tensor, frames: int = 36, resolution: int | None = None,
                     radius: float | None = None, elevation_deg: float = 20.0, fov_deg: float = DEFAULT_FOV_DEG,
                     background=(1.0, 1.0, 1.0), context=None, sources=None) -> torch.Tensor:
    """Frames (N, 3, H, W) in [0, 1] of one state from :func:`data_pipeline.cameras.turntable_cameras`.

    ``context``: the views (one object's ``Views``) the state came from, for a model with
    ``image_colour`` (its renders also take colour from them); ``sources``: in its place, what
    ``model.sample(…, return_sources=True)`` returned with the state."""
    state = _batched(model, state)
    if state.shape[0] != 1:
        raise ValueError(f"one object at a time: state has batch size {state.shape[0]}")
    resolution = resolution or max(64, model.config.encode_resolution)
    radius = radius or DEFAULT_RADIUS_FACTOR * float(model.renderer.box_half_size)
    device = _param(model).device
    K, c2w = (torch.from_numpy(x) for x in turntable_cameras(frames, radius, elevation_deg, fov_deg, resolution))
    bg = torch.as_tensor(background, dtype=torch.float32, device=device).reshape(1, 3)
    images = []
    for start in range(0, frames, 8):  # a few views per call keeps memory flat for long turntables
        images.append(model.render(state, K[None, start:start + 8].to(device), c2w[None, start:start + 8].to(device),
                                   resolution, resolution, bg, context, sources)[0].float().cpu())
    return torch.cat(images)


def turntable(model, state: torch.Tensor, path_gif: str | os.PathLike, frames: int = 36, resolution: int | None = None,
              radius: float | None = None, elevation_deg: float = 20.0, fov_deg: float = DEFAULT_FOV_DEG,
              background=(1.0, 1.0, 1.0), fps: float = 12, context=None, sources=None) -> str:
    """Render ``frames`` views around the world z axis and write them as a looping GIF.

    Defaults: resolution max(64, encode_resolution) px, radius 2.6 × the box half-size, 20°
    elevation, 50° field of view, white background. Returns the path written.
    """
    images = render_turntable(model, state, frames, resolution, radius, elevation_deg, fov_deg, background, context,
                              sources)
    save_turntable_gif(path_gif, images, fps=fps)
    return str(path_gif)


def default_level(model) -> float:
    """σ* = ln 2 / δ with δ = 2h / samples_per_ray: the density at which one render step is half opaque."""
    step = 2.0 * float(model.renderer.box_half_size) / int(model.renderer.samples_per_ray)
    return math.log(2.0) / step


def choose_level(model, grid: np.ndarray, level: float | None = None) -> tuple[float, str]:
    """(level, rule): the given level, σ* (:func:`default_level`), or the grid's mid-range if nothing reaches σ*."""
    if level is not None:
        return float(level), "given"
    sigma = default_level(model)
    finite = grid[np.isfinite(grid)]
    if finite.size and float(finite.max()) > sigma:
        return sigma, "half-opaque render step (ln 2 / step)"
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    return 0.5 * (low + high), f"mid-range fallback: max density {high:.3g} < {sigma:.3g}"


@torch.no_grad()
def extract_mesh(model, state: torch.Tensor, out_dir: str | os.PathLike, resolution: int = 64,
                 level: float | None = None, name: str = "mesh") -> dict:
    """Write ``OUT/mesh.ply`` and ``OUT/mesh.glb`` (vertex-coloured) of one state's density iso-surface.

    ``resolution`` is the grid's points per side over the box [-h, h]^3; ``level`` the density σ
    of the surface (default: see the module docstring). The surface is closed at the box border.
    Returns {"ply", "glb": paths, "level", "level_rule", "vertices", "faces"}.
    """
    grid, spacing, origin = density_grid(model, state, resolution)
    level, rule = choose_level(model, grid, level)
    vertices, faces = marching_tetrahedra(grid, level, spacing, origin, close_boundary=True)
    colours = vertex_colours(model, state, vertices) if len(vertices) else np.zeros((0, 3), np.uint8)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ply, glb = out / f"{name}.ply", out / f"{name}.glb"
    write_ply(ply, vertices, faces, colours)
    write_glb(glb, vertices, faces, colours)
    return {"ply": str(ply), "glb": str(glb), "level": level, "level_rule": rule,
            "vertices": len(vertices), "faces": len(faces)}


__all__ = ["render_turntable", "turntable", "default_level", "choose_level", "extract_mesh"]
