"""Meshes made with trimesh for the render tests, the benchmark and the README picture.

They are what a renderer must cope with: centimetre scale, hundreds of units off the origin under
a glTF node transform, a texture as GLB (embedded) and as OBJ (beside it, via its .mtl). Needs
trimesh (the dev extra); nothing else in the package imports this module.
"""

from __future__ import annotations

import os

import numpy as np
import trimesh
from PIL import Image


def checker_texture() -> Image.Image:
    ij = (np.indices((64, 64)) // 8).sum(0)  # 8 x 8 checks
    image = np.zeros((64, 64, 3), np.uint8)
    image[:] = (220, 30, 30)
    image[ij % 2 == 0] = (30, 30, 220)
    return Image.fromarray(image)


def textured_sphere() -> trimesh.Trimesh:
    mesh = trimesh.creation.icosphere(subdivisions=3)
    mesh.unmerge_vertices()  # own UVs per face corner
    v = mesh.vertices
    uv = np.stack([(np.arctan2(v[:, 1], v[:, 0]) / (2 * np.pi)) % 1.0, v[:, 2] * 0.5 + 0.5], axis=1)
    mesh.visual = trimesh.visual.TextureVisuals(uv=uv, image=checker_texture())
    mesh.apply_scale([1.0, 0.7, 0.5])
    return mesh


def make_meshes(folder: str) -> dict[str, str]:
    """Write the example meshes into ``folder``; returns object id -> path."""
    os.makedirs(folder, exist_ok=True)
    paths = {}
    box = trimesh.creation.box((0.04, 0.02, 0.03))  # centimetre-ish scale, rotated and moved
    box.apply_transform(trimesh.transformations.euler_matrix(0.3, -0.5, 0.9))
    box.apply_translation([0.5, 0.2, -0.1])
    paths["box"] = os.path.join(folder, "box.ply")
    box.export(paths["box"])
    # an ellipsoid hundreds of units across, off centre, under a glTF node with its own transform
    ellipsoid = trimesh.creation.icosphere(subdivisions=3)
    ellipsoid.apply_scale([300.0, 120.0, 60.0])
    scene = trimesh.Scene()
    node = trimesh.transformations.euler_matrix(0.2, 0.4, -0.3)
    node[:3, 3] = [800.0, -250.0, 40.0]
    scene.add_geometry(ellipsoid, node_name="ellipsoid", transform=node)
    paths["ellipsoid"] = os.path.join(folder, "ellipsoid.glb")
    scene.export(paths["ellipsoid"])
    sphere = textured_sphere()
    paths["textured_glb"] = os.path.join(folder, "textured_glb.glb")
    sphere.export(paths["textured_glb"])
    os.makedirs(os.path.join(folder, "obj"), exist_ok=True)
    paths["obj/textured_obj"] = os.path.join(folder, "obj", "textured_obj.obj")
    trimesh.exchange.export.export_mesh(sphere, paths["obj/textured_obj"])  # + material.mtl + material_0.png
    return paths
