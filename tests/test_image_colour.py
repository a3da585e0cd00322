"""Pixel-aligned colour (model_zoo/image_colour.py): projections of known points, exact pixel
reads, the fall-back to ψ's colour, the own-view exclusion, and that a model with it follows the
views' colours where the default model does not."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data_pipeline.cameras import intrinsics_from_fov, look_at_c2w
from data_pipeline.reader import ReaderConfig, StreamingReader
from data_pipeline.synthetic import generate_dataset
from model_zoo.experiment import colour_follow, colour_follow_batch
from model_zoo.goembedfusion import GOEmbedFusion, ModelConfig, Views
from model_zoo.image_colour import ImageColour, SourceViews, box_pyramid, project, sample_images
from model_zoo.metrics import chroma_slope, foreground, mean_chroma
from model_zoo.rays import view_rays

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 12


def synthetic_batch(tmp_path, objects: int, batch_size: int, context_views: int, seed: int):
    """The first reader batch of a fresh 32 px synthetic set of ``objects``: ``context_views``
    context views and 2 target views per object."""
    summary = generate_dataset(str(tmp_path), objects=objects, views=6, resolution=32, seed=seed, holdout_fraction=0.0,
                               workers=1, progress=False)
    return next(iter(StreamingReader(ReaderConfig(summary["train_pattern"], batch_size=batch_size,
                                                  context_views_min=context_views, context_views_max=context_views,
                                                  target_views=2, num_workers=0))))


def cameras(count: int):
    """``count`` OpenCV cameras on a circle looking at the origin, for SIZE × SIZE images."""
    K = torch.as_tensor(intrinsics_from_fov(SIZE, SIZE, math.radians(50.0)), dtype=torch.float64)
    c2w = [torch.as_tensor(look_at_c2w(np.array([2.5 * math.cos(a), 2.5 * math.sin(a), 0.7]), np.zeros(3)),
                           dtype=torch.float64) for a in np.linspace(0.0, 4.0, count)]
    return K.expand(1, count, 3, 3).clone(), torch.stack(c2w)[None]


def test_points_on_a_pixels_ray_project_back_to_its_centre_in_front_of_the_camera():
    K, c2w = cameras(2)
    origins, directions = view_rays(K, c2w, SIZE, SIZE)  # (1, 2, H*W, 3)
    depth = torch.rand(SIZE * SIZE, dtype=torch.float64) * 3 + 0.5
    points = origins[0, 0] + depth.unsqueeze(-1) * directions[0, 0]
    uv, z = project(points[None], K, c2w)
    v, u = torch.meshgrid(torch.arange(SIZE, dtype=torch.float64) + 0.5, torch.arange(SIZE, dtype=torch.float64) + 0.5,
                          indexing="ij")
    assert torch.allclose(uv[0, 0], torch.stack([u.reshape(-1), v.reshape(-1)], -1), atol=1e-9)
    assert (z[0, 0] > 0).all()
    behind = origins[0, 0] - directions[0, 0]  # one unit behind the camera
    assert (project(behind[None], K, c2w)[1][0, 0] < 0).all()


def test_a_pixel_centre_reads_that_pixel_exactly():
    images = torch.rand(1, 2, 3, SIZE, SIZE, dtype=torch.float64)
    rows, cols = torch.randint(0, SIZE, (2, 50))
    uv = torch.stack([cols + 0.5, rows + 0.5], -1).to(torch.float64).expand(1, 2, 50, 2)
    seen = sample_images(images, uv)  # (1, 2, 50, 3)
    for view in range(2):
        assert torch.allclose(seen[0, view], images[0, view][:, rows, cols].T, atol=1e-12)


def blend_inputs(count=2, points=64, seed=0):
    torch.manual_seed(seed)
    K, c2w = cameras(count)
    sources = SourceViews(torch.rand(1, count, 3, SIZE, SIZE, dtype=torch.float64), K, c2w)
    points_world = (torch.rand(1, points, 3, dtype=torch.float64) - 0.5)
    directions = torch.nn.functional.normalize(torch.randn(1, points, 3, dtype=torch.float64), dim=-1)
    features = torch.randn(1, points, 8, dtype=torch.float64)
    colour = torch.rand(1, points, 3, dtype=torch.float64)
    return sources, points_world, directions, features, colour


def test_without_a_readable_view_the_colour_is_psis_own():
    blend = ImageColour(8).double()
    sources, points, directions, features, colour = blend_inputs()
    dropped = SourceViews(sources.images, sources.K, sources.c2w, weights=torch.zeros(1, 2, dtype=torch.float64))
    assert torch.equal(blend(features, points, directions, colour, dropped), colour)
    excluded = torch.ones(1, points.shape[1], 2, dtype=torch.bool)
    assert torch.equal(blend(features, points, directions, colour, sources, excluded), colour)
    assert not torch.allclose(blend(features, points, directions, colour, sources), colour)


def test_with_the_blend_fully_open_one_view_gives_its_own_pixel():
    blend = ImageColour(8).double()
    with torch.no_grad():
        blend.mix.weight.zero_()
        blend.mix.bias.fill_(60.0)  # α = 1 to 1e-26
    sources, _, _, features, colour = blend_inputs(count=1, points=SIZE * SIZE)
    origins, directions = view_rays(sources.K, sources.c2w, SIZE, SIZE)
    points = origins[:, 0] + 1.7 * directions[:, 0]
    blended = blend(features, points, directions[:, 0], colour, sources)
    assert torch.allclose(blended[0], sources.images[0, 0].flatten(1).T, atol=1e-12)


def test_the_wiener_gain_shrinks_a_noisy_reading_towards_psi_by_its_closed_form():
    # Fully open blend (α = 1), one view, one level: the output is the shrunk reading itself,
    # ψ + g·(y − ψ) with g = s² / (s² + (σ/2)²), for a clean, a middling and a hopeless σ.
    blend = ImageColour(8, noise_aware=True, gain="wiener").double()
    with torch.no_grad():
        blend.mix.weight.zero_()
        blend.mix.bias.fill_(60.0)
    sources, _, _, features, colour = blend_inputs(count=1, points=SIZE * SIZE)
    origins, directions = view_rays(sources.K, sources.c2w, SIZE, SIZE)
    points = origins[:, 0] + 1.7 * directions[:, 0]
    pixels = sources.images[0, 0].flatten(1).T
    prior = 0.25  # the initial s
    for sigma in (0.0, 0.5, 100.0):
        noisy = SourceViews(sources.images, sources.K, sources.c2w, noise_levels=torch.tensor([[sigma]], dtype=torch.float64))
        gain = prior ** 2 / (prior ** 2 + (sigma / 2) ** 2)
        expected = colour[0] + gain * (pixels - colour[0])
        assert torch.allclose(blend(features, points, directions[:, 0], colour, noisy)[0], expected, atol=1e-12)
    # Level l averages 4ˡ pixels: its noise std is σ/2 / 2ˡ, so the coarse level keeps more of its reading.
    two = ImageColour(8, levels=2, noise_aware=True, gain="wiener").double()
    noisy = SourceViews(sources.images, sources.K, sources.c2w, noise_levels=torch.tensor([[0.5]], dtype=torch.float64))
    seen, _, _, _, noise_std, _ = two._read(noisy, points, directions[:, 0])
    assert torch.allclose(noise_std[0, 0, 0, :, 0], torch.tensor([0.25, 0.125], dtype=torch.float64))
    with pytest.raises(ValueError, match="gain"):
        ImageColour(8, noise_aware=True, gain="fixed")
    # Bands: level 0 is read as ψ + g₀·(y₀ − y₁) + g₁·(y₁ − ψ), g_k = s²/(s² + v_k) with the bands'
    # noise variances v₀ = σ₀² − σ₁² and v₁ = σ₁²; a clean view still reads its own pixel.
    bands = ImageColour(8, levels=2, noise_aware=True, gain="wiener_bands").double()
    with torch.no_grad():
        bands.mix.weight.zero_()
        bands.mix.bias.fill_(60.0)
        bands.level.weight.zero_()
        bands.level.bias.copy_(torch.tensor([60.0, 0.0]))  # read level 0 only
    clean = SourceViews(sources.images, sources.K, sources.c2w, noise_levels=torch.zeros(1, 1, dtype=torch.float64))
    assert torch.allclose(bands(features, points, directions[:, 0], colour, clean)[0], pixels, atol=1e-12)
    y0, y1 = seen[0, 0, :, 0], seen[0, 0, :, 1]
    g0, g1 = (prior ** 2 / (prior ** 2 + v) for v in (0.25 ** 2 - 0.125 ** 2, 0.125 ** 2))
    expected = colour[0] + g0 * (y0 - y1) + g1 * (y1 - colour[0])
    assert torch.allclose(bands(features, points, directions[:, 0], colour, noisy)[0], expected, atol=1e-12)


def test_a_ray_from_a_source_views_own_camera_takes_its_shrunk_pixel_with_nothing_learned():
    # own_view, EDM's skip: at a source's own camera the colour is m + Σ_k g_k b_k of that pixel whatever
    # the MLP's weights, m being the blend of the other views and ψ (the coarsest band taken against
    # m): the pixel itself for a clean view, m for a hopeless σ, the bands' closed form between. Rays
    # from another camera get the blend, exactly as without own_view; an excluded view is not copied.
    plain = ImageColour(8, levels=2, noise_aware=True, gain="wiener_bands").double()
    own = ImageColour(8, levels=2, noise_aware=True, gain="wiener_bands", own_view=True).double()
    own.load_state_dict(plain.state_dict())
    sources, _, _, features, colour = blend_inputs(count=3, points=SIZE * SIZE)
    origins, directions = view_rays(sources.K, sources.c2w, SIZE, SIZE)  # camera 2 is not a source
    pixels = sources.images[0, 0].flatten(1).T

    def noisy(sigma):
        return SourceViews(sources.images[:, :2], sources.K[:, :2], sources.c2w[:, :2],
                           noise_levels=torch.tensor([[sigma, 0.0]], dtype=torch.float64))

    prior = 0.25  # the initial s
    not_view_0 = torch.zeros(1, SIZE * SIZE, 2, dtype=torch.bool)
    not_view_0[..., 0] = True
    for depth in (1.2, 2.5):  # any point of the ray: all project to the ray's own pixel
        points = origins[:, 0] + depth * directions[:, 0]
        others = plain(features, points, directions[:, 0], colour, noisy(0.5), not_view_0)[0]  # m: view 1 and ψ
        assert not torch.allclose(others, colour[0], atol=1e-3)  # view 1 sees these points
        assert torch.allclose(own(features, points, directions[:, 0], colour, noisy(0.0))[0], pixels, atol=1e-12)
        assert not torch.allclose(plain(features, points, directions[:, 0], colour, noisy(0.0))[0], pixels, atol=1e-2)
        assert torch.allclose(own(features, points, directions[:, 0], colour, noisy(100.0))[0], others, atol=1e-4)
        seen = own._read(noisy(0.5), points, directions[:, 0])[0]
        y0, y1 = seen[0, 0, :, 0], seen[0, 0, :, 1]
        g0, g1 = (prior ** 2 / (prior ** 2 + v) for v in (0.25 ** 2 - 0.125 ** 2, 0.125 ** 2))
        expected = others + g0 * (y0 - y1) + g1 * (y1 - others)
        assert torch.allclose(own(features, points, directions[:, 0], colour, noisy(0.5))[0], expected, atol=1e-12)
    other = origins[:, 2] + 1.7 * directions[:, 2]
    assert torch.equal(own(features, other, directions[:, 2], colour, noisy(0.5)),
                       plain(features, other, directions[:, 2], colour, noisy(0.5)))
    points = origins[:, 0] + 1.7 * directions[:, 0]
    excluded = torch.zeros(1, points.shape[1], 2, dtype=torch.bool)
    excluded[..., 0] = True
    assert torch.equal(own(features, points, directions[:, 0], colour, noisy(0.0), excluded),
                       plain(features, points, directions[:, 0], colour, noisy(0.0), excluded))
    # own_level 1 reads the coarser level: ψ + g₁·(y₁ − ψ), the finest band left out.
    coarse = ImageColour(8, levels=2, noise_aware=True, gain="wiener_bands", own_view=True, own_level=1).double()
    coarse.load_state_dict(plain.state_dict())
    points = origins[:, 0] + 1.7 * directions[:, 0]
    y1 = own._read(noisy(0.5), points, directions[:, 0])[0][0, 0, :, 1]
    g1 = prior ** 2 / (prior ** 2 + 0.125 ** 2)
    others = plain(features, points, directions[:, 0], colour, noisy(0.5), not_view_0)[0]
    assert torch.allclose(coarse(features, points, directions[:, 0], colour, noisy(0.5))[0],
                          others + g1 * (y1 - others), atol=1e-12)
    with pytest.raises(ValueError, match="own_view"):
        ImageColour(8, noise_aware=True, gain="learned", own_view=True)
    with pytest.raises(ValueError, match="own_level"):
        ImageColour(8, levels=2, noise_aware=True, gain="wiener", own_view=True, own_level=2)


def test_the_adaptive_prior_starts_as_the_global_one_and_moves_the_gain_per_point():
    sources, points, directions, features, colour = blend_inputs(count=2)
    noisy = SourceViews(sources.images, sources.K, sources.c2w, noise_levels=torch.tensor([[0.5, 0.0]], dtype=torch.float64))
    fixed = ImageColour(8, levels=2, noise_aware=True, gain="wiener_bands").double()
    adaptive = ImageColour(8, levels=2, noise_aware=True, gain="wiener_bands", adaptive_prior=True).double()
    adaptive.load_state_dict(fixed.state_dict(), strict=False)  # all but the (zero) prior head
    assert torch.equal(adaptive(features, points, directions, colour, noisy), fixed(features, points, directions, colour, noisy))
    with torch.no_grad():  # a larger prior std where feature 0 is positive: there the reading counts more
        adaptive.prior_head.weight[:, 0] = 5.0
    moved = adaptive(features, points, directions, colour, noisy)
    assert not torch.allclose(moved, fixed(features, points, directions, colour, noisy))
    with pytest.raises(ValueError, match="adaptive_prior"):
        ImageColour(8, noise_aware=True, gain="learned", adaptive_prior=True)


def test_render_without_context_is_the_plain_model_and_a_context_view_never_reads_itself():
    torch.manual_seed(0)
    plain = GOEmbedFusion(ModelConfig(encode_resolution=16, rays_per_view=32))
    blended = GOEmbedFusion(ModelConfig(encode_resolution=16, rays_per_view=32, image_colour=True))
    missing, unexpected = blended.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(name.startswith("renderer.image_colour.") for name in missing)
    K, c2w = cameras(1)
    K, c2w = K.float(), c2w.float()
    state = torch.randn(1, *plain.representation.state_shape)
    background = torch.ones(1, 3)
    view = Views(torch.rand(1, 1, 3, SIZE, SIZE), K, c2w)
    with torch.no_grad():
        alone = plain.render(state, K, c2w, SIZE, SIZE, background)
        assert torch.equal(blended.render(state, K, c2w, SIZE, SIZE, background), alone)
        assert not torch.allclose(blended.render(state, K, c2w, SIZE, SIZE, background, view), alone)
    # The context loss with the only view as its own source: it may read nothing, so ψ's loss.
    blended.eval()
    loss = {}
    for name, sources in (("plain", None), ("own", blended.sources(view))):
        generator = torch.Generator().manual_seed(3)
        loss[name] = blended._render_loss(state, view, background, generator, sources, own_views=True)
    assert torch.equal(loss["plain"], loss["own"])


def test_with_image_colour_the_reconstruction_follows_the_views_colours(tmp_path):
    """The default model paints one colouring per shape (README, "Colour: where it is lost": after
    600 steps ``same`` 0.001, ``follows`` 0.065); with image colour, after 100 steps ``same`` was
    0.077 and ``follows`` 0.008 (bench/colour_follow.py, seed 0); with seeds 1 and 2 (data and
    model) 0.068 / 0.014 and 0.068 / 0.006, hue 0.039 and 0.043. Asserted with margins that hold on all three."""
    batch = colour_follow_batch(str(tmp_path), seed=0)
    torch.manual_seed(0)
    model = GOEmbedFusion(ModelConfig(reconstruction_prob=1.0, context_dropout=0.0, image_colour=True))
    final = colour_follow(model, batch, steps=100, every=100)[-1]
    assert final["follows"] < 0.3 * final["same"], final
    assert final["hue"] > 0.02, final


def test_it_trains_under_bf16_autocast_renders_in_bf16_weights_and_samples_with_guidance(tmp_path):
    batch = synthetic_batch(tmp_path, objects=4, batch_size=2, context_views=2, seed=2)
    torch.manual_seed(0)
    model = GOEmbedFusion(ModelConfig(encode_resolution=16, rays_per_view=32, image_colour=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model(batch, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    assert sum(float(p.grad.abs().sum()) for p in model.renderer.image_colour.parameters()) > 0
    model.eval()
    context = Views.from_batch(batch, "context")
    K16 = batch.target_K[:, 0] * torch.tensor([0.5, 0.5, 1.0]).view(3, 1)
    with torch.no_grad():
        state = model.sample(K16, batch.target_c2w[:, 0], batch.background, context=context, steps=2,
                             guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(state).all()
        half = model.to(torch.bfloat16)
        images = half.render(state.to(torch.bfloat16), batch.target_K.to(torch.bfloat16), batch.target_c2w.to(torch.bfloat16),
                             16, 16, batch.background.to(torch.bfloat16), context.to(torch.bfloat16))
    assert images.dtype == torch.bfloat16 and torch.isfinite(images.float()).all()


def test_the_pyramid_levels_are_block_means_and_read_as_such_at_their_pixel_centres():
    images = torch.rand(1, 2, 3, 8, 8, dtype=torch.float64)
    levels = box_pyramid(images, 4)
    assert [level.shape[-1] for level in levels] == [8, 4, 2, 1]
    assert torch.allclose(levels[1][0, 1, :, 2, 3], images[0, 1, :, 4:6, 6:8].mean((1, 2)), atol=1e-12)
    assert torch.allclose(levels[3][0, 0, :, 0, 0], images[0, 0].mean((1, 2)), atol=1e-12)
    # ImageColour reads level l at full-resolution pixel coordinates: the centre of 2×2 block (2, 3)
    # is full-resolution pixel (7.0, 5.0) in (u, v).
    uv = torch.tensor([[7.0, 5.0]], dtype=torch.float64).expand(1, 2, 1, 2)
    scale = torch.tensor([0.5, 0.5], dtype=torch.float64)
    assert torch.allclose(sample_images(levels[1], uv * scale)[0, 1, 0], levels[1][0, 1, :, 2, 3], atol=1e-12)


def test_the_noise_level_reaches_the_blend_only_when_it_is_noise_aware():
    sources, points, directions, features, colour = blend_inputs()
    noisy = SourceViews(sources.images, sources.K, sources.c2w, noise_levels=torch.tensor([[0.0, 0.9]], dtype=torch.float64))
    for aware in (False, True):
        torch.manual_seed(1)
        blend = ImageColour(8, levels=3, noise_aware=aware).double()
        clean, told = (blend(features, points, directions, colour, s) for s in (sources, noisy))
        assert torch.equal(clean, told) != aware
    # Groups at different resolutions read as one set of views: the same as one group of both.
    half = torch.nn.functional.interpolate(sources.images[0], scale_factor=0.5, mode="area")[None]
    groups = [SourceViews(sources.images[:, :1], sources.K[:, :1], sources.c2w[:, :1]),
              SourceViews(half[:, 1:], sources.K[:, 1:] * torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64).view(3, 1),
                          sources.c2w[:, 1:])]
    blend = ImageColour(8).double()
    mixed = blend(features, points, directions, colour, groups)
    assert mixed.shape == colour.shape and torch.isfinite(mixed).all()


def test_a_noisy_target_model_trains_and_its_sample_is_coloured_by_the_image_the_sampler_made(tmp_path):
    with pytest.raises(ValueError, match="image_colour_noisy_target"):
        ModelConfig(image_colour_noisy_target=True)
    batch = synthetic_batch(tmp_path, objects=4, batch_size=2, context_views=2, seed=2)
    torch.manual_seed(0)
    model = GOEmbedFusion(ModelConfig(encode_resolution=16, rays_per_view=32, image_colour=True,
                                      image_colour_noisy_target=True, image_colour_levels=4))
    loss, _ = model(batch, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and float(model.renderer.image_colour.level.weight.grad.abs().sum()) > 0
    model.eval()
    K16 = batch.target_K[:, 0] * torch.tensor([0.5, 0.5, 1.0]).view(3, 1)
    last = {}
    with torch.no_grad():
        state, sources = model.sample(K16, batch.target_c2w[:, 0], batch.background, steps=3, sampler="ddim",
                                      generator=torch.Generator().manual_seed(0), return_sources=True,
                                      callback=lambda info: last.update(info))
        assert len(sources) == 1 and sources[0].noise_levels is None  # the made view is clean
        # DDIM's last step returns its x̂₀: the made view is that image, in [0, 1].
        assert torch.allclose(sources[0].images[:, 0], (last["denoised"].clamp(-1, 1) + 1) / 2, atol=1e-6)
        coloured = model.render(state, batch.target_K, batch.target_c2w, 32, 32, batch.background, sources=sources)
        grey = model.render(state, batch.target_K, batch.target_c2w, 32, 32, batch.background)
    assert not torch.allclose(coloured, grey)


def test_sample_views_conditions_each_made_image_on_those_before(tmp_path):
    # DFM's autoregressive sampling against the same steps written out with sample(): image 1 is an
    # unconditional sample, image 2 is sampled with image 1 as a clean context view, and the result
    # is image 2's ζ with image 1 as context and image 2 as the made source. One view is sample().
    batch = synthetic_batch(tmp_path, objects=2, batch_size=2, context_views=0, seed=2)
    torch.manual_seed(0)
    model = GOEmbedFusion(ModelConfig(encode_resolution=16, rays_per_view=32, image_colour=True,
                                      image_colour_noisy_target=True, image_colour_levels=2)).eval()
    K16 = batch.target_K * torch.tensor([0.5, 0.5, 1.0]).view(3, 1)
    options = dict(steps=2, sampler="ddim")
    seen = []
    state, sources = model.sample_views(K16, batch.target_c2w, batch.background, generator=torch.Generator().manual_seed(3),
                                        callback=lambda info: seen.append((info["view"], info["i"])), **options)
    assert seen == [(0, 0), (0, 1), (1, 0), (1, 1)]
    generator = torch.Generator().manual_seed(3)
    _, first = model.sample(K16[:, 0], batch.target_c2w[:, 0], batch.background, generator=generator,
                            return_sources=True, **options)
    made = Views(first[0].images, first[0].K, first[0].c2w)
    expected, expected_sources = model.sample(K16[:, 1], batch.target_c2w[:, 1], batch.background, context=made,
                                              generator=generator, return_sources=True, **options)
    torch.testing.assert_close(state, expected, rtol=0, atol=0)
    assert [group.count for group in sources] == [1, 1]
    for group, want in zip(sources, expected_sources):
        torch.testing.assert_close(group.images, want.images, rtol=0, atol=0)
        torch.testing.assert_close(group.c2w, want.c2w, rtol=0, atol=0)
    one, one_sources = model.sample_views(K16[:, :1], batch.target_c2w[:, :1], batch.background,
                                          generator=torch.Generator().manual_seed(3), **options)
    single, single_sources = model.sample(K16[:, 0], batch.target_c2w[:, 0], batch.background,
                                          generator=torch.Generator().manual_seed(3), return_sources=True, **options)
    torch.testing.assert_close(one, single, rtol=0, atol=0)
    torch.testing.assert_close(one_sources[0].images, single_sources[0].images, rtol=0, atol=0)
    with pytest.raises(ValueError, match="target_K"):
        model.sample_views(K16[:, 0], batch.target_c2w[:, 0], batch.background, **options)


def _chroma_slope(model: GOEmbedFusion, batch, t: int) -> float:
    """How much of x₀'s mean foreground chroma x̂₀ keeps at t (metrics.chroma_slope, as bench/denoise_colour.py)."""
    view = Views(batch.target_images[:, :1], batch.target_K[:, :1], batch.target_c2w[:, :1]).resized(16)
    clean = view.images[:, 0]
    x_t = model.schedule.q_sample(clean * 2 - 1, torch.full((clean.shape[0],), t),
                                  torch.randn(clean.shape, generator=torch.Generator().manual_seed(5)))
    with torch.no_grad():
        made = model.x0_predictor(view.K[:, 0], view.c2w[:, 0], batch.background)(x_t, t)
    mask = foreground(clean, batch.background)
    return chroma_slope(mean_chroma(clean * 2 - 1, mask), mean_chroma(made, mask))


def test_with_the_band_wiener_gain_the_denoised_image_keeps_the_noisy_views_colour(tmp_path):
    # Unconditional denoising of a moderately noisy view (t = 300): after 50 steps on one batch the
    # band-wise Wiener gain keeps ~0.36–0.39 of x₀'s colour in x̂₀, the learned gain ≤ 0.11 (seeds
    # 0 and 1; both start at 0.01). README, "Unconditional colour".
    batch = synthetic_batch(tmp_path, objects=8, batch_size=8, context_views=0, seed=3)
    slopes = {}
    for gain in ("learned", "wiener_bands"):
        torch.manual_seed(0)
        model = GOEmbedFusion(ModelConfig(encode_resolution=16, rays_per_view=64, image_colour=True, image_colour_noisy_target=True,
                                          image_colour_levels=3, image_colour_noisy_gain=gain, reconstruction_prob=0.0))
        optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
        generator = torch.Generator().manual_seed(0)
        for _ in range(50):
            loss, _ = model(batch, generator=generator)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        model.eval()
        slopes[gain] = _chroma_slope(model, batch, 300)
    assert slopes["wiener_bands"] > 0.25, slopes
    assert slopes["wiener_bands"] - slopes["learned"] > 0.15, slopes
