"""Everything that talks to Blender (``bpy``): import one mesh, normalise it, render its views.

One :class:`BlenderRenderer` lives in each worker process and renders many objects: ``bpy`` is
imported once (the costly part), and between objects the scene is reset to an empty factory
state. Nothing here decides *which* objects or *where* results go; see ``run.py``.

Coordinates. The world of the cameras is Blender's world (+Z up) after normalisation. What is
recorded as ``mesh_to_world`` maps the coordinates of the file's scene *as a generic mesh reader
(trimesh) loads it* — node transforms applied, in the file's own axes — to that world:

* glTF/GLB are +Y up; Blender's importer turns them to +Z up ((x, y, z) -> (x, -z, y)), so
  ``mesh_to_world = N @ GLTF_TO_BLENDER``;
* OBJ, PLY and STL are imported with Blender's axis conversion switched off (forward +Y, up +Z),
  so ``mesh_to_world = N``;
* FBX: imported with axis conversion off too, in the units Blender's FBX importer gives
  (trimesh cannot read FBX; a Blender-written FBX round-trips its source's coordinates).

N is the normalisation: a uniform scale and a translation that put the centre of the object's
bounding box at the origin and its largest half-extent at ``fit * box``.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from data_pipeline.cameras import blender_to_opencv_c2w
from data_pipeline.render.settings import RenderSettings, camera_positions

# glTF +Y up -> Blender +Z up, as Blender's glTF importer converts (x, y, z) -> (x, -z, y).
GLTF_TO_BLENDER = np.array([[1.0, 0, 0, 0], [0, 0, -1.0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1.0]])
MESH_EXTENSIONS = (".glb", ".gltf", ".obj", ".ply", ".stl", ".fbx")
EXTRA_NAME = "render"  # the optional dependency group that installs bpy


class RenderDependencyError(ImportError):
    """bpy is not installed."""


class MeshError(ValueError):
    """A mesh that cannot be rendered; the message is the reason (the caller adds the file)."""


def check_bpy_installed() -> None:
    """Raise :class:`RenderDependencyError` unless bpy can be imported (without importing it)."""
    import importlib.util

    try:
        found = importlib.util.find_spec("bpy") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise RenderDependencyError(
            f"rendering meshes needs Blender's Python module (bpy), which is not installed; "
            f"install the [{EXTRA_NAME}] extra: pip install -e '.[{EXTRA_NAME}]' (or: pip install bpy)")


def import_bpy():
    try:
        import bpy  # noqa: F401  (Blender as a Python module, from PyPI)
    except ImportError as error:
        raise RenderDependencyError(
            f"rendering meshes needs Blender's Python module (bpy), which is not installed ({error}); "
            f"install the [{EXTRA_NAME}] extra: pip install -e '.[{EXTRA_NAME}]' (or: pip install bpy)"
        ) from None
    return bpy


@dataclass
class RenderedObject:
    rgba: list[np.ndarray]  # (H, W, 4) uint8 per view, straight alpha
    K: np.ndarray  # (V, 3, 3)
    c2w: np.ndarray  # (V, 4, 4) OpenCV
    mesh_to_world: np.ndarray  # (4, 4)
    normalisation: dict
    object_bbox: list  # [[x, y, z] min, [x, y, z] max] in the world of the cameras
    cameras: dict  # the sampled azimuth, elevation and distance of every view
    num_faces: int
    warnings: list[str] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)  # reset / import / render


@contextlib.contextmanager
def quiet_output(log_path: str | None = None):
    """Send Blender's C-level prints (``Saved: ...``, EGL notices) away from our stdout/stderr."""
    target = os.open(log_path or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, target):
            os.close(fd)


def intrinsics_from_projection(P: np.ndarray, width: int, height: int) -> np.ndarray:
    """OpenCV K (continuous pixels, see cameras.py) from Blender's OpenGL projection matrix.

    Blender: x_ndc = -(P00 x + P02 z) / z for a camera-frame point with z < 0; pixel column
    u = (x_ndc + 1) W / 2 and row v = (1 - y_ndc) H / 2. With OpenCV axes (x, -y, -z) this is
    u = fx x/z + cx with fx = P00 W / 2, cx = (1 - P02) W / 2, and fy = P11 H / 2, cy = (1 + P12) H / 2.
    """
    P = np.asarray(P, dtype=np.float64)
    fx, fy = P[0, 0] * width / 2.0, P[1, 1] * height / 2.0
    cx, cy = (1.0 - P[0, 2]) * width / 2.0, (1.0 + P[1, 2]) * height / 2.0
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def normalisation_matrix(lo: np.ndarray, hi: np.ndarray, box: float, fit: float) -> tuple[np.ndarray, dict]:
    """Uniform scale + translation putting the box [lo, hi] centred, largest half-extent fit*box."""
    centre = (lo + hi) / 2.0
    half = float(np.max(hi - lo)) / 2.0
    if not (half > 0 and math.isfinite(half)):
        raise MeshError(f"degenerate bounding box {lo.tolist()} .. {hi.tolist()}")
    scale = fit * box / half
    N = np.eye(4)
    N[:3, :3] *= scale
    N[:3, 3] = -scale * centre
    return N, {"scale": scale, "centre": centre.tolist(), "bbox_min": lo.tolist(), "bbox_max": hi.tolist(),
               "box": box, "fit": fit}


