"""The sample schema: one sample in a shard is one object with all its views.

Schema version 1. A sample with key ``KEY`` is a group of consecutive tar members::

    KEY.meta.json      metadata and cameras (below), UTF-8 JSON
    KEY.view000.png    view 0, RGB, 8 bit, composited on the background colour
    KEY.view001.png    view 1
    ...
    KEY.view000.mask.png   optional: the object's mask in view 0, 8-bit grey, 255 = object,
                           0 = background, in between = partly covered edge pixels (renders of
                           meshes have them; other sources may not: masks are all or nothing)

``meta.json``::

    {
      "schema_version": 1,
      "object_id": "chair_0042",          # the original id; KEY is a tar-safe version of it
      "source": "synthetic",               # dataset or tool the object came from
      "category": "chair",                 # or null when unknown
      "scale": 0.5,                        # world units were multiplied by this at ingest
      "background": [1.0, 1.0, 1.0],       # RGB in [0, 1] that transparent pixels were composited on
      "width": 128, "height": 128,         # every view has this size
      "image_format": "png",               # png (default), jpg or webp
      "views": [                           # one entry per view, in member order
        {"name": "view000.png",
         "K": [[fx, 0, cx], [0, fy, cy], [0, 0, 1]],      # pixels; see cameras.py for the convention
         "c2w": [[...4 numbers...] x 4],                   # OpenCV camera-to-world, world units
         "mask": "view000.mask.png"}                       # only when the sample has masks
      ],
      "extra": {}                          # free-form, e.g. how the scale was chosen
    }

Numbers are written with Python's shortest round-tripping float repr, so cameras read back
bit-exact as float64. Shards are plain tar files: ``tar tf`` lists them and plain
``webdataset.WebDataset`` reads them (the keys split at the first dot, as webdataset expects).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from data_pipeline import image_io
from data_pipeline.cameras import CameraError, check_cameras as check_camera_stack

SCHEMA_VERSION = 1
IMAGE_FORMATS = ("png", "jpg", "webp")
META_SUFFIX = "meta.json"
MASK_SUFFIX = "mask.png"


class SampleError(ValueError):
    """A sample that cannot be used; the message says which object and which field."""


@dataclass
class ObjectSample:
    """One object: V encoded views with their cameras, plus metadata."""

    object_id: str
    images: list[bytes]  # encoded files, one per view
    intrinsics: np.ndarray  # (V, 3, 3) float64
    c2w: np.ndarray  # (V, 4, 4) float64, OpenCV convention
    width: int
    height: int
    image_format: str = "png"
    source: str = "unknown"
    category: str | None = None
    scale: float = 1.0
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    extra: dict = field(default_factory=dict)
    masks: list[bytes] | None = None  # encoded 8-bit grey PNGs, one per view (255 = object), or None

    @property
    def num_views(self) -> int:
        return len(self.images)

    @property
    def key(self) -> str:
        return object_key(self.object_id)

    def view_name(self, index: int) -> str:
        return f"view{index:03d}.{self.image_format}"

    def mask_name(self, index: int) -> str:
        return mask_name(index)

    def meta(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "object_id": self.object_id,
            "source": self.source,
            "category": self.category,
            "scale": float(self.scale),
            "background": [float(c) for c in self.background],
            "width": int(self.width),
            "height": int(self.height),
            "image_format": self.image_format,
            "views": [
                {"name": self.view_name(i), "K": self.intrinsics[i].tolist(), "c2w": self.c2w[i].tolist(),
                 **({"mask": self.mask_name(i)} if self.masks is not None else {})}
                for i in range(self.num_views)
            ],
            "extra": self.extra,
        }

    def to_members(self) -> list[tuple[str, bytes]]:
        """Tar members (name, bytes) in the order they are written."""
        if self.image_format not in IMAGE_FORMATS:
            raise SampleError(f"{self.object_id}: image_format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
        if self.intrinsics.shape != (self.num_views, 3, 3) or self.c2w.shape != (self.num_views, 4, 4):
            raise SampleError(
                f"{self.object_id}: expected intrinsics (V,3,3) and c2w (V,4,4) for V={self.num_views}, "
                f"got {self.intrinsics.shape} and {self.c2w.shape}"
            )
        if self.masks is not None and len(self.masks) != self.num_views:
            raise SampleError(f"{self.object_id}: {len(self.masks)} masks for {self.num_views} views")
        key = self.key
        members = [(f"{key}.{META_SUFFIX}", json.dumps(self.meta(), indent=None).encode("utf-8"))]
        for i, data in enumerate(self.images):
            members.append((f"{key}.{self.view_name(i)}", data))
            if self.masks is not None:
                members.append((f"{key}.{self.mask_name(i)}", self.masks[i]))
        return members


def mask_name(index: int) -> str:
    """The member suffix of view ``index``'s mask (always PNG: lossless, 8-bit grey)."""
    return f"view{index:03d}.{MASK_SUFFIX}"


def object_key(object_id: str) -> str:
    """A tar- and webdataset-safe key: no dots (webdataset splits keys at the first dot) or slashes."""
    key = re.sub(r"[^A-Za-z0-9_\-]", "_", object_id)
    if not key:
        raise SampleError("object_id must not be empty")
    return key


