"""Differentiable emission-absorption volume rendering of a representation ζ through a decoder ψ.

    C(r) = Σ_k T_k (1 − exp(−σ_k δ_k)) c_k + T_N · background,    T_k = exp(−Σ_{j<k} σ_j δ_j)

Samples are taken only inside the object's bounding box [-h, h]^3 (world units; h =
``box_half_size``), one per equal bin between the ray's entry and exit (stratified jitter in
training, bin centres otherwise). Rays that miss the box see the background.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model_zoo.rays import intersect_box, stratified_depths
from model_zoo.representations import Representation


class FieldDecoder(nn.Module):
    """ψ: feature at a point -> (density σ >= 0 in 1/world units, colour in [0, 1])."""

    def __init__(self, feature_dim: int, hidden: int = 64, layers: int = 2, density_bias: float = -2.0,
                 density_scale: float = 10.0):
        super().__init__()
        dims = [feature_dim] + [hidden] * layers
        blocks: list[nn.Module] = []
        for fan_in, fan_out in zip(dims[:-1], dims[1:]):
            blocks += [nn.Linear(fan_in, fan_out), nn.SiLU()]
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(dims[-1], 4)
        # A negative bias makes an all-zero feature (the GOEmbed origin) nearly empty space, so the
        # origin renders almost blank and its gradient is a clean back-projection.
        self.density_bias, self.density_scale = density_bias, density_scale

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.head(self.body(features))
        density = F.softplus(raw[..., 0] + self.density_bias) * self.density_scale
        colour = torch.sigmoid(raw[..., 1:4])
        return density, colour


@dataclass
class RenderOutput:
    rgb: torch.Tensor  # (B, N, 3)
    opacity: torch.Tensor  # (B, N) in [0, 1]: 1 - transmittance through the whole box
    depth: torch.Tensor  # (B, N) expected distance along the ray (world units), weighted by opacity
    weights: torch.Tensor | None = None  # (B, N, S) when requested
    points: torch.Tensor | None = None  # (B, N, S, 3) normalised sample points, when requested


def composite(density: torch.Tensor, colour: torch.Tensor, deltas: torch.Tensor, depths: torch.Tensor,
              background: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Emission-absorption quadrature along the last sample axis.

    density (..., S), colour (..., S, 3), deltas (..., S), depths (..., S), background (..., 3).
    Returns rgb (..., 3), opacity (...), depth (...), weights (..., S).
    """
    optical = density * deltas
    # Transmittance before each sample: exp of the exclusive cumulative sum (stable, no products).
    before = torch.cumsum(optical, dim=-1) - optical
    transmittance = torch.exp(-before)
    weights = transmittance * (1.0 - torch.exp(-optical))
    # T_N = exp(-total) exactly (summing the weights telescopes to the same value, but can
    # overshoot 1 by rounding); it keeps opacity in [0, 1] by construction.
    remaining = torch.exp(-optical.sum(dim=-1))
    opacity = 1.0 - remaining
    rgb = (weights.unsqueeze(-1) * colour).sum(dim=-2) + remaining.unsqueeze(-1) * background
    depth = (weights * depths).sum(dim=-1)
    return rgb, opacity, depth, weights


class VolumeRenderer(nn.Module):
    """Renders rays of a batch of objects: ``render_rays(state, origins, directions, background)``."""

    def __init__(self, representation: Representation, decoder: FieldDecoder, samples_per_ray: int = 32,
                 box_half_size: float = 1.0):
        super().__init__()
        self.representation, self.decoder = representation, decoder
        self.samples_per_ray, self.box_half_size = samples_per_ray, box_half_size

    def render_rays(self, state: torch.Tensor, origins: torch.Tensor, directions: torch.Tensor,
                    background: torch.Tensor, stratified: bool = False, generator: torch.Generator | None = None,
                    keep_samples: bool = False) -> RenderOutput:
        """state (B, *shape); origins, directions (B, N, 3) world units; background (B, 3)."""
        batch, count, _ = origins.shape
        t_near, t_far, hit = intersect_box(origins, directions, self.box_half_size)
        depths, deltas = stratified_depths(t_near, t_far, self.samples_per_ray, stratified, generator)
        deltas = deltas * hit.unsqueeze(-1)  # a ray that misses the box crosses nothing
        points = origins.unsqueeze(2) + depths.unsqueeze(-1) * directions.unsqueeze(2)  # (B, N, S, 3)
        normalised = (points / self.box_half_size).clamp(-1.0, 1.0)
        features = self.representation.sample(state, normalised.reshape(batch, count * self.samples_per_ray, 3))
        density, colour = self.decoder(features)
        density = density.reshape(batch, count, self.samples_per_ray).to(origins.dtype)
        colour = colour.reshape(batch, count, self.samples_per_ray, 3).to(origins.dtype)
        rgb, opacity, depth, weights = composite(density, colour, deltas, depths, background.unsqueeze(1).to(origins.dtype))
        return RenderOutput(rgb, opacity, depth, weights if keep_samples else None, normalised if keep_samples else None)

    def render_rays_chunked(self, state: torch.Tensor, origins: torch.Tensor, directions: torch.Tensor,
                            background: torch.Tensor, rays_per_chunk: int = 8192) -> RenderOutput:
        """Deterministic render of many rays in chunks (whole images at evaluation time)."""
        outputs = [self.render_rays(state, origins[:, i:i + rays_per_chunk], directions[:, i:i + rays_per_chunk], background)
                   for i in range(0, origins.shape[1], rays_per_chunk)]
        return RenderOutput(torch.cat([o.rgb for o in outputs], 1), torch.cat([o.opacity for o in outputs], 1),
                            torch.cat([o.depth for o in outputs], 1))
