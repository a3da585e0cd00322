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


def representation_kwargs(kind: str, resolution: int = 6, channels: int = 3) -> dict:
    if kind == "mlp":
        return {"channels": channels}
    if kind == "hashgrid":  # 3 levels (2, 4, 8 cells a side): the finest is hashed into 2^8 rows
        return {"channels": channels, "levels": 3, "log2_table_size": 8, "base_resolution": 2, "max_resolution": 8}
    return {"channels": channels, "resolution": resolution}


def make_renderer(kind: str, resolution: int = 6, samples: int = 12, dtype=torch.float64, channels: int = 3,
                  layers: int = 1, **decoder) -> VolumeRenderer:
    torch.manual_seed(0)
    rep = build_representation(kind, **representation_kwargs(kind, resolution, channels))
    renderer = VolumeRenderer(rep, FieldDecoder(rep.feature_dim, hidden=8, layers=layers, **decoder), samples_per_ray=samples)
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


@pytest.mark.parametrize("kind", ["voxel", "triplane", "mlp", "hashgrid"])
def test_goembed_equals_finite_differences(kind):
    renderer = make_renderer(kind)
    rays = camera_rays([[2.5, 0.3, 0.4], [-0.5, 2.6, 0.8]])
    background = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
    encoding = goembed(renderer, rays, background, normalisation="sum")  # the closed form for grids
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


@pytest.mark.parametrize("kind", ["voxel", "triplane", "mlp", "hashgrid"])
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


# -- the closed form ------------------------------------------------------------------------------

GRIDS = ["voxel", "triplane", "hashgrid"]


def dropped_view_weights(rays: RayBatch) -> torch.Tensor:
    """Ray weights that drop the second view and half-weight the third (context dropout, generalised)."""
    weights = torch.ones(rays.origins.shape[:2], dtype=rays.origins.dtype)
    n = rays.rays_per_view
    weights[:, n:2 * n] = 0.0
    weights[:, 2 * n:3 * n] = 0.5
    return weights


def three_views(dtype, size=5):
    return camera_rays([[2.5, 0.3, 0.4], [-0.5, 2.6, 0.8], [0.3, -0.4, -2.7]], size=size, dtype=dtype)


