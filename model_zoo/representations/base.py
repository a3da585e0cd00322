"""The interface every 3D representation implements."""

from __future__ import annotations

import torch
from torch import nn


class Representation(nn.Module):
    """A family of per-object states ζ of a fixed shape, with features readable at 3D points.

    The module holds only hyper-parameters (and, for the MLP, its fixed origin); the state ζ of
    each object is a tensor passed in, so a batch of objects is one tensor (B, *state_shape).
    Points are in normalised box coordinates: the object's bounding box maps to [-1, 1]^3.
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

    def origin(self, batch_size: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """ζ₀, the state GOEmbed differentiates at: zeros for grids."""
        return torch.zeros(batch_size, *self.state_shape, device=device, dtype=dtype)

    def sample(self, state: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """state (B, *state_shape), points (B, N, 3) in [-1, 1]^3 -> features (B, N, feature_dim)."""
        raise NotImplementedError
