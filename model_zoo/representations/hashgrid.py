"""Multiresolution hash grid (Instant-NGP, Müller et al. 2022) in plain PyTorch: L levels of T x C tables.

Level l is a grid of resolution N_l = floor(N_min · b^l), b = (N_max / N_min)^(1/(L-1)), over the
box [-1, 1]^3. A point reads, at every level, the 8 vertices of the cell it falls in, trilinearly
interpolated; a vertex's row of the level's table is its flat index where the level's grid fits
in the table ((N_l + 1)^3 <= T), else the spatial hash (x·1 ⊕ y·2654435761 ⊕ z·805459861) mod T.
The feature is the L levels' C-vectors, concatenated (L·C). ζ is the tables, (L, T, C): per-object
state like any other representation, so GOEmbed encodes into it unchanged, and, since reading it
is linear in ζ with the zero origin reading 0 everywhere, through the same closed form as the
triplane and voxel grid. No CUDA extension: gathers and scatter-adds.
"""

from __future__ import annotations

import math

import torch

from model_zoo.representations.base import GridRepresentation

PRIMES = (1, 2654435761, 805459861)


class HashGridRepresentation(GridRepresentation):
    kind = "hashgrid"

    def __init__(self, channels: int = 2, levels: int = 8, log2_table_size: int = 12, base_resolution: int = 4,
                 max_resolution: int = 64, origin: str = "zeros", origin_scale: float = 0.1, origin_seed: int = 0):
        super().__init__()
        if levels < 1 or base_resolution < 1 or max_resolution < base_resolution:
            raise ValueError("HashGridRepresentation needs levels >= 1 and 1 <= base_resolution <= max_resolution, "
                             f"got levels={levels}, base_resolution={base_resolution}, max_resolution={max_resolution}")
        self.channels, self.levels, self.table_size = channels, levels, 2 ** log2_table_size
        self.log2_table_size, self.base_resolution, self.max_resolution = log2_table_size, base_resolution, max_resolution
        growth = math.exp((math.log(max_resolution) - math.log(base_resolution)) / max(levels - 1, 1))
        self.level_resolutions = [int(math.floor(base_resolution * growth ** level)) for level in range(levels)]
        self.register_buffer("_resolutions", torch.tensor(self.level_resolutions, dtype=torch.long), persistent=False)
        # Which levels are stored densely (no hashing, no collisions).
        self.register_buffer("_dense", torch.tensor([(n + 1) ** 3 <= self.table_size for n in self.level_resolutions]),
                             persistent=False)
        self._init_origin(origin, origin_scale, origin_seed)

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (self.levels, self.table_size, self.channels)

    @property
    def feature_dim(self) -> int:
        return self.levels * self.channels

    @property
    def channel_axis(self) -> int:
        return 2

    def twin(self, channels: int) -> "HashGridRepresentation":
        return HashGridRepresentation(channels, self.levels, self.log2_table_size, self.base_resolution,
                                      self.max_resolution).to(self._resolutions.device)

    def corners(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """points (B, N, 3) -> rows (B, N, L, 8) into the flattened tables (L·T) and weights (B, N, L, 8)."""
        resolutions = self._resolutions.to(points.device)
        scaled = ((points.detach().to(torch.promote_types(points.dtype, torch.float32)) + 1) / 2).clamp(0, 1).unsqueeze(2) * resolutions.view(1, 1, -1, 1)
        lower = scaled.floor().clamp(max=resolutions.view(1, 1, -1, 1) - 1)  # a point on the far face uses the last cell
        fraction = scaled - lower
        lower = lower.long()
        offsets = torch.tensor([[(c >> 0) & 1, (c >> 1) & 1, (c >> 2) & 1] for c in range(8)], device=points.device)
        vertex = lower.unsqueeze(3) + offsets  # (B, N, L, 8, 3)
        side = (resolutions + 1).view(1, 1, -1, 1)
        dense = vertex[..., 0] + side * (vertex[..., 1] + side * vertex[..., 2])
        primes = torch.tensor(PRIMES, device=points.device)
        hashed = (vertex[..., 0] * primes[0]) ^ (vertex[..., 1] * primes[1]) ^ (vertex[..., 2] * primes[2])
        rows = torch.where(self._dense.to(points.device).view(1, 1, -1, 1), dense, hashed) & (self.table_size - 1)
        rows = rows + torch.arange(self.levels, device=points.device).view(1, 1, -1, 1) * self.table_size
        weights = torch.where(offsets.bool(), fraction.unsqueeze(3), 1 - fraction.unsqueeze(3)).prod(-1)
        return rows, weights.to(points.dtype)

    def sample(self, state: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        batch, count, _ = points.shape
        rows, weights = self.corners(points)
        tables = state.reshape(batch, self.levels * self.table_size, self.channels)
        gathered = tables.gather(1, rows.reshape(batch, -1, 1).expand(-1, -1, self.channels))
        gathered = gathered.reshape(batch, count, self.levels, 8, self.channels)
        features = (gathered * weights.to(state.dtype).unsqueeze(-1)).sum(3)  # (B, N, L, C)
        return features.reshape(batch, count, self.feature_dim)

    def splat(self, points: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        batch, count, _ = points.shape
        rows, weights = self.corners(points)
        spread = values.reshape(batch, count, self.levels, 1, self.channels) * weights.to(values.dtype).unsqueeze(-1)
        tables = values.new_zeros(batch, self.levels * self.table_size, self.channels)
        tables.scatter_add_(1, rows.reshape(batch, -1, 1).expand(-1, -1, self.channels), spread.reshape(batch, -1, self.channels))
        return tables.reshape(batch, *self.state_shape)

    def apply_feature_jacobian(self, twin_state: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        per_level = matrix.reshape(matrix.shape[0], self.levels, self.channels)  # (k, level, C)
        return torch.einsum("bltk,klc->bltc", twin_state, per_level)
