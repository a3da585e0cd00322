"""Images from people, in any mode Pillow opens, as float RGBA in [0, 1] — one conversion for every reader.

    image = open_image("photo.png")              # ImageFileError naming the file if it is not a readable image
    rgba = to_rgba(image)                        # (H, W, 4) float32 in [0, 1]
    rgb = to_rgb_uint8(image, background=(1, 1, 1))

Why not ``image.convert("RGB")``: Pillow converts 16-bit and 32-bit grayscale (``I;16``, ``I``) and
float (``F``) images by *clipping* to 0..255, so a 16-bit PNG comes out almost white. Here those
modes are scaled by their bit depth. Everything else (1, L, P with or without transparency, LA,
PA, RGB, RGBA, CMYK, YCbCr, LAB, HSV, ...) goes through Pillow's own RGBA conversion.
"""

from __future__ import annotations

import io
import os
import zlib

import numpy as np
import pyspng
from PIL import Image


class ImageFileError(ValueError):
    """A file that is not a readable image (not an image at all, truncated, unsupported)."""


_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def open_image(source: str | os.PathLike | bytes, where: str | None = None) -> Image.Image:
    """The fully decoded image at a path (or in bytes); :class:`ImageFileError` names ``where``."""
    where = where or (str(source) if not isinstance(source, bytes) else "image")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.load()  # decode now: a truncated file fails here, not somewhere downstream
            return image.copy() if image.mode != "P" else _keep_palette(image)
    except FileNotFoundError:
        raise ImageFileError(f"{where}: no such file") from None
    except Image.UnidentifiedImageError:
        raise ImageFileError(f"{where}: not an image file (Pillow does not recognise its format)") from None
    except Exception as error:  # Pillow raises many types (OSError "truncated", SyntaxError, ValueError ...)
        raise ImageFileError(f"{where}: cannot decode image ({type(error).__name__}: {error})") from None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_GREY, _PNG_RGB = 0, 2  # IHDR colour types


def decode_png_8bit(data: bytes, where: str = "image") -> np.ndarray | None:
    """The common PNG of shards, 8-bit RGB (colour type 2) or 8-bit grey (0), decoded with libspng
    (pyspng: ~2.5x Pillow's time per 64 px view, which goes mostly into Python around the decoder)
    as (H, W, 3) or (H, W) uint8; None for any other PNG or format (Pillow handles those).

    libspng as pyspng drives it ignores chunk CRCs and decodes a corrupt stream into wrong pixels
    without a word, so every chunk's CRC is checked here first (zlib.crc32, a few microseconds):
    damage is an :class:`ImageFileError`, as Pillow's path reports it.
    """
    if data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR" or data[24] != 8 or data[25] not in (_PNG_GREY, _PNG_RGB):
        return None
    pos, size = 8, len(data)
    while True:
        if pos + 12 > size:
            raise ImageFileError(f"{where}: cannot decode image (truncated PNG: the data ends inside a chunk at byte {pos})")
        length = int.from_bytes(data[pos:pos + 4], "big")
        end = pos + 12 + length
        if end > size:
            raise ImageFileError(f"{where}: cannot decode image (truncated PNG: chunk {data[pos + 4:pos + 8]!r} at byte "
                                 f"{pos} needs {length} bytes)")
        if zlib.crc32(data[pos + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            raise ImageFileError(f"{where}: cannot decode image (PNG chunk {data[pos + 4:pos + 8]!r} at byte {pos} "
                                 f"fails its CRC: corrupt data)")
        if data[pos + 4:pos + 8] == b"IEND":
            break
        pos = end
    try:
        return pyspng.load(data)
    except RuntimeError as error:
        raise ImageFileError(f"{where}: cannot decode image ({error})") from None


def _keep_palette(image: Image.Image) -> Image.Image:
    copy = image.copy()
    copy.info = dict(image.info)  # "transparency" lives in info
    return copy


def has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def to_rgba(image: Image.Image, dtype=np.float32) -> np.ndarray:
    """(H, W, 4) floats in [0, 1]; alpha is 1 where the image has none."""
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image).astype(np.float64)
        if mode.startswith("I;16"):
            scale = 65535.0
        elif mode == "I":  # 32-bit ints: 16-bit PNGs open as "I" in some Pillow versions
            scale = 65535.0 if values.max(initial=0) > 255 else 255.0
        else:  # "F": floats, either in [0, 1] or in [0, 255]
            scale = 1.0 if values.max(initial=0) <= 1.0 else 255.0
        grey = np.clip(values / scale, 0.0, 1.0).astype(dtype)
        return np.stack([grey, grey, grey, np.ones_like(grey)], axis=-1)
    return np.asarray(image.convert("RGBA"), dtype=dtype) / 255.0


def composite(rgba: np.ndarray, background: tuple[float, float, float] | None) -> np.ndarray:
    """(H, W, 3) float: straight alpha over ``background``; ``None`` drops the alpha channel."""
    if background is None:
        return rgba[..., :3]
    alpha = rgba[..., 3:4]
    return rgba[..., :3] * alpha + np.asarray(background, dtype=rgba.dtype) * (1.0 - alpha)


def to_rgb_uint8(image: Image.Image, background: tuple[float, float, float] | None = (1.0, 1.0, 1.0)) -> np.ndarray:
    """(H, W, 3) uint8 with transparency composited on ``background`` (or dropped if ``None``)."""
    if image.mode == "RGB":  # the common case, exactly as stored
        return np.asarray(image, dtype=np.uint8).copy()
    rgba = to_rgba(image, np.float64)
    return np.clip(np.rint(composite(rgba, background if has_alpha(image) else None) * 255.0), 0, 255).astype(np.uint8)
