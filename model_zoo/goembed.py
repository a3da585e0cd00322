"""GOEmbed: gradient-origin embedding of posed 2D views into any 3D representation.

    L(ζ) = Σ_i mean_pixels ‖R(ζ, φ_i) − o_i‖²,      ζ_enc = −∇_ζ L(ζ) |_{ζ = ζ₀}

One render of the origin ζ₀ plus one backward pass: a transmittance-weighted back-projection
("splat") of every pixel's residual into what its ray reads. The result has the shape of the
representation, for any representation and any number of views (zero views give zeros).

Two ways to compute it (``method``):

* ``"autograd"``: render ζ₀ and differentiate (``create_graph=True`` for a loss on ζ_enc to train
  ψ: second-order autograd through the renderer). Works for everything: the MLP, non-zero or
  learned grid origins, a decoder that also reads the point.
* ``"closed_form"`` (``"auto"`` picks it where it applies: a grid with the zero origin and a
  decoder that reads only the feature). Every sample of ζ₀ = 0 reads feature 0, so density and
  colour are the constants σ₀, c₀ = ψ(0) along every ray, and ∂(σ, c)/∂f is one 4 × F matrix
  J = ∂ψ/∂f(0). Then, exactly,

      ∂L/∂c_k = w_k e_r,   ∂L/∂σ_k = δ_k T_N (c₀ − bg)·e_r,   e_r = 2 (C_r − o_r) / (3 N_view)
      ζ_enc   = −J ᵀ · splat(∂L/∂σ, ∂L/∂c)     (per plane / grid / level)

  with w_k = T_k (1 − e^{−σ₀ δ_k}) the origin's rendering weights and C_r = (1 − T_N) c₀ + T_N bg.
  That is a 4-channel splat (5 with the coverage) and a per-cell 4 × C contraction: no decoder
  evaluation per sample, no second-order autograd. ψ enters only through ψ(0) and J, which ψ's
  own forward computes (``decoder(zeros, linearise=True)``, through ``__call__``: ZeRO-3 gathers
  its weights as for any forward). Training ψ through it is first-order autograd through J,
  σ₀, c₀ and the (linear) splat, whose adjoint is one sampling of the 4-channel twin grid.
  The price of this structure: the encoding is Jᵀ times 4 channels, rank ≤ 4 per block whatever
  C is (the same information as unprojection). The variants that escape it (a grid ``origin``
  of "random" or "learned", ``FieldDecoder(point_frequencies > 0)``; rank and cost measured by
  bench/goembed_variants.py) use the autograd path.

Normalisation (the paper's exact scaling is not known to us; it is a measured choice, see the
README and model_zoo/plenoptic_encoding.py):

* ``"sum"``: the raw gradient of L as written (grows with the number of views; scales with the
  origin's density σ₀, since the colour term is weighted by the origin's rendering weights);
* ``"views"``: divided by the number of views (a mean over views);
* ``"coverage"``: for grid representations, each cell divided by the rendering weight that
  reached it per view-pixel (how much the rays "saw" the cell), plus a floor of ``coverage_eps``
  times the object's mean coverage over the cells any ray reached. The floor is relative to the
  coverage's own scale, so the encoding does not change when the rays per view, the samples per
  ray or the views are multiplied (tests/test_goembed.py); cells no ray reached stay zero.
  A non-grid state (the MLP) has no cells: the whole encoding is divided by the object's total
  coverage, Σ over its rays of the origin's opacity per view-pixel (views × mean origin opacity),
  which is scale-free in the same way. (Dividing by the views alone, as before, left the MLP
  encoding proportional to σ₀: ~2e-5 with the blank origin, too small for the denoiser to use.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from model_zoo.rays import intersect_box, stratified_depths
from model_zoo.renderer import VolumeRenderer

Normalisation = Literal["sum", "views", "coverage"]
NORMALISATIONS = ("sum", "views", "coverage")
Method = Literal["auto", "closed_form", "autograd"]
METHODS = ("auto", "closed_form", "autograd")
DEFAULT_COVERAGE_EPS = 0.05  # the floor, relative to the object's mean coverage


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


def closed_form_applies(renderer: VolumeRenderer) -> bool:
    """A grid with the zero origin, rendered by a decoder that reads only the feature."""
    representation = renderer.representation
    return representation.is_grid and representation.has_zero_origin and getattr(renderer.decoder, "can_linearise", False)


def goembed(renderer: VolumeRenderer, rays: RayBatch, background: torch.Tensor, create_graph: bool = False,
            normalisation: Normalisation = "coverage", coverage_eps: float = DEFAULT_COVERAGE_EPS, *,
            method: Method = "auto", return_stats: bool = False, log_density: bool = False):
    """ζ_enc (B, *state_shape) from the views in ``rays`` (with ``return_stats``: and a dict of
    detached scalars: ``origin_opacity``, the mean opacity of the origin's render over the rays
    that cross the box, which a blank origin keeps near 0).

    ``create_graph=True`` keeps the graph, so a loss on ζ_enc (or on anything computed from it)
    trains the decoder ψ (and a learned origin) through the encoder.

    ``log_density``: the density part of the gradient is taken with respect to log σ (σ₀ ∂L/∂σ in
    place of ∂L/∂σ), everything else unchanged. Why: at a blank origin (σ₀ ≈ 0.01) the colour
    part, ∂L/∂c_k = w_k e_r, is weighted by rendering weights w_k ≈ σ₀ δ_k, while the density
    part, δ_k T_N (c₀ − bg)·e_r, is not; so ∂L/∂σ is ~1/σ₀ times larger and it sees the residual
    only along (c₀ − bg) — for a grey origin on a white background, the brightness. The hue of the
    views is then nearly absent from ζ_enc (measured on a trained model: permuting the views' RGB
    channels changed the encoding by 0.3%). With respect to log σ both parts scale with σ₀.
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "closed_form" and not closed_form_applies(renderer):
        raise ValueError("method='closed_form' needs a grid representation with the zero origin and a decoder that "
                         f"reads only the feature (representation {renderer.representation.kind!r}); use 'autograd'")
    if method == "auto":
        method = "closed_form" if closed_form_applies(renderer) else "autograd"
    representation = renderer.representation
    if rays.num_views == 0:
        encoding = torch.zeros(background.shape[0], *representation.state_shape, device=rays.origins.device,
                               dtype=rays.origins.dtype)
        stats = {"origin_opacity": torch.zeros((), device=rays.origins.device)}
        return (encoding, stats) if return_stats else encoding
    run = _closed_form if method == "closed_form" else _autograd
    encoding, coverage_per_view, opacity = run(renderer, rays, background, create_graph, normalisation, log_density)
    encoding = _normalise(encoding, coverage_per_view, opacity, rays, representation, normalisation, coverage_eps)
    if not return_stats:
        return encoding
    hit = intersect_box(rays.origins, rays.directions, renderer.box_half_size)[2].to(opacity.dtype)
    counted = hit if rays.ray_weights is None else hit * rays.ray_weights.to(opacity.dtype)
    stats = {"origin_opacity": ((opacity.detach() * counted).sum() / counted.sum().clamp_min(1)).float()}
    return encoding, stats


