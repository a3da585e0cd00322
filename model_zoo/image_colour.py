"""Pixel-aligned colour: a rendered point also reads the colour of the context views it projects into.

Why: the tiny preset's grids are 16 cells a side, and a 16³ grid decoded by ψ cannot hold the
texture of a 64 px view; worse, the amortised model paints every object one grey (README, "Colour:
where it is lost": the denoiser does not carry colour from its input to ζ̂, whichever encoder
feeds it). Feed-forward sparse-view methods take colour from the images themselves instead —
pixelNeRF's pixel-aligned features, IBRNet's blending of source views, and DFM, which renders
with features projected from its context views. This module is the smallest form of that:

    c(x) = (1 − α) · ψ_c(f) + α · Σ_j w_j · I_j(π_j(x)),    w = softmax_j s_j

* π_j(x) projects the sample point x into source view j (OpenCV camera, pixel centres at
  j + 0.5, as in model_zoo/rays.py); I_j is that view's image sampled bilinearly there;
* s_j and α come from a small MLP that reads, per view, ψ's feature f at x, the sampled colour
  and cos θ_j, the angle between the rendered ray and view j's ray to x (the nearest view most
  likely sees the same surface: IBRNet's cue for occlusion); α from the weight-pooled hidden units;
* views x does not project into (behind the camera, outside the image), dropped views and
  excluded ones (a context view rendered for its own loss must not copy itself) get no weight;
  where no view is left, α = 0 and the colour is ψ's own.

Density stays ψ's alone: the geometry still comes from ζ̂ only. GOEmbed never uses this (its
origin render has no sources), so the encoder and its closed form are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class SourceViews:
    """Posed views to take colour from: images (B, V, 3, H, W) in [0, 1], K (B, V, 3, 3), c2w (B, V, 4, 4),
    and ``weights`` (B, V), 0 for a view that must not be read (e.g. context dropout); None: all read."""

    images: torch.Tensor
    K: torch.Tensor
    c2w: torch.Tensor
    weights: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return self.images.shape[1]


def project(points: torch.Tensor, K: torch.Tensor, c2w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """points (B, M, 3) world -> pixel coordinates uv (B, V, M, 2) and camera depth z (B, V, M) in every view."""
    rotation, centre = c2w[..., :3, :3], c2w[..., :3, 3]  # (B, V, 3, 3), (B, V, 3)
    # x_cam = Rᵀ (x − centre), written with row vectors: (x − centre) · R.
    camera = (points.unsqueeze(1) - centre.unsqueeze(2)) @ rotation
    z = camera[..., 2]
    safe = torch.where(z.abs() > 1e-6, z, torch.full_like(z, 1e-6))
    u = K[..., 0, 0, None] * camera[..., 0] / safe + K[..., 0, 2, None]
    v = K[..., 1, 1, None] * camera[..., 1] / safe + K[..., 1, 2, None]
    return torch.stack([u, v], -1), z


def sample_images(images: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear colours (B, V, M, 3) of images (B, V, 3, H, W) at pixel coordinates uv (B, V, M, 2)."""
    batch, views, channels, height, width = images.shape
    scale = torch.tensor([2.0 / width, 2.0 / height], device=uv.device, dtype=uv.dtype)
    grid = (uv * scale - 1.0).reshape(batch * views, -1, 1, 2)  # align_corners=False: pixel centres at j + 0.5
    sampled = F.grid_sample(images.reshape(batch * views, channels, height, width).to(uv.dtype), grid,
                            mode="bilinear", padding_mode="border", align_corners=False)
    return sampled.reshape(batch, views, channels, -1).transpose(2, 3)


class ImageColour(nn.Module):
    """The blend above: ``forward(features, points, directions, colour, sources, exclude)`` -> colour (B, M, 3)."""

    def __init__(self, feature_dim: int, hidden: int = 32):
        super().__init__()
        self.view = nn.Sequential(nn.Linear(feature_dim + 4, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.score = nn.Linear(hidden, 1)
        self.mix = nn.Linear(hidden, 1)

    def forward(self, features: torch.Tensor, points: torch.Tensor, directions: torch.Tensor, colour: torch.Tensor,
                sources: SourceViews, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """features (B, M, F) at the points (B, M, 3, world units), the rendered rays' unit directions
        (B, M, 3), ψ's colour there (B, M, 3); ``exclude`` (B, M, V) bool: views a point must not read."""
        uv, z = project(points, sources.K, sources.c2w)
        height, width = sources.images.shape[-2:]
        valid = (z > 1e-4) & (uv[..., 0] >= 0) & (uv[..., 0] <= width) & (uv[..., 1] >= 0) & (uv[..., 1] <= height)
        if sources.weights is not None:
            valid = valid & (sources.weights > 0).unsqueeze(-1)
        if exclude is not None:
            valid = valid & ~exclude.transpose(1, 2)
        seen = sample_images(sources.images, uv)  # (B, V, M, 3)
        to_point = points.unsqueeze(1) - sources.c2w[..., None, :3, 3]
        cosine = (F.normalize(to_point, dim=-1) * directions.unsqueeze(1)).sum(-1, keepdim=True)
        # The MLP runs in its weights' dtype (bf16 for a bf16 export); weights and blending in fp32 at least.
        dtype = self.score.weight.dtype
        per_view = torch.cat([features.unsqueeze(1).expand(-1, seen.shape[1], -1, -1).to(dtype), seen.to(dtype),
                              cosine.to(dtype)], -1)
        hidden = self.view(per_view)  # (B, V, M, H)
        # A finite "minus infinity": a point no view sees gets uniform weights, zeroed below, and no NaN.
        scores = self.score(hidden)[..., 0].to(seen.dtype).masked_fill(~valid, -1e4)
        weights = torch.softmax(scores, dim=1) * valid
        blended = (weights.unsqueeze(-1) * seen).sum(1)
        pooled = (weights.unsqueeze(-1).to(dtype) * hidden).sum(1)
        alpha = torch.sigmoid(self.mix(pooled).to(seen.dtype)) * valid.any(1, keepdim=True).transpose(1, 2).to(seen.dtype)
        return ((1 - alpha) * colour + alpha * blended).to(colour.dtype)
