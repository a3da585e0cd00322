"""One input mesh -> one schema-v1 sample (views composited on the background + masks + cameras)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np

from data_pipeline import storage
from data_pipeline.render.blender import BlenderRenderer, MeshError
from data_pipeline.render.settings import RenderSettings
from data_pipeline.schema import ObjectSample, encode_image, encode_mask

SOURCE_NAME = "blender-render"


@dataclass(frozen=True)
class MeshJob:
    object_id: str
    url: str  # local path or any fsspec URL


@dataclass
class ObjectResult:
    """What a worker hands back for one object: a sample, or the reason it was skipped."""

    object_id: str
    url: str
    sample: ObjectSample | None = None
    error: str | None = None
    warnings: tuple[str, ...] = ()
    seconds: dict | None = None


def composite(rgba: np.ndarray, background: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 on the background, mask uint8) from a straight-alpha RGBA render."""
    alpha = rgba[..., 3:4].astype(np.float64) / 255.0
    rgb = rgba[..., :3].astype(np.float64) * alpha + 255.0 * np.asarray(background) * (1.0 - alpha)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), rgba[..., 3].copy()


@contextlib.contextmanager
def local_copy(url: str):
    """A local path for the mesh: the file itself, or a temporary download of a remote URL.

    A remote .gltf/.obj brings the files beside it that it names only if they sit in the same
    folder; self-contained GLB/PLY/STL need nothing else.
    """
    if storage.is_local(url):
        yield storage.local_path(url)
        return
    folder = tempfile.mkdtemp(prefix="goembed-mesh-")
    try:
        fs, path = storage.filesystem(url)
        local = os.path.join(folder, os.path.basename(path))
        fs.get(path, local)
        ext = os.path.splitext(path)[1].lower()
        if ext in (".gltf", ".obj"):  # sidecars: .bin / .mtl / textures in the same folder
            parent = path.rsplit("/", 1)[0]
            for entry in fs.ls(parent, detail=False):
                name = entry.rsplit("/", 1)[-1]
                if name != os.path.basename(path) and os.path.splitext(name)[1].lower() in (
                        ".bin", ".mtl", ".png", ".jpg", ".jpeg", ".webp", ".tga", ".bmp"):
                    fs.get(entry, os.path.join(folder, name))
        yield local
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def render_object(renderer: BlenderRenderer, job: MeshJob, settings: RenderSettings) -> ObjectResult:
    """Render one mesh into a sample; any failure becomes an ObjectResult with the reason."""
    try:
        with local_copy(job.url) as path:
            if not os.path.isfile(path):
                raise MeshError("file not found")
            rendered = renderer.render(path, job.object_id, settings)
    except MeshError as error:
        return ObjectResult(job.object_id, job.url, error=str(error))
    except Exception as error:  # anything else Blender or the storage raised: skip, named
        return ObjectResult(job.object_id, job.url, error=f"{type(error).__name__}: {error}")
    images, masks = [], []
    for rgba in rendered.rgba:
        rgb, mask = composite(rgba, settings.background)
        images.append(encode_image(rgb))
        masks.append(encode_mask(mask))
    extra = {
        "source_file": job.url,
        "mesh_to_world": rendered.mesh_to_world.tolist(),
        "normalisation": rendered.normalisation,
        "object_bbox": rendered.object_bbox,
        "num_faces": rendered.num_faces,
        "cameras": rendered.cameras,
        "render": {"engine": settings.engine, "samples": settings.samples if settings.engine == "cycles" else None,
                   "lighting": settings.lighting, "seed": settings.seed, "fov_deg": settings.fov_deg},
        "warnings": rendered.warnings,
    }
    sample = ObjectSample(
        object_id=job.object_id, images=images, intrinsics=rendered.K, c2w=rendered.c2w,
        width=settings.resolution, height=settings.resolution, source=SOURCE_NAME,
        scale=float(rendered.normalisation["scale"]), background=tuple(settings.background), extra=extra, masks=masks,
    )
    return ObjectResult(job.object_id, job.url, sample=sample, warnings=tuple(rendered.warnings), seconds=rendered.seconds)