class BlenderRenderer:
    """One Blender inside this process; :meth:`render` renders one mesh file, many times over."""

    def __init__(self, threads: int = 0, log_path: str | None = None):
        start = time.perf_counter()
        self.log_path = log_path
        with quiet_output(log_path):
            self.bpy = import_bpy()
        self.threads = threads
        self.import_seconds = time.perf_counter() - start

    # -- scene ------------------------------------------------------------------------------
    def reset(self) -> None:
        self.bpy.ops.wm.read_factory_settings(use_empty=True)

    def _import(self, path: str) -> np.ndarray:
        """Import the file into the scene; returns the 4x4 from the file's axes to Blender's."""
        bpy = self.bpy
        ext = os.path.splitext(path)[1].lower()
        if ext in (".glb", ".gltf"):
            bpy.ops.import_scene.gltf(filepath=path)
            return GLTF_TO_BLENDER
        if ext == ".obj":
            bpy.ops.wm.obj_import(filepath=path, forward_axis="Y", up_axis="Z")
        elif ext == ".ply":
            bpy.ops.wm.ply_import(filepath=path, forward_axis="Y", up_axis="Z")
        elif ext == ".stl":
            bpy.ops.wm.stl_import(filepath=path, forward_axis="Y", up_axis="Z")
        elif ext == ".fbx":
            if not hasattr(bpy.ops.import_scene, "fbx"):
                raise MeshError("this Blender has no FBX importer")
            bpy.ops.import_scene.fbx(filepath=path, use_manual_orientation=True, axis_forward="Y", axis_up="Z")
        else:
            raise MeshError(f"unsupported file type {ext!r} (supported: {', '.join(MESH_EXTENSIONS)})")
        return np.eye(4)

    def _missing_textures(self) -> list[str]:
        """Drop image-texture nodes whose file is missing (they would render magenta); name them."""
        bpy = self.bpy
        missing = []
        for image in bpy.data.images:
            if image.source != "FILE" or image.packed_file is not None:
                continue
            path = bpy.path.abspath(image.filepath)
            if not os.path.isfile(path):
                missing.append(os.path.basename(image.filepath) or image.name)
        if not missing:
            return []
        for material in bpy.data.materials:
            if material.node_tree is None:
                continue
            for node in list(material.node_tree.nodes):
                if node.type == "TEX_IMAGE" and node.image is not None and (
                        os.path.basename(node.image.filepath) or node.image.name) in missing:
                    material.node_tree.nodes.remove(node)
        return sorted(set(missing))

    def _mesh_bounds(self, meshes) -> tuple[np.ndarray, np.ndarray, int]:
        lo, hi, faces = np.full(3, np.inf), np.full(3, -np.inf), 0
        for obj in meshes:
            mesh = obj.data
            faces += len(mesh.polygons)
            n = len(mesh.vertices)
            if n == 0:
                continue
            co = np.empty(n * 3, dtype=np.float64)
            mesh.vertices.foreach_get("co", co)
            M = np.array(obj.matrix_world, dtype=np.float64)
            world = co.reshape(n, 3) @ M[:3, :3].T + M[:3, 3]
            lo, hi = np.minimum(lo, world.min(0)), np.maximum(hi, world.max(0))
        return lo, hi, faces

    def _setup_render(self, settings: RenderSettings) -> None:
        bpy = self.bpy
        scene = bpy.context.scene
        render = scene.render
        render.resolution_x = render.resolution_y = settings.resolution
        render.resolution_percentage = 100
        render.film_transparent = True
        render.image_settings.file_format = "PNG"
        render.image_settings.color_mode = "RGBA"
        render.image_settings.color_depth = "8"
        render.image_settings.compression = 0
        scene.view_settings.view_transform = "Standard"  # colours as in the textures, no filmic curve
        scene.view_settings.look = "None"
        if self.threads:
            render.threads_mode, render.threads = "FIXED", self.threads
        world = bpy.data.worlds.new("world")
        scene.world = world
        if settings.engine == "cycles":
            render.engine = "CYCLES"
            scene.cycles.device = "CPU"
            scene.cycles.samples = settings.samples
            scene.cycles.use_denoising = False
            scene.cycles.seed = 0
            scene.cycles.use_adaptive_sampling = False
            world.use_nodes = True
            background = world.node_tree.nodes["Background"]
            background.inputs["Color"].default_value = (1.0, 1.0, 1.0, 1.0)
            background.inputs["Strength"].default_value = 1.0 if settings.lighting == "uniform" else 0.35
            if settings.lighting == "sun":
                sun = bpy.data.objects.new("sun", bpy.data.lights.new("sun", type="SUN"))
                sun.data.energy = 3.0
                sun.rotation_euler = (math.radians(40), 0.0, math.radians(30))
                scene.collection.objects.link(sun)
        else:
            render.engine = "BLENDER_WORKBENCH"
            shading = scene.display.shading
            shading.light = "FLAT" if settings.lighting == "uniform" else "STUDIO"
            shading.color_type = "TEXTURE"
            scene.display.render_aa = "8"

    def _camera(self, settings: RenderSettings):
        bpy = self.bpy
        data = bpy.data.cameras.new("camera")
        data.lens_unit = "FOV"
        data.sensor_fit = "AUTO"
        data.angle = math.radians(settings.fov_deg)
        data.clip_start, data.clip_end = 0.01 * settings.box, 100.0 * settings.box
        camera = bpy.data.objects.new("camera", data)
        bpy.context.scene.collection.objects.link(camera)
        bpy.context.scene.camera = camera
        return camera

    # -- one object -------------------------------------------------------------------------
    def render(self, path: str, object_id: str, settings: RenderSettings) -> RenderedObject:
        """Render the mesh at ``path`` from the cameras of ``object_id`` (see settings.camera_positions)."""
        from mathutils import Matrix, Vector  # Blender's own maths, for its own matrices

        bpy = self.bpy
        seconds = {}
        with quiet_output(self.log_path), tempfile.TemporaryDirectory(prefix="goembed-render-") as tmp:
            start = time.perf_counter()
            self.reset()
            seconds["reset"] = time.perf_counter() - start
            start = time.perf_counter()
            try:
                file_to_blender = self._import(path)
            except MeshError:
                raise
            except Exception as error:  # the importers raise RuntimeError and friends on bad files
                raise MeshError(f"cannot import ({type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''})") from None
            seconds["import"] = time.perf_counter() - start
            meshes = [obj for obj in bpy.context.scene.objects if obj.type == "MESH"]
            if not meshes:
                raise MeshError("the file holds no mesh")
            lo, hi, faces = self._mesh_bounds(meshes)
            if faces == 0:
                raise MeshError("the mesh has no faces")
            if faces > settings.max_faces:
                raise MeshError(f"the mesh has {faces} faces, more than --max-faces {settings.max_faces}")
            if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
                raise MeshError("the mesh has non-finite vertex coordinates")
            N, normalisation = normalisation_matrix(lo, hi, settings.box, settings.fit)
            # move every root; children follow their parents
            N_blender = Matrix(N.tolist())
            for obj in bpy.context.scene.objects:
                if obj.parent is None:
                    obj.matrix_world = N_blender @ obj.matrix_world
            warnings = [f"missing texture {name}: rendered untextured" for name in self._missing_textures()]
            half_extents = (hi - lo) / 2.0 * normalisation["scale"]
            positions, spherical = camera_positions(settings, object_id, float(np.linalg.norm(half_extents)))
            self._setup_render(settings)
            camera = self._camera(settings)
            depsgraph = bpy.context.evaluated_depsgraph_get()
            rgba, Ks, c2ws = [], [], []
            start = time.perf_counter()
            for i, position in enumerate(positions):
                eye = Vector([float(x) for x in position])
                rotation = (-eye).to_track_quat("-Z", "Y").to_matrix().to_4x4()
                camera.matrix_world = Matrix.Translation(eye) @ rotation
                bpy.context.view_layer.update()
                c2ws.append(blender_to_opencv_c2w(np.array(camera.matrix_world, dtype=np.float64)))
                P = camera.calc_matrix_camera(depsgraph, x=settings.resolution, y=settings.resolution)
                Ks.append(intrinsics_from_projection(np.array(P, dtype=np.float64), settings.resolution, settings.resolution))
                out = os.path.join(tmp, f"view{i:03d}.png")
                bpy.context.scene.render.filepath = out
                bpy.ops.render.render(write_still=True)
                with Image.open(out) as image:
                    rgba.append(np.asarray(image.convert("RGBA")).copy())
                os.remove(out)
            seconds["render"] = time.perf_counter() - start
        object_bbox = [(N[:3, :3] @ lo + N[:3, 3]).tolist(), (N[:3, :3] @ hi + N[:3, 3]).tolist()]
        border = [i for i, image in enumerate(rgba) if max(image[0, :, 3].max(), image[-1, :, 3].max(),
                                                            image[:, 0, 3].max(), image[:, -1, 3].max()) > 0]
        if border:  # only possible with a manual --camera-distance: the object is cut off there
            warnings.append(f"the object touches the image border in {len(border)} view(s) (first: view {border[0]}); "
                            f"raise --camera-distance or lower --fit")
        return RenderedObject(rgba, np.stack(Ks), np.stack(c2ws), N @ file_to_blender, normalisation, object_bbox,
                              spherical, faces, warnings, seconds)
