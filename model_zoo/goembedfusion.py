"""GOEmbedFusion: the renderer's decoder ψ, the GOEmbed encoder and the 3D denoiser as one module.

One training step for a batch of objects (DESIGN.md §2):

1. the first target view is the diffusion target: x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε (images in [-1, 1]);
2. ζ_enc = GOEmbed(context views ∪ {x_t at its camera}), views resized to ``encode_resolution``;
3. ζ̂ = D_θ(ζ_enc, t), a clean 3D representation;
4. ζ̂ is rendered on random rays of every target and context view; the loss is the MSE to the
   clean images (colours in [0, 1]).

Context dropout (``context_dropout``) removes the context views of some objects, which trains
the unconditional model used by classifier-free guidance. With probability
``reconstruction_prob`` an object is trained in *reconstruction mode*: the noisy target is left
out of the encoding and t = T−1 (at that noise level x_t carries no signal anyway), which is
exactly what :meth:`reconstruct` does at test time, deterministically.

The module knows nothing of DeepSpeed: ``forward(batch) -> (loss, metrics)`` is all a trainer needs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from model_zoo.diffusion import CosineSchedule, classifier_free_guidance
from model_zoo.encodings import unprojection
from model_zoo.goembed import METHODS, NORMALISATIONS, RayBatch, goembed
from model_zoo.presets import get_preset
from model_zoo.lpips import LPIPS
from model_zoo.rays import gather_pixels, patch_pixel_indices, random_pixel_indices, view_rays
from model_zoo.renderer import FieldDecoder, VolumeRenderer
from model_zoo.representations import ORIGINS, build_representation
from model_zoo.unet import build_denoiser

Encoder = Literal["goembed", "unprojection", "zeros"]


@dataclass
class ModelConfig:
    preset: str = "tiny"
    representation: str = "triplane"  # triplane | voxel | mlp
    encoder: Encoder = "goembed"  # goembed; unprojection and zeros are baselines
    goembed_normalisation: str = "coverage"  # see goembed.py and the README for the measurement
    goembed_method: str = "auto"  # auto (closed form where exact: grids, zero origin) | closed_form | autograd
    goembed_origin: str = "zeros"  # grids: zeros | random (fixed, seeded) | learned; GOEmbed variants, see README
    goembed_origin_scale: float = 0.1  # std of a random / learned grid origin
    decoder_point_frequencies: int = 0  # > 0: ψ also reads a positional encoding of the point (a GOEmbed variant)
    origin_density: float = 0.01  # σ(0) of ψ, fixed by construction: the GOEmbed origin renders (nearly) blank
    encode_resolution: int = 32  # views are resized to this width before encoding
    train_decoder_through_encoder: bool = True  # create_graph=True: the loss reaches ψ through GOEmbed
    context_dropout: float = 0.1
    reconstruction_prob: float = 0.25
    context_loss_weight: float = 1.0
    num_timesteps: int = 1000
    box_half_size: float = 1.0  # objects live in [-h, h]^3 (world units)
    rays_per_view: int | None = None  # None: the preset's
    samples_per_ray: int | None = None  # None: the preset's
    mlp_hidden: int = 32  # the MLP representation's own width
    lpips_weight: float = 0.0  # > 0 adds LPIPS on a rendered patch of the first target view
    lpips_weights_path: str | None = None  # AlexNet + LPIPS heads (see lpips.py); never downloaded
    lpips_patch_size: int = 32  # pixels; AlexNet needs >= 32

    def __post_init__(self):
        if self.encoder not in ("goembed", "unprojection", "zeros"):
            raise ValueError(f"ModelConfig.encoder must be goembed, unprojection or zeros, got {self.encoder!r}")
        if self.goembed_normalisation not in NORMALISATIONS:
            raise ValueError(f"ModelConfig.goembed_normalisation must be one of {NORMALISATIONS}, got {self.goembed_normalisation!r}")
        if self.goembed_method not in METHODS:
            raise ValueError(f"ModelConfig.goembed_method must be one of {METHODS}, got {self.goembed_method!r}")
        if self.goembed_origin not in ORIGINS:
            raise ValueError(f"ModelConfig.goembed_origin must be one of {ORIGINS}, got {self.goembed_origin!r}")
        if self.decoder_point_frequencies < 0:
            raise ValueError(f"ModelConfig.decoder_point_frequencies must be >= 0, got {self.decoder_point_frequencies}")
        if self.lpips_weight > 0 and not self.lpips_weights_path:
            raise ValueError("ModelConfig.lpips_weights_path is required when lpips_weight > 0 (weights are never downloaded)")
        for name in ("context_dropout", "reconstruction_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ModelConfig.{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass
class Views:
    """Posed images of B objects: images (B, V, 3, H, W) in [0, 1], K (B, V, 3, 3), c2w (B, V, 4, 4)."""

    images: torch.Tensor
    K: torch.Tensor
    c2w: torch.Tensor

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
        self.renderer = VolumeRenderer(representation, decoder, config.samples_per_ray or preset.samples_per_ray,
                                       config.box_half_size)
        denoiser_config = preset.denoiser_config(kind)
        if activation_checkpointing:  # recompute U-Net activations in backward: memory for compute
            denoiser_config = replace(denoiser_config, use_checkpoint=True)
        self.denoiser = build_denoiser(kind, representation.state_shape, denoiser_config)
        self.schedule = CosineSchedule(config.num_timesteps)
        self.rays_per_view = config.rays_per_view or preset.rays_per_view
        self.lpips = LPIPS(config.lpips_weights_path) if config.lpips_weight > 0 else None

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
                       return_stats=return_stats)

    def denoise(self, encoding: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.denoiser(encoding, t)

    def render(self, state: torch.Tensor, K: torch.Tensor, c2w: torch.Tensor, height: int, width: int,
               background: torch.Tensor) -> torch.Tensor:
        """Whole images (B, V, 3, H, W) of ζ from any cameras (deterministic sample positions)."""
        batch, count = K.shape[:2]
        origins, directions = view_rays(K, c2w, height, width)
        out = self.renderer.render_rays_chunked(state, origins.reshape(batch, -1, 3), directions.reshape(batch, -1, 3), background)
        return out.rgb.reshape(batch, count, height, width, 3).permute(0, 1, 4, 2, 3)

    # -- training ------------------------------------------------------------------------------
    def forward(self, batch, generator: torch.Generator | None = None,
                on_part: Callable[[str], None] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The GOEmbedFusion loss of a :class:`data_pipeline.reader.ViewBatch` (or anything shaped like one).

        ``on_part(name)`` is called after each part ("prepare", "encode", "denoise", "render_loss"),
        so a benchmark can time them without a copy of this method.
        """
        config = self.config
        mark = on_part or (lambda name: None)
        device = batch.target_images.device
        B = batch.target_images.shape[0]
        draw = generator.device if generator is not None else device

        def uniform(*shape):
            return torch.rand(*shape, generator=generator, device=draw).to(device)

        x0 = batch.target_images[:, 0] * 2 - 1
        t = self.schedule.sample_timesteps(B, generator, device)
        reconstruction = uniform(B) < config.reconstruction_prob
        t = torch.where(reconstruction, torch.full_like(t, config.num_timesteps - 1), t)
        noise = torch.randn(x0.shape, generator=generator, device=draw).to(device=device, dtype=x0.dtype)
        x_t = self.schedule.q_sample(x0, t, noise)

        keep_context = (uniform(B) >= config.context_dropout).to(x0.dtype)
        context = Views(batch.context_images, batch.context_K, batch.context_c2w)
        noisy = Views(((x_t + 1) / 2).unsqueeze(1), batch.target_K[:, :1], batch.target_c2w[:, :1])
        encode_views = context.join(noisy)
        view_weights = torch.cat([keep_context.unsqueeze(1).expand(-1, context.count), (~reconstruction).to(x0.dtype).unsqueeze(1)], 1)
        mark("prepare")
        encoding, encode_stats = self.encode(encode_views, batch.background, view_weights,
                                             create_graph=config.train_decoder_through_encoder and self.training,
                                             return_stats=True)
        mark("encode")
        state = self.denoise(encoding, t)
        mark("denoise")

        target_mse = self._render_loss(state, Views(batch.target_images, batch.target_K, batch.target_c2w), batch.background, generator)
        metrics = {"target_mse": target_mse.detach(), "t_mean": t.float().mean(),
                   "psnr_target": -10 * torch.log10(target_mse.detach().clamp_min(1e-10)), **encode_stats}
        loss = target_mse
        if context.count:
            context_mse = self._render_loss(state, context, batch.background, generator)
            loss = loss + config.context_loss_weight * context_mse
            metrics["context_mse"] = context_mse.detach()
        if self.lpips is not None:
            perceptual = self._lpips_loss(state, batch, generator)
            loss = loss + config.lpips_weight * perceptual
            metrics["lpips"] = perceptual.detach()
        mark("render_loss")
        metrics["loss"] = loss.detach()
        return loss, metrics

    def _lpips_loss(self, state: torch.Tensor, batch, generator: torch.Generator | None) -> torch.Tensor:
        """LPIPS between a rendered square patch of the first target view and the same pixels."""
        images = batch.target_images[:, :1]
        batch_size, _, _, height, width = images.shape
        size = min(self.config.lpips_patch_size, height, width)
        indices = patch_pixel_indices(batch_size, 1, height, width, size, generator,
                                      generator.device if generator is not None else images.device).to(images.device)
        origins, directions = view_rays(batch.target_K[:, :1], batch.target_c2w[:, :1], height, width, indices)
        out = self.renderer.render_rays(state, origins[:, 0], directions[:, 0], batch.background,
                                        stratified=self.training, generator=generator)
        rendered = out.rgb.reshape(batch_size, size, size, 3).permute(0, 3, 1, 2)
        truth = gather_pixels(images, indices)[:, 0].reshape(batch_size, size, size, 3).permute(0, 3, 1, 2)
        return self.lpips(rendered, truth.to(rendered.dtype)).mean()

    def _render_loss(self, state: torch.Tensor, views: Views, background: torch.Tensor,
                     generator: torch.Generator | None) -> torch.Tensor:
        batch, count = views.images.shape[:2]
        height, width = views.images.shape[-2:]
        indices = random_pixel_indices(batch, count, height, width, self.rays_per_view, generator,
                                       generator.device if generator is not None else views.images.device).to(views.images.device)
        origins, directions = view_rays(views.K, views.c2w, height, width, indices)
        colours = gather_pixels(views.images, indices)
        out = self.renderer.render_rays(state, origins.reshape(batch, -1, 3), directions.reshape(batch, -1, 3), background,
                                        stratified=self.training, generator=generator)
        return F.mse_loss(out.rgb, colours.reshape(batch, -1, 3).to(out.rgb.dtype))

    # -- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, context: Views, background: torch.Tensor) -> torch.Tensor:
        """Deterministic sparse-view reconstruction: ζ from the context views alone."""
        encoding = self.encode(context, background)
        t = torch.full((context.images.shape[0],), self.config.num_timesteps - 1, device=background.device, dtype=torch.long)
        return self.denoise(encoding, t)

    @torch.no_grad()
    def sample(self, target_K: torch.Tensor, target_c2w: torch.Tensor, background: torch.Tensor,
               context: Views | None = None, steps: int = 50, guidance_scale: float = 1.0,
               resolution: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """A 3D sample ζ (B, *state_shape) by DDIM over an image at one target camera per object.

        target_K (B, 3, 3) is for an image of width ``resolution`` (default: encode_resolution) and
        square pixels. With context views and guidance_scale != 1, classifier-free guidance mixes
        the conditional and unconditional predictions of ζ. The result renders from any camera.
        """
        width = height = resolution or self.config.encode_resolution  # square, like the training renders
        batch = target_K.shape[0]
        device = background.device
        draw = generator.device if generator is not None else device
        x_t = torch.randn(batch, 3, height, width, generator=generator, device=draw).to(device)
        state = None
        timesteps = self.schedule.ddim_timesteps(steps)
        for i, t_now in enumerate(timesteps):
            t = torch.full((batch,), t_now, device=device, dtype=torch.long)
            noisy = Views(((x_t + 1) / 2).unsqueeze(1), target_K.unsqueeze(1), target_c2w.unsqueeze(1))
            state = self._predict(noisy, context, background, t, guidance_scale)
            x0 = self.render(state, target_K.unsqueeze(1), target_c2w.unsqueeze(1), height, width, background)[:, 0] * 2 - 1
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            x_t = self.schedule.ddim_step(x_t, x0, t_now, t_prev)
        return state

    def _predict(self, noisy: Views, context: Views | None, background: torch.Tensor, t: torch.Tensor,
                 guidance_scale: float) -> torch.Tensor:
        if context is None or context.count == 0:
            return self.denoise(self.encode(noisy, background), t)
        both = context.resized(noisy.images.shape[-1]).join(noisy)
        conditional = self.denoise(self.encode(both, background), t)
        if guidance_scale == 1.0:  # no guidance: the unconditional pass would be thrown away
            return conditional
        unconditional = self.denoise(self.encode(noisy, background), t)
        return classifier_free_guidance(conditional, unconditional, guidance_scale)

    def describe(self) -> dict:
        return {"config": asdict(self.config), "parameters": sum(p.numel() for p in self.parameters()),
                "state_shape": list(self.representation.state_shape)}


def psnr(mse: torch.Tensor) -> torch.Tensor:
    return -10 * torch.log10(mse.clamp_min(1e-10))


__all__ = ["GOEmbedFusion", "ModelConfig", "Views", "psnr"]
