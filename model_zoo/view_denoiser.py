"""A 2D denoiser of the noisy target view: x̂₀ = E[x₀ | x_t] by a U-Net, for ``image_colour`` to read.

Why: the renderer's colour at the noisy target's camera is what the sampler takes as x̂₀, and ζ̂
carries no colour (README, "Colour: where it is lost"). ``image_colour`` can read x_t itself, but
every way it does so is linear in x_t per pixel or per band (a blend, a Wiener shrink), and a
linear estimate of x₀ from white noise is Gaussian texture: unconditional samples came out grey
at high noise and colour speckle at low noise (README, "The own view's skip"). DFM instead runs a
2D network on x_t (with its time embedding) and renders from its pixel-aligned features: a
non-linear x̂₀ path. This is the smallest form of that: a timestep-conditioned 2D U-Net whose
output is an image, trained by its own x₀ loss and through the rendering loss; ``image_colour``
then reads that image in place of x_t.

EDM's preconditioning (Karras et al. 2022, Table 1), written for the variance-preserving
x_t = √ᾱ·x₀ + √(1−ᾱ)·ε with data std σ_d:

    x̂₀ = c_skip·x_t + c_out·F(c_in·x_t, t),    v = ᾱσ_d² + 1 − ᾱ,
    c_in = 1/√v,    c_skip = √ᾱ·σ_d²/v,    c_out = σ_d·√(1−ᾱ)/√v.

c_skip·x_t is the best linear estimate of x₀ (the per-pixel Wiener filter), so the network only
learns what no linear filter can: F = 0 is that filter, and as ᾱ → 1, x̂₀ → x_t exactly
(c_out → 0), so a sampler's last steps keep x_t's colour rather than shrinking it towards a mean.
"""

from __future__ import annotations

import torch
from torch import nn

from model_zoo.unet import UNet, UNetConfig

# σ_d of images in [−1, 1]: the EDM default, and about that of the renders (objects on a background).
DATA_STD = 0.5


class ViewDenoiser(nn.Module):
    """``forward(x_t (B, 3, H, W) in [−1, 1], t (B,) timesteps, alpha_bar (B,))`` -> x̂₀ (B, 3, H, W).

    H and W must be divisible by the U-Net's downsampling factor (4 for the tiny preset's)."""

    def __init__(self, config: UNetConfig, data_std: float = DATA_STD):
        super().__init__()
        if data_std <= 0:
            raise ValueError(f"ViewDenoiser data_std must be > 0, got {data_std}")
        self.data_std = data_std
        self.network = UNet(2, 3, 3, config)

    def coefficients(self, alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_in, c_skip, c_out), each (B, 1, 1, 1) in float32, for ᾱ (B,)."""
        a = alpha_bar.float().view(-1, 1, 1, 1)
        variance = a * self.data_std ** 2 + 1 - a
        return variance.rsqrt(), a.sqrt() * self.data_std ** 2 / variance, self.data_std * ((1 - a) / variance).sqrt()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        c_in, c_skip, c_out = self.coefficients(alpha_bar)
        dtype = self.network.input_conv.weight.dtype  # bf16 weights (a bf16 export) run in bf16
        residual = self.network((c_in * x_t.float()).to(dtype), t).float()
        return (c_skip * x_t.float() + c_out * residual).to(x_t.dtype)


__all__ = ["DATA_STD", "ViewDenoiser"]
