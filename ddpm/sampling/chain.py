"""The discrete chain's scalars the steppers step with, float64 on the CPU: abar_t, the half
log-SNR lambda_t and the sigma of the variance-exploding view, with t = -1 the clean data."""

from __future__ import annotations

import math

import torch

from ddpm.diffusion import GaussianDiffusion


def abar(diffusion: GaussianDiffusion, t: int) -> torch.Tensor:
    """abar_t as a float64 scalar tensor; abar_{-1} = 1 (the clean data)."""
    return diffusion.alphas_cumprod64[t] if t >= 0 else torch.tensor(1.0, dtype=torch.float64)


def half_log_snr(diffusion: GaussianDiffusion, t: int) -> float:
    """lambda_t = log(alpha_t / sigma_t) = log(abar_t / (1 - abar_t)) / 2, the half log-SNR
    the multistep solvers step in (infinite at t = -1, the clean data)."""
    a = abar(diffusion, t)
    return float(0.5 * torch.log(a / (1 - a)))


def ratios(diffusion: GaussianDiffusion, t: int, t_prev: int) -> tuple[float, float]:
    """(sigma_prev / sigma_t, alpha_prev) of a step t -> t_prev: the two scalars of the
    exponential integrators' update in the data prediction."""
    abar_t, abar_prev = abar(diffusion, t), abar(diffusion, t_prev)
    return float(torch.sqrt((1 - abar_prev) / (1 - abar_t))), float(abar_prev.sqrt())


def ve_sigma(diffusion: GaussianDiffusion, t: int) -> float:
    """sigma_t = sqrt((1 - abar_t) / abar_t): x_t / sqrt(abar_t) = x0 + sigma_t eps, the
    chain seen as variance exploding (Karras et al. 2022, sec. 2); 0 at t = -1."""
    a = float(abar(diffusion, t))
    return math.sqrt((1 - a) / a)
