"""Images a person looks at during training: preview grids, turntable GIFs and their cameras.

All images come in as float tensors in [0, 1], channels first (the layout the model uses); they
may live on any device and may require grad. Values outside [0, 1] (a prediction can overshoot)
are clipped and NaNs drawn black, so a diverging model still produces a preview to look at.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data_pipeline.cameras import intrinsics_from_fov, look_at_c2w

# Separator between tiles: mid grey stands out against both white backgrounds and dark objects.
SEPARATOR_PX = 2
SEPARATOR_RGB = (128, 128, 128)


def save_image_atomic(image: Image.Image, path: str | os.PathLike, **save_kwargs) -> None:
    """Save through a temporary file and rename, so a viewer never opens a half-written image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fmt = save_kwargs.pop("format", None) or Image.registered_extensions()[path.suffix.lower()]
    image.save(tmp, format=fmt, **save_kwargs)
    os.replace(tmp, path)


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) float in [0, 1] -> (..., H, W, 3) uint8."""
    x = images.detach().float().cpu().nan_to_num(0.0).clamp(0.0, 1.0)
    x = (x * 255.0).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (N, 3, h, w) to size=(H, W); antialiased so downscaled previews do not alias."""
    if tuple(images.shape[-2:]) == size or images.shape[0] == 0:
        return images
    return F.interpolate(images.detach().float(), size=size, mode="bilinear", align_corners=False, antialias=True)


def save_preview_grid(path_png: str | os.PathLike, context: torch.Tensor, target: torch.Tensor,
                      prediction: torch.Tensor) -> None:
    """Write a PNG with one row per object: its k context views | the target | the prediction.

    ``context`` is (B, k, 3, h, w) with k >= 0, ``target`` (B, 3, H, W), ``prediction``
    (B, 3, h', w'); everything is resized to the target's (H, W). Tiles are separated by
    :data:`SEPARATOR_PX` grey pixels, so the image is (k + 2) * W + (k + 1) * sep wide and
    B * H + (B - 1) * sep high.
    """
    if target.ndim != 4 or target.shape[1] != 3:
        raise ValueError(f"target must be (B, 3, H, W), got {tuple(target.shape)}")
    if prediction.ndim != 4 or prediction.shape[1] != 3:
        raise ValueError(f"prediction must be (B, 3, H, W), got {tuple(prediction.shape)}")
    if context.ndim != 5 or context.shape[2] != 3:
        raise ValueError(f"context must be (B, k, 3, H, W), got {tuple(context.shape)}")
    batch, height, width = target.shape[0], target.shape[2], target.shape[3]
    if batch == 0 or prediction.shape[0] != batch or context.shape[0] != batch:
        raise ValueError(f"batch sizes must agree and be > 0: context {context.shape[0]}, "
                         f"target {batch}, prediction {prediction.shape[0]}")
    k = context.shape[1]
    size = (height, width)
    ctx = _resize(context.reshape(batch * k, *context.shape[2:]), size).reshape(batch, k, 3, height, width)
    # columns: context views..., target, prediction  ->  tiles (B, k + 2, H, W, 3)
    tiles = _to_uint8(torch.cat([ctx, _resize(target, size)[:, None], _resize(prediction, size)[:, None]], dim=1))

    cols, sep = k + 2, SEPARATOR_PX
    grid = np.empty((batch * height + (batch - 1) * sep, cols * width + (cols - 1) * sep, 3), dtype=np.uint8)
    grid[:] = SEPARATOR_RGB
    for row in range(batch):
        for col in range(cols):
            y, x = row * (height + sep), col * (width + sep)
            grid[y:y + height, x:x + width] = tiles[row, col]
    save_image_atomic(Image.fromarray(grid), path_png)


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
    images = [Image.fromarray(f).quantize(colors=256, method=Image.Quantize.MEDIANCUT) for f in _to_uint8(frames)]
    save_image_atomic(images[0], path_gif, format="GIF", save_all=True, append_images=images[1:],
                      duration=round(1000.0 / fps), loop=0)


def turntable_cameras(num_frames: int, radius: float, elevation_deg: float, fov_deg: float,
                      resolution: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cameras on a circle around the world z axis (+z is up), all looking at the origin.

    Frame i sits at azimuth 360 * i / num_frames degrees (counter-clockwise seen from +z,
    starting on +x), so the last frame leads back into the first and the GIF loops without a
    repeated frame. ``elevation_deg`` lifts the circle above the xy plane, ``fov_deg`` is the
    horizontal field of view, ``resolution`` is an int (square) or (height, width).
    Returns K (N, 3, 3) and c2w (N, 4, 4), float32, OpenCV convention (see data_pipeline.cameras).
    """
    if num_frames <= 0 or radius <= 0:
        raise ValueError(f"num_frames and radius must be positive, got {num_frames} and {radius}")
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    K = intrinsics_from_fov(width, height, math.radians(fov_deg))
    elevation = math.radians(elevation_deg)
    c2ws = []
    for i in range(num_frames):
        azimuth = 2.0 * math.pi * i / num_frames
        eye = radius * np.array([math.cos(elevation) * math.cos(azimuth),
                                 math.cos(elevation) * math.sin(azimuth),
                                 math.sin(elevation)])
        c2ws.append(look_at_c2w(eye, np.zeros(3)))
    K_all = torch.from_numpy(np.repeat(K[None], num_frames, axis=0)).float()
    return K_all, torch.from_numpy(np.stack(c2ws)).float()
