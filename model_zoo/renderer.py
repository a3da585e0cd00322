"""Differentiable emission-absorption volume rendering of a representation ζ through a decoder ψ.

    C(r) = Σ_k T_k (1 − exp(−σ_k δ_k)) c_k + T_N · background,    T_k = exp(−Σ_{j<k} σ_j δ_j)

Samples are taken only inside the object's bounding box [-h, h]^3 (world units; h =
``box_half_size``), one per equal bin between the ray's entry and exit (stratified jitter in
training, bin centres otherwise). Rays that miss the box see the background.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model_zoo.image_colour import ImageColour, Sources, source_count
from model_zoo.rays import intersect_box, stratified_depths
from model_zoo.representations import Representation


class FieldDecoder(nn.Module):
    """ψ: feature at a point (and, optionally, the point itself) -> (density σ >= 0 in 1/world units, colour in [0, 1]).

    **A blank origin by construction.** Density is measured relative to ψ's own reading of a zero
    feature: ``σ(f) = s · softplus(raw_σ(f) − raw_σ(0) + b₀)`` with ``b₀`` chosen so that
    ``σ(0) = origin_density`` exactly, whatever ψ's weights are. So the GOEmbed origin (a zero
    grid) stays nearly empty space (opacity ``1 − exp(−σ₀ · path)``, ~2% across the unit box at
    the default) while ψ trains; the fog that a free density bias let drift (0.64–0.69 mean opacity
    at initialisation before) cannot come back. σ₀ > 0 is needed: at σ₀ = 0 every rendering weight
    of the origin is 0 and the colour residual would not reach the gradient at all.

    ``point_frequencies > 0`` makes ψ also read a positional encoding γ(x) of the sample point
    (a GOEmbed variant: J = ∂ψ/∂f(0, x) then varies with x, so the encoding is no longer rank 4).
    The origin stays blank at every point (density relative to ψ(0, x)), at the price of a second
    evaluation of ψ per sample.
    """

    def __init__(self, feature_dim: int, hidden: int = 64, layers: int = 2, origin_density: float = 0.01,
                 density_scale: float = 10.0, point_frequencies: int = 0):
        super().__init__()
        if not 0.0 < origin_density < density_scale:
            raise ValueError(f"FieldDecoder.origin_density must be in (0, density_scale={density_scale}), got {origin_density}")
        self.feature_dim, self.point_frequencies = feature_dim, point_frequencies
        self.point_dim = 3 + 6 * point_frequencies if point_frequencies > 0 else 0
        dims = [feature_dim + self.point_dim] + [hidden] * layers
        blocks: list[nn.Module] = []
        for fan_in, fan_out in zip(dims[:-1], dims[1:]):
            blocks += [nn.Linear(fan_in, fan_out), nn.SiLU()]
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(dims[-1], 4)
        self.origin_density, self.density_scale = origin_density, density_scale
        # softplus⁻¹(σ₀ / s), computed stably: log(expm1(y)).
        self.origin_bias = math.log(math.expm1(origin_density / density_scale))

    @property
    def sees_points(self) -> bool:
        return self.point_dim > 0

    @property
    def can_linearise(self) -> bool:
        """Whether ``linearise=True`` gives the one J of the whole field (ψ reads only the feature)."""
        return not self.sees_points

    def encode_points(self, points: torch.Tensor) -> torch.Tensor:
        scales = (2.0 ** torch.arange(self.point_frequencies, device=points.device, dtype=points.dtype)) * math.pi
        angles = points.unsqueeze(-1) * scales  # (..., 3, L)
        return torch.cat([points, angles.sin().flatten(-2), angles.cos().flatten(-2)], dim=-1)

    def forward(self, features: torch.Tensor, points: torch.Tensor | None = None, linearise: bool = False):
        """features (..., F) [, points (..., 3) in [-1, 1]^3 when ``sees_points``] -> (density (...), colour (..., 3)).

        ``linearise=True`` returns ``(density, colour, jacobian)`` at ``features`` instead, with
        jacobian (..., 4, F) = ∂(σ, c)/∂f there: what the closed-form GOEmbed needs (ψ(0) and
        J = ∂ψ/∂f(0)). It is computed here, inside ψ's own forward (called through ``__call__``), by
        pushing tangents through every layer's own forward, so a wrapper that gathers parameters
        around module calls (DeepSpeed ZeRO-3) sees nothing unusual, and the result is an ordinary
        first-order function of ψ's weights (no second-order autograd needed to train ψ through it).
        """
        if self.sees_points:
            if points is None:
                raise ValueError("this FieldDecoder reads the sample points (point_frequencies > 0): pass points")
            if linearise:
                raise ValueError("FieldDecoder.linearise: J varies with the point when ψ sees points; use autograd GOEmbed")
            encoded = self.encode_points(points.to(features.dtype))
            # ψ(f, x) and ψ(0, x) in one call: density is relative to the origin at the same point.
            both = torch.cat([torch.cat([features, encoded], -1), torch.cat([torch.zeros_like(features), encoded], -1)], 0)
            raw, raw_origin = self.head(self.body(both)).chunk(2, dim=0)
            return self._activate(raw, raw_origin[..., 0])
        if linearise:
            return self._linearised(features)
        # ψ(0) rides along as one extra row: density relative to it costs nothing measurable.
        flat = features.reshape(-1, features.shape[-1])
        raw = self.head(self.body(torch.cat([flat, flat.new_zeros(1, flat.shape[-1])], 0)))
        return self._activate(raw[:-1].reshape(*features.shape[:-1], 4), raw[-1, 0])

    def _activate(self, raw: torch.Tensor, raw_origin_density: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        density = F.softplus(raw[..., 0] - raw_origin_density + self.origin_bias) * self.density_scale
        return density, torch.sigmoid(raw[..., 1:4])

    def _linearised(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lead, dim = features.shape[:-1], features.shape[-1]
        # Row 0 is ψ(0), the reference density is relative to; then the points asked for.
        value = torch.cat([features.new_zeros(1, dim), features.reshape(-1, dim)], 0)
        count = value.shape[0]
        # Each row carries F tangents e_1..e_F. A Linear layer maps a tangent t to W t = layer(t) − layer(0)
        # exactly (it is affine): one call of the layer on [values; tangents; 0]. An activation multiplies
        # the tangent by its derivative at the value.
        tangent = torch.eye(dim, device=value.device, dtype=value.dtype).expand(count, dim, dim)
        for layer in [*self.body, self.head]:
            if isinstance(layer, nn.Linear):
                out = layer(torch.cat([value, tangent.reshape(-1, tangent.shape[-1]), value.new_zeros(1, value.shape[-1])], 0))
                value, tangent = out[:count], (out[count:-1] - out[-1]).reshape(count, dim, -1)
            elif isinstance(layer, nn.SiLU):
                sigma = torch.sigmoid(value)
                tangent = tangent * (sigma * (1 + value * (1 - sigma))).unsqueeze(1)
                value = layer(value)
            else:
                raise TypeError(f"FieldDecoder.linearise knows Linear and SiLU layers, not {type(layer).__name__}")
        raw, raw_tangent = value[1:], tangent[1:]  # (count, 4), (count, F, 4)
        density, colour = self._activate(raw, value[0, 0])
        d_density = self.density_scale * torch.sigmoid(raw[..., 0] - value[0, 0] + self.origin_bias)  # softplus' = sigmoid
        d_colour = colour * (1 - colour)
        jacobian = torch.cat([(d_density.unsqueeze(-1) * raw_tangent[..., 0]).unsqueeze(1),
                              d_colour.unsqueeze(-1) * raw_tangent[..., 1:4].transpose(1, 2)], 1)  # (count, 4, F)
        return density.reshape(lead), colour.reshape(*lead, 3), jacobian.reshape(*lead, 4, dim)


@dataclass
class RenderOutput:
    rgb: torch.Tensor  # (B, N, 3)
    opacity: torch.Tensor  # (B, N) in [0, 1]: 1 - transmittance through the whole box
    depth: torch.Tensor  # (B, N) expected distance along the ray (world units), weighted by opacity
    weights: torch.Tensor | None = None  # (B, N, S) when requested
    points: torch.Tensor | None = None  # (B, N, S, 3) normalised sample points, when requested


class _LogGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by the value (∂/∂log x = x ∂/∂x).
    Its backward is made of differentiable ops, so it works under ``create_graph``."""

    @staticmethod
    def forward(ctx, value):
        ctx.save_for_backward(value)
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        (value,) = ctx.saved_tensors
        return grad * value


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
                 box_half_size: float = 1.0, image_colour: ImageColour | None = None):
        super().__init__()
        self.representation, self.decoder = representation, decoder
        self.samples_per_ray, self.box_half_size = samples_per_ray, box_half_size
        self.image_colour = image_colour  # None: colour is ψ's alone (model_zoo/image_colour.py)

    def render_rays(self, state: torch.Tensor, origins: torch.Tensor, directions: torch.Tensor,
                    background: torch.Tensor, stratified: bool = False, generator: torch.Generator | None = None,
                    keep_samples: bool = False, log_density_gradient: bool = False,
                    sources: Sources | None = None, exclude: torch.Tensor | None = None) -> RenderOutput:
        """state (B, *shape); origins, directions (B, N, 3) world units; background (B, 3).

        ``log_density_gradient``: the backward pass carries ∂/∂log σ = σ ∂/∂σ into the decoder in
        place of ∂/∂σ (GOEmbed's ``log_density``); the forward is unchanged.
        ``sources``: views the renderer's ``image_colour`` blends colour from (ignored without one);
        ``exclude`` (B, N, V) bool: source views a ray must not read (its own view)."""
        batch, count, _ = origins.shape
        t_near, t_far, hit = intersect_box(origins, directions, self.box_half_size)
        depths, deltas = stratified_depths(t_near, t_far, self.samples_per_ray, stratified, generator)
        deltas = deltas * hit.unsqueeze(-1)  # a ray that misses the box crosses nothing
        points = origins.unsqueeze(2) + depths.unsqueeze(-1) * directions.unsqueeze(2)  # (B, N, S, 3)
        normalised = (points / self.box_half_size).clamp(-1.0, 1.0)
        flat_points = normalised.reshape(batch, count * self.samples_per_ray, 3)
        features = self.representation.sample(state, flat_points)
        if getattr(self.decoder, "sees_points", False):
            density, colour = self.decoder(features, flat_points)
        else:
            density, colour = self.decoder(features)
        density = density.reshape(batch, count, self.samples_per_ray).to(origins.dtype)
        if log_density_gradient:
            density = _LogGradient.apply(density)
        if self.image_colour is not None and source_count(sources):
            samples = self.samples_per_ray
            colour = self.image_colour(
                features, points.reshape(batch, -1, 3), directions.unsqueeze(2).expand(-1, -1, samples, -1).reshape(batch, -1, 3),
                colour.reshape(batch, -1, 3).to(origins.dtype), sources,
                None if exclude is None else exclude.unsqueeze(2).expand(-1, -1, samples, -1).reshape(batch, -1, exclude.shape[-1]))
        colour = colour.reshape(batch, count, self.samples_per_ray, 3).to(origins.dtype)
        rgb, opacity, depth, weights = composite(density, colour, deltas, depths, background.unsqueeze(1).to(origins.dtype))
        return RenderOutput(rgb, opacity, depth, weights if keep_samples else None, normalised if keep_samples else None)

    def render_rays_chunked(self, state: torch.Tensor, origins: torch.Tensor, directions: torch.Tensor,
                            background: torch.Tensor, rays_per_chunk: int = 8192,
                            sources: Sources | None = None) -> RenderOutput:
        """Deterministic render of many rays in chunks (whole images at evaluation time)."""
        outputs = [self.render_rays(state, origins[:, i:i + rays_per_chunk], directions[:, i:i + rays_per_chunk], background,
                                    sources=sources)
                   for i in range(0, origins.shape[1], rays_per_chunk)]
        return RenderOutput(torch.cat([o.rgb for o in outputs], 1), torch.cat([o.opacity for o in outputs], 1),
                            torch.cat([o.depth for o in outputs], 1))