def _loss_scale(rays: RayBatch) -> float:
    return 1.0 / (rays.rays_per_view * 3)  # Σ over views of the mean over that view's pixels and channels


def _autograd(renderer, rays, background, create_graph, normalisation, log_density=False):
    representation = renderer.representation
    keep = normalisation == "coverage" and representation.is_grid
    with torch.enable_grad():
        # Inside enable_grad: a learned origin stays a function of its parameter even under no_grad.
        origin = representation.origin(background.shape[0], device=rays.origins.device, dtype=rays.origins.dtype)
        if not origin.requires_grad:
            origin = origin.detach().clone().requires_grad_(True)
        out = renderer.render_rays(origin, rays.origins, rays.directions, background, stratified=False, keep_samples=keep,
                                   log_density_gradient=log_density)
        squared = ((out.rgb - rays.colours) ** 2).sum(dim=-1)
        if rays.ray_weights is not None:
            squared = squared * rays.ray_weights
        loss = squared.sum() * _loss_scale(rays)
        (gradient,) = torch.autograd.grad(loss, origin, create_graph=create_graph)
    cover = None
    if keep:
        weights = out.weights if rays.ray_weights is None else out.weights * rays.ray_weights.unsqueeze(-1)
        cover = coverage(renderer, out.points, weights)
    return -gradient, cover, out.opacity


