"""Renderer and rays against independently known results: analytic transmittance, projections."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data_pipeline.cameras import intrinsics_from_fov, look_at_c2w, project_points
from model_zoo.rays import (gather_pixels, intersect_box, patch_pixel_indices, pixel_centers, rays_from_pixels,
                            spread_cameras, view_rays)
from model_zoo.renderer import FieldDecoder, VolumeRenderer, composite
from model_zoo.representations import build_representation


class ConstantField(torch.nn.Module):
    """A decoder that ignores features: constant density and colour everywhere in the box."""

    def __init__(self, density: float, colour=(0.2, 0.4, 0.6)):
        super().__init__()
        self.density, self.colour = density, torch.tensor(colour, dtype=torch.float64)

    def forward(self, features):
        shape = features.shape[:-1]
        return torch.full(shape, self.density, dtype=features.dtype), self.colour.to(features.dtype).expand(*shape, 3)


def renderer_with(decoder, samples=64, half=1.0):
    return VolumeRenderer(build_representation("voxel", channels=1, resolution=4), decoder, samples, half)


@pytest.mark.parametrize("density", [0.0, 0.3, 2.0])
def test_transmittance_through_a_constant_density_slab_is_exponential(density):
    renderer = renderer_with(ConstantField(density), samples=7)
    # Rays through the cube [-1, 1]^3 with known path lengths: along x (2), and diagonals.
    origins = torch.tensor([[[-5.0, 0.0, 0.0], [-5.0, -5.0, 0.0], [-3.0, -3.0, -3.0], [-5.0, 0.3, -0.2]]], dtype=torch.float64)
    targets = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.3, -0.2]]], dtype=torch.float64)
    directions = targets - origins
    directions = directions / directions.norm(dim=-1, keepdim=True)
    lengths = torch.tensor([[2.0, 2.0 * math.sqrt(2.0), 2.0 * math.sqrt(3.0), 2.0]], dtype=torch.float64)
    background = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
    for stratified in (False, True):
        out = renderer.render_rays(torch.zeros(1, 1, 4, 4, 4, dtype=torch.float64), origins, directions, background,
                                   stratified=stratified)
        expected = 1.0 - torch.exp(-density * lengths)
        torch.testing.assert_close(out.opacity, expected, rtol=1e-12, atol=1e-12)
        colour = torch.tensor([0.2, 0.4, 0.6], dtype=torch.float64)
        torch.testing.assert_close(out.rgb, expected[..., None] * colour + (1 - expected[..., None]) * background)


def test_empty_field_renders_the_background_and_missing_rays_too():
    renderer = renderer_with(ConstantField(0.0))
    origins = torch.tensor([[[-5.0, 0.0, 0.0], [-5.0, 3.0, 0.0]]])  # the second ray misses the box
    directions = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    background = torch.tensor([[0.1, 0.7, 0.3]])
    out = renderer.render_rays(torch.zeros(1, 1, 4, 4, 4), origins, directions, background)
    torch.testing.assert_close(out.rgb, background.expand(1, 2, 3))
    assert torch.all(out.opacity == 0)
    dense = renderer_with(ConstantField(50.0)).render_rays(torch.zeros(1, 1, 4, 4, 4), origins, directions, background)
    assert dense.opacity[0, 0] > 0.999 and dense.opacity[0, 1] == 0  # a miss stays background however dense
    torch.testing.assert_close(dense.depth[0, 0], torch.tensor(4.0), atol=0.05, rtol=0)  # surface at x = -1


def test_opacity_stays_in_unit_interval_for_random_fields():
    torch.manual_seed(0)
    for kind, shape_kwargs in (("triplane", {"resolution": 8}), ("voxel", {"resolution": 8}), ("mlp", {"hidden": 16}),
                               ("hashgrid", {"levels": 4, "log2_table_size": 10})):
        rep = build_representation(kind, channels=4, **shape_kwargs)
        renderer = VolumeRenderer(rep, FieldDecoder(rep.feature_dim, hidden=16, origin_density=5.0), samples_per_ray=16)
        state = torch.randn(2, *rep.state_shape) * 3
        origins = torch.randn(2, 50, 3) * 0.2 + torch.tensor([0.0, 0.0, -3.0])
        directions = torch.nn.functional.normalize(torch.randn(2, 50, 3) * 0.3 + torch.tensor([0.0, 0.0, 1.0]), dim=-1)
        out = renderer.render_rays(state, origins, directions, torch.rand(2, 3), stratified=True)
        assert out.opacity.min() >= 0 and out.opacity.max() <= 1
        assert torch.isfinite(out.rgb).all() and out.rgb.min() >= 0 and out.rgb.max() <= 1 + 1e-5, kind  # fp32 rounding of 16 terms only


def test_composite_matches_a_hand_computed_two_sample_case():
    density = torch.tensor([1.0, 2.0])
    deltas = torch.tensor([0.5, 0.25])
    colour = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    rgb, opacity, depth, weights = composite(density, colour, deltas, torch.tensor([1.0, 2.0]), torch.zeros(3))
    w0 = 1 - math.exp(-0.5)
    w1 = math.exp(-0.5) * (1 - math.exp(-0.5))
    torch.testing.assert_close(weights, torch.tensor([w0, w1]))
    torch.testing.assert_close(rgb, torch.tensor([w0, w1, 0.0]))
    torch.testing.assert_close(depth, torch.tensor(w0 * 1 + w1 * 2))


def test_rays_pass_through_the_points_that_project_to_their_pixels():
    rng = np.random.default_rng(0)
    K = intrinsics_from_fov(40, 30, 0.9)
    K[0, 2] += 1.5  # an off-centre principal point and non-square pixels
    K[1, 1] *= 1.1
    c2w = look_at_c2w(np.array([2.0, -3.0, 1.5]), np.array([0.1, 0.2, -0.1]))
    points = rng.uniform(-1, 1, size=(20, 3))
    uv, depth = project_points(points, K, c2w)
    origins, directions = rays_from_pixels(torch.tensor(K), torch.tensor(c2w), torch.tensor(uv))
    # The point lies on its ray: origin + s * direction for s = its distance from the camera.
    distance = np.linalg.norm(points - c2w[:3, 3], axis=1)
    on_ray = origins + torch.tensor(distance)[:, None] * directions
    torch.testing.assert_close(on_ray, torch.tensor(points), atol=1e-9, rtol=0)


def test_pixel_helpers():
    centers = pixel_centers(2, 3)
    torch.testing.assert_close(centers[4], torch.tensor([1.5, 1.5]))  # row 1, column 1
    images = torch.arange(2 * 1 * 3 * 2 * 3, dtype=torch.float32).reshape(2, 1, 3, 2, 3)
    picked = gather_pixels(images, torch.tensor([[[4, 0]]]).expand(2, 1, 2))
    torch.testing.assert_close(picked[1, 0, 0], images[1, 0, :, 1, 1])
    patch = patch_pixel_indices(1, 1, 8, 8, 3, torch.Generator().manual_seed(0))[0, 0]
    rows, cols = patch // 8, patch % 8
    assert rows.max() - rows.min() == 2 and cols.max() - cols.min() == 2 and len(set(patch.tolist())) == 9
    origins, directions = view_rays(torch.eye(3).expand(1, 2, 3, 3) * 4 + torch.tensor([[0, 0, 2], [0, 0, 2], [0, 0, -3]]),
                                    torch.eye(4).expand(1, 2, 4, 4), 4, 4)
    assert origins.shape == (1, 2, 16, 3) and torch.allclose(directions.norm(dim=-1), torch.ones(1, 2, 16))


def test_spread_cameras_picks_the_opposite_camera_then_the_quarter_turns():
    # Eight cameras on a circle, 45° apart: from camera 0 the farthest is the opposite one (4),
    # then one of the two a quarter turn from both (2 or 6: the first of a tie), then the other.
    angles = torch.arange(8, dtype=torch.float64) * math.pi / 4
    c2w = torch.eye(4, dtype=torch.float64).repeat(8, 1, 1)
    c2w[:, :3, 3] = torch.stack([3 * angles.cos(), 3 * angles.sin(), torch.zeros(8, dtype=torch.float64)], -1)
    assert spread_cameras(c2w, 1) == [0]
    assert spread_cameras(c2w, 4) == [0, 4, 2, 6]
    with pytest.raises(ValueError, match="count"):
        spread_cameras(c2w, 9)


def test_intersect_box_axis_parallel_rays():
    t_near, t_far, hit = intersect_box(torch.tensor([[-3.0, 0.5, 0.5], [0.0, 0.0, 0.0]]),
                                       torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), 1.0)
    torch.testing.assert_close(t_near, torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(t_far, torch.tensor([4.0, 1.0]))
    assert hit.all()


# -- the field decoder ψ: blank origin, linearisation, positional variant --------------------------

@pytest.mark.parametrize("point_frequencies", [0, 2])
def test_decoder_origin_is_blank_whatever_its_weights(point_frequencies):
    decoder = FieldDecoder(5, hidden=16, layers=2, origin_density=0.01, point_frequencies=point_frequencies).double()
    points = torch.rand(7, 3, dtype=torch.float64) * 2 - 1
    for seed in range(3):
        with torch.no_grad():
            for p in decoder.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed), dtype=p.dtype) * 2)
        density, _ = decoder(torch.zeros(7, 5, dtype=torch.float64), points)
        torch.testing.assert_close(density, torch.full((7,), 0.01, dtype=torch.float64), rtol=1e-12, atol=0)
        dense, _ = decoder(torch.randn(7, 5, dtype=torch.float64) * 3, points)
        assert (dense - 0.01).abs().max() > 1e-3  # non-zero features still change the density


def test_decoder_linearisation_equals_autograd_jacobian():
    decoder = FieldDecoder(6, hidden=8, layers=3).double()
    features = torch.randn(4, 6, dtype=torch.float64)
    density, colour, jacobian = decoder(features, linearise=True)
    reference_density, reference_colour = decoder(features)
    torch.testing.assert_close(density, reference_density)
    torch.testing.assert_close(colour, reference_colour)
    for i in range(4):
        def field(f):
            d, c = decoder(f.unsqueeze(0))
            return torch.cat([d, c[0]])
        torch.testing.assert_close(jacobian[i], torch.autograd.functional.jacobian(field, features[i]), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="points"):
        FieldDecoder(6, point_frequencies=2)(features)


# -- the hash grid ---------------------------------------------------------------------------------

def test_hash_grid_interpolates_a_linear_field_exactly_on_dense_levels():
    """Trilinear interpolation reproduces a linear function of the vertices' positions exactly."""
    rep = build_representation("hashgrid", channels=1, levels=3, log2_table_size=13, base_resolution=3, max_resolution=12)
    assert rep.level_resolutions == [3, 6, 12] and all(rep._dense.tolist())  # 13^3 = 2197 <= 8192: no hashing
    a = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    state = torch.zeros(1, *rep.state_shape, dtype=torch.float64)
    for level, n in enumerate(rep.level_resolutions):
        side = torch.arange(n + 1, dtype=torch.float64)
        z, y, x = torch.meshgrid(side, side, side, indexing="ij")
        position = torch.stack([x, y, z], -1).reshape(-1, 3) / n * 2 - 1  # vertex i sits at -1 + 2 i / n
        rows = (x + (n + 1) * (y + (n + 1) * z)).reshape(-1).long()
        state[0, level, rows, 0] = position @ a + level
    points = torch.rand(1, 200, 3, dtype=torch.float64) * 2 - 1
    points[0, :3] = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0], [1.0, -1.0, 0.5]], dtype=torch.float64)  # faces
    features = rep.sample(state, points)[0]
    for level in range(3):
        torch.testing.assert_close(features[:, level], points[0] @ a + level, rtol=0, atol=1e-12)


def test_hash_grid_splat_is_the_adjoint_of_sample_and_hashes_collide_consistently():
    rep = build_representation("hashgrid", channels=3, levels=4, log2_table_size=7, base_resolution=2, max_resolution=16)
    assert not all(rep._dense.tolist())  # the fine levels are hashed into 128 rows
    generator = torch.Generator().manual_seed(0)
    state = torch.randn(2, *rep.state_shape, generator=generator, dtype=torch.float64)
    points = torch.rand(2, 50, 3, generator=generator, dtype=torch.float64) * 2 - 1
    values = torch.randn(2, 50, rep.feature_dim, generator=generator, dtype=torch.float64)
    # <sample(state), values> = <state, splat(values)>: splat is the exact adjoint.
    torch.testing.assert_close((rep.sample(state, points) * values).sum(), (state * rep.splat(points, values)).sum())
    rows, weights = rep.corners(points)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 50, 4, dtype=torch.float64))
    assert rows.min() >= 0 and rows.max() < rep.levels * rep.table_size
