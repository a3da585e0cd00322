"""The 2D view denoiser (model_zoo/view_denoiser.py) and GOEmbedFusion's image_colour_view_denoiser:
EDM's preconditioning against the closed-form linear estimate of Gaussian data, the identity at no
noise, that image_colour reads its x̂₀, and that both its own loss and the rendering loss train it."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch

from model_zoo.diffusion import CosineSchedule
from model_zoo.goembedfusion import GOEmbedFusion, ModelConfig, Views
from model_zoo.presets import get_preset
from model_zoo.view_denoiser import DATA_STD, ViewDenoiser
from tests.test_image_colour import synthetic_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def silent(denoiser: ViewDenoiser) -> ViewDenoiser:
    """The network's output zeroed: x̂₀ = c_skip·x_t, the preconditioning alone."""
    with torch.no_grad():
        denoiser.network.out[-1].weight.zero_()
        denoiser.network.out[-1].bias.zero_()
    return denoiser


@pytest.mark.parametrize("alpha_bar", [0.02, 0.3, 0.9])
def test_with_a_silent_network_it_is_the_linear_mmse_estimate_of_gaussian_data(alpha_bar):
    # For x₀ ~ N(0, σ_d²) per pixel, E[x₀ | x_t] = √ᾱσ_d²/(ᾱσ_d² + 1 − ᾱ)·x_t, with error variance
    # c_out²: measured on samples, independently of the formulas in the module.
    torch.manual_seed(0)
    denoiser = silent(ViewDenoiser(get_preset("tiny").unet))
    x0 = DATA_STD * torch.randn(256, 3, 16, 16)
    x_t = math.sqrt(alpha_bar) * x0 + math.sqrt(1 - alpha_bar) * torch.randn_like(x0)
    a = torch.full((256,), alpha_bar)
    with torch.no_grad():
        estimate = denoiser(x_t, torch.full((256,), 500), a)
    slope = (estimate * x_t).sum() / (x_t * x_t).sum()
    assert torch.allclose(estimate, slope * x_t, atol=1e-6)  # a silent network: linear in x_t
    regression = (x0 * x_t).mean() / (x_t * x_t).mean()  # the least-squares slope of x₀ on x_t
    standard_error = math.sqrt(((x0 - regression * x_t).pow(2).mean() / (x_t * x_t).sum()).item())
    assert abs(slope - regression) < 4 * standard_error
    _, _, c_out = denoiser.coefficients(a)
    assert (estimate - x0).pow(2).mean().item() == pytest.approx(c_out[0].item() ** 2, rel=0.03)


def test_at_no_noise_it_returns_x_t_whatever_the_network_says():
    torch.manual_seed(1)
    denoiser = ViewDenoiser(get_preset("tiny").unet)  # random weights: a non-zero network output
    x_t = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(denoiser(x_t, torch.zeros(2, dtype=torch.long), torch.ones(2)), x_t, atol=1e-6)
        # at t = 0 of the cosine schedule (ᾱ = 0.99996) it is still within 0.01 of x_t, so a
        # sampler's last step keeps the colour it made
        schedule = CosineSchedule(1000)
        last = denoiser(x_t, torch.zeros(2, dtype=torch.long), schedule.alpha_bar(torch.zeros(2, dtype=torch.long)))
        assert (last - x_t).abs().max() < 0.01
        # and at ᾱ → 0 it no longer follows x_t at all: the preconditioned input is pure noise
        _, c_skip, _ = denoiser.coefficients(torch.tensor([1e-4]))
        assert c_skip.item() < 0.01


def view_model(**overrides) -> GOEmbedFusion:
    torch.manual_seed(0)
    config = dict(representation="voxel", image_colour=True, image_colour_noisy_target=True, image_colour_levels=2,
                  image_colour_view_denoiser=True, image_colour_own_view=True)
    return GOEmbedFusion(ModelConfig(**{**config, **overrides}))