class _SharedSplat(torch.autograd.Function):
    """``twin.splat_shared`` as an autograd op. It is linear in the values and its adjoint is
    ``sample_shared`` (first-order only; the points are fixed ray geometry). Only the first
    ``backward_twin.channels`` channels carry gradient (the coverage channel does not)."""

    @staticmethod
    def forward(ctx, values, points, twin, backward_twin):
        ctx.save_for_backward(points)
        ctx.backward_twin, ctx.axis, ctx.channels = backward_twin, twin.channel_axis + 1, twin.channels
        return twin.splat_shared(points, values)

    @staticmethod
    def backward(ctx, grad):
        (points,) = ctx.saved_tensors
        kept = ctx.backward_twin.channels
        grad_values = ctx.backward_twin.sample_shared(grad.narrow(ctx.axis, 0, kept).contiguous(), points)
        if kept < ctx.channels:
            grad_values = torch.nn.functional.pad(grad_values, (0, ctx.channels - kept))
        return grad_values, None, None, None


def _closed_form(renderer, rays, background, create_graph, normalisation, log_density=False):
    representation, decoder = renderer.representation, renderer.decoder
    device, batch = rays.origins.device, background.shape[0]
    parameter = next(decoder.parameters(), None)
    with torch.set_grad_enabled(create_graph):
        # ψ(0) and J = ∂ψ/∂f(0), from ψ's own forward (in ψ's dtype: bf16 under DeepSpeed).
        zero = torch.zeros(1, representation.feature_dim, device=device,
                           dtype=parameter.dtype if parameter is not None else torch.float32)
        density0, colour0, jacobian = decoder(zero, linearise=True)
        # Everything from here in fp32 (fp64 for fp64 rays), whatever the model's dtype (bf16 under
        # DeepSpeed) and with autocast off: the einsum and the splat are sums of many small terms.
        work = torch.promote_types(rays.origins.dtype, torch.float32)
        with torch.autocast(device.type, enabled=False):
            sigma0, c0, jacobian = density0[0].to(work), colour0[0].to(work), jacobian[0].to(work)
            origins, directions = rays.origins.to(work), rays.directions.to(work)
            t_near, t_far, hit = intersect_box(origins, directions, renderer.box_half_size)
            depths, deltas = stratified_depths(t_near, t_far, renderer.samples_per_ray, stratified=False)
            deltas = deltas * hit.unsqueeze(-1)
            points = origins.unsqueeze(2) + depths.unsqueeze(-1) * directions.unsqueeze(2)
            points = (points / renderer.box_half_size).clamp(-1.0, 1.0)
            # The origin's render: constant density along every ray (composite() with σ ≡ σ₀, c ≡ c₀).
            optical = sigma0 * deltas
            transmittance = torch.exp(-(torch.cumsum(optical, dim=-1) - optical))
            weights = transmittance * (1.0 - torch.exp(-optical))  # (B, N, S)
            remaining = torch.exp(-optical.sum(dim=-1))  # T_N
            bg = background.to(work).unsqueeze(1)
            rgb = weights.sum(-1, keepdim=True) * c0 + remaining.unsqueeze(-1) * bg
            residual = 2 * _loss_scale(rays) * (rgb - rays.colours.to(work))  # e_r = ∂L/∂C_r
            if rays.ray_weights is not None:
                residual = residual * rays.ray_weights.to(work).unsqueeze(-1)
            d_density = deltas * (remaining * ((c0 - bg) * residual).sum(-1)).unsqueeze(-1)  # ∂L/∂σ_k
            if log_density:
                d_density = d_density * sigma0  # ∂L/∂log σ_k
            d_colour = weights.unsqueeze(-1) * residual.unsqueeze(2)  # ∂L/∂c_k
            payload = [d_density.unsqueeze(-1), d_colour]
            cover = normalisation == "coverage"
            if cover:  # the coverage rides along as a fifth channel (no gradient: as in the autograd path)
                counted = weights if rays.ray_weights is None else weights * rays.ray_weights.to(work).unsqueeze(-1)
                payload.append(counted.detach().unsqueeze(-1))
            payload = torch.cat(payload, -1)  # (B, N, S, k)
            twin = representation.twin(payload.shape[-1])
            backward_twin = representation.twin(4) if cover else twin
            splat = _SharedSplat.apply(payload.reshape(batch, -1, payload.shape[-1]), points.reshape(batch, -1, 3).detach(),
                                       twin, backward_twin)  # (B, *twin shape): every block gets the same payload
            axis = representation.channel_axis + 1
            gradient = representation.apply_feature_jacobian(splat.narrow(axis, 0, 4), jacobian)
            coverage_per_view = splat.narrow(axis, 4, 1).detach() if cover else None
    return -gradient.to(rays.origins.dtype), coverage_per_view, (1.0 - remaining)


