"""Voxel grid: C x R x R x R features, trilinearly interpolated."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model_zoo.representations.base import DenseGridRepresentation


class VoxelRepresentation(DenseGridRepresentation):
    kind = "voxel"

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (self.channels, self.resolution, self.resolution, self.resolution)  # (C, z, y, x)

    @property
    def feature_dim(self) -> int:
        return self.channels

    @property
    def channel_axis(self) -> int:
        return 0

    @staticmethod
    def _coords(points: torch.Tensor, dtype) -> torch.Tensor:
        # grid_sample on a 5-D input reads the last coordinate axis as (x, y, z) = (W, H, D).
        batch, count, _ = points.shape
        return points.reshape(batch, 1, 1, count, 3).to(dtype)

    def sample(self, state: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        batch, count, _ = points.shape
        features = F.grid_sample(state, self._coords(points, state.dtype), mode="bilinear", padding_mode="border",
                                 align_corners=False)
        return features.reshape(batch, self.channels, count).transpose(1, 2)

    def splat(self, points: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        # grid_sample's own input-gradient kernel, without a forward pass on a probe.
        batch, count, _ = points.shape
        grad = values.transpose(1, 2).reshape(batch, self.channels, 1, 1, count)
        grid, _ = torch.ops.aten.grid_sampler_3d_backward(
            grad.contiguous(), values.new_zeros(()).expand(batch, *self.state_shape),
            self._coords(points.detach(), values.dtype), 0, 1, False, [True, False])
        return grid

    def apply_feature_jacobian(self, twin_state: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bkzyx,kc->bczyx", twin_state, matrix)
