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

With ``noise_aware`` (``ModelConfig.image_colour_noisy_target``) a source may be noisy — the
diffusion's x_t at the target camera, read as x_t/√ᾱ_t = x₀ + σε — and every view carries its
noise level σ (0 for a clean view; σ/(1+σ) into the MLP, whose colour inputs are clipped to
[−1, 2], so that σ = 100 does not swamp it; the blend itself uses the unclipped colours). A
noisy pixel alone is not a colour estimate (a per-pixel denoiser of white noise gives colour
speckle), so each view is also read from a pyramid of ``levels`` box-filtered copies (1, 2, 4, …
pixels wide) and the MLP picks, per view, a softmax mixture of the levels: a learned,
noise-dependent low-pass filter. This is the x̂₀ "skip" path DFM has
through its 2D feature network on x_t, and which rendering ζ̂ alone lacks (ζ̂ carries no colour).

With ``gain="wiener"`` (``ModelConfig.image_colour_noisy_gain``) the MLP no longer has to learn how
much a noisy reading is worth: each level l of a view with noise level σ is first shrunk towards
ψ's colour by the posterior-mean (Wiener) gain of a Gaussian prior around it,

    y_l ← ψ_c + g_l · (y_l − ψ_c),    g_l = s_l² / (s_l² + σ_l²),    σ_l = (σ / 2) / 2ˡ,

σ_l being the noise's standard deviation in [0, 1] units after averaging 2ˡ × 2ˡ i.i.d. pixels and
s_l a learned prior standard deviation per level. The gain is exactly 1 for a clean view and ~0 at
t = T−1 (σ = 100), where the learned form still let ±50 colours through a small α (README,
"Unconditional colour"). The MLP then reads the shrunk colours and still picks views, levels and α.

``gain="wiener_bands"`` shrinks the pyramid's band-pass parts instead (wavelet shrinkage): with
b_{L−1} = y_{L−1} − ψ_c and b_l = y_l − y_{l+1} below it, level l is read as

    ψ_c + Σ_{k ≥ l} g_k · b_k,    g_k = s_k² / (s_k² + v_k),    v_{L−1} = σ_{L−1}²,  v_k = σ_k² − σ_{k+1}²,

v_k being the noise variance of band k (a block mean's noise is shared with the finer level it is
the mean of). Fine detail, whose prior variance is small, is then dropped at noise levels where
the coarse colour is still kept; shrinking whole levels lets a fine level's noise through with
its gain (measured: colour speckle in unconditional samples). A clean view reads y_l unchanged.

With ``own_view`` (``ModelConfig.image_colour_own_view``) a ray that comes from a source view's own
camera — its direction equals the direction from that camera's centre to the point, to 1e-5 rad —
takes its colour from that view's pixel alone, read at level ``own_level`` (0: the finest) after
the shrink above:

    c(x) = m + Σ_{k ≥ own_level} g_k · b_k   (wiener_bands; wiener: m + g_l · (y_l − m); clean: y_l)

with no learned α, view weights or level mixture; the prior mean m is the blend of every other
view and ψ (ψ_c where no other view is read; the coarsest band b_{L−1} is taken against m), so a
conditional sample's target camera starts from the context views' colour, not ψ's grey. Every
point of such a ray projects to the same pixel, so this is a per-pixel posterior mean of x₀ given
x_t under a Gaussian prior around m: EDM's c_skip path (x̂₀ → x_t as σ → 0, → m as σ → ∞) in the
wavelet domain.
Why: the learned α stays below 1 (x̂₀ kept 0.83 of x_t's colour even at t = 0, README), and a
sampler that shrinks colour by that factor at each low-noise step ends grey. A context view
rendered for its own loss is excluded (``exclude``) and so never copies itself. A Gaussian prior
per band makes Gaussian texture: copied at level 0, a sample's fine bands are colour speckle
(measured, README); at a coarser ``own_level`` only the coarse colour follows x_t and the detail
is ψ's.

With ``adaptive_prior`` (``ModelConfig.image_colour_adaptive_prior``) the prior std of each band
also depends on ψ's feature at the point, log s_l(x) = log s_l + w_l · f(x) + b_l (zero at the
start): one global s_l must be as large as the detail at edges, and then lets the same amount of
noise through in flat regions; a per-point s_l can drop it there (a spatially adaptive Wiener
filter, whose adaptivity comes from ζ̂).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class SourceViews:
    """Posed views to take colour from: images (B, V, 3, H, W) in [0, 1], K (B, V, 3, 3), c2w (B, V, 4, 4),
    ``weights`` (B, V), 0 for a view that must not be read (e.g. context dropout; None: all read), and
    ``noise_levels`` (B, V): σ of a noisy view x₀ + σ·ε, in units of the [−1, 1] image (None: clean)."""

    images: torch.Tensor
    K: torch.Tensor
    c2w: torch.Tensor
    weights: torch.Tensor | None = None
    noise_levels: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return self.images.shape[1]


