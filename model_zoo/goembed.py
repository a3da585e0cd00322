"""GOEmbed: gradient-origin embedding of posed 2D views into any 3D representation.

    L(ζ) = Σ_i mean_pixels ‖R(ζ, φ_i) − o_i‖²,      ζ_enc = −∇_ζ L(ζ) |_{ζ = ζ₀}

One render of the origin ζ₀ plus one backward pass: a transmittance-weighted back-projection
("splat") of every pixel's residual into what its ray reads. The result has the shape of the
representation, for any representation and any number of views (zero views give zeros).

Normalisation (the paper's exact scaling is not known to us; it is a measured choice, see the
README and model_zoo/plenoptic_encoding.py):

* ``"sum"``: the raw gradient of L as written (grows with the number of views);
* ``"views"``: divided by the number of views (a mean over views);
* ``"coverage"``: for grid representations, each cell divided by the rendering weight that
  reached it (how much the rays "saw" the cell), so well- and poorly-observed cells are on one
  scale; cells no ray reached stay zero. Falls back to ``"views"`` for non-grid states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from model_zoo.renderer import VolumeRenderer

Normalisation = Literal["sum", "views", "coverage"]
NORMALISATIONS = ("sum", "views", "coverage")


@dataclass
class RayBatch:
    """Rays of V views of B objects, flattened: N rays per view, V*N rays per object."""

    origins: torch.Tensor  # (B, V*N, 3)
    directions: torch.Tensor  # (B, V*N, 3)
    colours: torch.Tensor  # (B, V*N, 3) the observed pixel colours
    num_views: int
    # (B, V*N) 0/1 weights: drop some views of some objects (context dropout) without reshaping.
    ray_weights: torch.Tensor | None = None

    def views_per_object(self) -> torch.Tensor:
        """(B,) number of views that count for each object."""
        if self.ray_weights is None:
            return torch.full((self.origins.shape[0],), float(self.num_views), device=self.origins.device)
        return self.ray_weights.sum(dim=1) / max(self.rays_per_view, 1)

    @property
    def rays_per_view(self) -> int:
        return self.origins.shape[1] // max(self.num_views, 1)


def goembed(renderer: VolumeRenderer, rays: RayBatch, background: torch.Tensor, create_graph: bool = False,
            normalisation: Normalisation = "coverage", coverage_eps: float = 1e-3) -> torch.Tensor:
    """ζ_enc (B, *state_shape) from the views in ``rays``.

    ``create_graph=True`` keeps the graph of the gradient, so a loss on ζ_enc (or on anything
    computed from it) trains the decoder ψ through the encoder: second-order autograd.
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    representation = renderer.representation
    batch = background.shape[0]
    dtype = rays.origins.dtype
    origin = representation.origin(batch, device=rays.origins.device, dtype=dtype)
    if rays.num_views == 0:
        return torch.zeros_like(origin)
    origin.requires_grad_(True)
    with torch.enable_grad():
        out = renderer.render_rays(origin, rays.origins, rays.directions, background, stratified=False,
                                   keep_samples=normalisation == "coverage" and representation.is_grid)
        # Σ over views of the mean over that view's pixels (and colour channels).
        squared = ((out.rgb - rays.colours) ** 2).sum(dim=-1)
        if rays.ray_weights is not None:
            squared = squared * rays.ray_weights
        loss = squared.sum() / (rays.rays_per_view * 3)
        (gradient,) = torch.autograd.grad(loss, origin, create_graph=create_graph)
    encoding = -gradient
    if normalisation == "views" or (normalisation == "coverage" and not representation.is_grid):
        per_object = rays.views_per_object().clamp_min(1.0).to(encoding.dtype)
        return encoding / per_object.view(-1, *([1] * (encoding.dim() - 1)))
    if normalisation == "coverage":
        weights = out.weights if rays.ray_weights is None else out.weights * rays.ray_weights.unsqueeze(-1)
        return encoding / (coverage(renderer, out.points, weights) / rays.rays_per_view + coverage_eps)
    return encoding


def coverage(renderer: VolumeRenderer, points: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-cell sum of the rendering weights of the samples that read it (B, *state_shape).

    Sampling a grid is linear in the grid, so the weight each cell received is the vector-Jacobian
    product of ``sample`` with the (detached) sample weights: the same splat as GOEmbed, of ones.
    """
    representation = renderer.representation
    batch = points.shape[0]
    probe = torch.zeros(batch, *representation.state_shape, device=points.device, dtype=points.dtype, requires_grad=True)
    with torch.enable_grad():
        features = representation.sample(probe, points.reshape(batch, -1, 3).detach())
        # Every feature channel of a cell gets the full weight: coverage is per channel, like ζ.
        cotangent = weights.detach().reshape(batch, -1, 1).expand_as(features)
        (splat,) = torch.autograd.grad(features, probe, grad_outputs=cotangent)
    return splat
