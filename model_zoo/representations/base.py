"""The interface every 3D representation implements."""

from __future__ import annotations

import torch
from torch import nn

ORIGINS = ("zeros", "random", "learned")


class Representation(nn.Module):
    """A family of per-object states ζ of a fixed shape, with features readable at 3D points.

    The module holds only hyper-parameters (and, for the MLP or a non-zero grid origin, the
    origin); the state ζ of each object is a tensor passed in, so a batch of objects is one
    tensor (B, *state_shape). Points are in normalised box coordinates: the object's bounding
    box maps to [-1, 1]^3.
    """

    kind: str = "base"

    @property
    def state_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def feature_dim(self) -> int:
        """Size of the feature vector ``sample`` returns at each point."""
        raise NotImplementedError

    @property
    def is_grid(self) -> bool:
        """Whether ζ is a spatial grid (cells that rays can cross), which some encodings need."""
        return False

    @property
    def has_zero_origin(self) -> bool:
        """Whether ζ₀ = 0 (every sample of the origin reads feature 0: GOEmbed has a closed form)."""
        return True

    def origin(self, batch_size: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """ζ₀, the state GOEmbed differentiates at: zeros for grids unless configured otherwise."""
        return torch.zeros(batch_size, *self.state_shape, device=device, dtype=dtype)

    def sample(self, state: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """state (B, *state_shape), points (B, N, 3) in [-1, 1]^3 -> features (B, N, feature_dim)."""
        raise NotImplementedError

    def splat(self, points: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The adjoint of ``sample`` (it is linear in the state for grids): values (B, N, feature_dim)
        at points (B, N, 3) -> (B, *state_shape), each value spread into the cells its point reads
        with the interpolation weights. Generic version: the vector-Jacobian product of ``sample``."""
        probe = torch.zeros(points.shape[0], *self.state_shape, device=points.device, dtype=values.dtype,
                            requires_grad=True)
        with torch.enable_grad():
            (splat,) = torch.autograd.grad(self.sample(probe, points.detach()), probe, grad_outputs=values.detach())
        return splat


class GridRepresentation(Representation):
    """A representation whose state is cells of ``channels`` features read by linear interpolation.

    The feature at a point is ``feature_blocks`` blocks of ``channels`` (one per plane of a triplane,
    per level of a hash grid). What GOEmbed's closed form needs from a grid: ``twin(k)``, the same
    geometry with k channels, and ``apply_feature_jacobian``, the per-cell contraction of a k-channel
    twin state with a (k, feature_dim) matrix.

    The origin is zeros by default; ``origin="random"`` is a fixed random grid (seeded, the same for
    every object; ``origin_scale`` its std) and ``origin="learned"`` a trained parameter initialised
    the same way. Both are GOEmbed variants: features then vary along rays, so the encoding is no
    longer the rank-4 image of a splat, and the closed form no longer applies.
    """

    channels: int

    def _init_origin(self, origin: str, origin_scale: float, origin_seed: int) -> None:
        if origin not in ORIGINS:
            raise ValueError(f"{type(self).__name__}.origin must be one of {ORIGINS}, got {origin!r}")
        self.origin_kind, self.origin_scale, self.origin_seed = origin, origin_scale, origin_seed
        values = None
        if origin != "zeros":
            generator = torch.Generator().manual_seed(origin_seed)
            values = torch.randn(*self.state_shape, generator=generator) * origin_scale
        self.register_parameter("_origin_param", nn.Parameter(values) if origin == "learned" else None)
        self.register_buffer("_origin_buffer", values if origin == "random" else None, persistent=False)

    @property
    def is_grid(self) -> bool:
        return True

    @property
    def has_zero_origin(self) -> bool:
        return self.origin_kind == "zeros"

    @property
    def feature_blocks(self) -> int:
        return self.feature_dim // self.channels

    @property
    def channel_axis(self) -> int:
        """Axis of ``state_shape`` that holds the channels."""
        raise NotImplementedError

    def origin(self, batch_size: int, device=None, dtype=torch.float32) -> torch.Tensor:
        fixed = self._origin_param if self._origin_param is not None else self._origin_buffer
        if fixed is None:
            return super().origin(batch_size, device, dtype)
        # Learned: expand (no copy), so the gradient reaches the parameter.
        out = fixed.to(device=device, dtype=dtype).expand(batch_size, *self.state_shape)
        return out if self._origin_param is not None else out.clone()

    def twin(self, channels: int) -> "GridRepresentation":
        raise NotImplementedError

    def splat_shared(self, points: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``splat`` of the same (B, N, channels) values into every block (plane, level)."""
        batch, count, _ = values.shape
        return self.splat(points, values.unsqueeze(2).expand(batch, count, self.feature_blocks, self.channels)
                          .reshape(batch, count, self.feature_dim))

    def sample_shared(self, state: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """The adjoint of ``splat_shared``: ``sample`` summed over the blocks, (B, N, channels)."""
        features = self.sample(state, points)
        return features.reshape(*features.shape[:2], self.feature_blocks, self.channels).sum(2)

    def apply_feature_jacobian(self, twin_state: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        """twin_state (B, *twin(k).state_shape), matrix (k, feature_dim) -> (B, *state_shape):
        in every cell, channel c of block b is Σ_j twin[j] · matrix[j, b·channels + c]."""
        raise NotImplementedError


class DenseGridRepresentation(GridRepresentation):
    """A grid of ``resolution`` cells per side and ``channels`` features a cell (triplane, voxel
    grid); its twin is the same grid with other channels."""

    def __init__(self, channels: int, resolution: int, origin: str = "zeros", origin_scale: float = 0.1,
                 origin_seed: int = 0):
        super().__init__()
        self.channels, self.resolution = channels, resolution
        self._init_origin(origin, origin_scale, origin_seed)

    def twin(self, channels: int) -> "DenseGridRepresentation":
        return type(self)(channels, self.resolution)