# How much a noisy reading counts (``ImageColour(gain=…)``, ``ModelConfig.image_colour_noisy_gain``).
GAINS = ("learned", "wiener", "wiener_bands")

# A ray is "from" a source view's camera when the directions to the point differ by less than this
# (radians; float32 rounding is ~1e-7 for points a few world units away, distinct cameras ≫ 1e-3).
OWN_VIEW_TOLERANCE_RAD = 1e-5


# Groups of source views, each at its own resolution (clean context views at the data resolution,
# the noisy target at the encode resolution): one SourceViews or a sequence of them.
Sources = SourceViews | Sequence[SourceViews]


def source_groups(sources: Sources | None) -> list[SourceViews]:
    if sources is None:
        return []
    return [sources] if isinstance(sources, SourceViews) else [group for group in sources if group.count]


def source_count(sources: Sources | None) -> int:
    return sum(group.count for group in source_groups(sources))


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


def box_pyramid(images: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """images (B, V, 3, H, W) and ``levels − 1`` copies averaged over 2ˡ × 2ˡ pixel blocks."""
    batch, views, channels, height, width = images.shape
    flat = images.reshape(batch * views, channels, height, width)
    pyramid = [images]
    for level in range(1, levels):
        size = 2 ** level
        if size > min(height, width):
            break
        pooled = F.avg_pool2d(flat, size)
        pyramid.append(pooled.reshape(batch, views, channels, *pooled.shape[-2:]))
    return pyramid


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

    def __init__(self, feature_dim: int, hidden: int = 32, levels: int = 1, noise_aware: bool = False,
                 gain: str = "learned", own_view: bool = False, own_level: int = 0, adaptive_prior: bool = False,
                 denoised: bool = False):
        super().__init__()
        if levels < 1:
            raise ValueError(f"ImageColour levels must be >= 1, got {levels}")
        if gain not in GAINS:
            raise ValueError(f"ImageColour gain must be one of {', '.join(GAINS)}, got {gain!r}")
        # A raw noisy reading reaches ±50 at t = T−1; one through a 2D denoiser (``denoised``) stays an image.
        if own_view and noise_aware and gain == "learned" and not denoised:
            raise ValueError("ImageColour own_view with a noisy source needs gain wiener or wiener_bands, or denoised")
        if not 0 <= own_level < levels:
            raise ValueError(f"ImageColour own_level must be in [0, {levels - 1}], got {own_level}")
        self.levels, self.noise_aware, self.gain = levels, noise_aware, gain
        self.own_view, self.own_level = own_view, own_level
        # The Wiener forms' prior standard deviation s_l per level or band ([0, 1] colour units), as a log.
        self.prior_log_std = (nn.Parameter(torch.full((levels,), math.log(0.25)))
                              if noise_aware and gain != "learned" else None)
        if adaptive_prior and self.prior_log_std is None:
            raise ValueError("ImageColour adaptive_prior needs a noisy source with gain wiener or wiener_bands")
        # log s_l(x) = log s_l + a linear map of ψ's feature at x, zero at the start (the global prior).
        self.prior_head = nn.Linear(feature_dim, levels) if adaptive_prior else None
        if self.prior_head is not None:
            nn.init.zeros_(self.prior_head.weight)
            nn.init.zeros_(self.prior_head.bias)
        inputs = feature_dim + 3 * levels + 1 + (1 if noise_aware else 0)
        self.view = nn.Sequential(nn.Linear(inputs, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.score = nn.Linear(hidden, 1)
        self.mix = nn.Linear(hidden, 1)
        self.level = nn.Linear(hidden, levels) if levels > 1 else None

    def _read(self, group: SourceViews, points: torch.Tensor, directions: torch.Tensor):
        """One group's colours (B, V, M, L, 3), readable mask (B, V, M), cos θ and noise level (B, V, M, 1),
        the levels' noise std (B, V, M, L, 1; None without a Wiener gain) and the rays from each view's
        own camera (B, V, M; None without ``own_view``)."""
        uv, z = project(points, group.K, group.c2w)
        height, width = group.images.shape[-2:]
        valid = (z > 1e-4) & (uv[..., 0] >= 0) & (uv[..., 0] <= width) & (uv[..., 1] >= 0) & (uv[..., 1] <= height)
        if group.weights is not None:
            valid = valid & (group.weights > 0).unsqueeze(-1)
        levels = []
        for image in box_pyramid(group.images, self.levels):
            scale = torch.tensor([image.shape[-1] / width, image.shape[-2] / height], device=uv.device, dtype=uv.dtype)
            levels.append(sample_images(image, uv * scale))
        box = [2 ** level for level in range(len(levels))]
        levels += [levels[-1]] * (self.levels - len(levels))  # a view smaller than the coarsest level
        box += [box[-1]] * (self.levels - len(box))
        seen = torch.stack(levels, 3)
        to_point = points.unsqueeze(1) - group.c2w[..., None, :3, 3]
        cosine = (F.normalize(to_point, dim=-1) * directions.unsqueeze(1)).sum(-1, keepdim=True)
        noise = (group.noise_levels if group.noise_levels is not None
                 else torch.zeros(group.images.shape[:2], device=uv.device))
        noise = noise.to(uv.dtype)[..., None, None].expand_as(cosine)
        noise_std = own = None
        if self.prior_log_std is not None:  # σ_l of each level: (B, V, M, L, 1)
            noise_std = noise.unsqueeze(-1) / 2 / torch.tensor(box, device=uv.device, dtype=uv.dtype).view(-1, 1)
        if self.own_view:  # sin of the angle between the ray and the view's ray to the point, in fp32
            sine = torch.linalg.cross(F.normalize(to_point.float(), dim=-1),
                                      directions.float().unsqueeze(1).expand_as(to_point), dim=-1).norm(dim=-1)
            own = valid & (sine < OWN_VIEW_TOLERANCE_RAD) & (cosine[..., 0] > 0)
        return seen, valid, cosine, noise, noise_std, own

    def forward(self, features: torch.Tensor, points: torch.Tensor, directions: torch.Tensor, colour: torch.Tensor,
                sources: Sources, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """features (B, M, F) at the points (B, M, 3, world units), the rendered rays' unit directions
        (B, M, 3), ψ's colour there (B, M, 3); ``exclude`` (B, M, V') bool: views a point must not
        read, for the first V' source views (the rest may all be read)."""
        parts = list(zip(*(self._read(group, points, directions) for group in source_groups(sources))))
        seen, valid, cosine, noise = (torch.cat(part, 1) for part in parts[:4])
        own = torch.cat(parts[5], 1) if self.own_view else None
        # The gain of the part of a reading measured against ψ's colour (1: none is): see own_view below.
        base_gain = torch.ones_like(seen[..., :1, 0, :1])  # (B, V, M, 1)
        if self.prior_log_std is not None:  # the Wiener shrink towards ψ's colour
            log_std = self.prior_log_std.to(seen.dtype).view(-1, 1)  # (L, 1)
            if self.prior_head is not None:  # per point: (B, 1, M, L, 1)
                log_std = log_std + self.prior_head(features.to(self.prior_head.weight.dtype)).to(seen.dtype)[:, None, :, :, None]
            prior_var = torch.exp(2 * log_std)
            noise_var = torch.cat(parts[4], 1).pow(2)  # (B, V, M, L, 1)
            base = colour.to(seen.dtype)[:, None, :, None, :]
            if self.gain == "wiener":
                gains = (prior_var / (prior_var + noise_var)).expand(*seen.shape[:-1], 1)
                seen = base + gains * (seen - base)
                base_gain = gains[..., self.own_level, :]
            else:  # bands: b_l = y_l − y_{l+1}, the coarsest against ψ; their noise variances
                bands = torch.cat([seen[..., :-1, :] - seen[..., 1:, :], seen[..., -1:, :] - base], -2)
                band_var = torch.cat([noise_var[..., :-1, :] - noise_var[..., 1:, :], noise_var[..., -1:, :]], -2)
                gains = (prior_var / (prior_var + band_var)).expand(*seen.shape[:-1], 1)
                seen = base + (gains * bands).flip(-2).cumsum(-2).flip(-2)  # level l: ψ + Σ_{k ≥ l} g_k b_k
                base_gain = gains[..., -1, :]
        if exclude is not None:
            excluded = exclude.transpose(1, 2)
            if excluded.shape[1] < valid.shape[1]:
                excluded = F.pad(excluded, (0, 0, 0, valid.shape[1] - excluded.shape[1]), value=False)
            valid = valid & ~excluded
            own = None if own is None else own & ~excluded
        if own is not None:  # a view is the skip on its own rays, not one of the blend's views
            own_rays, valid = valid, valid & ~own
        # The MLP runs in its weights' dtype (bf16 for a bf16 export); weights and blending in fp32 at least.
        dtype = self.score.weight.dtype
        views = seen.shape[1]
        readable = seen.clamp(-1.0, 2.0) if self.noise_aware else seen  # a noisy source reaches ±50
        inputs = [features.unsqueeze(1).expand(-1, views, -1, -1).to(dtype), readable.flatten(3).to(dtype), cosine.to(dtype)]
        if self.noise_aware:
            inputs.append((noise / (1 + noise)).to(dtype))
        hidden = self.view(torch.cat(inputs, -1))  # (B, V, M, H)
        own_reading = seen[..., self.own_level, :]  # (B, V, M, 3): what a ray from the view's own camera reads
        if self.level is not None:  # each view's colour: its own mixture of the pyramid's levels
            level_weights = torch.softmax(self.level(hidden).to(seen.dtype), dim=-1)
            seen = (level_weights.unsqueeze(-1) * seen).sum(3)
        else:
            seen = seen[..., 0, :]
        # A finite "minus infinity": a point no view sees gets uniform weights, zeroed below, and no NaN.
        scores = self.score(hidden)[..., 0].to(seen.dtype).masked_fill(~valid, -1e4)
        weights = torch.softmax(scores, dim=1) * valid
        blended = (weights.unsqueeze(-1) * seen).sum(1)
        pooled = (weights.unsqueeze(-1).to(dtype) * hidden).sum(1)
        alpha = torch.sigmoid(self.mix(pooled).to(seen.dtype)) * valid.any(1, keepdim=True).transpose(1, 2).to(seen.dtype)
        result = (1 - alpha) * colour + alpha * blended
        if own is not None:  # the skip: the own view's reading, shrunk towards the blend of everything else
            # A reading shrunk towards ψ is moved to the same shrink towards m = the blend of the other views
            # and ψ (their colour is the better prior): + (1 − g)·(m − ψ_c), g the gain of its part against ψ.
            own = own & own_rays
            towards = own_reading + (1 - base_gain) * (result - colour.to(result.dtype)).unsqueeze(1)
            count = own.sum(1, keepdim=True).transpose(1, 2)  # (B, M, 1)
            own_colour = (own.unsqueeze(-1).to(towards.dtype) * towards).sum(1) / count.clamp_min(1)
            result = torch.where(count > 0, own_colour, result)
        return result.to(colour.dtype)


def band_skip(prior: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor, prior_log_std: torch.Tensor,
              from_level: int = 0) -> torch.Tensor:
    """The wavelet-domain posterior mean of an image x₀ around a prediction of it (EDM's c_skip, per band).

    ``prior`` m (B, 3, H, W) is the prediction, ``noisy`` y = x₀ + σ·ε (B, 3, H, W) a noisy reading of
    the same image, both in [0, 1] units; ``sigma`` (B,) is σ in units of the [−1, 1] image (as
    ``SourceViews.noise_levels``). The residual y − m is split into the box pyramid's bands (as
    ``ImageColour``'s ``wiener_bands``: b_l = r_l − r_{l+1}, the coarsest b_{L−1} = r_{L−1}, r_l the
    2ˡ-pixel block means), and

        x̂₀ = m + Σ_{l ≥ from_level} g_l · b_l,    g_l = s_l² / (s_l² + v_l),

    v_l being band l's noise variance and s_l = exp(``prior_log_std``[l]) its prior std. So x̂₀ → y
    as σ → 0 (with from_level 0) and → m as σ → ∞; bands finer than ``from_level`` stay m's, so the
    noise of the fine bands (colour speckle) is never let through.
    """
    levels = prior_log_std.shape[0]
    if not 0 <= from_level < levels:
        raise ValueError(f"band_skip from_level must be in [0, {levels - 1}], got {from_level}")
    height, width = prior.shape[-2:]
    residual = (noisy - prior).float()
    means = [residual]
    for level in range(1, levels):  # block means, back at full size (a level wider than the image: the last)
        size = min(2 ** level, height, width)
        means.append(F.interpolate(F.avg_pool2d(residual, size), size=(height, width), mode="nearest"))
    box = torch.tensor([min(2 ** level, height, width) for level in range(levels)], device=prior.device,
                       dtype=torch.float32)
    noise_var = ((sigma.float().view(-1, 1) / 2) / box).pow(2)  # (B, L): σ_l², [0, 1] units
    band_var = torch.cat([noise_var[:, :-1] - noise_var[:, 1:], noise_var[:, -1:]], 1)
    prior_var = torch.exp(2 * prior_log_std.detach().float()).view(1, -1)
    gains = prior_var / (prior_var + band_var)  # (B, L)
    skip = torch.zeros_like(residual)
    for level in range(from_level, levels):
        band = means[level] - means[level + 1] if level + 1 < levels else means[level]
        skip = skip + gains[:, level].view(-1, 1, 1, 1) * band
    return (prior.float() + skip).to(prior.dtype)
