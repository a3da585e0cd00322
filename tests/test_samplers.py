"""The samplers against an analytic case: Gaussian data, whose exact x₀-predictor is known.

For data x₀ ~ N(μ, s²) per element, E[x₀ | x_t] = μ + s²√ᾱ (x_t − √ᾱ μ) / (ᾱ s² + 1 − ᾱ), and the
probability-flow ODE maps x_T ~ N(0, 1) onto N(μ, s²). A sampler given this predictor must
produce samples with mean μ and standard deviation s; the error shrinks with more steps, faster
for the second-order DPM-Solver++(2M) than for first-order DDIM. Ancestral DDPM draws each step
from q(x_s | x_t, x̂₀), which leaves out x₀'s posterior variance: its samples are too narrow by an
amount that shrinks with the number of steps.
"""

from __future__ import annotations

import pytest
import torch

from model_zoo.diffusion import CosineSchedule
from model_zoo.samplers import SAMPLERS, get_sampler

MU, S = 0.3, 0.2


def gaussian_x0(schedule):
    def model(x_t, t):
        ab = schedule.alpha_bar(t)
        return MU + S**2 * ab.sqrt() * (x_t - ab.sqrt() * MU) / (ab * S**2 + 1 - ab)
    return model


def std_error(name, steps, schedule, noise, generator=None):
    out = get_sampler(name)(gaussian_x0(schedule), noise, schedule.ddim_timesteps(steps), schedule, generator=generator)
    return abs(float(out.mean()) - MU), abs(float(out.std()) - S)


DETERMINISTIC = ("ddim", "dpmpp_2m")


def test_samplers_recover_gaussian_data_and_dpmpp_is_more_accurate_per_step():
    schedule = CosineSchedule(1000)
    noise = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    for name in DETERMINISTIC:
        mean_err, std_err = std_error(name, 100, schedule, noise)
        assert mean_err < 0.005 and std_err < 0.01, (name, mean_err, std_err)
    # Measured std errors: 20 steps DDIM 0.031, DPM++ 0.016; 50 steps 0.0127 and 0.0009.
    for steps, ratio in ((20, 0.7), (50, 0.2)):
        ddim = std_error("ddim", steps, schedule, noise)[1]
        dpmpp = std_error("dpmpp_2m", steps, schedule, noise)[1]
        assert dpmpp < ratio * ddim, (steps, ddim, dpmpp)


def test_ddpm_is_unbiased_its_spread_converges_with_steps_and_its_noise_comes_from_the_generator():
    schedule = CosineSchedule(1000)
    noise = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    # Measured std errors: 25 steps 0.041, 100 steps 0.015, 300 steps 0.006; mean errors < 2e-4.
    errors = [std_error("ddpm", steps, schedule, noise, torch.Generator().manual_seed(1)) for steps in (25, 100, 300)]
    assert all(mean_err < 0.002 for mean_err, _ in errors)
    spread = [std_err for _, std_err in errors]
    assert spread[0] > 0.03 and spread[1] < 0.6 * spread[0] and spread[2] < 0.6 * spread[1] and spread[2] < 0.01, spread
    run = lambda seed: get_sampler("ddpm")(gaussian_x0(schedule), noise[:64], schedule.ddim_timesteps(5), schedule,
                                          generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))


def test_callback_sees_every_step_in_order():
    schedule = CosineSchedule(1000)
    seen = []
    for name in SAMPLERS:
        seen.clear()
        get_sampler(name)(gaussian_x0(schedule), torch.randn(8), schedule.ddim_timesteps(5), schedule,
                          callback=lambda info: seen.append((info["i"], info["t"], info["steps"])))
        assert [s[0] for s in seen] == list(range(5)) and [s[1] for s in seen] == schedule.ddim_timesteps(5)
        assert all(s[2] == 5 for s in seen)


def test_unknown_sampler_is_named():
    with pytest.raises(ValueError, match="unknown sampler 'euler'.*ddim"):
        get_sampler("euler")
