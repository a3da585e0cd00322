"""Image files a person opens (previews, turntables, plots): float tensors to 8-bit, atomic saves, GIFs.

Images come in as float tensors in [0, 1], channels first (the layout the model uses), on any
device, possibly requiring grad. Values outside [0, 1] (a prediction can overshoot) are clipped
and NaNs drawn black, so a diverging model still produces an image to look at.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_pipeline.atomic_files import atomic_write


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) float in [0, 1] -> (..., H, W, 3) uint8."""
    x = images.detach().float().cpu().nan_to_num(0.0).clamp(0.0, 1.0)
    x = (x * 255.0).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def save_image_atomic(image: Image.Image, path: str | os.PathLike, **save_kwargs) -> None:
    """Save through a temporary file and rename, so a viewer never opens a half-written image."""
    fmt = save_kwargs.pop("format", None) or Image.registered_extensions()[Path(path).suffix.lower()]
    with atomic_write(path, "wb") as f:
        image.save(f, format=fmt, **save_kwargs)


def save_turntable_gif(path_gif: str | os.PathLike, frames: torch.Tensor, fps: float = 12) -> None:
    """Write frames (N, 3, H, W) in [0, 1] as an animated GIF that loops forever.

    GIF stores frame delays in 1/100 s, so the real rate is the nearest that fits (12 fps plays
    at 12.5). Pillow merges a frame identical to the one before it into a longer delay, which
    looks the same but leaves fewer frames in the file.
    """
    if frames.ndim != 4 or frames.shape[1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must be (N, 3, H, W) with N > 0, got {tuple(frames.shape)}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    # GIF holds 256 colours per frame: an adaptive palette per frame keeps renders smooth.
    images = [Image.fromarray(f).quantize(colors=256, method=Image.Quantize.MEDIANCUT) for f in to_uint8(frames)]
    save_image_atomic(images[0], path_gif, format="GIF", save_all=True, append_images=images[1:],
                      duration=round(1000.0 / fps), loop=0)


__all__ = ["to_uint8", "save_image_atomic", "save_turntable_gif"]