def _normalise(encoding, cover, opacity, rays, representation, normalisation, coverage_eps):
    if normalisation == "sum":
        return encoding
    if normalisation == "views":
        per_object = rays.views_per_object().clamp_min(1.0).to(encoding.dtype)
        return encoding / per_object.view(-1, *([1] * (encoding.dim() - 1)))
    work = torch.promote_types(encoding.dtype, torch.float32)
    if not representation.is_grid:  # one "cell": the object's total coverage per view-pixel
        counted = opacity.detach().to(work)
        if rays.ray_weights is not None:
            counted = counted * rays.ray_weights.to(work)
        total = (counted.sum(1) / rays.rays_per_view).view(-1, *([1] * (encoding.dim() - 1)))
        return torch.where(total > 0, encoding.to(work) / total.clamp_min(torch.finfo(work).tiny), 0.0).to(encoding.dtype)
    # Coverage per view-pixel (Σ of rendering weights / rays per view), in fp32 at least.
    cover = cover.to(work) / rays.rays_per_view
    flat = cover.flatten(1)
    reached = flat > 0
    scale = (flat * reached).sum(1) / reached.sum(1).clamp_min(1)  # mean over the reached cells
    floor = (coverage_eps * scale).view(-1, *([1] * (cover.dim() - 1)))
    normalised = torch.where(cover > 0, encoding.to(work) / (cover + floor).clamp_min(torch.finfo(work).tiny), 0.0)
    return normalised.to(encoding.dtype)


def coverage(renderer: VolumeRenderer, points: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-cell sum of the rendering weights of the samples that read it (B, *state_shape).

    Sampling a grid is linear in the grid, so the weight each cell received is the adjoint of
    ``sample`` (``splat``) applied to the (detached) sample weights: the same splat as GOEmbed, of ones.
    """
    representation = renderer.representation
    batch = points.shape[0]
    # Every feature channel of a cell gets the full weight: coverage is per channel, like ζ.
    values = weights.detach().reshape(batch, -1, 1).expand(-1, -1, representation.feature_dim)
    return representation.splat(points.reshape(batch, -1, 3).detach(), values.to(points.dtype))
