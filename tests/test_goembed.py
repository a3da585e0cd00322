"""GOEmbed against finite differences and against the geometry of the rays it splats along."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.cameras import intrinsics_from_fov, look_at_c2w
from model_zoo.goembed import RayBatch, goembed
from model_zoo.rays import view_rays
from model_zoo.renderer import FieldDecoder, VolumeRenderer
from model_zoo.representations import build_representation


def make_renderer(kind: str, resolution: int = 6, samples: int = 12, dtype=torch.float64) -> VolumeRenderer:
    torch.manual_seed(0)
    kwargs = {"channels": 3} if kind == "mlp" else {"channels": 3, "resolution": resolution}
    rep = build_representation(kind, **kwargs)
    renderer = VolumeRenderer(rep, FieldDecoder(rep.feature_dim, hidden=8, layers=1), samples_per_ray=samples)
    return renderer.to(dtype)


def camera_rays(eyes, size=5, dtype=torch.float64, rays=None):
    """Rays of views looking at the origin from ``eyes``; colours are a fixed pattern."""
    K = torch.tensor(np.stack([intrinsics_from_fov(size, size, 0.9)] * len(eyes)), dtype=dtype)[None]
    c2w = torch.tensor(np.stack([look_at_c2w(np.array(e, dtype=float), np.zeros(3)) for e in eyes]), dtype=dtype)[None]
    origins, directions = view_rays(K, c2w, size, size, rays)
    count = origins.shape[2]
    generator = torch.Generator().manual_seed(1)
    colours = torch.rand(1, len(eyes), count, 3, generator=generator, dtype=dtype)
    return RayBatch(origins.reshape(1, -1, 3), directions.reshape(1, -1, 3), colours.reshape(1, -1, 3), len(eyes))


def mse_loss(renderer, state, rays, background):
    out = renderer.render_rays(state, rays.origins, rays.directions, background)
    return ((out.rgb - rays.colours) ** 2).sum() / (rays.rays_per_view * 3)


@pytest.mark.parametrize("kind", ["voxel", "triplane", "mlp"])
def test_goembed_equals_finite_differences(kind):
    renderer = make_renderer(kind)
    rays = camera_rays([[2.5, 0.3, 0.4], [-0.5, 2.6, 0.8]])
    background = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
    encoding = goembed(renderer, rays, background, normalisation="sum")
    origin = renderer.representation.origin(1, dtype=torch.float64)
    flat = origin.reshape(-1)
    # Check the coordinates with the largest encodings plus a few random ones.
    candidates = set(encoding.reshape(-1).abs().topk(5).indices.tolist())
    candidates |= set(torch.randint(0, flat.numel(), (5,), generator=torch.Generator().manual_seed(2)).tolist())
    eps = 1e-6
    for i in candidates:
        plus, minus = flat.clone(), flat.clone()
        plus[i] += eps
        minus[i] -= eps
        derivative = (mse_loss(renderer, plus.reshape(origin.shape), rays, background)
                      - mse_loss(renderer, minus.reshape(origin.shape), rays, background)) / (2 * eps)
        torch.testing.assert_close(encoding.reshape(-1)[i], -derivative, rtol=1e-5, atol=1e-9)
    assert encoding.abs().max() > 0


def touched_voxels(renderer, rays, resolution):
    """Cells whose trilinear footprint contains some sample point of these rays (independent of autograd)."""
    out = renderer.render_rays(renderer.representation.origin(1, dtype=torch.float64), rays.origins, rays.directions,
                               torch.ones(1, 3, dtype=torch.float64), keep_samples=True)
    points = out.points.reshape(-1, 3)
    # align_corners=False: cell i's centre is at -1 + (2i + 1) / R; a point reads the 2 nearest per axis.
    continuous = (points + 1) * resolution / 2 - 0.5
    lower = continuous.floor().long()
    touched = torch.zeros(resolution, resolution, resolution, dtype=torch.bool)
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                idx = (lower + torch.tensor([dx, dy, dz])).clamp(0, resolution - 1)
                touched[idx[:, 2], idx[:, 1], idx[:, 0]] = True  # state is (C, z, y, x)
    return touched


def test_single_view_splats_only_along_its_rays_and_zero_elsewhere():
    resolution = 10
    renderer = make_renderer("voxel", resolution=resolution, samples=24)
    # A narrow bundle: 3 pixels of one view.
    rays = camera_rays([[3.0, 0.2, 0.1]], size=9, rays=torch.tensor([[[40, 41, 30]]]))
    encoding = goembed(renderer, rays, torch.ones(1, 3, dtype=torch.float64), normalisation="sum")[0]
    nonzero = encoding.abs().amax(dim=0) > 0  # over channels -> (z, y, x)
    touched = touched_voxels(renderer, rays, resolution)
    assert nonzero.any()
    assert not (nonzero & ~touched).any(), "GOEmbed wrote into cells no ray reads"
    assert nonzero.sum() < 0.2 * nonzero.numel()  # a thin bundle touches few cells
    # A second view adds cells along its own rays only.
    both = camera_rays([[3.0, 0.2, 0.1], [0.1, 3.0, 0.2]], size=9, rays=torch.tensor([[[40, 41, 30], [40, 41, 30]]]))
    encoding_both = goembed(renderer, both, torch.ones(1, 3, dtype=torch.float64), normalisation="sum")[0]
    added = (encoding_both - encoding).abs().amax(dim=0) > 1e-12
    second = camera_rays([[0.1, 3.0, 0.2]], size=9, rays=torch.tensor([[[40, 41, 30]]]))
    assert added.any() and not (added & ~touched_voxels(renderer, second, resolution)).any()


@pytest.mark.parametrize("kind", ["voxel", "triplane", "mlp"])
@pytest.mark.parametrize("normalisation", ["sum", "views", "coverage"])
def test_goembed_works_for_every_representation_and_normalisation(kind, normalisation):
    renderer = make_renderer(kind, dtype=torch.float32)
    rays = camera_rays([[2.5, 0.3, 0.4], [-0.5, 2.6, 0.8], [0.3, -0.4, -2.7]], size=6, dtype=torch.float32)
    background = torch.ones(1, 3)
    encoding = goembed(renderer, rays, background, normalisation=normalisation)
    assert encoding.shape == (1, *renderer.representation.state_shape)
    assert torch.isfinite(encoding).all() and encoding.abs().max() > 0
    empty = RayBatch(rays.origins[:, :0], rays.directions[:, :0], rays.colours[:, :0], 0)
    assert torch.equal(goembed(renderer, empty, background, normalisation=normalisation),
                       torch.zeros_like(encoding))


def test_create_graph_lets_a_loss_on_the_encoding_train_the_decoder():
    renderer = make_renderer("triplane", dtype=torch.float32)
    rays = camera_rays([[2.5, 0.3, 0.4]], size=6, dtype=torch.float32)
    encoding = goembed(renderer, rays, torch.ones(1, 3), create_graph=True)
    encoding.square().sum().backward()
    grads = [p.grad for p in renderer.decoder.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    detached = goembed(renderer, rays, torch.ones(1, 3), create_graph=False)
    assert not detached.requires_grad
