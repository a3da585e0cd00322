"""Model library: representations, renderer, GOEmbed, denoiser, diffusion (see DESIGN.md §1)."""