def test_image_colour_reads_the_view_denoisers_image_told_its_noise_level(tmp_path):
    batch = synthetic_batch(tmp_path, objects=2, batch_size=2, context_views=1, seed=0)
    model = view_model().eval()
    target = Views.from_batch(batch, "target")
    t = torch.tensor([100, 900])
    noisy = model.noisy_target(target, t, torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        expected = (model.denoise_view(noisy, t) + 1) / 2
        groups = model.sources(Views.from_batch(batch, "context"), noisy=noisy, t=t)
    assert torch.equal(groups[1].images[:, 0], expected)
    alpha_bar = model.schedule.alpha_bar(t)
    assert torch.allclose(groups[1].noise_levels[:, 0], ((1 - alpha_bar) / alpha_bar).sqrt())
    # a made (clean) image is read as it is, not denoised again
    assert torch.equal(model.sources(None, noisy=noisy)[0].images, noisy.images)
    # without the option the noisy target is read as x_t/√ᾱ (unchanged behaviour)
    plain = view_model(image_colour_view_denoiser=False, image_colour_own_view=False).eval()
    assert plain.view_denoiser is None
    read = plain.sources(None, noisy=noisy, t=t)[0].images
    assert torch.allclose(read * 2 - 1, (noisy.images * 2 - 1) / alpha_bar.sqrt().view(-1, 1, 1, 1, 1), atol=1e-5)


def test_all_views_adds_the_other_views_to_its_loss_and_nothing_else(tmp_path):
    batch = synthetic_batch(tmp_path, objects=2, batch_size=2, context_views=1, seed=3)
    first = view_model()(batch, torch.Generator().manual_seed(0))[1]
    every = view_model(image_colour_view_denoiser_all_views=True)(batch, torch.Generator().manual_seed(0))[1]
    # the same draws up to the view loss: every other metric is identical, the view loss is not
    assert every["target_mse"] == first["target_mse"] and every["context_mse"] == first["context_mse"]
    assert every["view_mse"] != first["view_mse"]
    # with no other view (one target, no context) it is exactly the first target's loss
    only = synthetic_batch(tmp_path / "one", objects=2, batch_size=2, context_views=0, seed=3)
    only.target_images, only.target_K, only.target_c2w = (x[:, :1] for x in (only.target_images, only.target_K, only.target_c2w))
    assert (view_model(image_colour_view_denoiser_all_views=True)(only, torch.Generator().manual_seed(0))[1]["view_mse"]
            == view_model()(only, torch.Generator().manual_seed(0))[1]["view_mse"])


def test_its_own_loss_and_the_rendering_loss_both_train_it_and_its_loss_falls(tmp_path):
    batch = synthetic_batch(tmp_path, objects=4, batch_size=4, context_views=1, seed=1)
    # The rendering loss alone (own loss weight 0, no reconstruction mode) reaches the 2D network.
    model = view_model(image_colour_view_denoiser_loss_weight=0.0, reconstruction_prob=0.0)
    loss, metrics = model(batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert "view_mse" in metrics
    assert model.view_denoiser.network.input_conv.weight.grad.abs().sum() > 0
    # Its own x₀ loss falls on the same objects in a few dozen steps (fixed noise draws per step).
    model = view_model(reconstruction_prob=0.0)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    curve = []
    for step in range(40):
        loss, metrics = model(batch, torch.Generator().manual_seed(step % 4))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        curve.append(metrics["view_mse"].item())
    assert sum(curve[-4:]) < 0.5 * sum(curve[:4]), curve


def test_a_sample_with_it_is_coloured_by_the_image_the_sampler_made(tmp_path):
    batch = synthetic_batch(tmp_path, objects=2, batch_size=2, context_views=1, seed=2)
    model = view_model().eval()
    target = Views.from_batch(batch, "target")
    K = target.K[:, 0]  # the 32 px data is at the encode resolution already
    state, sources = model.sample(K, target.c2w[:, 0], batch.background, steps=3, sampler="ddim",
                                  generator=torch.Generator().manual_seed(0), return_sources=True)
    assert state.shape == (2, *model.representation.state_shape)
    assert len(sources) == 1 and sources[0].noise_levels is None and sources[0].images.shape == (2, 1, 3, 32, 32)


def test_config_refusals_name_the_fields():
    with pytest.raises(pydantic.ValidationError, match="image_colour_view_denoiser needs image_colour_noisy_target"):
        ModelConfig(image_colour=True, image_colour_view_denoiser=True)
    with pytest.raises(pydantic.ValidationError, match="image_colour_view_denoiser needs image_colour_noisy_gain: learned"):
        ModelConfig(image_colour=True, image_colour_noisy_target=True, image_colour_view_denoiser=True,
                    image_colour_noisy_gain="wiener_bands")
    # own view on a raw noisy reading (no denoiser, learned gain) is still refused
    with pytest.raises(pydantic.ValidationError, match="image_colour_own_view with image_colour_noisy_target"):
        ModelConfig(image_colour=True, image_colour_noisy_target=True, image_colour_own_view=True)
    with pytest.raises(ValueError, match="data_std"):
        ViewDenoiser(get_preset("tiny").unet, data_std=0.0)


def test_image_from_the_view_denoiser_steps_with_its_own_x0_and_is_refused_where_it_cannot_apply(tmp_path):
    batch = synthetic_batch(tmp_path, objects=1, batch_size=1, context_views=1, seed=4)
    model = view_model().eval()
    target = Views.from_batch(batch, "target")
    K, c2w = target.K[:, 0], target.c2w[:, 0]
    x_t = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        predict = model.x0_predictor(K, c2w, batch.background, image_from="view_denoiser")
        t = torch.tensor([400])
        expected = model.denoise_view(Views(((x_t + 1) / 2).unsqueeze(1), K.unsqueeze(1), c2w.unsqueeze(1)), t)
        assert torch.equal(predict(x_t, 400), expected)
        assert predict.state.shape == (1, *model.representation.state_shape)  # ζ̂ still follows x_t
        rendered = model.x0_predictor(K, c2w, batch.background)(x_t, 400)
        assert not torch.allclose(rendered, expected)
    with pytest.raises(ValueError, match="no context views"):
        model.x0_predictor(K, c2w, batch.background, context=Views.from_batch(batch, "context"), image_from="view_denoiser")
    with pytest.raises(ValueError, match="needs model.image_colour_view_denoiser"):
        view_model(image_colour_view_denoiser=False, image_colour_own_view=False).x0_predictor(
            K, c2w, batch.background, image_from="view_denoiser")
    with pytest.raises(ValueError, match="image_from must be"):
        model.x0_predictor(K, c2w, batch.background, image_from="both")
