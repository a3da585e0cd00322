"""Ingest existing render folders (NeRF-synthetic / Blender format) into WebDataset shards.

Usage::

    python -m data_pipeline.ingest SRC_DIR... --format nerf-synthetic --out DIR_OR_URL \\
        [--resolution R] [--maxcount N] [--maxsize BYTES] [--workers W] [--background r,g,b] \\
        [--prefix shard] [--image-format png|jpg|webp] [--normalize visual-hull|none] [--box B] [--fit F]
        [--scale S] [--category NAME]

One object is one folder holding one or more ``transforms*.json`` files (``transforms.json`` or
``transforms_train/val/test.json``; the frames of all of them are the object's views), as
OmniObject3D releases its renders. A SRC_DIR is either such a folder or a folder of them (found
recursively; the object id is then the folder's path relative to SRC_DIR).

Each view is composited on the background colour (RGBA renders), optionally resized, and its
camera is converted once, here, from Blender/OpenGL to the OpenCV convention used everywhere
else (see cameras.py). Objects are normalised into the training box by default
(``--normalize visual-hull``): the box of the visual hull of the views' alpha masks (a coarse
grid, see visual_hull.py) is centred and scaled so its largest half-extent is ``fit * box``; the
transform (``extra.source_to_world``, 4 x 4, the dataset's world -> the cameras' world), the hull's
box (``extra.object_bbox``, in the new world) and how it was found (``extra.normalisation``) are
recorded. ``--normalize none`` keeps the native scale (times ``--scale``). RGBA views keep their
alpha as masks (``KEY.viewNNN.mask.png``). A broken object (missing image, malformed JSON, bad matrix or camera) is
reported with the file at fault and skipped; the rest of the run goes on.

Exit status: 0 when every object was written, 1 when some were skipped (or nothing could be
written), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from data_pipeline import image_io, storage
from data_pipeline.cli_types import background_colour, byte_size, positive_float, positive_int
from data_pipeline.cameras import CameraError, blender_to_opencv_c2w, check_camera, intrinsics_from_fov, scale_intrinsics
from data_pipeline.parallel import map_in_order
from data_pipeline.schema import IMAGE_FORMATS, ObjectSample, SampleError, encode_image, encode_mask, object_key
from data_pipeline.shards import ShardWriter
from data_pipeline.visual_hull import HullError, visual_hull_box

SOURCE_NAME = "nerf-synthetic"
FORMATS = ("nerf-synthetic",)
NORMALIZE = ("visual-hull", "none")
HULL_GRID = 48
# NeRF-synthetic often writes file_path without an extension ("./train/r_0"): try these in order.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
_TRANSFORMS_RE = re.compile(r"^transforms(?:_(?P<split>[A-Za-z0-9_\-]+))?\.json$")
# transforms.json first, then the usual splits in their usual order, then anything else by name.
_SPLIT_RANK = {"": 0, "train": 1, "val": 2, "test": 3}
# Camera fields that may sit at the top level of a transforms file or inside each frame.
_CAMERA_FIELDS = ("camera_angle_x", "camera_angle_y", "fl_x", "fl_y", "cx", "cy", "w", "h")
_DISTORTION_FIELDS = ("k1", "k2", "k3", "k4", "p1", "p2")
# Lanczos is antialiased when downscaling in PIL (its support grows with the reduction factor).
_RESAMPLE = Image.Resampling.LANCZOS


class IngestError(ValueError):
    """An object that cannot be ingested; the message starts with the file at fault."""


class SourceError(FileNotFoundError):
    """A SRC_DIR that does not exist or holds no object: a usage error, not a bad object."""


@dataclass(frozen=True)
class ObjectSource:
    """One object to ingest: its id (becomes the sample key) and its folder."""

    object_id: str
    folder: str


NO_SCALE_REASON = "default: no normalisation (--scale not given)"


@dataclass(frozen=True)
class IngestOptions:
    """How every object of a run is converted (picklable: it travels to the worker processes)."""

    resolution: int | None = None  # output width; None keeps the original size
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    image_format: str = "png"
    scale: float = 1.0
    scale_reason: str | None = None  # None: "given (--scale)" for a scale other than 1, else NO_SCALE_REASON
    category: str | None = None
    normalize: str = "visual-hull"
    box: float = 1.0
    fit: float = 0.9


@dataclass(frozen=True)
class Frame:
    """One view as the transforms file describes it, before its image is read."""

    where: str  # "PATH frames[i]", for messages
    split: str  # "" for transforms.json, else the suffix of transforms_<split>.json
    image_path: str
    c2w_blender: np.ndarray
    camera: dict  # the camera fields in force for this frame (top level overridden per frame)


@dataclass(frozen=True)
class LoadResult:
    source: ObjectSource
    sample: ObjectSample | None
    error: str | None


@dataclass(frozen=True)
class SkippedObject:
    object_id: str
    reason: str

    def __str__(self) -> str:
        return f"skipped {self.object_id}: {self.reason}"


@dataclass
class IngestSummary:
    objects_found: int = 0
    objects_written: int = 0
    views_written: int = 0
    shards: list[str] = field(default_factory=list)
    num_bytes: int = 0
    pattern: str = ""
    skipped: list[SkippedObject] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if self.objects_written > 0 and not self.skipped else 1

    def format(self) -> str:
        lines = [
            f"ingest: wrote {self.objects_written} of {self.objects_found} objects ({self.views_written} views) "
            f"into {len(self.shards)} shards, {self.num_bytes} bytes",
            f"shards: {self.pattern or '(none)'}",
        ]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} objects (exit status 1):")
            lines += [f"  {s.object_id}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


# --------------------------------------------------------------------------- finding objects


def transforms_files(folder: str) -> list[tuple[str, str]]:
    """(split, path) of every transforms*.json in ``folder``, in view order."""
    found = []
    for name in os.listdir(folder):
        match = _TRANSFORMS_RE.match(name)
        if match and os.path.isfile(os.path.join(folder, name)):
            split = match.group("split") or ""
            found.append((split, os.path.join(folder, name)))
    return sorted(found, key=lambda item: (_SPLIT_RANK.get(item[0], len(_SPLIT_RANK)), item[0]))


def find_objects(root: str) -> list[ObjectSource]:
    """The objects under ``root``: root itself when it holds transforms*.json, else every folder
    below it that does (not looking inside an object folder), sorted by relative path."""
    root = os.path.normpath(root)
    if not os.path.isdir(root):
        raise SourceError(f"{root}: not a directory")
    if transforms_files(root):
        return [ObjectSource(os.path.basename(os.path.abspath(root)), root)]
    found: list[ObjectSource] = []
    seen: set[str] = set()  # real paths, so that symlink loops end
    for folder, dirs, _ in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        if folder != root and transforms_files(folder):
            found.append(ObjectSource(os.path.relpath(folder, root).replace(os.sep, "/"), folder))
            dirs[:] = []  # an object's subfolders hold its images, not more objects
    return sorted(found, key=lambda s: s.object_id.split("/"))


# --------------------------------------------------------------------------- one object


def read_transforms(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read().decode("utf-8"))
    except json.JSONDecodeError as error:
        raise IngestError(f"{path}: malformed JSON ({error})") from None
    except UnicodeDecodeError as error:
        raise IngestError(f"{path}: not UTF-8 text ({error})") from None
    except OSError as error:
        raise IngestError(f"{path}: cannot read ({error.strerror or error})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("frames"), list):
        raise IngestError(f"{path}: expected a JSON object with a 'frames' list")
    return doc


def _camera_fields(values: dict, where: str) -> dict:
    """The camera fields present in ``values``, as floats; rejects lens distortion."""
    fields = {}
    for name in _CAMERA_FIELDS:
        if values.get(name) is None:
            continue
        try:
            fields[name] = float(values[name])
        except (TypeError, ValueError):
            raise IngestError(f"{where}: {name} must be a number, got {values[name]!r}") from None
    distortion = [name for name in _DISTORTION_FIELDS if values.get(name) not in (None, 0, 0.0)]
    if distortion:
        # Pinhole only: silently dropping distortion would make the cameras quietly wrong.
        raise IngestError(f"{where}: lens distortion ({', '.join(distortion)}) is not supported")
    return fields


def parse_matrix(value, where: str) -> np.ndarray:
    try:
        matrix = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise IngestError(f"{where}.transform_matrix must be a 4x4 matrix of numbers") from None
    if matrix.shape != (4, 4):
        raise IngestError(f"{where}.transform_matrix must be 4x4, got shape {matrix.shape}")
    return matrix


def resolve_image_path(base_dir: str, file_path: str, where: str) -> str:
    """The image a frame's file_path names: as written, else with each known extension added."""
    path = os.path.normpath(os.path.join(base_dir, file_path))
    candidates = [path] + [path + ext for ext in IMAGE_EXTENSIONS]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    tried = "|".join(IMAGE_EXTENSIONS)
    raise IngestError(f"{path}: image not found (also tried {tried}; named by {where}.file_path)")


