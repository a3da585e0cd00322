"""GOEmbedFusion: the renderer's decoder ψ, the GOEmbed encoder and the 3D denoiser as one module.

One training step for a batch of objects (DESIGN.md §2, DFM's recipe):

1. the first target view is the diffusion target: it is resized to ``encode_resolution`` first,
   then noised there, x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε (images in [-1, 1]) — so the encoder sees the
   schedule's noise level exactly, in training as in sampling (which draws x_T at that width);
2. two GOEmbed encodings in separate channel groups, each normalised on its own: the clean
   context views (DFM's per-view features at t = 0) and the noisy target x_t (at t);
3. ζ̂ = D_θ([ζ_ctx, ζ_tgt], t, mode), a clean 3D representation;
4. ζ̂ is rendered on random rays of every target view — the noised one and the ones never
   encoded (``data.target_views`` ≥ 2 gives DFM's held-out second target) — and, with weight
   ``context_loss_weight``, of the context views; the loss is the MSE to the clean images.

Context dropout (``context_dropout``) empties the context group of some objects, which trains
the unconditional model used by classifier-free guidance. With probability
``reconstruction_prob`` an object is trained in *reconstruction mode*: the target group is empty
and a mode flag (the denoiser's ``cond`` input) says so, which is exactly what
:meth:`reconstruct` does at test time, deterministically. The flag keeps the two regimes apart:
the first sampling step (t = T−1 with a pure-noise splat) is a generation step like any other.

Sampling is delegated to the pure functions of :mod:`model_zoo.samplers`; :meth:`x0_predictor`
is the model they call.

The module knows nothing of DeepSpeed: ``forward(batch) -> (loss, metrics)`` is all a trainer needs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Annotated, Callable, Literal

import pydantic
import pydantic.dataclasses
import torch
import torch.nn.functional as F
from pydantic import AfterValidator, Field
from torch import nn

from model_zoo.diffusion import CosineSchedule, classifier_free_guidance
from model_zoo.encodings import unprojection
from model_zoo.goembed import METHODS, NORMALISATIONS, RayBatch, goembed
from model_zoo.image_colour import GAINS, ImageColour, Sources, SourceViews, band_skip
from model_zoo.metrics import psnr_from_mse
from model_zoo.presets import PRESETS, get_preset
from model_zoo.lpips import LPIPS
from model_zoo.rays import gather_pixels, patch_pixel_indices, random_pixel_indices, view_rays
from model_zoo.renderer import FieldDecoder, VolumeRenderer
from model_zoo.representations import ORIGINS, REPRESENTATIONS, build_representation
from model_zoo.samplers import SAMPLERS, Callback, get_sampler
from model_zoo.unet import build_denoiser
from model_zoo.view_denoiser import ViewDenoiser

# The training metric psnr_target is capped at 100 dB (a perfect patch must not log +inf).
PSNR_MSE_FLOOR = 1e-10

Encoder = Literal["goembed", "unprojection", "zeros"]
Evidence = Literal["groups", "summed"]
GuidanceOn = Literal["state", "x0"]
ImageFrom = Literal["render", "view_denoiser"]


def _one_of(choices) -> AfterValidator:
    """The value must be one of ``choices`` (a tuple, or a registry dict's keys)."""
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return value
    return AfterValidator(check)


def _known_preset(name: str) -> str:
    get_preset(name)  # otherwise an unknown preset only fails when the model is built
    return name


# Strict (True is not 1, "4" is not 4) and closed (an unknown field is an error). The same class
# is the trainer's `model:` section and what checkpoints and exports store in model_config.json.
@pydantic.dataclasses.dataclass(config=pydantic.ConfigDict(strict=True, extra="forbid"))
class ModelConfig:
    """The model's architecture and losses (also what checkpoints and exports store in model_config.json).

    Invalid values raise pydantic.ValidationError (a ValueError) naming the field.
    """

    preset: Annotated[str, AfterValidator(_known_preset)] = Field("tiny", description=(
        f"size preset (model_zoo/presets.py): {', '.join(PRESETS)}"))
    representation: Annotated[str, _one_of(REPRESENTATIONS)] = Field("triplane", description=(
        f"3D representation ζ: {', '.join(REPRESENTATIONS)} (hashgrid: no denoiser yet)"))
    encoder: Encoder = Field("goembed", description="goembed; unprojection and zeros are baselines")
    goembed_normalisation: Annotated[str, _one_of(NORMALISATIONS)] = Field(
        "coverage", description=f"how GOEmbed normalises its encoding: {', '.join(NORMALISATIONS)} (goembed.py; README)")
    goembed_method: Annotated[str, _one_of(METHODS)] = Field(
        "auto", description=f"{', '.join(METHODS)}; auto: closed form where exact (grids, zero origin), else autograd")
    goembed_log_density: bool = Field(False, description=(
        "GOEmbed's density gradient with respect to log σ: keeps the views' colour in the encoding at a "
        "blank origin (goembed.py; README)"))
    goembed_origin: Annotated[str, _one_of(ORIGINS)] = Field(
        "zeros", description="grids' GOEmbed origin: zeros, random (fixed, seeded) or learned (GOEmbed variants, README)")
    goembed_origin_scale: float = Field(0.1, ge=0, description="std of a random / learned grid origin")
    decoder_point_frequencies: int = Field(0, ge=0, description=(
        "> 0: ψ also reads a positional encoding of the point (a GOEmbed variant)"))
    origin_density: float = Field(0.01, gt=0, description=(
        "σ(0) of ψ, fixed by construction: the GOEmbed origin renders (nearly) blank"))
    encode_resolution: int = Field(32, ge=1, description="views are resized to this width before encoding (and noised there)")
    evidence: Evidence = Field("groups", description=(
        "groups: clean context and noisy target encoded into separate channel groups (DFM's per-view features, "
        "context t = 0); summed: one encoding of all views (the first implementation)"))
    # (Not "mode_token": saved configs redact any *token* field.)
    mode_flag: bool = Field(True, description=(
        "a 0/1 flag (the denoiser's cond input) marks reconstruction mode, so that it is not confused "
        "with generation at t = T-1"))
    train_decoder_through_encoder: bool = Field(True, description="create_graph=True: the loss reaches ψ through GOEmbed")
    context_dropout: float = Field(0.1, ge=0, le=1, description=(
        "probability of emptying an object's context group (trains the unconditional model for guidance)"))
    reconstruction_prob: float = Field(0.5, ge=0, le=1, description=(
        "probability of training an object in reconstruction mode (empty target group, mode flag set)"))
    context_loss_weight: float = Field(1.0, ge=0, description="weight of the rendering loss on the context views")
    num_timesteps: int = Field(1000, ge=1, description="diffusion steps T of the cosine schedule")
    box_half_size: float = Field(1.0, gt=0, description="objects live in [-h, h]^3 (world units)")
    rays_per_view: int | None = Field(None, ge=1, description="rays rendered per target view in training; null: the preset's")
    samples_per_ray: int | None = Field(None, ge=1, description="samples per ray; null: the preset's")
    mlp_hidden: int = Field(32, ge=1, description="the MLP representation's own width")
    lpips_weight: float = Field(0.0, ge=0, description="> 0 adds LPIPS on a rendered patch of the first target view")
    lpips_weights_path: str | None = Field(None, description="AlexNet + LPIPS heads (see lpips.py); never downloaded")
    lpips_patch_size: int = Field(32, ge=32, description="LPIPS patch width in pixels; AlexNet needs >= 32")
    image_colour: bool = Field(False, description=(
        "also colour every rendered point from the clean context views it projects into (pixel-aligned, "
        "as pixelNeRF / IBRNet / DFM; model_zoo/image_colour.py); density stays ζ̂'s"))
    image_colour_noisy_target: bool = Field(False, description=(
        "image_colour also reads the noisy target x_t, told its noise level (DFM's x̂₀ path from x_t; "
        "a generated sample is then coloured by the view the sampler made); needs image_colour"))
    image_colour_levels: int = Field(1, ge=1, description=(
        "image_colour reads each view at this many box-filtered scales (1, 2, 4, ... px) and mixes them per view"))
    image_colour_noisy_gain: Annotated[str, _one_of(GAINS)] = Field("learned", description=(
        "how much a noisy reading counts: learned (by the blend's MLP alone) | wiener (each level first shrunk "
        "towards ψ's colour by s²/(s² + σ_l²), its noise std σ_l after the box filter, s learned) | wiener_bands "
        "(the same for the pyramid's band-pass differences: fine detail dropped first); needs image_colour_noisy_target"))
    image_colour_own_view: bool = Field(False, description=(
        "a ray from a source view's own camera takes that view's pixel, shrunk by its gain, with no learned "
        "blend (EDM's c_skip: x̂₀ at the noisy target's camera follows x_t as σ → 0); needs image_colour, and "
        "with image_colour_noisy_target a wiener gain or image_colour_view_denoiser"))
    image_colour_own_level: int = Field(0, ge=0, description=(
        "the pyramid level image_colour_own_view reads (0: every band, the pixel itself when clean; L-1: only the "
        "coarsest colour, the detail ψ's); < image_colour_levels"))
    image_colour_adaptive_prior: bool = Field(False, description=(
        "the wiener gains' prior std of each band also depends on ψ's feature at the point (zero-initialised "
        "linear head): noise dropped in flat regions, detail kept at edges; needs a wiener gain"))
    image_colour_view_denoiser: bool = Field(False, description=(
        "image_colour reads the noisy target through a 2D U-Net's x̂₀ = E[x₀ | x_t] (EDM-preconditioned; DFM's "
        "2D network on x_t; model_zoo/view_denoiser.py) instead of x_t itself: a non-linear x̂₀ path; needs "
        "image_colour_noisy_target and image_colour_noisy_gain: learned (its output is not x₀ + noise)"))
    image_colour_view_denoiser_loss_weight: float = Field(1.0, ge=0, description=(
        "weight of the view denoiser's own loss, the MSE of its x̂₀ to the clean target at encode_resolution "
        "(it is also trained through the rendering loss)"))
    image_colour_view_denoiser_all_views: bool = Field(False, description=(
        "its own loss also on every other view of the batch (context and never-encoded targets), each noised "
        "at its own random t: a 2D diffusion loss on ~4x the images per step"))

    @pydantic.model_validator(mode="after")
    def _lpips_weights(self):
        if self.lpips_weight > 0 and not self.lpips_weights_path:
            raise ValueError("lpips_weights_path is required when lpips_weight > 0 (weights are never downloaded)")
        return self

    @pydantic.model_validator(mode="after")
    def _image_colour_options(self):
        if not self.image_colour and (self.image_colour_noisy_target or self.image_colour_levels != 1):
            raise ValueError("image_colour_noisy_target and image_colour_levels need image_colour: true")
        if self.image_colour_noisy_gain != "learned" and not self.image_colour_noisy_target:
            raise ValueError(f"image_colour_noisy_gain: {self.image_colour_noisy_gain} needs image_colour_noisy_target: true")
        if self.image_colour_own_view and not self.image_colour:
            raise ValueError("image_colour_own_view needs image_colour: true")
        if self.image_colour_adaptive_prior and self.image_colour_noisy_gain == "learned":
            raise ValueError("image_colour_adaptive_prior needs image_colour_noisy_gain: wiener or wiener_bands")
        if self.image_colour_own_level >= self.image_colour_levels:
            raise ValueError(f"image_colour_own_level must be < image_colour_levels ({self.image_colour_levels}), "
                             f"got {self.image_colour_own_level}")
        if self.image_colour_view_denoiser and not self.image_colour_noisy_target:
            raise ValueError("image_colour_view_denoiser needs image_colour_noisy_target: true")
        if self.image_colour_view_denoiser and self.image_colour_noisy_gain != "learned":
            raise ValueError(f"image_colour_view_denoiser needs image_colour_noisy_gain: learned, got "
                             f"{self.image_colour_noisy_gain} (a wiener gain assumes a reading x₀ + σε)")
        if (self.image_colour_own_view and self.image_colour_noisy_target and self.image_colour_noisy_gain == "learned"
                and not self.image_colour_view_denoiser):
            raise ValueError("image_colour_own_view with image_colour_noisy_target needs image_colour_noisy_gain: "
                             "wiener or wiener_bands, or image_colour_view_denoiser (a raw noisy reading reaches ±50)")
        return self


@dataclass
class Views:
    """Posed images of B objects: images (B, V, 3, H, W) in [0, 1], K (B, V, 3, 3), c2w (B, V, 4, 4)."""

    images: torch.Tensor
    K: torch.Tensor
    c2w: torch.Tensor

    @classmethod
    def from_batch(cls, batch, which: str) -> "Views":
        """The ``which`` ("context" or "target") views of a reader batch
        (:class:`data_pipeline.reader.ViewBatch`): the one conversion from a batch to views."""
        if which not in ("context", "target"):
            raise ValueError(f"which must be 'context' or 'target', got {which!r}")
        return cls(getattr(batch, f"{which}_images"), getattr(batch, f"{which}_K"), getattr(batch, f"{which}_c2w"))

    def to(self, *args, **kwargs) -> "Views":
        """The views with every tensor moved or cast (``torch.Tensor.to``'s arguments)."""
        return Views(self.images.to(*args, **kwargs), self.K.to(*args, **kwargs), self.c2w.to(*args, **kwargs))

    @property
    def count(self) -> int:
        return self.images.shape[1]

    def join(self, other: "Views") -> "Views":
        """Both sets of views of the same objects, as one (images must have the same size)."""
        return Views(torch.cat([self.images, other.images], 1), torch.cat([self.K, other.K], 1),
                     torch.cat([self.c2w, other.c2w], 1))

    def resized(self, width: int) -> "Views":
        height, old_width = self.images.shape[-2:]
        if width == old_width:
            return self
        new_height = max(1, round(height * width / old_width))
        flat = self.images.flatten(0, 1)
        mode = "area" if width < old_width else "bilinear"
        images = F.interpolate(flat, size=(new_height, width), mode=mode).unflatten(0, self.images.shape[:2])
        scale = torch.tensor([width / old_width, new_height / height, 1.0], device=self.K.device, dtype=self.K.dtype)
        return Views(images, self.K * scale.view(3, 1), self.c2w)


class GOEmbedFusion(nn.Module):
    def __init__(self, config: ModelConfig | None = None, activation_checkpointing: bool = False):
        super().__init__()
        self.config = config = config or ModelConfig()
        preset = get_preset(config.preset)
        kind = config.representation
        origin = {"origin": config.goembed_origin, "origin_scale": config.goembed_origin_scale}
        if kind == "triplane":
            representation = build_representation(kind, channels=preset.triplane_channels, resolution=preset.triplane_resolution, **origin)
        elif kind == "voxel":
            representation = build_representation(kind, channels=preset.voxel_channels, resolution=preset.voxel_resolution, **origin)
        elif kind == "hashgrid":  # GOEmbed, the renderer and the experiments' encoders take it; no 3D denoiser yet
            raise ValueError("ModelConfig.representation 'hashgrid' has no denoiser yet (model_zoo/unet.py): use it "
                             "through model_zoo.representations and goembed directly")
        else:
            if config.goembed_origin != "zeros":
                raise ValueError(f"ModelConfig.goembed_origin applies to grids; the {kind!r} origin is fixed")
            representation = build_representation(kind, channels=preset.triplane_channels, hidden=config.mlp_hidden)
        decoder = FieldDecoder(representation.feature_dim, preset.decoder_hidden, preset.decoder_layers,
                               origin_density=config.origin_density, point_frequencies=config.decoder_point_frequencies)
        image_colour = ImageColour(representation.feature_dim, preset.decoder_hidden, levels=config.image_colour_levels,
                                   noise_aware=config.image_colour_noisy_target, denoised=config.image_colour_view_denoiser,
                                   gain=config.image_colour_noisy_gain,
                                   own_view=config.image_colour_own_view,
                                   own_level=config.image_colour_own_level,
                                   adaptive_prior=config.image_colour_adaptive_prior) if config.image_colour else None
        self.renderer = VolumeRenderer(representation, decoder, config.samples_per_ray or preset.samples_per_ray,
                                       config.box_half_size, image_colour)
        denoiser_config = preset.denoiser_config(kind)
        if activation_checkpointing:  # recompute U-Net activations in backward: memory for compute
            denoiser_config = replace(denoiser_config, use_checkpoint=True)
        if config.mode_flag:
            denoiser_config = replace(denoiser_config, cond_dim=1)
        self.denoiser = build_denoiser(kind, representation.state_shape, denoiser_config,
                                       input_groups=2 if config.evidence == "groups" else 1)
        self.schedule = CosineSchedule(config.num_timesteps)
        self.rays_per_view = config.rays_per_view or preset.rays_per_view
        self.lpips = LPIPS(config.lpips_weights_path) if config.lpips_weight > 0 else None
        # The 2D x̂₀ of the noisy target that image_colour reads (the triplane denoiser's U-Net size, in 2D).
        view_config = replace(preset.unet, cond_dim=0, use_checkpoint=denoiser_config.use_checkpoint)
        self.view_denoiser = ViewDenoiser(view_config) if config.image_colour_view_denoiser else None

    @property
    def representation(self):
        return self.renderer.representation

    # -- the three parts -----------------------------------------------------------------------
    def encode(self, views: Views, background: torch.Tensor, view_weights: torch.Tensor | None = None,
               create_graph: bool = False, return_stats: bool = False):
        """ζ_enc (B, *state_shape) from posed views (zero views: zeros). ``view_weights`` (B, V) drops views.

        ``return_stats``: also a dict of detached scalars for the metrics (GOEmbed: ``origin_opacity``)."""
        views = views.resized(self.config.encode_resolution)
        batch, count = views.images.shape[:2]
        height, width = views.images.shape[-2:]
        origins, directions = view_rays(views.K, views.c2w, height, width)
        colours = views.images.flatten(3).transpose(2, 3)  # (B, V, H*W, 3)
        weights = None
        if view_weights is not None:
            weights = view_weights.to(colours.dtype).unsqueeze(-1).expand(-1, -1, height * width).reshape(batch, -1)
        rays = RayBatch(origins.reshape(batch, -1, 3), directions.reshape(batch, -1, 3), colours.reshape(batch, -1, 3),
                        count, weights)
        if self.config.encoder == "zeros" or count == 0:
            encoding = torch.zeros(batch, *self.representation.state_shape, device=background.device, dtype=colours.dtype)
            return (encoding, {}) if return_stats else encoding
        if self.config.encoder == "unprojection":
            encoding = unprojection(self.renderer, rays)
            return (encoding, {}) if return_stats else encoding
        return goembed(self.renderer, rays, background, create_graph=create_graph,
                       normalisation=self.config.goembed_normalisation, method=self.config.goembed_method,
                       return_stats=return_stats, log_density=self.config.goembed_log_density)

    def condition(self, context: Views | None, noisy: Views | None, background: torch.Tensor,
                  context_weights: torch.Tensor | None = None, noisy_weights: torch.Tensor | None = None,
                  create_graph: bool = False, return_stats: bool = False):
        """The denoiser's input from clean context views and the noisy target (either may be None).

        ``evidence="groups"``: [ζ_ctx, ζ_tgt] stacked along the channel axis, each its own GOEmbed
        (so each is normalised by its own coverage); an absent or dropped group is exactly zero.
        ``"summed"``: one GOEmbed of all views together. Weights (B, V) drop views per object.
        ``return_stats``: also the encoder's metrics (the first group's where both have them).
        """
        batch = background.shape[0]
        stats: dict = {}

        def done(encoding):
            return (encoding, stats) if return_stats else encoding

        def empty():
            return torch.zeros(batch, *self.representation.state_shape, device=background.device)

        if self.config.evidence == "summed":
            views, weights = None, []
            for more, more_weights in ((context, context_weights), (noisy, noisy_weights)):
                if more is None or more.count == 0:
                    continue
                more = more.resized(self.config.encode_resolution)
                views = more if views is None else views.join(more)
                weights.append(more_weights if more_weights is not None
                               else torch.ones(batch, more.count, device=background.device))
            if views is None:
                return done(empty())
            encoding, stats = self.encode(views, background, torch.cat(weights, 1), create_graph=create_graph,
                                          return_stats=True)
            return done(encoding)
        groups = []
        for views, weights in ((context, context_weights), (noisy, noisy_weights)):
            if views is None or views.count == 0:
                groups.append(empty())
            else:
                encoding, group_stats = self.encode(views, background, weights, create_graph=create_graph,
                                                    return_stats=True)
                groups.append(encoding)
                stats = {**group_stats, **stats}
        return done(torch.cat(groups, dim=self._channel_dim))

    @property
    def _channel_dim(self) -> int:
        # Triplane (B, 3, C, R, R): channels are dim 2; voxel (B, C, R, R, R) and MLP (B, P): dim 1.
        return 2 if self.config.representation == "triplane" else 1

    def denoise(self, encoding: torch.Tensor, t: torch.Tensor, reconstruction: torch.Tensor | None = None) -> torch.Tensor:
        """ζ̂ from the denoiser input; ``reconstruction`` (B,) bool marks reconstruction mode (the flag)."""
        cond = None
        if self.config.mode_flag:
            flag = reconstruction if reconstruction is not None else torch.zeros(encoding.shape[0], dtype=torch.bool,
                                                                              device=encoding.device)
            cond = flag.to(encoding.dtype).unsqueeze(1)
        return self.denoiser(encoding, t, cond)

    def render(self, state: torch.Tensor, K: torch.Tensor, c2w: torch.Tensor, height: int, width: int,
               background: torch.Tensor, context: Views | None = None, sources: Sources | None = None) -> torch.Tensor:
        """Whole images (B, V, 3, H, W) of ζ from any cameras (deterministic sample positions).

        ``context``: the clean views ζ was reconstructed or sampled from; with ``image_colour`` the
        render also takes colour from them (without, or for an unconditional ζ, ψ's colour alone).
        ``sources`` (in place of ``context``): what ``image_colour`` reads, as ``sample`` returns it."""
        batch, count = K.shape[:2]
        origins, directions = view_rays(K, c2w, height, width)
        sources = self.sources(context) if sources is None else sources
        out = self.renderer.render_rays_chunked(state, origins.reshape(batch, -1, 3), directions.reshape(batch, -1, 3),
                                                background, sources=sources)
        return out.rgb.reshape(batch, count, height, width, 3).permute(0, 1, 4, 2, 3)

    def sources(self, context: Views | None, weights: torch.Tensor | None = None, noisy: Views | None = None,
                noisy_weights: torch.Tensor | None = None, t: torch.Tensor | None = None,
                view_x0: torch.Tensor | None = None) -> list[SourceViews] | None:
        """The views ``image_colour`` reads (None without it or without views); weights (B, V) drop views.

        With ``image_colour_view_denoiser`` the noisy target is read as its 2D x̂₀ (``denoise_view``;
        ``view_x0``: that x̂₀ (B, 3, h, w) in [−1, 1] already computed) with its noise level σ.

        With ``image_colour_noisy_target``, also ``noisy``: x_t (as a view in [0, 1]) at t (B,), or a
        clean generated view when t is None. x_t is read as x_t / √ᾱ_t = x₀ + σ·ε with
        σ = √((1−ᾱ_t)/ᾱ_t) (EDM's noise level, ᾱ floored at 1e-4, so σ ≤ 100): an unbiased view of
        x₀, so that the convex blend can weigh it like a Wiener filter would. Read as x_t itself,
        every colour is shrunk by √ᾱ_t, a blend (gain ≤ 1) cannot undo that, and each sampling
        step pulls the colours back to the mean (measured: grey samples)."""
        if not self.config.image_colour:
            return None
        groups = []
        if context is not None and context.count:
            groups.append(SourceViews(context.images, context.K, context.c2w, weights))
        if self.config.image_colour_noisy_target and noisy is not None and noisy.count:
            images, sigma = noisy.images, None
            if t is not None:
                alpha_bar = self.schedule.alpha_bar(t, images.device).clamp_min(1e-4)
                sigma = ((1 - alpha_bar) / alpha_bar).sqrt().unsqueeze(1).expand(-1, noisy.count)
                if self.view_denoiser is not None:  # its x̂₀, told σ (how far to trust it)
                    denoised = view_x0 if view_x0 is not None else self.denoise_view(noisy, t)
                    images = ((denoised + 1) / 2).unsqueeze(1)
                else:
                    scale = alpha_bar.rsqrt().view(-1, 1, 1, 1, 1)
                    images = ((images.float() * 2 - 1) * scale + 1) / 2
            groups.append(SourceViews(images, noisy.K, noisy.c2w, noisy_weights, sigma))
        return groups or None

    def denoise_view(self, noisy: Views, t: torch.Tensor) -> torch.Tensor:
        """The view denoiser's x̂₀ (B, 3, h, w) in [−1, 1] of the first noisy view x_t (in [0, 1]) at t (B,)."""
        alpha_bar = self.schedule.alpha_bar(t, noisy.images.device)
        return self.view_denoiser(noisy.images[:, 0] * 2 - 1, t, alpha_bar)

    # -- training ------------------------------------------------------------------------------
    def noisy_target(self, target: Views, t: torch.Tensor, noise: torch.Tensor) -> Views:
        """x_t of the first view of ``target`` at ``encode_resolution``, as a view in [0, 1].

        The clean image is resized first and noised at the encode resolution, so the encoder sees
        the schedule's √(1−ᾱ_t) noise level (noising first and then averaging pixels would shrink
        it). ``noise`` has the shape (B, 3, h, w) of the resized view.
        """
        first = self.first_target(target)
        x0 = first.images[:, 0] * 2 - 1
        x_t = self.schedule.q_sample(x0, t, noise.to(x0.dtype))
        return Views(((x_t + 1) / 2).unsqueeze(1), first.K, first.c2w)

    def first_target(self, target: Views) -> Views:
        """The first view of ``target`` (the one noised) at ``encode_resolution``, clean."""
        return Views(target.images[:, :1], target.K[:, :1], target.c2w[:, :1]).resized(self.config.encode_resolution)

    def encode_shape(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of a view of size (height, width) once resized to ``encode_resolution``."""
        new_width = self.config.encode_resolution
        return (max(1, round(height * new_width / width)) if new_width != width else height), new_width

    def forward(self, batch, generator: torch.Generator | None = None,
                on_part: Callable[[str], None] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The GOEmbedFusion loss of a :class:`data_pipeline.reader.ViewBatch` (or anything shaped like one).

        ``on_part(name)`` is called after each part ("prepare", "encode", "denoise", "render_loss"),
        so a benchmark can time them without a copy of this method.
        """
        config = self.config
        mark = on_part or (lambda name: None)
        device = batch.target_images.device
        dtype = batch.target_images.dtype
        B = batch.target_images.shape[0]
        draw = generator.device if generator is not None else device

        def uniform(*shape):
            return torch.rand(*shape, generator=generator, device=draw).to(device)

        t = self.schedule.sample_timesteps(B, generator, device)
        reconstruction = uniform(B) < config.reconstruction_prob
        # Reconstruction mode has no target evidence: t = T-1 ("nothing is known") plus its flag.
        t = torch.where(reconstruction, torch.full_like(t, config.num_timesteps - 1), t)
        height, width = self.encode_shape(*batch.target_images.shape[-2:])
        noise = torch.randn((B, 3, height, width), generator=generator, device=draw).to(device=device, dtype=dtype)
        targets = Views.from_batch(batch, "target")
        noisy = self.noisy_target(targets, t, noise)

        keep_context = (uniform(B) >= config.context_dropout).to(dtype)
        context = Views.from_batch(batch, "context")
        mark("prepare")
        encoding, encode_stats = self.condition(context, noisy, batch.background,
                                                context_weights=keep_context.unsqueeze(1).expand(-1, context.count),
                                                noisy_weights=(~reconstruction).to(dtype).unsqueeze(1),
                                                create_graph=config.train_decoder_through_encoder and self.training,
                                                return_stats=True)
        mark("encode")
        state = self.denoise(encoding, t, reconstruction)
        mark("denoise")

        view_x0 = self.denoise_view(noisy, t) if self.view_denoiser is not None else None
        # Every target view: the noised one and those never encoded (held out from the encoder).
        sources = self.sources(context, keep_context.unsqueeze(1).expand(-1, context.count), noisy,
                               (~reconstruction).to(dtype).unsqueeze(1), t, view_x0=view_x0)
        target_mse = self._render_loss(state, targets, batch.background, generator, sources)
        metrics = {"target_mse": target_mse.detach(), "t_mean": t.float().mean(),
                   "psnr_target": psnr_from_mse(target_mse.detach(), mse_floor=PSNR_MSE_FLOOR), **encode_stats}
        loss = target_mse
        if context.count and config.context_loss_weight > 0:
            # A context view must not copy its own pixels: each reads only the other context views.
            context_mse = self._render_loss(state, context, batch.background, generator, sources, own_views=True)
            loss = loss + config.context_loss_weight * context_mse
            metrics["context_mse"] = context_mse.detach()
        if self.lpips is not None:
            perceptual = self._lpips_loss(state, batch, generator, sources)
            loss = loss + config.lpips_weight * perceptual
            metrics["lpips"] = perceptual.detach()
        if view_x0 is not None:  # a 2D diffusion x₀ loss, on every object (at T−1 it learns the mean view);
            # last, so that its extra draws (all_views) leave the rendering losses' rays as they were
            view_mse = self._view_denoiser_loss(view_x0, targets, context, generator)
            loss = loss + config.image_colour_view_denoiser_loss_weight * view_mse
            metrics["view_mse"] = view_mse.detach()
        mark("render_loss")
        metrics["loss"] = loss.detach()
        return loss, metrics

    def _view_denoiser_loss(self, view_x0: torch.Tensor, targets: Views, context: Views,
                            generator: torch.Generator | None) -> torch.Tensor:
        """The view denoiser's x₀ MSE: on the noised target's x̂₀ and, with ``all_views``, on every other
        view, each noised at the encode resolution with its own t and noise (one mean over all images)."""
        clean = self.first_target(targets).images[:, 0] * 2 - 1
        errors = (view_x0.float() - clean.float()).pow(2).flatten(1).mean(1)
        if self.config.image_colour_view_denoiser_all_views:
            views = Views(targets.images[:, 1:], targets.K[:, 1:], targets.c2w[:, 1:])
            views = views.join(context) if context.count else views
            if views.count:
                x0 = views.resized(self.config.encode_resolution).images.flatten(0, 1) * 2 - 1
                draw = generator.device if generator is not None else x0.device
                t = self.schedule.sample_timesteps(x0.shape[0], generator, x0.device)
                noise = torch.randn(x0.shape, generator=generator, device=draw).to(device=x0.device, dtype=x0.dtype)
                x_t = self.schedule.q_sample(x0, t, noise)
                predicted = self.view_denoiser(x_t, t, self.schedule.alpha_bar(t, x0.device))
                errors = torch.cat([errors, (predicted.float() - x0.float()).pow(2).flatten(1).mean(1)])
        return errors.mean()

    def _lpips_loss(self, state: torch.Tensor, batch, generator: torch.Generator | None,
                    sources: Sources | None = None) -> torch.Tensor:
        """LPIPS between a rendered square patch of the first target view and the same pixels."""
        images = batch.target_images[:, :1]
        batch_size, _, _, height, width = images.shape
        size = min(self.config.lpips_patch_size, height, width)
        indices = patch_pixel_indices(batch_size, 1, height, width, size, generator,
                                      generator.device if generator is not None else images.device).to(images.device)
        origins, directions = view_rays(batch.target_K[:, :1], batch.target_c2w[:, :1], height, width, indices)
        out = self.renderer.render_rays(state, origins[:, 0], directions[:, 0], batch.background,
                                        stratified=self.training, generator=generator, sources=sources)
        rendered = out.rgb.reshape(batch_size, size, size, 3).permute(0, 3, 1, 2)
        truth = gather_pixels(images, indices)[:, 0].reshape(batch_size, size, size, 3).permute(0, 3, 1, 2)
        return self.lpips(rendered, truth.to(rendered.dtype)).mean()

    def _render_loss(self, state: torch.Tensor, views: Views, background: torch.Tensor,
                     generator: torch.Generator | None, sources: Sources | None = None,
                     own_views: bool = False) -> torch.Tensor:
        """MSE of ``rays_per_view`` random pixels of every view; ``own_views``: ``views`` are the
        first source group, so each view's rays are kept from reading their own view."""
        batch, count = views.images.shape[:2]
        height, width = views.images.shape[-2:]
        indices = random_pixel_indices(batch, count, height, width, self.rays_per_view, generator,
                                       generator.device if generator is not None else views.images.device).to(views.images.device)
        origins, directions = view_rays(views.K, views.c2w, height, width, indices)
        colours = gather_pixels(views.images, indices)
        exclude = None
        if sources is not None and own_views:
            own = torch.eye(count, dtype=torch.bool, device=origins.device)  # (view of the ray, source view)
            exclude = own.repeat_interleave(self.rays_per_view, 0).expand(batch, -1, -1)
        out = self.renderer.render_rays(state, origins.reshape(batch, -1, 3), directions.reshape(batch, -1, 3), background,
                                        stratified=self.training, generator=generator, sources=sources, exclude=exclude)
        return F.mse_loss(out.rgb, colours.reshape(batch, -1, 3).to(out.rgb.dtype))

    # -- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, context: Views, background: torch.Tensor) -> torch.Tensor:
        """Deterministic sparse-view reconstruction: ζ from the context views alone (reconstruction mode)."""
        batch = context.images.shape[0]
        encoding = self.condition(context, None, background)
        t = torch.full((batch,), self.config.num_timesteps - 1, device=background.device, dtype=torch.long)
        return self.denoise(encoding, t, torch.ones(batch, dtype=torch.bool, device=background.device))

    def x0_predictor(self, target_K: torch.Tensor, target_c2w: torch.Tensor, background: torch.Tensor,
                     context: Views | None = None, guidance_scale: float = 1.0, guidance_on: GuidanceOn = "x0",
                     image_from: ImageFrom = "render", noisy_skip_level: int | None = None):
        """The ``model(x_t, t) -> x̂₀`` a sampler calls: encode, denoise in 3D, render at the target camera.

        target_K (B, 3, 3) is for the square image x_t. With context views and guidance_scale ≠ 1,
        classifier-free guidance mixes the conditional and unconditional predictions, either of ζ̂
        (``guidance_on="state"``) or of the rendered x̂₀ (``"x0"``, the default: it measured slightly
        better, README "Samplers"; the renderer is non-linear, so they differ). The returned callable's ``.state`` is the last ζ̂ (with x₀ guidance, the
        conditional one): the 3D sample once the sampler is done.

        ``image_from="view_denoiser"`` (unconditional only, needs ``image_colour_view_denoiser``): x̂₀ is
        the view denoiser's own 2D prediction, not the render, whose colour is that prediction times
        ζ̂'s opacity (measured: half its chroma, README "The view denoiser"); ζ̂ still follows x_t.

        ``noisy_skip_level`` (None: off; needs a ``wiener`` or ``wiener_bands`` gain): x̂₀ also takes
        x_t's own bands from that pyramid level on, each shrunk by its Wiener gain around the
        prediction (:func:`model_zoo.image_colour.band_skip`, with the model's learned prior std per
        band): x̂₀ → x_t's coarse colour as σ → 0, → the prediction as σ → ∞. Why: the render
        keeps too little of x_t's colour even at low noise (opacity × blend, α < 1), and a sampler that
        shrinks colour at every step ends grey (README "The noisy skip").
        """
        if guidance_on not in ("state", "x0"):
            raise ValueError(f"guidance_on must be 'state' or 'x0', got {guidance_on!r}")
        if image_from not in ("render", "view_denoiser"):
            raise ValueError(f"image_from must be 'render' or 'view_denoiser', got {image_from!r}")
        if image_from == "view_denoiser" and (self.view_denoiser is None or (context is not None and context.count)):
            raise ValueError("image_from='view_denoiser' needs model.image_colour_view_denoiser and no context views "
                             "(the 2D network sees only x_t)")
        if noisy_skip_level is not None:
            colour = self.renderer.image_colour
            if colour is None or colour.prior_log_std is None:
                raise ValueError("noisy_skip_level needs model.image_colour with image_colour_noisy_gain wiener or "
                                 "wiener_bands (their prior std per band)")
            if not 0 <= noisy_skip_level < colour.levels:
                raise ValueError(f"noisy_skip_level must be in [0, {colour.levels - 1}] (image_colour_levels), "
                                 f"got {noisy_skip_level}")
        K, c2w = target_K.unsqueeze(1), target_c2w.unsqueeze(1)
        guided = context is not None and context.count > 0 and guidance_scale != 1.0

        def predict_x0(x_t: torch.Tensor, t_now: int) -> torch.Tensor:
            height, width = x_t.shape[-2:]
            t = torch.full((x_t.shape[0],), int(t_now), device=background.device, dtype=torch.long)
            noisy = Views(((x_t + 1) / 2).unsqueeze(1), K, c2w)
            view_x0 = self.denoise_view(noisy, t) if self.view_denoiser is not None else None

            def image(state, views=context):
                sources = self.sources(views, noisy=noisy, t=t, view_x0=view_x0)
                return self.render(state, K, c2w, height, width, background, sources=sources)[:, 0] * 2 - 1

            conditional = self.denoise(self.condition(context, noisy, background), t)
            predict.state = conditional
            if image_from == "view_denoiser":
                return view_x0
            if not guided:  # no guidance: the unconditional pass would be thrown away
                return image(conditional)
            unconditional = self.denoise(self.condition(None, noisy, background), t)
            if guidance_on == "state":
                predict.state = classifier_free_guidance(conditional, unconditional, guidance_scale)
                return image(predict.state)
            return classifier_free_guidance(image(conditional), image(unconditional, None), guidance_scale)

        def predict(x_t: torch.Tensor, t_now: int) -> torch.Tensor:
            x0 = predict_x0(x_t, t_now)
            if noisy_skip_level is None:
                return x0
            return self.noisy_skip(x0, x_t, torch.full((x_t.shape[0],), int(t_now), device=x_t.device), noisy_skip_level)

        predict.state = None
        return predict

    def noisy_skip(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, from_level: int) -> torch.Tensor:
        """x̂₀ (B, 3, h, w) in [−1, 1] plus x_t's bands from ``from_level`` on, Wiener-shrunk around it
        (:func:`model_zoo.image_colour.band_skip`); x_t is read as x_t/√ᾱ_t = x₀ + σ·ε, as ``sources`` does."""
        alpha_bar = self.schedule.alpha_bar(t, x_t.device).clamp_min(1e-4)
        sigma = ((1 - alpha_bar) / alpha_bar).sqrt()
        reading = x_t.float() * alpha_bar.rsqrt().view(-1, 1, 1, 1)
        shrunk = band_skip((x0.float() + 1) / 2, (reading + 1) / 2, sigma, self.renderer.image_colour.prior_log_std,
                           from_level)
        return (shrunk * 2 - 1).to(x0.dtype)

    @torch.no_grad()
    def sample(self, target_K: torch.Tensor, target_c2w: torch.Tensor, background: torch.Tensor,
               context: Views | None = None, steps: int = 50, guidance_scale: float = 1.0,
               resolution: int | None = None, generator: torch.Generator | None = None,
               sampler: str = "dpmpp_2m", guidance_on: GuidanceOn = "x0", callback: Callback | None = None,
               return_sources: bool = False, image_from: ImageFrom = "render", noisy_skip_level: int | None = None):
        """A 3D sample ζ (B, *state_shape) by ``sampler`` (see model_zoo.samplers) over an image at one
        target camera per object; ``steps`` timesteps evenly spaced from T−1 to 0.

        target_K (B, 3, 3) is for an image of width ``resolution`` (default: encode_resolution) and
        square pixels; x_T is standard normal at that size, the noise level training showed the
        encoder at t = T−1. ``callback`` is called after every step (see model_zoo.samplers).
        The result renders from any camera. ``return_sources``: (ζ, sources), where sources is what
        ``render(…, sources=)`` must read to colour the sample as the model made it: the context
        views and, with ``image_colour_noisy_target``, the image the sampler made.
        """
        state, made = self._sample_image(target_K, target_c2w, background, context, steps, guidance_scale,
                                         resolution, generator, sampler, guidance_on, callback, image_from,
                                         noisy_skip_level)
        return (state, self.sources(context, noisy=made)) if return_sources else state

    def _sample_image(self, target_K: torch.Tensor, target_c2w: torch.Tensor, background: torch.Tensor,
                      context: Views | None, steps: int, guidance_scale: float, resolution: int | None,
                      generator: torch.Generator | None, sampler: str, guidance_on: GuidanceOn,
                      callback: Callback | None, image_from: ImageFrom = "render",
                      noisy_skip_level: int | None = None) -> tuple[torch.Tensor, Views]:
        """(ζ, the image the sampler made as a clean view in [0, 1] at the target camera); the defaults
        are the public methods' (``sample``, ``sample_views``)."""
        width = height = resolution or self.config.encode_resolution  # square, like the training renders
        batch = target_K.shape[0]
        device = background.device
        draw = generator.device if generator is not None else device
        noise = torch.randn(batch, 3, height, width, generator=generator, device=draw).to(device)
        model = self.x0_predictor(target_K, target_c2w, background, context, guidance_scale, guidance_on, image_from,
                                  noisy_skip_level)
        image = get_sampler(sampler)(model, noise, self.schedule.ddim_timesteps(steps), self.schedule, callback=callback,
                                     generator=generator)
        made = Views(((image.float().clamp(-1, 1) + 1) / 2).unsqueeze(1), target_K.unsqueeze(1), target_c2w.unsqueeze(1))
        return model.state, made

    @torch.no_grad()
    def sample_views(self, target_K: torch.Tensor, target_c2w: torch.Tensor, background: torch.Tensor,
                     context: Views | None = None, steps: int = 50, guidance_scale: float = 1.0,
                     resolution: int | None = None, generator: torch.Generator | None = None,
                     sampler: str = "dpmpp_2m", guidance_on: GuidanceOn = "x0", callback: Callback | None = None,
                     image_from: ImageFrom = "render", noisy_skip_level: int | None = None):
        """DFM's autoregressive sampling: one image per target camera, in order, each sampled with the
        context and every image made before it as clean context views. (ζ, sources) of the last one,
        as ``sample(…, return_sources=True)`` gives them: ζ was conditioned on all the earlier images,
        and with ``image_colour`` its renders read them (and the last) for colour.

        Why: a single made image fixes only the side of the object its camera sees; renders from the
        other sides read ψ's colour alone (measured: a quarter of the made view's hue, README
        "Unconditional colour"). target_K (B, V, 3, 3) for images of width ``resolution``,
        target_c2w (B, V, 4, 4); the other arguments are ``sample``'s, and ``callback`` also gets
        "view" (its index); ``image_from`` applies to the first image of an unconditional sample.
        The model was trained with up to ``data.context_views_max`` context views: keep V − 1 plus the
        context within that.
        """
        if target_K.dim() != 4 or target_c2w.dim() != 4:
            raise ValueError(f"sample_views takes target_K (B, V, 3, 3) and target_c2w (B, V, 4, 4), "
                             f"got {tuple(target_K.shape)} and {tuple(target_c2w.shape)}")
        made = context if context is not None and context.count else None
        for view in range(target_K.shape[1]):
            report = None if callback is None else (lambda info, view=view: callback({**info, "view": view}))
            # image_from="view_denoiser" makes the first image only: the later ones are conditioned on it
            source = image_from if made is None else "render"
            state, image = self._sample_image(target_K[:, view], target_c2w[:, view], background, made, steps,
                                              guidance_scale, resolution, generator, sampler, guidance_on, report, source,
                                              noisy_skip_level)
            if view + 1 < target_K.shape[1]:  # the last image is read as the made image, as in sample()
                made = image if made is None else made.join(image.resized(made.images.shape[-1]))
        return state, self.sources(made, noisy=image)

    def describe(self) -> dict:
        return {"config": asdict(self.config), "parameters": sum(p.numel() for p in self.parameters()),
                "state_shape": list(self.representation.state_shape)}


__all__ = ["GOEmbedFusion", "ModelConfig", "PSNR_MSE_FLOOR", "SAMPLERS", "Views"]
