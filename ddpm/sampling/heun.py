"""Heun's sampler (Karras et al. 2022, "EDM", Algorithm 1) on our variance-preserving chain.

Seen as variance exploding, x~ = x_t / sqrt(abar_t) = x0 + sigma_t eps with sigma_t =
sqrt((1 - abar_t) / abar_t), the probability-flow ODE is dx~/dsigma = eps(x~, sigma) (EDM's
d = (x~ - D(x~; sigma)) / sigma, with D the predicted x0). Each step from sigma to sigma' is
Euler's, x~' = x~ + (sigma' - sigma) eps, then corrected with the slope at its end,
x~' = x~ + (sigma' - sigma) (eps + eps') / 2: second order, two network evaluations. The last
step, to sigma = 0, is Euler's alone: it returns the predicted x0. Deterministic.
"""

from __future__ import annotations

import math

from ddpm.config import SamplerConfig
from ddpm.diffusion import GaussianDiffusion
from ddpm.sampling.chain import abar, ve_sigma
from ddpm.sampling.denoiser import Denoiser


class Heun:
    """EDM's Algorithm 1 over the visited timesteps (at each one's own sigma)."""

    stochastic = False

    def __init__(self, diffusion: GaussianDiffusion, config: SamplerConfig, timesteps) -> None:
        self.diffusion = diffusion

    def step(self, i, t, t_prev, x, denoise: Denoiser, noise):
        p = denoise(x, t)
        if t_prev < 0:  # Euler to sigma = 0: x~ - sigma eps = x0
            return p.x0, p.x0
        sigma, sigma_prev = ve_sigma(self.diffusion, t), ve_sigma(self.diffusion, t_prev)
        scale, scale_prev = (
            math.sqrt(float(abar(self.diffusion, t))),
            math.sqrt(float(abar(self.diffusion, t_prev))),
        )
        x_ve = x / scale
        euler = x_ve + (sigma_prev - sigma) * p.eps  # Algorithm 1, line 5
        q = denoise(euler * scale_prev, t_prev)  # the slope at the step's end (line 7)
        x_prev = x_ve + (sigma_prev - sigma) * 0.5 * (p.eps + q.eps)  # line 8
        return x_prev * scale_prev, q.x0
