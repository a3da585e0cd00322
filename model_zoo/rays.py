"""Rays of OpenCV cameras, ray-box intersection and stratified samples along rays.

Conventions are those of data_pipeline/cameras.py: c2w camera-to-world, +z forward, pixel
(row i, column j) has its centre at continuous coordinates (j + 0.5, i + 0.5).
Directions are unit vectors, so distances along a ray (and depths) are in world units.
"""

from __future__ import annotations

import torch


def pixel_centers(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(H*W, 2) continuous (u, v) of every pixel centre, row-major."""
    v, u = torch.meshgrid(torch.arange(height, device=device, dtype=dtype) + 0.5,
                          torch.arange(width, device=device, dtype=dtype) + 0.5, indexing="ij")
    return torch.stack([u.reshape(-1), v.reshape(-1)], dim=-1)


def rays_from_pixels(K: torch.Tensor, c2w: torch.Tensor, uv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """World-space rays through pixel coordinates.

    K (..., 3, 3), c2w (..., 4, 4), uv (..., N, 2) -> origins (..., N, 3), unit directions (..., N, 3).
    """
    fx, fy = K[..., 0, 0, None], K[..., 1, 1, None]
    cx, cy = K[..., 0, 2, None], K[..., 1, 2, None]
    x = (uv[..., 0] - cx) / fx
    y = (uv[..., 1] - cy) / fy
    directions_cam = torch.stack([x, y, torch.ones_like(x)], dim=-1)
    directions = directions_cam @ c2w[..., :3, :3].transpose(-1, -2)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    origins = c2w[..., None, :3, 3].expand_as(directions)
    return origins, directions


def random_pixel_indices(batch: int, views: int, height: int, width: int, rays_per_view: int,
                         generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """(B, V, N) flat pixel indices drawn uniformly without replacement within each view."""
    scores = torch.rand(batch, views, height * width, generator=generator, device=device)
    return scores.topk(min(rays_per_view, height * width), dim=-1).indices


def patch_pixel_indices(batch: int, views: int, height: int, width: int, patch_size: int,
                        generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """(B, V, P*P) flat indices of one random square patch per view (as DFM renders)."""
    size = min(patch_size, height, width)
    top = torch.randint(0, height - size + 1, (batch, views, 1, 1), generator=generator, device=device)
    left = torch.randint(0, width - size + 1, (batch, views, 1, 1), generator=generator, device=device)
    rows = top + torch.arange(size, device=device).view(1, 1, size, 1)
    cols = left + torch.arange(size, device=device).view(1, 1, 1, size)
    return (rows * width + cols).reshape(batch, views, size * size)


def gather_pixels(images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """images (B, V, 3, H, W), indices (B, V, N) -> colours (B, V, N, 3)."""
    flat = images.flatten(3)  # (B, V, 3, H*W)
    picked = flat.gather(3, indices.unsqueeze(2).expand(-1, -1, flat.shape[2], -1))
    return picked.transpose(2, 3)


def view_rays(K: torch.Tensor, c2w: torch.Tensor, height: int, width: int,
              indices: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays of views (B, V): all pixels (N = H*W) or the flat ``indices`` (B, V, N)."""
    centers = pixel_centers(height, width, device=K.device, dtype=K.dtype)
    if indices is None:
        uv = centers.expand(*K.shape[:-2], -1, -1)
    else:
        uv = centers[indices]
    return rays_from_pixels(K, c2w, uv)


def spread_cameras(c2w: torch.Tensor, count: int) -> list[int]:
    """Indices of ``count`` of the cameras c2w (V, 4, 4), first 0, then each the one whose centre's
    direction from the origin is farthest from those already chosen (farthest-point sampling):
    views that together see as much of an object at the origin as so few can."""
    if not 1 <= count <= c2w.shape[0]:
        raise ValueError(f"count must be between 1 and the {c2w.shape[0]} cameras, got {count}")
    directions = torch.nn.functional.normalize(c2w[:, :3, 3].double(), dim=-1)
    chosen = [0]
    nearest = 1 - directions @ directions[0]  # cosine distance to the nearest chosen camera
    while len(chosen) < count:
        index = int(nearest.argmax())
        chosen.append(index)
        nearest = torch.minimum(nearest, 1 - directions @ directions[index])
    return chosen


def intersect_box(origins: torch.Tensor, directions: torch.Tensor, half_size: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slab test against the cube [-h, h]^3: (t_near, t_far, hit), each (...,)."""
    # Avoid division by zero for axis-parallel rays: a tiny direction gives a huge, correct-signed t.
    safe = torch.where(directions.abs() < 1e-9, torch.full_like(directions, 1e-9), directions)
    t0 = (-half_size - origins) / safe
    t1 = (half_size - origins) / safe
    t_near = torch.minimum(t0, t1).amax(dim=-1).clamp_min(0.0)
    t_far = torch.maximum(t0, t1).amin(dim=-1)
    hit = t_far > t_near
    return t_near, torch.where(hit, t_far, t_near), hit


def stratified_depths(t_near: torch.Tensor, t_far: torch.Tensor, samples_per_ray: int, stratified: bool,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample distances (..., S) in [t_near, t_far] and the interval length of each sample.

    One sample per equal bin: jittered uniformly in its bin when ``stratified`` (training),
    at the bin centre otherwise (deterministic evaluation).
    """
    bins = torch.arange(samples_per_ray, device=t_near.device, dtype=t_near.dtype)
    if stratified:
        # Drawn where the generator lives (a CPU generator may drive a CUDA model), then moved.
        draw = generator.device if generator is not None else t_near.device
        jitter = torch.rand(*t_near.shape, samples_per_ray, generator=generator, device=draw, dtype=t_near.dtype).to(t_near.device)
    else:
        jitter = torch.full((*t_near.shape, samples_per_ray), 0.5, device=t_near.device, dtype=t_near.dtype)
    step = ((t_far - t_near) / samples_per_ray).unsqueeze(-1)
    depths = t_near.unsqueeze(-1) + (bins + jitter) * step
    # Each sample stands for its own bin: quadrature with deltas = bin width is exact for a
    # piecewise-constant field and keeps sum(deltas) = t_far - t_near for any jitter.
    return depths, step.expand_as(depths)
