"""Images a person looks at during training: preview grids, turntable GIFs and their cameras.

All images come in as float tensors in [0, 1], channels first (the layout the model uses); they
may live on any device and may require grad. Values outside [0, 1] (a prediction can overshoot)
are clipped and NaNs drawn black, so a diverging model still produces a preview to look at.
The GIF writer and the atomic save live in :mod:`model_zoo.image_files`, the orbit cameras in
:mod:`data_pipeline.cameras` (one of each, shared with :mod:`model_zoo.assets`).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data_pipeline import cameras
from model_zoo.image_files import save_image_atomic, save_turntable_gif, to_uint8

# Separator between tiles: mid grey stands out against both white backgrounds and dark objects.
SEPARATOR_PX = 2
SEPARATOR_RGB = (128, 128, 128)


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
    tiles = to_uint8(torch.cat([ctx, _resize(target, size)[:, None], _resize(prediction, size)[:, None]], dim=1))

    cols, sep = k + 2, SEPARATOR_PX
    grid = np.empty((batch * height + (batch - 1) * sep, cols * width + (cols - 1) * sep, 3), dtype=np.uint8)
    grid[:] = SEPARATOR_RGB
    for row in range(batch):
        for col in range(cols):
            y, x = row * (height + sep), col * (width + sep)
            grid[y:y + height, x:x + width] = tiles[row, col]
    save_image_atomic(Image.fromarray(grid), path_png)


def turntable_cameras(num_frames: int, radius: float, elevation_deg: float, fov_deg: float,
                      resolution: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`data_pipeline.cameras.turntable_cameras` as float32 tensors: K (N, 3, 3), c2w (N, 4, 4)."""
    K, c2w = cameras.turntable_cameras(num_frames, radius, elevation_deg, fov_deg, resolution)
    return torch.from_numpy(K), torch.from_numpy(c2w)


# save_image_atomic and save_turntable_gif are re-exported: the trainer writes previews through this module.
__all__ = ["SEPARATOR_PX", "SEPARATOR_RGB", "save_preview_grid", "save_turntable_gif", "save_image_atomic",
           "turntable_cameras"]
