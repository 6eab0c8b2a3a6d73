"""DDIM (Song et al. 2020): the non-Markovian chain, deterministic at eta = 0."""

from __future__ import annotations

import torch

from ddpm.config import SamplerConfig
from ddpm.diffusion import GaussianDiffusion
from ddpm.sampling.chain import abar
from ddpm.sampling.denoiser import Denoiser


def ddim_step(
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    eps: torch.Tensor,
    t: int,
    t_prev: int,
    eta: float,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """DDIM step x_t -> x_{t_prev} (Song et al. 2020, eq. 12, sigma from eq. 16).

    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma noise,
    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev).
    With eta = 1 this is the ancestral step with the posterior variance.
    """
    abar_t, abar_prev = abar(diffusion, t), abar(diffusion, t_prev)
    sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
    x_prev = float(abar_prev.sqrt()) * x0 + float((1 - abar_prev - sigma**2).sqrt()) * eps
    if eta > 0 and t_prev >= 0:
        x_prev = x_prev + float(sigma) * noise
    return x_prev


class DDIM:
    """eq. 12 with eta from ``config.eta``; noise only when eta > 0."""

    def __init__(self, diffusion: GaussianDiffusion, config: SamplerConfig, timesteps) -> None:
        self.diffusion, self.eta = diffusion, config.eta
        self.stochastic = config.eta > 0

    def step(self, i, t, t_prev, x, denoise: Denoiser, noise):
        p = denoise(x, t)
        return ddim_step(self.diffusion, p.x0, p.eps, t, t_prev, self.eta, noise), p.x0
