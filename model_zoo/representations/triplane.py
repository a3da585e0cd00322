"""Triplane: three axis-aligned feature planes (xy, xz, yz), each C x R x R."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model_zoo.representations.base import DenseGridRepresentation

# Which two coordinates index each plane; grid_sample reads (x, y) as (width, height).
PLANE_AXES = ((0, 1), (0, 2), (1, 2))
PLANE_SLICES = (slice(0, 2), slice(0, 3, 2), slice(1, 3))  # the same, as views (no gather)


class TriplaneRepresentation(DenseGridRepresentation):
    kind = "triplane"

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (3, self.channels, self.resolution, self.resolution)

    @property
    def feature_dim(self) -> int:
        return 3 * self.channels  # the three planes' features, concatenated

    @property
    def channel_axis(self) -> int:
        return 1

    def _coords(self, points: torch.Tensor, dtype) -> torch.Tensor:
        batch, count, _ = points.shape
        coords = torch.stack([points[..., axes] for axes in PLANE_SLICES], dim=1)  # (B, 3, N, 2)
        return coords.reshape(batch * 3, 1, count, 2).to(dtype)

    def sample(self, state: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        batch, count, _ = points.shape
        planes = state.reshape(batch * 3, self.channels, self.resolution, self.resolution)
        features = F.grid_sample(planes, self._coords(points, planes.dtype), mode="bilinear", padding_mode="border",
                                 align_corners=False)
        # (B*3, C, 1, N) -> (B, N, 3*C)
        return features.reshape(batch, 3, self.channels, count).permute(0, 3, 1, 2).reshape(batch, count, 3 * self.channels)

    def splat(self, points: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        # grid_sample's own input-gradient kernel, without a forward pass on a probe.
        batch, count, _ = points.shape
        grad = values.reshape(batch, count, 3, self.channels).permute(0, 2, 3, 1).reshape(batch * 3, self.channels, 1, count)
        shape = (batch * 3, self.channels, self.resolution, self.resolution)
        planes, _ = torch.ops.aten.grid_sampler_2d_backward(
            grad.contiguous(), values.new_zeros(()).expand(shape), self._coords(points.detach(), values.dtype),
            0, 1, False, [True, False])  # bilinear, border padding, align_corners=False
        return planes.reshape(batch, *self.state_shape)

    def splat_shared(self, points: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        # One kernel call per plane on the same values: no 3x copy of them.
        batch, count, _ = points.shape
        grad = values.transpose(1, 2).unsqueeze(2).contiguous()  # (B, C, 1, N)
        zeros = values.new_zeros(()).expand(batch, self.channels, self.resolution, self.resolution)
        planes = [torch.ops.aten.grid_sampler_2d_backward(grad, zeros, points.detach()[..., axes].unsqueeze(1).to(values.dtype),
                                                          0, 1, False, [True, False])[0] for axes in PLANE_SLICES]
        return torch.stack(planes, 1)

    def sample_shared(self, state: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        total = sum(F.grid_sample(state[:, plane], points[..., axes].unsqueeze(1).to(state.dtype), mode="bilinear",
                                  padding_mode="border", align_corners=False) for plane, axes in enumerate(PLANE_SLICES))
        return total.squeeze(2).transpose(1, 2)  # (B, C, 1, N) -> (B, N, C)

    def apply_feature_jacobian(self, twin_state: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        per_plane = matrix.reshape(matrix.shape[0], 3, self.channels)  # (k, plane, C)
        return torch.einsum("bpkhw,kpc->bpchw", twin_state, per_plane)
