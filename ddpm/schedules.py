"""Noise schedules: beta_t for t = 0 .. T-1, as pure float64 functions.

Every schedule is registered in :data:`SCHEDULES` and reached through :func:`make_betas`, which
checks 0 < beta_t < 1. Float64 matters: alphas_cumprod is a product of up to thousands of
factors, and float32 loses the tail of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

MAX_BETA = 0.999  # Nichol & Dhariwal 2021, sec. 3.2: avoids a singularity near t = T


def linear_betas(timesteps: int) -> torch.Tensor:
    """Ho et al. 2020: beta from 1e-4 to 0.02 over T = 1000, scaled by 1000 / T for other T.

    The scaling keeps abar(T) near zero for short chains (improved-diffusion); below T ≈ 50 it
    would push beta past 1, so it is clipped at MAX_BETA like the other schedules.
    """
    scale = 1000 / timesteps
    betas = torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    return betas.clamp(max=MAX_BETA)


def _betas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """beta_t = 1 - abar(t+1) / abar(t) from abar on the T + 1 grid points t/T, clipped."""
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(0.0, MAX_BETA)


def cosine_betas(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: abar(t) = f(t) / f(0).

    f(t) = cos²((t/T + s) / (1 + s) · π/2), with the offset s keeping beta_0 from being tiny.
    """
    t = torch.linspace(0, 1, timesteps + 1, dtype=torch.float64)
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return _betas_from_alphas_cumprod(f / f[0])


def sigmoid_betas(
    timesteps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0
) -> torch.Tensor:
    """Jabri et al. 2022 (RIN), as in lucidrains: abar follows a shifted, rescaled sigmoid."""
    t = torch.linspace(0, 1, timesteps + 1, dtype=torch.float64)
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    f = (v_end - torch.sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)
    return _betas_from_alphas_cumprod(f / f[0])


def dns_betas(timesteps: int, offset: float = 5.0) -> torch.Tensor:
    """ "DNS" (dynamic negative square), the third schedule of betterlmy's CIFAR-10 DDPM:
    beta_t = low + (high - low) ((t + offset) / (T + 1 + offset))² for t = 0 .. T-1, with the
    linear schedule's ends, low = 1e-4 and high = 0.02 scaled by 1000 / T.

    beta grows with the square of t, so it stays near ``low`` for longer than the linear
    schedule and destroys the image later in the chain; clipped at MAX_BETA like the others.
    """
    scale = 1000 / timesteps
    low, high = scale * 1e-4, scale * 0.02
    t = torch.arange(timesteps, dtype=torch.float64)
    betas = low + (high - low) * ((t + offset) / (timesteps + 1 + offset)) ** 2
    return betas.clamp(max=MAX_BETA)


SCHEDULES: dict[str, Callable[[int], torch.Tensor]] = {
    "linear": linear_betas,
    "cosine": cosine_betas,
    "sigmoid": sigmoid_betas,
    "dns": dns_betas,
}


def make_betas(name: str, timesteps: int) -> torch.Tensor:
    """The betas of schedule ``name`` over ``timesteps`` steps.

    Returns:
        float64 tensor of shape [T], every value strictly between 0 and 1.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    if timesteps < 2:
        raise ValueError(f"timesteps must be at least 2; got {timesteps}")
    betas = SCHEDULES[name](timesteps)
    assert betas.shape == (timesteps,) and betas.dtype == torch.float64
    if not bool(((betas > 0) & (betas < 1)).all()):
        raise ValueError(f"schedule {name!r} with T={timesteps} gives betas outside (0, 1)")
    return betas
