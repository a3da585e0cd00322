"""The noisy skip (model_zoo.image_colour.band_skip, GOEmbedFusion.x0_predictor(noisy_skip_level=…)):
the identity at no noise, the prediction at infinite noise, that bands finer than its level are
never let through, that its gain is the Wiener filter's (measured on Gaussian data against the
analytic minimum error, independently of the module's formula), and where it is refused."""

from __future__ import annotations

import math

import pytest
import torch

from model_zoo.goembedfusion import GOEmbedFusion, ModelConfig, Views
from model_zoo.image_colour import band_skip
from tests.test_image_colour import synthetic_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LEVELS = 4
PRIOR_STD = 0.2


def prior_log_std(levels: int = LEVELS, std: float = PRIOR_STD) -> torch.Tensor:
    return torch.full((levels,), math.log(std))


def test_no_noise_gives_the_noisy_reading_and_infinite_noise_the_prediction():
    torch.manual_seed(0)
    prior, noisy = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    assert torch.allclose(band_skip(prior, noisy, torch.zeros(2), prior_log_std()), noisy, atol=1e-6)
    assert torch.allclose(band_skip(prior, noisy, torch.full((2,), 1e5), prior_log_std()), prior, atol=1e-6)


def test_bands_finer_than_its_level_are_never_let_through():
    # A residual of 2-pixel checkers has zero block means at every level from 1 on: from level 1
    # the result is the prediction, whatever the noise level; from level 0 it is let through.
    prior = torch.full((1, 3, 32, 32), 0.5)
    checkers = (torch.arange(32).view(-1, 1) + torch.arange(32).view(1, -1)) % 2 * 0.2 - 0.1
    noisy = prior + checkers
    assert torch.allclose(band_skip(prior, noisy, torch.zeros(1), prior_log_std(), from_level=1), prior, atol=1e-6)
    assert torch.allclose(band_skip(prior, noisy, torch.zeros(1), prior_log_std(), from_level=0), noisy, atol=1e-6)


@pytest.mark.parametrize("sigma", [0.5, 2.0, 8.0])
def test_its_gain_on_a_flat_colour_is_the_wiener_filters(sigma):
    # x₀ = m + c, c one colour per image and channel ~ N(0, s²); y = x₀ + (σ/2)·ε in [0, 1] units.
    # From the coarsest level (8 px blocks) the estimate is m + g·(c + block noise): its error is
    # measured against the least possible, s²·v/(s² + v) with v = (σ/2/8)², and against gains
    # 0.7× and 1.3× its own.
    torch.manual_seed(1)
    objects = 4000
    prior = torch.full((objects, 3, 8, 8), 0.5)
    colour = PRIOR_STD * torch.randn(objects, 3, 1, 1)
    x0 = prior + colour
    noisy = x0 + sigma / 2 * torch.randn_like(x0)
    sigmas = torch.full((objects,), sigma)
    estimate = band_skip(prior, noisy, sigmas, prior_log_std(), from_level=LEVELS - 1)
    error = (estimate - x0).pow(2).mean().item()
    noise_var = (sigma / 2 / 8) ** 2
    least = PRIOR_STD ** 2 * noise_var / (PRIOR_STD ** 2 + noise_var)
    assert error == pytest.approx(least, rel=0.06)
    for factor in (0.7, 1.3):
        other = prior + factor * (estimate - prior)
        assert (other - x0).pow(2).mean().item() > error


def tiny_model(**overrides) -> GOEmbedFusion:
    torch.manual_seed(0)
    config = dict(representation="voxel", image_colour=True, image_colour_noisy_target=True, image_colour_levels=LEVELS,
                  image_colour_noisy_gain="wiener_bands")
    return GOEmbedFusion(ModelConfig(**{**config, **overrides})).eval()


def test_the_sampler_model_with_it_keeps_x_t_at_the_last_step_and_the_render_at_the_first(tmp_path):
    batch = synthetic_batch(tmp_path, objects=1, batch_size=1, context_views=1, seed=5)
    model = tiny_model()
    target = Views.from_batch(batch, "target")
    K, c2w = target.K[:, 0], target.c2w[:, 0]
    x_t = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        render = model.x0_predictor(K, c2w, batch.background)
        skip = model.x0_predictor(K, c2w, batch.background, noisy_skip_level=0)
        first = model.config.num_timesteps - 1
        # t = T−1: σ = 100 and x_t/√ᾱ reaches ±100, every gain is ≤ 0.002: x̂₀ is within 0.05 of the render
        assert (skip(x_t, first) - render(x_t, first)).abs().max() < 0.05
        assert skip.state.shape == (1, *model.representation.state_shape)
        # t = 0 (ᾱ = 0.99996): x̂₀ is x_t/√ᾱ to within the gains' 1e-3, far from the render
        alpha_bar = model.schedule.alpha_bar(torch.zeros(1, dtype=torch.long))
        expected = x_t / alpha_bar.sqrt()
        assert (skip(x_t, 0) - expected).abs().max() < 5e-3
        assert (render(x_t, 0) - expected).abs().max() > 0.1
        # a coarse level keeps the render's fine detail: only x_t's 8 px block means differ from it
        coarse = model.x0_predictor(K, c2w, batch.background, noisy_skip_level=LEVELS - 1)(x_t, 0)
        pool = torch.nn.functional.avg_pool2d
        assert torch.allclose(pool(coarse, 8), pool(expected, 8), atol=5e-3)
        assert torch.allclose(coarse - pool(coarse, 8).repeat_interleave(8, -1).repeat_interleave(8, -2),
                              render(x_t, 0) - pool(render(x_t, 0), 8).repeat_interleave(8, -1).repeat_interleave(8, -2),
                              atol=1e-5)


def test_a_sample_and_made_views_take_it(tmp_path):
    batch = synthetic_batch(tmp_path, objects=1, batch_size=1, context_views=1, seed=6)
    model = tiny_model()
    target = Views.from_batch(batch, "target")
    options = dict(steps=3, sampler="ddpm", resolution=32)
    plain = model.sample_views(target.K, target.c2w, batch.background, generator=torch.Generator().manual_seed(0), **options)
    skip = model.sample_views(target.K, target.c2w, batch.background, generator=torch.Generator().manual_seed(0),
                              noisy_skip_level=1, **options)
    # the same noise, a different made image (its last step keeps x_t's colour bands)
    assert not torch.allclose(plain[1][0].images, skip[1][0].images)


def test_it_is_refused_where_it_cannot_apply(tmp_path):
    batch = synthetic_batch(tmp_path, objects=1, batch_size=1, context_views=1, seed=7)
    target = Views.from_batch(batch, "target")
    K, c2w = target.K[:, 0], target.c2w[:, 0]
    with pytest.raises(ValueError, match="noisy_skip_level needs model.image_colour"):
        tiny_model(image_colour_noisy_gain="learned").x0_predictor(K, c2w, batch.background, noisy_skip_level=1)
    with pytest.raises(ValueError, match=r"noisy_skip_level must be in \[0, 3\]"):
        tiny_model().x0_predictor(K, c2w, batch.background, noisy_skip_level=4)
    with pytest.raises(ValueError, match="from_level"):
        band_skip(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), torch.zeros(1), prior_log_std(), from_level=-1)
