"""DPM-Solver++ (Lu et al. 2022b): a deterministic multistep ODE solver in the data
prediction; order 1 is DDIM, 2 is DPM-Solver++(2M), 3 its third-order form."""

from __future__ import annotations

import math

import torch

from ddpm.config import SamplerConfig
from ddpm.diffusion import GaussianDiffusion
from ddpm.sampling.chain import half_log_snr, ratios
from ddpm.sampling.denoiser import Denoiser


def dpm_solver_order(order: int, i: int, n: int, lower_order_final: bool) -> int:
    """The order of step ``i`` of ``n`` (diffusers' rule): the first steps lack the history
    for more than i + 1; the step to sigma = 0 is first order (it returns the predicted x0);
    with ``lower_order_final`` and fewer than 15 steps, the one before it is at most second
    order, which keeps few-step sampling stable (Lu et al. 2022b, sec. 5)."""
    if i == n - 1:
        return 1
    if lower_order_final and n < 15 and i == n - 2:
        return min(order, i + 1, 2)
    return min(order, i + 1)


def dpm_solver_update(
    x: torch.Tensor,
    x0s: list[torch.Tensor],
    lambdas: list[float],
    lambda_prev: float,
    sigma_ratio: float,
    alpha_prev: float,
) -> torch.Tensor:
    """One DPM-Solver++ multistep update (Lu et al. 2022b, Algorithm 2 and its third-order
    form in appendix B) of order len(x0s): x_prev from x_t, the data predictions x0s (newest
    first) at the log-SNRs lambdas (newest first, lambda = log(alpha / sigma)).

    With h = lambda_prev - lambda_0 and r_k = (lambda_k - lambda_{k+1}) / h:
    x_prev = sigma_prev / sigma_t x - alpha_prev (e^-h - 1) D0 + the corrections of D1 (the
    first difference, "midpoint" form at second order) and D2 (the second, at third order).
    """
    h = lambda_prev - lambdas[0]
    phi1 = math.expm1(-h)  # e^-h - 1
    out = sigma_ratio * x - alpha_prev * phi1 * x0s[0]
    if len(x0s) == 1:
        return out
    r0 = (lambdas[0] - lambdas[1]) / h
    d1_0 = (x0s[0] - x0s[1]) / r0
    if len(x0s) == 2:
        return out - 0.5 * alpha_prev * phi1 * d1_0
    r1 = (lambdas[1] - lambdas[2]) / h
    d1_1 = (x0s[1] - x0s[2]) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi2 = phi1 / h + 1.0  # (e^-h - 1) / h + 1
    phi3 = (phi1 + h) / h**2 - 0.5  # (e^-h - 1 + h) / h^2 - 1/2, which -> 0 as h -> 0
    return out + alpha_prev * phi2 * d1 - alpha_prev * phi3 * d2


class DPMSolver:
    """Each step is :func:`dpm_solver_update` of the order :func:`dpm_solver_order` gives, in
    alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha / sigma); the
    last step, to t = -1 (sigma = 0), returns the predicted x0 itself. Keeps the last
    ``order`` data predictions."""

    stochastic = False

    def __init__(self, diffusion: GaussianDiffusion, config: SamplerConfig, timesteps) -> None:
        if config.order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3; got {config.order}")
        self.diffusion, self.order = diffusion, config.order
        self.lower_order_final, self.n = config.lower_order_final, len(timesteps)
        self.x0s: list[torch.Tensor] = []  # the data predictions so far, newest first
        self.lambdas: list[float] = []

    def step(self, i, t, t_prev, x, denoise: Denoiser, noise):
        x0 = denoise(x, t).x0
        self.x0s.insert(0, x0)
        self.lambdas.insert(0, half_log_snr(self.diffusion, t))
        if t_prev < 0:
            x = x0
        else:
            k = dpm_solver_order(self.order, i, self.n, self.lower_order_final)
            ratio, alpha_prev = ratios(self.diffusion, t, t_prev)
            lambda_prev = half_log_snr(self.diffusion, t_prev)
            x = dpm_solver_update(x, self.x0s[:k], self.lambdas[:k], lambda_prev, ratio, alpha_prev)
        del self.x0s[self.order :], self.lambdas[self.order :]
        return x, x0