@pytest.mark.parametrize("kind", GRIDS)
@pytest.mark.parametrize("normalisation", ["sum", "views", "coverage"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("log_density", [False, True])
def test_closed_form_equals_autograd_goembed_and_trains_psi_the_same(kind, normalisation, weighted, dtype, log_density):
    renderer = make_renderer(kind, dtype=dtype, channels=5, layers=2)
    rays = three_views(dtype)
    if weighted:
        rays.ray_weights = dropped_view_weights(rays)
    background = torch.tensor([[0.2, 0.9, 0.6]], dtype=dtype)
    reference = goembed(renderer, rays, background, create_graph=True, normalisation=normalisation, method="autograd",
                        log_density=log_density)
    closed = goembed(renderer, rays, background, create_graph=True, normalisation=normalisation, method="closed_form",
                     log_density=log_density)
    scale = reference.abs().max()
    assert scale > 0
    difference = (closed - reference).abs().max()
    if dtype == torch.float64:
        assert difference < 1e-5 and difference / scale < 1e-9
    else:
        assert difference / scale < 1e-4
    # The same gradient into ψ, for a loss on the encoding (the autograd path: second order).
    probe = torch.randn(reference.shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    parameters = list(renderer.decoder.parameters())
    grads_reference = torch.autograd.grad((reference * probe).sum(), parameters)
    grads_closed = torch.autograd.grad((closed * probe).sum(), parameters)
    for a, b in zip(grads_reference, grads_closed):
        # fp32: σ₀ (~0.01) scales the log-density gradients down, and rounding with them (seen: 1.06e-4).
        fp32 = 3e-4 if log_density else 1e-4
        tolerance = (1e-9 if dtype == torch.float64 else fp32) * max(float(a.abs().max()), 1e-30)
        assert (a - b).abs().max() <= tolerance


def test_auto_picks_the_closed_form_only_where_it_is_exact():
    from model_zoo.goembed import closed_form_applies

    assert closed_form_applies(make_renderer("voxel")) and closed_form_applies(make_renderer("hashgrid"))
    assert not closed_form_applies(make_renderer("mlp"))
    assert not closed_form_applies(make_renderer("triplane", point_frequencies=2))  # J varies with the point
    with pytest.raises(ValueError, match="closed_form"):
        goembed(make_renderer("mlp"), three_views(torch.float64), torch.ones(1, 3, dtype=torch.float64), method="closed_form")


def test_closed_form_evaluates_the_decoder_once_not_per_sample():
    renderer = make_renderer("voxel", dtype=torch.float32)
    calls = []
    handle = renderer.decoder.register_forward_hook(lambda module, args, kwargs, out: calls.append(args[0].shape),
                                                    with_kwargs=True)
    goembed(renderer, three_views(torch.float32), torch.ones(1, 3), create_graph=True)
    handle.remove()
    assert calls == [torch.Size([1, renderer.representation.feature_dim])]  # ψ(0) and J, through __call__


def test_closed_form_is_dtype_robust_under_bf16_autocast():
    renderer = make_renderer("triplane", dtype=torch.float32)
    rays = three_views(torch.float32)
    reference = goembed(renderer, rays, torch.ones(1, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = goembed(renderer, rays, torch.ones(1, 3))
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    # Only ψ(0) and J are computed in bf16 (3 significant digits); the splat and normalisation are fp32.
    assert (low - reference).abs().max() < 0.05 * reference.abs().max()
    # A model cast to bf16 (as DeepSpeed does) with fp32 rays: fp32 encoding, bf16 gradients into ψ.
    renderer.to(torch.bfloat16)
    cast = goembed(renderer, rays, torch.ones(1, 3), create_graph=True)
    assert cast.dtype == torch.float32 and (cast - reference).abs().max() < 0.05 * reference.abs().max()
    cast.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in renderer.decoder.parameters())


# -- scale-free coverage normalisation -----------------------------------------------------------

def repeat_rays(rays: RayBatch, times: int) -> RayBatch:
    """Every ray of every view ``times`` times (rays per view × times)."""
    def rep(t):
        v = t.reshape(t.shape[0], rays.num_views, rays.rays_per_view, *t.shape[2:])
        return v.repeat_interleave(times, dim=2).reshape(t.shape[0], -1, *t.shape[2:])
    return RayBatch(rep(rays.origins), rep(rays.directions), rep(rays.colours), rays.num_views,
                    None if rays.ray_weights is None else rep(rays.ray_weights))


def repeat_views(rays: RayBatch, times: int) -> RayBatch:
    cat = lambda t: torch.cat([t] * times, dim=1)  # noqa: E731
    return RayBatch(cat(rays.origins), cat(rays.directions), cat(rays.colours), rays.num_views * times,
                    None if rays.ray_weights is None else cat(rays.ray_weights))


@pytest.mark.parametrize("kind", [*GRIDS, "mlp"])
def test_coverage_normalisation_is_unchanged_when_rays_views_or_samples_are_scaled(kind):
    renderer = make_renderer(kind, samples=24)
    rays = three_views(torch.float64, size=6)
    background = torch.ones(1, 3, dtype=torch.float64)
    base = goembed(renderer, rays, background, normalisation="coverage")
    assert base.abs().max() > 0
    for scaled in (repeat_rays(rays, 3), repeat_views(rays, 2)):
        torch.testing.assert_close(goembed(renderer, scaled, background, normalisation="coverage"), base,
                                   rtol=1e-9, atol=1e-12)
    # Samples: a finer quadrature of the same integrals; equal up to the quadrature error.
    finer = make_renderer(kind, samples=96)
    coarse, fine = (goembed(r, rays, background, normalisation="coverage") for r in (make_renderer(kind, samples=48), finer))
    relative = (coarse - fine).norm() / fine.norm()
    assert relative < 0.05, relative
    # Nor with the origin's density (σ₀ = 0.01 vs 0.001): the raw gradient is proportional to it.
    thinner = make_renderer(kind, samples=24, origin_density=0.001)
    ratio = goembed(thinner, rays, background, normalisation="coverage").norm() / base.norm()
    assert 0.8 < ratio < 1.25, ratio
    # The raw gradient is not scale-free (it doubles with the views); that is what normalisation is for.
    raw = goembed(renderer, rays, background, normalisation="sum")
    torch.testing.assert_close(goembed(renderer, repeat_views(rays, 2), background, normalisation="sum"), 2 * raw)


def test_coverage_floor_is_relative_to_the_coverage_scale():
    """An absolute floor would dominate a sparse coverage; the relative floor never exceeds eps x the mean."""
    renderer = make_renderer("voxel", samples=24)
    rays = three_views(torch.float64, size=6)
    background = torch.ones(1, 3, dtype=torch.float64)
    tight = goembed(renderer, rays, background, normalisation="coverage", coverage_eps=1e-9)
    default = goembed(renderer, rays, background, normalisation="coverage")
    loose = goembed(renderer, rays, background, normalisation="coverage", coverage_eps=10.0)
    # Well-covered cells barely feel the default floor; a floor 10x the mean shrinks everything.
    assert (default - tight).abs().max() < 0.5 * tight.abs().max()
    assert loose.abs().max() < 0.2 * tight.abs().max()


# -- blank origin ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", GRIDS)
def test_origin_opacity_is_reported_and_stays_blank_when_psi_changes(kind):
    renderer = make_renderer(kind, dtype=torch.float32, layers=2)
    rays = three_views(torch.float32)
    background = torch.ones(1, 3)
    _, stats = goembed(renderer, rays, background, return_stats=True)
    first = float(stats["origin_opacity"])
    with torch.no_grad():  # "training" ψ: any weights at all
        for p in renderer.decoder.parameters():
            p.add_(torch.randn_like(p) * 3)
    _, stats = goembed(renderer, rays, background, return_stats=True)
    _, reference = goembed(renderer, rays, background, return_stats=True, method="autograd")
    # σ(0) = origin_density exactly, so the opacity of a ray of length ℓ is 1 - exp(-0.01 ℓ): 1.4-3.4% in the box.
    assert 0.005 < first < 0.035 and abs(float(stats["origin_opacity"]) - first) < 1e-6
    assert abs(float(reference["origin_opacity"]) - first) < 1e-6


def test_hash_grid_encoding_lands_only_in_the_rows_its_rays_read():
    renderer = make_renderer("hashgrid", samples=24)
    rep = renderer.representation
    rays = camera_rays([[3.0, 0.2, 0.1]], size=9, rays=torch.tensor([[[40, 41, 30]]]))
    encoding = goembed(renderer, rays, torch.ones(1, 3, dtype=torch.float64), normalisation="sum")[0]
    out = renderer.render_rays(rep.origin(1, dtype=torch.float64), rays.origins, rays.directions,
                               torch.ones(1, 3, dtype=torch.float64), keep_samples=True)
    rows, _ = rep.corners(out.points.reshape(1, -1, 3))
    read = torch.zeros(rep.levels * rep.table_size, dtype=torch.bool)
    read[rows.reshape(-1)] = True
    written = encoding.abs().amax(dim=-1).reshape(-1) > 0  # (L*T,)
    assert written.any() and not (written & ~read).any(), "GOEmbed wrote into hash rows no sample reads"
    assert written.sum() < 0.5 * written.numel()


# -- variants that carry more than unprojection ---------------------------------------------------

def encoding_rank(renderer, encoding) -> int:
    rep = renderer.representation
    state = encoding[0]
    block = state.reshape(rep.channels, -1) if rep.kind == "voxel" else state[0].reshape(rep.channels, -1)
    singular = torch.linalg.svdvals(block)
    return int((singular > 1e-6 * singular.max()).sum())


@pytest.mark.parametrize("kind", ["voxel", "triplane"])
def test_zero_origin_is_rank_4_and_the_variants_are_not(kind):
    rays = three_views(torch.float64, size=8)
    background = torch.ones(1, 3, dtype=torch.float64)
    zero = make_renderer(kind, channels=8, layers=2)
    assert encoding_rank(zero, goembed(zero, rays, background)) == 4  # Jᵀ times 4 channels
    positional = make_renderer(kind, channels=8, layers=2, point_frequencies=2)
    assert encoding_rank(positional, goembed(positional, rays, background)) == 8
    for origin in ("random", "learned"):
        torch.manual_seed(0)
        rep = build_representation(kind, **representation_kwargs(kind, channels=8), origin=origin)
        renderer = VolumeRenderer(rep, FieldDecoder(rep.feature_dim, hidden=8, layers=2), samples_per_ray=12).double()
        assert encoding_rank(renderer, goembed(renderer, rays, background)) == 8


def test_random_origin_goembed_equals_finite_differences_and_a_learned_origin_trains():
    torch.manual_seed(0)
    rep = build_representation("voxel", channels=3, resolution=6, origin="random", origin_scale=0.5)
    renderer = VolumeRenderer(rep, FieldDecoder(rep.feature_dim, hidden=8, layers=1), samples_per_ray=12).double()
    rays = camera_rays([[2.5, 0.3, 0.4], [-0.5, 2.6, 0.8]])
    background = torch.ones(1, 3, dtype=torch.float64)
    encoding = goembed(renderer, rays, background, normalisation="sum")
    origin = rep.origin(1, dtype=torch.float64)
    flat = origin.reshape(-1)
    for i in encoding.reshape(-1).abs().topk(4).indices.tolist():
        plus, minus = flat.clone(), flat.clone()
        plus[i] += 1e-6
        minus[i] -= 1e-6
        derivative = (mse_loss(renderer, plus.reshape(origin.shape), rays, background)
                      - mse_loss(renderer, minus.reshape(origin.shape), rays, background)) / 2e-6
        torch.testing.assert_close(encoding.reshape(-1)[i], -derivative, rtol=1e-5, atol=1e-9)
    learned = build_representation("voxel", channels=3, resolution=6, origin="learned")
    trainable = VolumeRenderer(learned, FieldDecoder(3, hidden=8, layers=1), samples_per_ray=12).double()
    goembed(trainable, rays, background, create_graph=True).square().sum().backward()
    assert learned._origin_param.grad is not None and learned._origin_param.grad.abs().sum() > 0
    with torch.no_grad():  # evaluation: still an encoding, no graph
        assert not goembed(trainable, rays, background).requires_grad
