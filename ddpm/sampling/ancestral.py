"""The ancestral sampler (Ho et al. 2020, Algorithm 2), respaced over any visited timesteps."""

from __future__ import annotations

import math

import torch

from ddpm.config import SamplerConfig, Variance
from ddpm.diffusion import GaussianDiffusion, posterior_coefficients
from ddpm.gaussians import learned_log_variance
from ddpm.sampling.chain import abar
from ddpm.sampling.denoiser import Denoiser


def ddpm_step(
    diffusion: GaussianDiffusion,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    t: int,
    t_prev: int,
    noise: torch.Tensor | None,
    variance: Variance = "posterior",
    v: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ancestral step x_t -> x_{t_prev} (Ho et al. 2020, Algorithm 2, respaced).

    The mean is q(x_{t_prev} | x_t, x0)'s (eq. 7); the variance is the posterior beta-tilde or
    beta (both in sec. 3.2), or the model's learned one, which interpolates the two in log
    space by its output ``v`` (Nichol & Dhariwal 2021, eq. 15), both taken between t and
    t_prev, so a respaced chain uses its own betas. No noise is added on the last step
    (t_prev = -1).
    """
    post = posterior_coefficients(abar(diffusion, t), abar(diffusion, t_prev))
    mean = float(post.coef_x0) * x0 + float(post.coef_xt) * x_t
    if t_prev < 0:
        return mean
    beta = 1 - abar(diffusion, t) / abar(diffusion, t_prev)
    if variance == "learned":
        if v is None:
            raise ValueError("variance='learned' needs a model with learned variances")
        log_var = learned_log_variance(v, math.log(float(post.variance)), math.log(float(beta)))
        return mean + torch.exp(0.5 * log_var) * noise
    var = post.variance if variance == "posterior" else beta
    return mean + math.sqrt(float(var)) * noise


class Ancestral:
    """x_{t_prev} ~ p(. | x_t): the posterior mean from the predicted x0, and the variance
    ``config.variance`` says (posterior, beta or learned); a fresh noise every step."""

    stochastic = True

    def __init__(self, diffusion: GaussianDiffusion, config: SamplerConfig, timesteps) -> None:
        self.diffusion, self.variance = diffusion, config.variance

    def step(self, i, t, t_prev, x, denoise: Denoiser, noise):
        p = denoise(x, t)  # the predicted x0 (and the variance, when learned)
        return ddpm_step(self.diffusion, x, p.x0, t, t_prev, noise, self.variance, p.v), p.x0
