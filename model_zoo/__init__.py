"""Model library: representations, renderer, GOEmbed, denoiser, diffusion (see DESIGN.md §1)."""

from model_zoo.loading import load

__all__ = ["load"]
