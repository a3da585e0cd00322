"""Cosine schedule, forward noising, DDIM for x0-prediction and classifier-free guidance (model_zoo/diffusion.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

from model_zoo.diffusion import CosineSchedule, classifier_free_guidance

T = 1000


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def schedule() -> CosineSchedule:
    return CosineSchedule(num_timesteps=T)


# --------------------------------------------------------------------------- schedule


def test_alpha_bar_decreases_from_one_to_zero(schedule):
    ab = schedule.alpha_bar(torch.arange(T))
    assert ab.shape == (T,) and ab.dtype == torch.float32
    assert (ab[1:] < ab[:-1]).all()
    assert ab[0] > 0.9999 and ab[-1] < 1e-4
    assert ab[T // 2] == pytest.approx(0.5, abs=0.05)  # the cosine schedule crosses 1/2 near the middle
    assert schedule.betas.max() <= 0.999


def test_alpha_bar_lookup_forms(schedule):
    assert schedule.alpha_bar(3).ndim == 0
    assert schedule.alpha_bar(torch.tensor([[1, 2], [3, 4]])).shape == (2, 2)
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        schedule.alpha_bar(T)
    with pytest.raises(ValueError):
        schedule.alpha_bar(torch.tensor([-1]))
    with pytest.raises(TypeError, match="integers"):
        schedule.alpha_bar(torch.tensor([0.5]))


def test_sample_timesteps_uniform_and_seeded(schedule):
    a = schedule.sample_timesteps(20_000, torch.Generator().manual_seed(1), device="cpu")
    b = schedule.sample_timesteps(20_000, torch.Generator().manual_seed(1), device=torch.device("cpu"))
    assert torch.equal(a, b) and a.dtype == torch.int64
    assert a.min() >= 0 and a.max() < T
    assert a.float().mean() == pytest.approx((T - 1) / 2, rel=0.03)
    assert len(a.unique()) > 0.99 * T


@pytest.mark.parametrize("t", [0, 100, 500, 900, 999])
def test_q_sample_statistics_match_theory(schedule, t):
    n, value = 200_000, 0.7
    x0 = torch.full((n,), value)
    noise = torch.randn(n, generator=torch.Generator().manual_seed(t))
    x_t = schedule.q_sample(x0, torch.full((n,), t), noise)
    ab = float(schedule.alpha_bar(t))
    # Standard errors: mean ~ sqrt((1-ab)/n) <= 0.0023, variance ~ (1-ab) sqrt(2/n) <= 0.0032.
    assert float(x_t.mean()) == pytest.approx(ab**0.5 * value, abs=0.012)
    assert float(x_t.var()) == pytest.approx(1 - ab, abs=0.015)


def test_q_sample_broadcasts_per_sample_timesteps(schedule):
    x0, noise = torch.randn(3, 3, 2, 4, 4), torch.randn(3, 3, 2, 4, 4)
    t = torch.tensor([0, 500, 999])
    x_t = schedule.q_sample(x0, t, noise)
    for i in range(3):
        ab = schedule.alpha_bar(int(t[i]))
        torch.testing.assert_close(x_t[i], ab.sqrt() * x0[i] + (1 - ab).sqrt() * noise[i])
    # a plain int timestep applies to the whole batch
    torch.testing.assert_close(schedule.q_sample(x0, 500, noise)[1], x_t[1])


def test_q_sample_bf16(schedule):
    x0, noise = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16)
    x_t = schedule.q_sample(x0, torch.tensor([0, 1, 500, 999]), noise)
    assert x_t.dtype == torch.bfloat16
    reference = schedule.q_sample(x0.float(), torch.tensor([0, 1, 500, 999]), noise.float())
    torch.testing.assert_close(x_t.float(), reference, atol=2e-2, rtol=1e-2)


# --------------------------------------------------------------------------- DDIM


def test_ddim_timesteps(schedule):
    for steps in (1, 2, 7, 50, 999, T):
        ts = schedule.ddim_timesteps(steps)
        assert len(ts) == steps and ts[0] == T - 1
        assert all(a > b for a, b in itertools.pairwise(ts))
        if steps > 1:
            assert ts[-1] == 0
    assert schedule.ddim_timesteps(T) == list(range(T - 1, -1, -1))
    for bad in (0, T + 1):
        with pytest.raises(ValueError):
            schedule.ddim_timesteps(bad)


def run_ddim(schedule, x0, steps, eta=0.0, seed=0, dtype=torch.float32):
    """DDIM from pure noise with a perfect x0 predictor; returns the final sample and the trajectory."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(x0.shape, generator=generator).to(dtype)
    ts = schedule.ddim_timesteps(steps)
    trajectory = [x]
    for t, t_prev in itertools.pairwise([*ts, -1]):
        x = schedule.ddim_step(x, x0.to(dtype), torch.full((x0.shape[0],), t), t_prev, eta=eta, generator=generator)
        trajectory.append(x)
    return x, trajectory


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("steps", [1, 10, 50])
def test_ddim_with_perfect_predictor_recovers_x0(schedule, eta, steps):
    x0 = torch.randn(2, 3, 4, 8, 8)
    final, trajectory = run_ddim(schedule, x0, steps, eta=eta)
    assert torch.equal(final, x0)
    assert len(trajectory) == steps + 1


def test_ddim_is_deterministic(schedule):
    x0 = torch.randn(2, 16)
    _, a = run_ddim(schedule, x0, 20, eta=0.0, seed=3)
    _, b = run_ddim(schedule, x0, 20, eta=0.0, seed=3)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    # with eta > 0 the same generator seed gives the same trajectory, another seed a different one
    _, c = run_ddim(schedule, x0, 20, eta=0.5, seed=3)
    _, d = run_ddim(schedule, x0, 20, eta=0.5, seed=3)
    _, e = run_ddim(schedule, x0, 20, eta=0.5, seed=4)
    assert all(torch.equal(u, v) for u, v in zip(c, d))
    assert not torch.equal(c[10], e[10])


def test_ddim_eta0_follows_the_forward_process(schedule):
    """With the true x0, deterministic DDIM keeps the noise fixed: every x_t equals q_sample(x0, t, ε)."""
    x0, eps = torch.randn(4, 32), torch.randn(4, 32)
    ts = schedule.ddim_timesteps(25)
    x = schedule.q_sample(x0, ts[0], eps)
    for t, t_prev in itertools.pairwise(ts):
        x = schedule.ddim_step(x, x0, t, t_prev)
        torch.testing.assert_close(x, schedule.q_sample(x0, t_prev, eps), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(schedule.eps_from_x0(x, x0, ts[-1]), eps, atol=1e-3, rtol=1e-3)


def test_ddim_per_sample_t_prev_with_finished_samples(schedule):
    x0, x_t = torch.randn(2, 5), torch.randn(2, 5)
    out = schedule.ddim_step(x_t, x0, torch.tensor([10, 10]), torch.tensor([-1, 5]))
    assert torch.equal(out[0], x0[0])
    torch.testing.assert_close(out[1:], schedule.ddim_step(x_t[1:], x0[1:], 10, 5))


def test_ddim_bf16(schedule):
    x0 = torch.randn(2, 3, 4, 8, 8)
    final, trajectory = run_ddim(schedule, x0, 10, eta=1.0, dtype=torch.bfloat16)
    assert all(x.dtype == torch.bfloat16 for x in trajectory)
    assert torch.equal(final, x0.to(torch.bfloat16))


# --------------------------------------------------------------------------- guidance


def test_classifier_free_guidance():
    cond, uncond = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 1.0), cond)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 3.0), uncond + 3.0 * (cond - uncond))