def frames_of(split: str, path: str, doc: dict) -> list[Frame]:
    top = _camera_fields(doc, path)
    base_dir = os.path.dirname(path)
    frames = []
    for i, entry in enumerate(doc["frames"]):
        where = f"{path} frames[{i}]"
        if not isinstance(entry, dict):
            raise IngestError(f"{where}: expected an object, got {type(entry).__name__}")
        file_path = entry.get("file_path")
        if not isinstance(file_path, str) or not file_path:
            raise IngestError(f"{where}: missing file_path")
        if "transform_matrix" not in entry:
            raise IngestError(f"{where}: missing transform_matrix")
        camera = {**top, **_camera_fields(entry, where)}
        c2w = parse_matrix(entry["transform_matrix"], where)
        frames.append(Frame(where, split, resolve_image_path(base_dir, file_path, where), c2w, camera))
    return frames


def load_rgb(path: str, background: tuple[float, float, float]) -> np.ndarray:
    """(H, W, 3) uint8: RGBA composited on ``background``, RGB as it is."""
    return load_rgb_alpha(path, background)[0]


def load_rgb_alpha(path: str, background: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray | None]:
    """(RGB composited on ``background``, the alpha channel as (H, W) uint8 or None without one).

    Any Pillow mode (16-bit, palette, CMYK, LA, ...): see data_pipeline/image_io.py."""
    try:
        image = image_io.open_image(path)
    except image_io.ImageFileError as error:
        raise IngestError(f"cannot read image: {error}") from None
    # Straight (non-premultiplied) alpha, composited in the stored sRGB values, as NeRF code does.
    rgb = image_io.to_rgb_uint8(image, background)
    if not image_io.has_alpha(image):
        return rgb, None
    alpha8 = np.clip(np.rint(image_io.to_rgba(image, np.float64)[..., 3] * 255.0), 0, 255).astype(np.uint8)
    return rgb, alpha8


