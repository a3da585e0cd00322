"""Timestep-conditioned denoisers whose output is a *clean 3D representation* (DESIGN.md §2, step 4).

GOEmbedFusion predicts x0, not noise: the denoiser maps the GOEmbed encoding ζ_enc of the noisy
target (plus context views) to a clean representation ζ̂ of the same shape, which the renderer turns
into images. So every network here returns a tensor shaped like its input, and none of them
zero-initialises its last layer (that trick suits eps/v-prediction residuals, where "predict 0" is a
sensible start; a representation that renders to nothing is not).

- :class:`UNet`: a standard residual U-Net for 2D or 3D inputs (ADM-style: GroupNorm + SiLU + conv,
  scale-shift timestep conditioning, optional self-attention at chosen levels).
- :class:`TriplaneDenoiser`: rolls the three planes out into one wide image for a 2D U-Net.
- :class:`VoxelDenoiser`: a 3D U-Net over a feature grid.
- :class:`MLPDenoiser`: a residual MLP over a flat parameter vector (MLP representations).
- :func:`build_denoiser`: picks one from the representation kind and per-object shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# The diffusion schedule has T = 1000 steps; the sinusoidal embedding is tuned for t in [0, 1000).
_MAX_PERIOD = 10_000.0

DenoiserKind = Literal["triplane", "voxel", "mlp"]


@dataclass(frozen=True)
class UNetConfig:
    """Size and behaviour of a denoiser. One config serves the 2D, 3D and MLP variants."""

    base_channels: int = 32
    # Channel multiplier per resolution level; level i runs at 1/2**i of the input size.
    channel_mults: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1
    # Levels (0 = full resolution) that get self-attention after each res block. When non-empty,
    # the bottleneck gets attention too: it is the cheapest place for global context.
    attention_resolutions: tuple[int, ...] = ()
    attention_head_channels: int = 64
    dropout: float = 0.0
    # Width of the timestep embedding MLP; None means 4 * base_channels (the DDPM/ADM default).
    time_embed_dim: int | None = None
    # 8 groups divides every channel count that is a multiple of 8, so small CPU presets work too.
    num_groups: int = 8
    # Recompute activations in the backward pass: trades ~30% more compute for much less memory.
    use_checkpoint: bool = False
    # Width of an optional extra embedding added to the time embedding (0 = no conditioning input).
    cond_dim: int = 0
    # MLPDenoiser only: hidden width (None = base_channels * channel_mults[-1]) and block count.
    mlp_hidden: int | None = None
    mlp_blocks: int = 4

    def __post_init__(self) -> None:
        # Configs often arrive from YAML/JSON with lists; keep them hashable tuples.
        object.__setattr__(self, "channel_mults", tuple(int(m) for m in self.channel_mults))
        object.__setattr__(self, "attention_resolutions", tuple(int(a) for a in self.attention_resolutions))
        if self.base_channels < 1:
            raise ValueError(f"base_channels must be positive, got {self.base_channels}")
        if not self.channel_mults or min(self.channel_mults) < 1:
            raise ValueError(f"channel_mults must be a non-empty tuple of positive ints, got {self.channel_mults}")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        bad_levels = [a for a in self.attention_resolutions if not 0 <= a < len(self.channel_mults)]
        if bad_levels:
            raise ValueError(
                f"attention_resolutions are level indices in [0, {len(self.channel_mults)}); got {bad_levels}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_groups < 1:
            raise ValueError(f"num_groups must be positive, got {self.num_groups}")
        for mult in self.channel_mults:
            channels = self.base_channels * mult
            if channels % self.num_groups:
                raise ValueError(
                    f"num_groups={self.num_groups} must divide every level's channels; "
                    f"base_channels={self.base_channels} * mult {mult} = {channels} is not divisible"
                )
        if self.time_embed_dim is not None and self.time_embed_dim < 1:
            raise ValueError(f"time_embed_dim must be positive or None, got {self.time_embed_dim}")
        if self.cond_dim < 0:
            raise ValueError(f"cond_dim must be >= 0, got {self.cond_dim}")
        if self.mlp_blocks < 1:
            raise ValueError(f"mlp_blocks must be >= 1, got {self.mlp_blocks}")

    @property
    def embed_dim(self) -> int:
        return self.time_embed_dim if self.time_embed_dim is not None else 4 * self.base_channels

    @property
    def downsample_factor(self) -> int:
        """Spatial sizes must be divisible by this (one stride-2 downsample between levels)."""
        return 2 ** (len(self.channel_mults) - 1)


# --------------------------------------------------------------------------- building blocks


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) in float32, frequencies from 1 to 1/_MAX_PERIOD."""
    half = dim // 2
    freqs = torch.exp(-math.log(_MAX_PERIOD) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _conv(dims: int) -> type[nn.Module]:
    if dims == 2:
        return nn.Conv2d
    if dims == 3:
        return nn.Conv3d
    raise ValueError(f"dims must be 2 or 3, got {dims}")


def _maybe_checkpoint(enabled: bool, fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
    # Only worth it (and only valid) when autograd is recording; non-reentrant checkpointing keeps
    # the RNG state so dropout masks match between the forward and the recomputation.
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class TimestepEmbedder(nn.Module):
    """t (and an optional extra embedding) -> the conditioning vector every block reads."""

    def __init__(self, frequency_dim: int, embed_dim: int, cond_dim: int = 0):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        self.cond_proj = nn.Linear(cond_dim, embed_dim) if cond_dim > 0 else None

    def forward(self, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        # Cast to the weights' dtype so bf16-weight models work without autocast.
        weight_dtype = self.mlp[0].weight.dtype
        emb = self.mlp(timestep_embedding(t, self.frequency_dim).to(weight_dtype))
        if cond is not None:
            if self.cond_proj is None:
                raise ValueError("cond was given but this denoiser was built with cond_dim=0")
            emb = emb + self.cond_proj(cond.to(weight_dtype))
        return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, with the time embedding as a scale and shift on the second norm."""

    def __init__(self, dims: int, in_channels: int, out_channels: int, embed_dim: int, config: UNetConfig):
        super().__init__()
        conv = _conv(dims)
        self.use_checkpoint = config.use_checkpoint
        self.norm1 = nn.GroupNorm(_groups(in_channels, config.num_groups), in_channels)
        self.conv1 = conv(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(embed_dim, 2 * out_channels)
        self.norm2 = nn.GroupNorm(_groups(out_channels, config.num_groups), out_channels)
        self.dropout = nn.Dropout(config.dropout)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1)
        self.skip = conv(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return _maybe_checkpoint(self.use_checkpoint, self._forward, x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(F.silu(emb)).chunk(2, dim=1)
        expand = (...,) + (None,) * (h.ndim - 2)  # (B, C) -> (B, C, 1, 1[, 1])
        h = self.norm2(h) * (1 + scale[expand]) + shift[expand]
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions (2D or 3D), residual."""

    def __init__(self, channels: int, config: UNetConfig):
        super().__init__()
        self.use_checkpoint = config.use_checkpoint
        heads = max(1, channels // config.attention_head_channels)
        while channels % heads:
            heads -= 1
        self.num_heads = heads
        self.norm = nn.GroupNorm(_groups(channels, config.num_groups), channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return _maybe_checkpoint(self.use_checkpoint, self._forward, x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        tokens = self.norm(x).reshape(b, c, -1)
        n = tokens.shape[-1]
        q, k, v = self.qkv(tokens).reshape(b, 3, self.num_heads, c // self.num_heads, n).permute(1, 0, 2, 4, 3)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        out = out.permute(0, 1, 3, 2).reshape(b, c, n)
        return x + self.proj(out).reshape(x.shape)


class Downsample(nn.Module):
    """Stride-2 3x3 conv: learnt downsampling halves every spatial size."""

    def __init__(self, dims: int, channels: int):
        super().__init__()
        self.conv = _conv(dims)(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv (avoids the checkerboard artefacts of transposed convs)."""

    def __init__(self, dims: int, channels: int):
        super().__init__()
        self.conv = _conv(dims)(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _groups(channels: int, num_groups: int) -> int:
    # Input/skip-concatenated widths are sums of level widths, so they stay divisible; gcd is a guard.
    return math.gcd(channels, num_groups)


# --------------------------------------------------------------------------- the U-Net


class UNet(nn.Module):
    """Residual U-Net over (B, C, *spatial) with ``len(spatial) == dims``; returns (B, out_channels, *spatial)."""

    def __init__(self, dims: Literal[2, 3], in_channels: int, out_channels: int, config: UNetConfig):
        super().__init__()
        conv = _conv(dims)
        self.dims = dims
        self.config = config
        base, embed_dim = config.base_channels, config.embed_dim
        self.time_embed = TimestepEmbedder(base, embed_dim, config.cond_dim)
        self.input_conv = conv(in_channels, base, 3, padding=1)

        # Encoder: record the width of every activation pushed onto the skip stack.
        self.down = nn.ModuleList()
        skip_channels = [base]
        channels = base
        last_level = len(config.channel_mults) - 1
        for level, mult in enumerate(config.channel_mults):
            for _ in range(config.num_res_blocks):
                self.down.append(self._stage(dims, channels, base * mult, level, config))
                channels = base * mult
                skip_channels.append(channels)
            if level != last_level:
                self.down.append(nn.ModuleList([Downsample(dims, channels)]))
                skip_channels.append(channels)

        middle: list[nn.Module] = [ResBlock(dims, channels, channels, embed_dim, config)]
        if config.attention_resolutions:
            middle.append(AttentionBlock(channels, config))
        middle.append(ResBlock(dims, channels, channels, embed_dim, config))
        self.middle = nn.ModuleList(middle)

        # Decoder: one more block per level than the encoder, to consume the downsample's skip too.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mults))):
            for block in range(config.num_res_blocks + 1):
                stage = self._stage(dims, channels + skip_channels.pop(), base * mult, level, config)
                channels = base * mult
                if level != 0 and block == config.num_res_blocks:
                    stage.append(Upsample(dims, channels))
                self.up.append(stage)
        assert not skip_channels

        self.out = nn.Sequential(
            nn.GroupNorm(_groups(channels, config.num_groups), channels),
            nn.SiLU(),
            conv(channels, out_channels, 3, padding=1),  # default init: the output is x0, not a residual
        )

    @staticmethod
    def _stage(dims: int, in_ch: int, out_ch: int, level: int, config: UNetConfig) -> nn.ModuleList:
        stage = nn.ModuleList([ResBlock(dims, in_ch, out_ch, config.embed_dim, config)])
        if level in config.attention_resolutions:
            stage.append(AttentionBlock(out_ch, config))
        return stage

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        spatial = x.shape[2:]
        factor = self.config.downsample_factor
        if len(spatial) != self.dims or any(s % factor for s in spatial):
            raise ValueError(
                f"UNet(dims={self.dims}) needs {self.dims} spatial sizes divisible by {factor}, got {tuple(spatial)}"
            )
        t = _as_batch_timesteps(t, x)
        emb = self.time_embed(t, cond)

        h = self.input_conv(x)
        skips = [h]
        for stage in self.down:
            for layer in stage:
                h = layer(h, emb)
            skips.append(h)
        for layer in self.middle:
            h = layer(h, emb)
        for stage in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            for layer in stage:
                h = layer(h, emb)
        return self.out(h)


def _as_batch_timesteps(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Accept a Python number, a scalar tensor or (B,) timesteps; return (B,) on x's device."""
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"timesteps must be a scalar or shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t


def _pad_to_multiple(x: torch.Tensor, multiple: int, num_spatial: int) -> torch.Tensor:
    """Zero-pad the last ``num_spatial`` dims at their far end up to a multiple of ``multiple``."""
    pads: list[int] = []
    for size in reversed(x.shape[-num_spatial:]):  # F.pad lists the last dim first
        pads += [0, -size % multiple]
    return F.pad(x, pads) if any(pads) else x


# --------------------------------------------------------------------------- representation denoisers


class _GridDenoiser(nn.Module):
    """A U-Net denoiser of feature grids of ``resolution`` cells a side. The input may carry more
    channels per cell than the output (e.g. separate groups of clean-context and noisy-target
    evidence); the output is always one clean grid of ``channels``."""

    spatial_dims: int  # of the U-Net: 2 (a triplane rolled out into one image) or 3 (a voxel grid)

    def __init__(self, channels: int, resolution: int, config: UNetConfig, in_channels: int | None = None):
        super().__init__()
        self.channels, self.resolution = channels, resolution
        self.in_channels = in_channels or channels
        self.unet = UNet(self.spatial_dims, self.in_channels, channels, config)


class TriplaneDenoiser(_GridDenoiser):
    """(B, 3, C, R, R) triplane -> clean (B, 3, C, R, R) triplane, through one 2D U-Net.

    The three planes are "rolled out" side by side into one (B, C, R', 3R') image rather than
    batched as three independent images: the xy, xz and yz planes describe the same 3D points, and
    only when they share one image can convolutions (at coarse levels, where the receptive field
    spans plane borders) and attention exchange information between them — what a 3D-consistent
    denoiser needs — at the cost of a 2D, not a 3D, network. Each plane is padded on its own to
    R' (a multiple of the downsampling factor) before the roll-out, so 3R' is divisible too and
    plane borders coincide with the downsampling grid (no coarse cell straddles two planes).
    """

    spatial_dims = 2

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        b, planes, c, r, r2 = x.shape
        if (planes, c, r, r2) != (3, self.in_channels, self.resolution, self.resolution):
            raise ValueError(
                f"expected triplanes (B, 3, {self.in_channels}, {self.resolution}, {self.resolution}), got {tuple(x.shape)}"
            )
        padded = _pad_to_multiple(x, self.unet.config.downsample_factor, num_spatial=2)
        rp = padded.shape[-1]
        rolled = padded.permute(0, 2, 3, 1, 4).reshape(b, c, rp, 3 * rp)  # planes along the width
        out = self.unet(rolled, t, cond)
        unrolled = out.reshape(b, self.channels, rp, 3, rp).permute(0, 3, 1, 2, 4)
        return unrolled[..., :r, :r].contiguous()


class VoxelDenoiser(_GridDenoiser):
    """(B, C, R, R, R) feature grid -> clean grid of the same shape, through a 3D U-Net."""

    spatial_dims = 3

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        expected = (self.in_channels,) + (self.resolution,) * 3
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected voxel grids (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        r = self.resolution
        out = self.unet(_pad_to_multiple(x, self.unet.config.downsample_factor, num_spatial=3), t, cond)
        return out[..., :r, :r, :r].contiguous()


class _MLPBlock(nn.Module):
    """Pre-norm residual MLP block; the time embedding scales and shifts the normalised input."""

    def __init__(self, hidden: int, embed_dim: int, config: UNetConfig):
        super().__init__()
        self.use_checkpoint = config.use_checkpoint
        self.norm = nn.LayerNorm(hidden)
        self.emb_proj = nn.Linear(embed_dim, 2 * hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(config.dropout)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return _maybe_checkpoint(self.use_checkpoint, self._forward, x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.emb_proj(F.silu(emb)).chunk(2, dim=1)
        h = self.norm(x) * (1 + scale) + shift
        h = self.fc2(self.dropout(F.silu(self.fc1(F.silu(h)))))
        return x + h


class MLPDenoiser(nn.Module):
    """(B, P) flat MLP-representation weights -> clean (B, P), via a timestep-conditioned residual MLP."""

    def __init__(self, num_params: int, config: UNetConfig, in_params: int | None = None):
        super().__init__()
        self.num_params = num_params
        self.in_params = in_params or num_params
        hidden = config.mlp_hidden or config.base_channels * config.channel_mults[-1]
        embed_dim = config.embed_dim
        self.time_embed = TimestepEmbedder(config.base_channels, embed_dim, config.cond_dim)
        self.input = nn.Linear(self.in_params, hidden)
        self.blocks = nn.ModuleList([_MLPBlock(hidden, embed_dim, config) for _ in range(config.mlp_blocks)])
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, num_params))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_params:
            raise ValueError(f"expected flat parameters (B, {self.in_params}), got {tuple(x.shape)}")
        emb = self.time_embed(_as_batch_timesteps(t, x), cond)
        h = self.input(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)


def build_denoiser(kind: DenoiserKind, shape: tuple[int, ...], config: UNetConfig, input_groups: int = 1) -> nn.Module:
    """The denoiser for one representation kind, from its per-object shape (no batch dim).

    triplane: (3, C, R, R); voxel: (C, R, R, R); mlp: (P,). ``input_groups`` > 1: the input has
    that many representation-shaped groups stacked along the channel axis (triplane: (3, G*C, R, R),
    voxel: (G*C, R, R, R), mlp: (G*P,)); the output is one representation.
    """
    if input_groups < 1:
        raise ValueError(f"input_groups must be >= 1, got {input_groups}")
    shape = tuple(int(s) for s in shape)
    if kind == "triplane":
        if len(shape) != 4 or shape[0] != 3 or shape[2] != shape[3]:
            raise ValueError(f"triplane shape must be (3, C, R, R), got {shape}")
        return TriplaneDenoiser(shape[1], shape[2], config, in_channels=input_groups * shape[1])
    if kind == "voxel":
        if len(shape) != 4 or not shape[1] == shape[2] == shape[3]:
            raise ValueError(f"voxel shape must be (C, R, R, R), got {shape}")
        return VoxelDenoiser(shape[0], shape[1], config, in_channels=input_groups * shape[0])
    if kind == "mlp":
        if len(shape) != 1:
            raise ValueError(f"mlp shape must be (P,), got {shape}")
        return MLPDenoiser(shape[0], config, in_params=input_groups * shape[0])
    raise ValueError(f"unknown denoiser kind {kind!r}; expected one of 'triplane', 'voxel', 'mlp'")
