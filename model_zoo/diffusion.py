"""Gaussian diffusion for the x0-parameterisation: cosine schedule, forward noising, DDIM, CFG.

Timesteps are integer indices t in [0, T): index t means t + 1 noising steps have been applied,
so ᾱ[0] is just below 1 and ᾱ[T-1] is almost 0 (DESIGN.md's "t ~ U{1..T}" is the same set shifted
by one). The denoiser predicts the clean sample x0 directly; DDIM recovers the noise from it.

All arithmetic on the schedule runs in float32 and results are cast back to the caller's dtype,
so bf16 tensors get bf16 results without bf16 rounding of ᾱ (which would make ᾱ ≈ 1 steps
indistinguishable). Nothing assumes a device: tables follow the tensors they are used with, and
random numbers come from the caller's generator on the generator's own device, so a seeded run
draws the same numbers whether the tensors then live on CPU or GPU.
"""

from __future__ import annotations

import math

import torch

TimestepLike = int | torch.Tensor


class CosineSchedule:
    """Nichol & Dhariwal (2021) cosine ᾱ(t), with per-step betas clipped to <= ``max_beta``."""

    def __init__(self, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999):
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        self.num_timesteps = num_timesteps
        self.s = s

        def f(step: torch.Tensor) -> torch.Tensor:
            return torch.cos((step / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2

        # Built in float64 so the cumulative product of ~1000 factors does not drift.
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64)
        betas = (1 - f(steps[1:]) / f(steps[:-1])).clamp(max=max_beta)
        self.betas = betas
        self._alpha_bar = torch.cumprod(1 - betas, dim=0).to(torch.float32)
        self._by_device: dict[torch.device, torch.Tensor] = {}

    # ------------------------------------------------------------------ lookups

    def _table(self, device: torch.device) -> torch.Tensor:
        # One copy per device, made once: avoids a host-to-device copy on every training step.
        if device not in self._by_device:
            self._by_device[device] = self._alpha_bar.to(device)
        return self._by_device[device]

    def alpha_bar(self, t: TimestepLike, device: torch.device | str | None = None) -> torch.Tensor:
        """ᾱ at integer timesteps t (int or tensor of any shape), float32 on t's (or ``device``'s) device."""
        t = torch.as_tensor(t, device=device)
        if t.is_floating_point() or t.is_complex():
            raise TypeError(f"timesteps must be integers, got dtype {t.dtype}")
        # Range-check only on CPU: on an accelerator it would force a sync every step, and an
        # out-of-range index there fails loudly anyway.
        if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"timesteps must be in [0, {self.num_timesteps}), got min {int(t.min())} max {int(t.max())}")
        return self._table(t.device)[t.long()]

    # ------------------------------------------------------------------ training

    def sample_timesteps(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """(batch,) int64 timesteps uniform in [0, T), drawn with ``generator`` and moved to ``device``."""
        draw_device = generator.device if generator is not None else device
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=draw_device)
        return t.to(device) if device is not None else t

    def q_sample(self, x0: torch.Tensor, t: TimestepLike, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t · x0 + √(1−ᾱ_t) · noise. t: int, scalar or (B,), broadcast over x0's trailing dims."""
        ab = _per_sample(self.alpha_bar(t, x0.device), x0)
        x_t = ab.sqrt() * x0.float() + (1 - ab).sqrt() * noise.float()
        return x_t.to(x0.dtype)

    # ------------------------------------------------------------------ sampling

    def ddim_timesteps(self, steps: int) -> list[int]:
        """``steps`` distinct timesteps, evenly spaced and decreasing from T-1 to 0 (just [T-1] if steps == 1)."""
        T = self.num_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be in [1, {T}], got {steps}")
        if steps == 1:
            return [T - 1]
        # Integer rounding of i * (T-1) / (steps-1): spacing >= 1, so the values are distinct.
        ascending = [(i * (T - 1) + (steps - 1) // 2) // (steps - 1) for i in range(steps)]
        return ascending[::-1]

    def eps_from_x0(self, x_t: torch.Tensor, x0_pred: torch.Tensor, t: TimestepLike) -> torch.Tensor:
        """The noise implied by x_t and a predicted x0 (inverting :meth:`q_sample`), in float32."""
        ab = _per_sample(self.alpha_bar(t, x_t.device), x_t)
        return (x_t.float() - ab.sqrt() * x0_pred.float()) / (1 - ab).clamp(min=1e-20).sqrt()

    def ddim_step(
        self,
        x_t: torch.Tensor,
        x0_pred: torch.Tensor,
        t: TimestepLike,
        t_prev: TimestepLike,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One DDIM update x_t -> x_{t_prev} (Song et al. 2021, eq. 12) for an x0-predicting model.

        eta = 0 is deterministic; eta = 1 matches DDPM's posterior variance. t_prev < 0 means
        "the end": the result is x0_pred itself.
        """
        if isinstance(t_prev, int) and t_prev < 0:
            return x0_pred.to(x_t.dtype)
        t_prev_tensor = torch.as_tensor(t_prev, device=x_t.device)
        ab_t = _per_sample(self.alpha_bar(t, x_t.device), x_t)
        # Per-sample t_prev may mix finished (< 0, ᾱ = 1) and running samples.
        done = t_prev_tensor < 0
        ab_prev = torch.where(done, torch.ones((), device=x_t.device), self.alpha_bar(t_prev_tensor.clamp(min=0)))
        ab_prev = _per_sample(ab_prev, x_t)

        eps = self.eps_from_x0(x_t, x0_pred, t)
        sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).clamp(min=0).sqrt()
        x_prev = ab_prev.sqrt() * x0_pred.float() + (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0:
            x_prev = x_prev + sigma * _randn_like(x_prev, generator)
        return x_prev.to(x_t.dtype)


def classifier_free_guidance(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + scale · (cond − uncond): scale 1 is the conditional model, 0 the unconditional one."""
    return pred_uncond + scale * (pred_cond - pred_uncond)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Scalar or (B,) values -> shape broadcastable over ``like`` = (B, ...)."""
    if values.ndim == 0:
        return values
    if values.ndim != 1 or values.shape[0] != like.shape[0]:
        raise ValueError(f"timesteps must be a scalar or shape ({like.shape[0]},), got {tuple(values.shape)}")
    return values.reshape((-1,) + (1,) * (like.ndim - 1))


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # Draw on the generator's device (a CPU generator cannot fill a CUDA tensor), then move.
    draw_device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=draw_device, dtype=torch.float32).to(x.device)
