"""Voxel grid: C x R x R x R features, trilinearly interpolated."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model_zoo.representations.base import Representation


class VoxelRepresentation(Representation):
    kind = "voxel"

    def __init__(self, channels: int, resolution: int):
        super().__init__()
        self.channels, self.resolution = channels, resolution

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (self.channels, self.resolution, self.resolution, self.resolution)  # (C, z, y, x)

    @property
    def feature_dim(self) -> int:
        return self.channels

    @property
    def is_grid(self) -> bool:
        return True

    def sample(self, state: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        batch, count, _ = points.shape
        # grid_sample on a 5-D input reads the last coordinate axis as (x, y, z) = (W, H, D).
        coords = points.reshape(batch, 1, 1, count, 3).to(state.dtype)
        features = F.grid_sample(state, coords, mode="bilinear", padding_mode="border", align_corners=False)
        return features.reshape(batch, self.channels, count).transpose(1, 2)