def output_size(width: int, height: int, resolution: int | None) -> tuple[int, int]:
    """Width becomes ``resolution``; height keeps the aspect ratio."""
    if resolution is None or resolution == width:
        return width, height
    return resolution, max(1, int(round(height * resolution / width)))


def resize_alpha(alpha: np.ndarray, width: int, height: int) -> np.ndarray:
    if alpha.shape[:2] == (height, width):
        return alpha
    return np.asarray(Image.fromarray(alpha, mode="L").resize((width, height), _RESAMPLE), dtype=np.uint8)


def resize_rgb(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    if rgb.shape[:2] == (height, width):
        return rgb
    # Resize after compositing: resizing straight-alpha RGBA would bleed the (arbitrary) colour
    # of transparent pixels into the silhouette's edge.
    return np.asarray(Image.fromarray(rgb, mode="RGB").resize((width, height), _RESAMPLE), dtype=np.uint8)


def frame_intrinsics(camera: dict, width: int, height: int, where: str) -> np.ndarray:
    """K on the image's own pixel grid (width x height).

    fl_x/fl_y/cx/cy are in pixels of the grid the file declares (w, h; default: the image's
    size), with the pixel-centre-at-+0.5 convention of cameras.py, so cx = w/2 is centred.
    Without fl_x the focal length comes from camera_angle_x (and camera_angle_y if given).
    """
    grid_w, grid_h = camera.get("w", float(width)), camera.get("h", float(height))
    if grid_w <= 0 or grid_h <= 0:
        raise IngestError(f"{where}: w and h must be positive, got {grid_w} x {grid_h}")
    try:
        if "fl_x" in camera or "fl_y" in camera:
            fx = camera.get("fl_x", camera.get("fl_y"))
            fy = camera.get("fl_y", fx)
            K = np.array([[fx, 0.0, grid_w / 2.0], [0.0, fy, grid_h / 2.0], [0.0, 0.0, 1.0]])
        elif "camera_angle_x" in camera:
            K = intrinsics_from_fov(grid_w, grid_h, camera["camera_angle_x"], camera.get("camera_angle_y"))
        else:
            raise IngestError(f"{where}: neither camera_angle_x nor fl_x is given")
    except CameraError as error:
        raise IngestError(f"{where}: {error}") from None
    if "cx" in camera:
        K[0, 2] = camera["cx"]
    if "cy" in camera:
        K[1, 2] = camera["cy"]
    sx, sy = width / grid_w, height / grid_h
    if abs(sx - sy) > 0.01 * sx:
        raise IngestError(f"{where}: declared size {grid_w:g}x{grid_h:g} and image size {width}x{height} have different aspect ratios")
    return K if (sx, sy) == (1.0, 1.0) else scale_intrinsics(K, sx, sy)


def load_nerf_synthetic_object(folder: str, options: IngestOptions | None = None,
                               object_id: str | None = None) -> ObjectSample:
    """Read one NeRF-synthetic object folder into an :class:`ObjectSample` (OpenCV cameras),
    converted as ``options`` says (default :class:`IngestOptions`).

    ``normalize="visual-hull"`` centres and scales the object into [-box, box]^3 from its masks
    (``scale`` is then not used); ``"none"`` multiplies camera translations by ``scale``.

    Raises :class:`IngestError` whose message starts with the file at fault.
    """
    options = options or IngestOptions()
    resolution, background, image_format = options.resolution, options.background, options.image_format
    scale, scale_reason, normalize, box, fit = options.scale, options.scale_reason, options.normalize, options.box, options.fit
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    object_id = object_id or os.path.basename(os.path.abspath(folder))
    files = transforms_files(folder)
    if not files:
        raise IngestError(f"{folder}: no transforms*.json in this folder")
    frames: list[Frame] = []
    seen_images: set[str] = set()
    duplicates = 0
    for split, path in files:
        for frame in frames_of(split, path, read_transforms(path)):
            # transforms.json beside split files often repeats their frames: keep each image once.
            if frame.image_path in seen_images:
                duplicates += 1
                continue
            seen_images.add(frame.image_path)
            frames.append(frame)
    if not frames:
        raise IngestError(f"{files[0][1]}: no frames")

    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    images, Ks, c2ws, alphas = [], [], [], []
    first_size: tuple[int, int] | None = None
    out_size: tuple[int, int] = (0, 0)
    for frame in frames:
        rgb, alpha = load_rgb_alpha(frame.image_path, background)
        height, width = rgb.shape[:2]
        if first_size is None:
            first_size = (width, height)
            out_size = output_size(width, height, resolution)
        elif (width, height) != first_size:
            raise IngestError(f"{frame.image_path}: size {width}x{height} differs from the object's first view ({first_size[0]}x{first_size[1]})")
        K = frame_intrinsics(frame.camera, width, height, frame.where)
        K = scale_intrinsics(K, out_size[0] / width, out_size[1] / height) if out_size != (width, height) else K
        c2w = blender_to_opencv_c2w(frame.c2w_blender)
        try:
            check_camera(K, c2w, where=frame.where)
        except CameraError as error:
            raise IngestError(str(error)) from None
        images.append(encode_image(resize_rgb(rgb, *out_size), image_format))
        alphas.append(None if alpha is None else resize_alpha(alpha, *out_size))
        Ks.append(K)
        c2ws.append(c2w)
    c2w_stack = np.stack(c2ws)
    has_masks = all(a is not None for a in alphas)
    normalisation, object_bbox = {"method": "none", "scale": float(scale)}, None
    if normalize == "visual-hull" and has_masks:
        try:
            lo, hi = visual_hull_box(np.stack(alphas) >= 128, np.stack(Ks), c2w_stack, grid=HULL_GRID)
        except HullError as error:
            raise IngestError(f"{folder}: cannot normalise ({error}); use --normalize none") from None
        centre, half = (lo + hi) / 2.0, float(np.max(hi - lo)) / 2.0
        scale = fit * box / half
        normalisation = {"method": "visual-hull", "grid": HULL_GRID, "scale": scale, "centre": centre.tolist(),
                         "hull_min": lo.tolist(), "hull_max": hi.tolist(), "box": box, "fit": fit}
        object_bbox = [(scale * (lo - centre)).tolist(), (scale * (hi - centre)).tolist()]
        scale_reason = f"visual hull of the alpha masks: largest half-extent {half:.6g} -> {fit * box:.6g}"
    else:
        centre = np.zeros(3)
        if normalize == "visual-hull":  # nothing to find the object in: say so, keep the native scale
            normalisation["why"] = "the views have no alpha channel (no masks)"
            scale_reason = "not normalised: the views have no alpha channel to find the object in"
    source_to_world = np.eye(4)
    source_to_world[:3, :3] *= scale
    source_to_world[:3, 3] = -scale * centre
    c2w_stack = c2w_stack.copy()
    c2w_stack[:, :3, 3] = (c2w_stack[:, :3, 3] - centre) * scale

    extra = {
        "scale_reason": scale_reason or ("given (--scale)" if scale != 1.0 else NO_SCALE_REASON),
        "normalisation": normalisation,
        "source_to_world": source_to_world.tolist(),
        "original_width": first_size[0],
        "original_height": first_size[1],
        "resample": "lanczos" if out_size != first_size else "none",
        "transforms_files": [os.path.basename(path) for _, path in files],
        "view_splits": [frame.split for frame in frames],
    }
    if object_bbox is not None:
        extra["object_bbox"] = object_bbox
    if duplicates:
        extra["duplicate_frames_dropped"] = duplicates
    return ObjectSample(
        object_id=object_id,
        images=images,
        intrinsics=np.stack(Ks),
        c2w=c2w_stack,
        width=out_size[0],
        height=out_size[1],
        image_format=image_format,
        source=SOURCE_NAME,
        category=options.category,
        scale=float(scale),
        background=tuple(float(c) for c in background),
        extra=extra,
        masks=[encode_mask(a) for a in alphas] if has_masks else None,
    )


def _load_worker(task: tuple[ObjectSource, IngestOptions]) -> LoadResult:
    """Runs in a pool worker: never raises, so one bad object cannot stop the run."""
    source, options = task
    try:
        sample = load_nerf_synthetic_object(source.folder, options, object_id=source.object_id)
        return LoadResult(source, sample, None)
    except (IngestError, SampleError) as error:
        return LoadResult(source, None, str(error))
    except Exception as error:  # an unexpected failure still names the object, and the run goes on
        return LoadResult(source, None, f"{source.folder}: {type(error).__name__}: {error}")


# --------------------------------------------------------------------------- a whole run


def collect_sources(roots: Iterable[str]) -> list[ObjectSource]:
    sources: list[ObjectSource] = []
    for root in roots:
        found = find_objects(root)
        if not found:
            raise SourceError(f"{root}: no folder with a transforms*.json below it")
        sources.extend(found)
    return sources


def _split_duplicate_keys(sources: list[ObjectSource]) -> tuple[list[ObjectSource], list[SkippedObject]]:
    """Two objects whose ids map to the same sample key would be indistinguishable in a shard."""
    owner: dict[str, str] = {}
    unique, skipped = [], []
    for source in sources:
        key = object_key(source.object_id)
        if key in owner:
            skipped.append(SkippedObject(source.object_id, f"{source.folder}: sample key {key!r} is already used by object {owner[key]!r}"))
        else:
            owner[key] = source.object_id
            unique.append(source)
    return unique, skipped


def _load_all(tasks: list[tuple[ObjectSource, IngestOptions]], workers: int) -> Iterator[LoadResult]:
    return map_in_order(_load_worker, tasks, workers)  # in input order, so shards are deterministic


def ingest(
    sources: list[str],
    out: str,
    resolution: int | None = None,
    background: tuple[float, float, float] = (1.0, 1.0, 1.0),
    image_format: str = "png",
    scale: float = 1.0,
    category: str | None = None,
    max_objects: int = 100,
    max_bytes: int = 1 << 30,
    workers: int = 1,
    prefix: str = "shard",
    storage_options: dict | None = None,
    progress: bool = False,
    log=None,
    normalize: str = "visual-hull",
    box: float = 1.0,
    fit: float = 0.9,
) -> IngestSummary:
    """Ingest NeRF-synthetic object folders (or folders of them) into shards at ``out``.

    Raises :class:`SourceError` when a source does not exist or holds no object; bad objects are
    skipped and listed in the summary. ``log`` receives one line per skipped object.
    """
    if resolution is not None and resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive number, got {scale}")
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    if normalize != "none" and scale != 1.0:
        raise ValueError("scale is for normalize='none' (the visual hull chooses the scale itself)")
    if not (box > 0 and 0 < fit <= 1):
        raise ValueError(f"box must be > 0 and fit in (0, 1], got box={box}, fit={fit}")
    options = IngestOptions(
        resolution=resolution,
        background=tuple(float(c) for c in background),
        image_format=image_format,
        scale=float(scale),
        category=category,
        normalize=normalize,
        box=float(box),
        fit=float(fit),
    )
    found = collect_sources(sources)
    unique, skipped = _split_duplicate_keys(found)
    summary = IngestSummary(objects_found=len(found), skipped=list(skipped))
    log = log or (lambda line: tqdm.write(line, file=sys.stderr))
    for item in skipped:
        log(str(item))

    writer = ShardWriter(out, prefix=prefix, max_objects=max_objects, max_bytes=max_bytes, storage_options=storage_options)
    bar = tqdm(total=len(unique), desc="ingest", unit="obj", disable=not progress, file=sys.stderr)
    try:
        for result in _load_all([(source, options) for source in unique], workers):
            bar.update(1)
            if result.sample is None:
                item = SkippedObject(result.source.object_id, result.error or "unknown error")
                summary.skipped.append(item)
                log(str(item))
                continue
            writer.write(result.sample)
            summary.objects_written += 1
            summary.views_written += result.sample.num_views
    except BaseException:
        # Keep what was written (every closed shard holds whole samples), but let the original
        # error through rather than one that closing a broken output might raise.
        with contextlib.suppress(Exception):
            writer.close()
        raise
    finally:
        bar.close()
    writer.close()
    summary.shards = list(writer.shard_urls)
    summary.num_bytes = writer.num_bytes
    summary.pattern = writer.pattern()
    return summary


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.ingest",
        description="Pack NeRF-synthetic/Blender render folders into WebDataset shards (one sample per object, OpenCV cameras).",
    )
    parser.add_argument("sources", nargs="+", metavar="SRC_DIR", help="an object folder (with transforms*.json) or a folder of them")
    parser.add_argument("--format", default="nerf-synthetic", choices=FORMATS, help="input layout (default: nerf-synthetic)")
    parser.add_argument("--out", required=True, help="output folder or URL (s3://bucket/prefix, file://..., any fsspec URL)")
    parser.add_argument("--resolution", type=positive_int, default=None, help="output width in pixels; height keeps the aspect ratio")
    parser.add_argument("--maxcount", type=positive_int, default=100, help="objects per shard (default 100)")
    parser.add_argument("--maxsize", type=byte_size, default=1 << 30, help="bytes per shard, e.g. 1G (default 1 GiB)")
    parser.add_argument("--workers", type=positive_int, default=1, help="parallel reader processes (default 1)")
    parser.add_argument("--background", type=background_colour, default=(1.0, 1.0, 1.0), help="r,g,b in [0,1] for transparent pixels (default 1,1,1: white)")
    parser.add_argument("--prefix", default="shard", help="shard file name prefix (default: shard)")
    parser.add_argument("--image-format", default="png", choices=IMAGE_FORMATS, help="encoding of the stored views (default png, lossless)")
    parser.add_argument("--normalize", choices=NORMALIZE, default="visual-hull", help="visual-hull (default): centre and scale each object into the box from its alpha masks; none: keep the native scale (times --scale)")
    parser.add_argument("--box", type=positive_float, default=1.0, help="training box half-size (the model's box_half_size, default 1)")
    parser.add_argument("--fit", type=positive_float, default=0.9, help="largest half-extent after normalisation, as a fraction of --box (default 0.9)")
    parser.add_argument("--scale", type=positive_float, default=1.0, help="with --normalize none: multiply camera translations by S (default 1.0)")
    parser.add_argument("--category", default=None, help="category to record for every object (default: none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", args.prefix):
        parser.error(f"--prefix must be letters, digits, '_' or '-' (no dots: webdataset splits names at dots), got {args.prefix!r}")
    for source in args.sources:
        if not os.path.isdir(source):
            parser.error(f"{source}: not a directory")
    if args.scale != 1.0 and args.normalize != "none":
        parser.error("--scale needs --normalize none (the visual hull chooses the scale itself)")
    if args.fit > 1.0:
        parser.error(f"--fit must be in (0, 1], got {args.fit}")
    try:
        summary = ingest(
            args.sources,
            args.out,
            resolution=args.resolution,
            background=args.background,
            image_format=args.image_format,
            scale=args.scale,
            category=args.category,
            max_objects=args.maxcount,
            max_bytes=args.maxsize,
            workers=args.workers,
            prefix=args.prefix,
            progress=not args.no_progress,
            normalize=args.normalize,
            box=args.box,
            fit=args.fit,
        )
    except SourceError as error:
        parser.error(str(error))
    except OSError as error:  # the output could not be written: say where and why, without secrets
        print(f"error: {storage.explain_storage_error(args.out, error)}", file=sys.stderr)
        return 1
    print(summary.format())
    return summary.exit_code


if __name__ == "__main__":
    # Run through the package module so worker processes and pickles see one copy of its classes.
    from data_pipeline.ingest import main as _main

    sys.exit(_main())
