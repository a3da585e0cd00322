"""Named model sizes, from a CPU test model (``tiny``) to one that needs ZeRO-3 (``large``).

A preset fixes everything about the *networks'* size: the 3D representation's resolution and
feature channels, the renderer's field decoder ψ, the denoiser U-Net, and the per-step ray budget
that sets the renderer's memory. Run-level choices (learning rate, batch size, data) live in the
training config, which names a preset.

Denoiser parameters (``count_parameters(build_denoiser(kind, shape, preset.denoiser_config(kind)))``):

    preset   triplane   voxel
    tiny       0.30M     0.76M   (CPU tests: well under 1M for the triplane denoiser)
    small     13.2M     34.0M
    base      77.6M    197.7M
    large    442.0M    278.5M   (voxel uses the lighter ``voxel_unet``; needs ZeRO-3 at scale)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from model_zoo.unet import UNetConfig


@dataclass(frozen=True)
class ModelPreset:
    name: str
    # Triplane ζ: 3 x C x R x R.
    triplane_resolution: int
    triplane_channels: int
    # Voxel ζ: C x R x R x R (cubic growth: kept coarser than the triplane at the same budget).
    voxel_resolution: int
    voxel_channels: int
    # Field decoder ψ: sampled feature -> (density, colour) MLP.
    decoder_hidden: int
    decoder_layers: int
    unet: UNetConfig
    # Points per ray (stratified inside the object's box) and rays rendered per target view per step.
    samples_per_ray: int
    rays_per_view: int
    # Optional lighter U-Net for voxel grids: 3x3x3 kernels cost 3x the parameters of 3x3 ones and
    # activations grow with R^3, so the triplane's U-Net is often too big in 3D. None = same as `unet`.
    voxel_unet: UNetConfig | None = None

    def denoiser_config(self, kind: str) -> UNetConfig:
        """The U-Net config for a representation kind ("triplane", "voxel" or "mlp")."""
        if kind == "voxel" and self.voxel_unet is not None:
            return self.voxel_unet
        return self.unet

    def triplane_shape(self) -> tuple[int, int, int, int]:
        return (3, self.triplane_channels, self.triplane_resolution, self.triplane_resolution)

    def voxel_shape(self) -> tuple[int, int, int, int]:
        return (self.voxel_channels,) + (self.voxel_resolution,) * 3


# One preset a row, the fields in the same order in every row, so the sizes compare at a glance.
PRESETS: dict[str, ModelPreset] = {preset.name: preset for preset in (
    # Seconds per step on a laptop CPU; what the test suite and the embedded default run.
    ModelPreset("tiny", triplane_resolution=16, triplane_channels=8, voxel_resolution=16, voxel_channels=8,
                decoder_hidden=32, decoder_layers=2, samples_per_ray=16, rays_per_view=256,
                unet=UNetConfig(base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=1, attention_resolutions=(2,))),
    # One GPU, quick experiments.
    ModelPreset("small", triplane_resolution=32, triplane_channels=16, voxel_resolution=32, voxel_channels=8,
                decoder_hidden=64, decoder_layers=3, samples_per_ray=48, rays_per_view=1024,
                unet=UNetConfig(base_channels=64, channel_mults=(1, 2, 2, 4), num_res_blocks=1,
                                attention_resolutions=(3,))),
    # A node of GPUs; DFM-like sampling budget (64 + 64 samples per ray).
    ModelPreset("base", triplane_resolution=64, triplane_channels=32, voxel_resolution=32, voxel_channels=16,
                decoder_hidden=128, decoder_layers=4, samples_per_ray=128, rays_per_view=2048,
                unet=UNetConfig(base_channels=128, channel_mults=(1, 2, 2, 4), num_res_blocks=2,
                                attention_resolutions=(2, 3), dropout=0.1, use_checkpoint=True)),
    # Multi-node with ZeRO-3: hundreds of millions of denoiser parameters.
    ModelPreset("large", triplane_resolution=128, triplane_channels=32, voxel_resolution=64, voxel_channels=16,
                decoder_hidden=256, decoder_layers=4, samples_per_ray=128, rays_per_view=4096,
                unet=UNetConfig(base_channels=256, channel_mults=(1, 2, 4, 4), num_res_blocks=2,
                                attention_resolutions=(2, 3), dropout=0.1, num_groups=32, use_checkpoint=True),
                voxel_unet=UNetConfig(base_channels=128, channel_mults=(1, 2, 4, 4), num_res_blocks=2,
                                      attention_resolutions=(3,), dropout=0.1, num_groups=32, use_checkpoint=True)),
)}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (works on the meta device: only shapes are read)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
