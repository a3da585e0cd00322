"""Baseline encodings of posed views into a representation, to compare GOEmbed against.

* ``unprojection``: every cell gets the mean colour of the pixels whose rays cross it (and the
  fraction of rays that did), the classic "lift pixels into the volume" encoding. It needs a
  grid representation (cells that rays cross); an MLP's weights have no cells.
* ``zeros``: no information at all (the model must work from its prior alone).
"""

from __future__ import annotations

import torch

from model_zoo.goembed import RayBatch
from model_zoo.rays import intersect_box, stratified_depths
from model_zoo.renderer import VolumeRenderer


def unprojection(renderer: VolumeRenderer, rays: RayBatch, samples_per_ray: int | None = None) -> torch.Tensor:
    """(B, *state_shape): channels 0-2 hold the mean RGB of the rays crossing each cell, channel 3
    the share of samples that reached it (0 where none did); other channels are zero."""
    representation = renderer.representation
    if not representation.is_grid:
        raise ValueError(f"unprojection needs a grid representation, not {representation.kind!r}")
    channels = getattr(representation, "channels", 0)
    if channels < 4:
        raise ValueError(f"unprojection needs >= 4 feature channels (RGB + count), the representation has {channels}")
    batch = rays.origins.shape[0]
    samples = samples_per_ray or renderer.samples_per_ray
    t_near, t_far, hit = intersect_box(rays.origins, rays.directions, renderer.box_half_size)
    depths, _ = stratified_depths(t_near, t_far, samples, stratified=False)
    points = rays.origins.unsqueeze(2) + depths.unsqueeze(-1) * rays.directions.unsqueeze(2)
    points = (points / renderer.box_half_size).clamp(-1, 1).reshape(batch, -1, 3)
    # Every sample of a ray that hits the box carries (r, g, b, 1) into the channels it reads.
    # (dropped views, see RayBatch.ray_weights, carry nothing).
    payload = torch.cat([rays.colours, torch.ones_like(rays.colours[..., :1])], dim=-1) * hit.unsqueeze(-1)
    if rays.ray_weights is not None:
        payload = payload * rays.ray_weights.unsqueeze(-1)
    payload = payload.unsqueeze(2).expand(-1, -1, samples, -1).reshape(batch, -1, 4)
    probe = torch.zeros(batch, *representation.state_shape, device=points.device, dtype=points.dtype, requires_grad=True)
    with torch.enable_grad():
        features = representation.sample(probe, points)  # (B, M, F): F = blocks of `channels`
        blocks = features.shape[-1] // channels
        cotangent = torch.zeros_like(features).view(batch, -1, blocks, channels)
        cotangent[..., :4] = payload.unsqueeze(2)
        (splat,) = torch.autograd.grad(features, probe, grad_outputs=cotangent.view_as(features))
    # Channels live in dim 1 (voxel: C, z, y, x), dim 2 (triplane: 3, C, R, R) or dim 3 (hash grid: L, T, C).
    channel_dim = representation.channel_axis + 1
    sums = splat.narrow(channel_dim, 0, 3)
    counts = splat.narrow(channel_dim, 3, 1)
    encoding = torch.zeros_like(splat)
    encoding.narrow(channel_dim, 0, 3).copy_(sums / counts.clamp_min(1e-6))
    total = counts.flatten(1).amax(dim=1).clamp_min(1e-6).view(batch, *([1] * (splat.dim() - 1)))
    encoding.narrow(channel_dim, 3, 1).copy_(counts / total)
    return encoding.detach()