def parse_sample(key: str, members: dict[str, bytes], check_cameras: bool = True) -> ObjectSample:
    """Build an :class:`ObjectSample` from the members of one tar group (suffix -> bytes).

    Images stay encoded (decoding is the reader's job, and only for the views it uses).
    Raises :class:`SampleError` naming the object and field on anything malformed.
    """
    raw = members.get(META_SUFFIX)
    if raw is None:
        raise SampleError(f"sample {key!r}: missing {META_SUFFIX}")
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SampleError(f"sample {key!r}: {META_SUFFIX} is not valid JSON ({error})") from None
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SampleError(f"sample {key!r}: schema_version {version!r} is not supported (this reader knows {SCHEMA_VERSION})")
    try:
        views = meta["views"]
        width, height = int(meta["width"]), int(meta["height"])
        fmt = meta["image_format"]
        intrinsics = np.array([v["K"] for v in views], dtype=np.float64).reshape(len(views), 3, 3)
        c2w = np.array([v["c2w"] for v in views], dtype=np.float64).reshape(len(views), 4, 4)
        names = [v["name"] for v in views]
        mask_names = [v.get("mask") for v in views]
    except (KeyError, TypeError, ValueError) as error:
        raise SampleError(f"sample {key!r}: malformed {META_SUFFIX} field ({type(error).__name__}: {error})") from None
    if check_cameras:
        try:
            check_camera_stack(intrinsics, c2w, where=f"sample {key!r} views")
        except CameraError as error:
            raise SampleError(str(error)) from None
    images = []
    for name in names:
        if name not in members:
            raise SampleError(f"sample {key!r}: view file {key}.{name} is missing from the shard")
        images.append(members[name])
    masks = None
    if any(m is not None for m in mask_names):
        if not all(isinstance(m, str) for m in mask_names):
            raise SampleError(f"sample {key!r}: some views name a mask and some do not (masks are all or nothing)")
        masks = []
        for name in mask_names:
            if name not in members:
                raise SampleError(f"sample {key!r}: mask file {key}.{name} is missing from the shard")
            masks.append(members[name])
    return ObjectSample(
        object_id=str(meta.get("object_id", key)),
        images=images,
        intrinsics=intrinsics,
        c2w=c2w,
        width=width,
        height=height,
        image_format=fmt,
        source=str(meta.get("source", "unknown")),
        category=meta.get("category"),
        scale=float(meta.get("scale", 1.0)),
        background=tuple(float(c) for c in meta.get("background", (1.0, 1.0, 1.0))),
        extra=dict(meta.get("extra") or {}),
        masks=masks,
    )


def encode_image(rgb: np.ndarray, image_format: str = "png", quality: int = 95) -> bytes:
    """Encode an (H, W, 3) uint8 image. PNG is lossless and deterministic."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise SampleError(f"images must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    buffer = io.BytesIO()
    image = Image.fromarray(rgb, mode="RGB")
    if image_format == "png":
        image.save(buffer, format="PNG", compress_level=4)
    elif image_format == "jpg":
        image.save(buffer, format="JPEG", quality=quality)
    elif image_format == "webp":
        image.save(buffer, format="WEBP", quality=quality)
    else:
        raise SampleError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    return buffer.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    """Encode an (H, W) uint8 mask (255 = object) as an 8-bit grey PNG."""
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise SampleError(f"masks must be (H, W) uint8, got {mask.shape} {mask.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buffer, format="PNG", compress_level=4)
    return buffer.getvalue()


def decode_mask(data: bytes, width: int | None = None, height: int | None = None, where: str = "mask") -> np.ndarray:
    """Decode an 8-bit grey mask to (H, W) uint8, checking mode and size; raises :class:`SampleError`."""
    try:
        mask = image_io.decode_png_8bit(data, where)  # the common case, fast; None for other files
        if mask is not None and mask.ndim != 2:
            raise SampleError(f"{where}: a mask must be 8-bit grey (PIL mode L), got mode RGB")
    except image_io.ImageFileError as error:
        raise SampleError(f"{where}: cannot decode ({error})") from None
    if mask is None:
        mask = _decode_mask_pillow(data, where)
    if width is not None and height is not None and mask.shape != (height, width):
        raise SampleError(f"{where}: decoded size {mask.shape[1]}x{mask.shape[0]} differs from declared {width}x{height}")
    return mask


def _decode_mask_pillow(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode != "L":
                raise SampleError(f"{where}: a mask must be 8-bit grey (PIL mode L), got mode {image.mode}")
            mask = np.asarray(image)
    except SampleError:
        raise
    except Exception as error:
        raise SampleError(f"{where}: cannot decode ({type(error).__name__}: {error})") from None
    return mask


def decode_image(data: bytes, width: int | None = None, height: int | None = None, where: str = "image") -> np.ndarray:
    """Decode to (H, W, 3) uint8, checking the declared size; raises :class:`SampleError`."""
    try:
        rgb = image_io.decode_png_8bit(data, where)  # the common case, fast; None for other files
        if rgb is not None and rgb.ndim == 2:  # 8-bit grey, as Pillow's path converts it
            rgb = np.repeat(rgb[..., None], 3, axis=-1)
        if rgb is None:  # any Pillow mode, 16-bit grayscale scaled rather than clipped (see image_io); alpha dropped
            rgb = image_io.to_rgb_uint8(image_io.open_image(data), background=None)
    except image_io.ImageFileError as error:
        raise SampleError(f"{where}: cannot decode ({error})") from None
    if width is not None and height is not None and rgb.shape[:2] != (height, width):
        raise SampleError(f"{where}: decoded size {rgb.shape[1]}x{rgb.shape[0]} differs from declared {width}x{height}")
    return rgb
