"""Triplane: three axis-aligned feature planes (xy, xz, yz), each C x R x R."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model_zoo.representations.base import Representation

# Which two coordinates index each plane; grid_sample reads (x, y) as (width, height).
PLANE_AXES = ((0, 1), (0, 2), (1, 2))


class TriplaneRepresentation(Representation):
    kind = "triplane"

    def __init__(self, channels: int, resolution: int):
        super().__init__()
        self.channels, self.resolution = channels, resolution

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (3, self.channels, self.resolution, self.resolution)

    @property
    def feature_dim(self) -> int:
        return 3 * self.channels  # the three planes' features, concatenated

    @property
    def is_grid(self) -> bool:
        return True

    def sample(self, state: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        batch, count, _ = points.shape
        planes = state.reshape(batch * 3, self.channels, self.resolution, self.resolution)
        coords = torch.stack([points[..., list(axes)] for axes in PLANE_AXES], dim=1)  # (B, 3, N, 2)
        coords = coords.reshape(batch * 3, 1, count, 2).to(planes.dtype)
        features = F.grid_sample(planes, coords, mode="bilinear", padding_mode="border", align_corners=False)
        # (B*3, C, 1, N) -> (B, N, 3*C)
        return features.reshape(batch, 3, self.channels, count).permute(0, 3, 1, 2).reshape(batch, count, 3 * self.channels)
