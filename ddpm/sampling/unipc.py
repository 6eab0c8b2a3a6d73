"""UniPC (Zhao et al. 2023): the multistep predictor UniP and the corrector UniC, in the data
prediction."""

from __future__ import annotations

import math

import numpy as np
import torch

from ddpm.config import BH, SamplerConfig
from ddpm.diffusion import GaussianDiffusion
from ddpm.sampling.chain import half_log_snr, ratios
from ddpm.sampling.denoiser import Denoiser


def unipc_order(order: int, i: int, n: int, lower_order_final: bool) -> int:
    """UniP's order at step ``i`` of ``n`` (diffusers' rule): the first steps lack the history
    for more than i + 1; with ``lower_order_final`` (at any number of steps) step i is at most
    of order n - i, so the last is first order, the one before at most second."""
    return min(order, i + 1, n - i if lower_order_final else order)


def unipc_coefficients(rks: list[float], h: float, bh: BH, corrector: bool) -> list[float]:
    """The weights rho of UniPC's differences (Zhao et al. 2023, sec. 3; data prediction).

    With hh = -h, B(h) = hh (bh1) or e^hh - 1 (bh2) and g_k = hh phi_{k+1}(hh) k!, where
    phi_1(x) = (e^x - 1) / x and phi_{k+1}(x) = (phi_k(x) - 1/k!) / x, the weights solve
    R rho = g / B(h), R[k][j] = r_j^k over the ratios rks = r_j = (lambda_j - lambda_0) / h
    of the history (and r = 1 for the corrector's new point). UniP of order p uses the first
    p - 1 rows and columns (its known points only), UniC all of them; the papers' simple
    forms take rho = 1/2 for UniP-2 and UniC-1.
    """
    p = len(rks) + 1  # the order: the current point and its history
    if (p == 2 and not corrector) or (p == 1 and corrector):
        return [0.5]
    if p == 1:
        return []
    hh = -h
    b_h = hh if bh == "bh1" else math.expm1(hh)
    g, h_phi, factorial = [], math.expm1(hh) / hh - 1.0, 1.0  # h_phi = hh phi_2(hh)
    for k in range(1, p + 1):
        g.append(h_phi * factorial / b_h)
        factorial *= k + 1
        h_phi = h_phi / hh - 1.0 / factorial
    r = np.array([*rks, 1.0])
    R = np.stack([r**k for k in range(p)])
    size = p if corrector else p - 1
    return np.linalg.solve(R[:size, :size], np.array(g[:size])).tolist()


def unipc_update(
    x: torch.Tensor,
    x0s: list[torch.Tensor],
    lambdas: list[float],
    lambda_prev: float,
    sigma_ratio: float,
    alpha_prev: float,
    bh: BH,
    x0_new: torch.Tensor | None = None,
) -> torch.Tensor:
    """One UniP step of order len(x0s) from x at lambdas[0] to lambda_prev or, given the data
    prediction ``x0_new`` at lambda_prev, the UniC correction of that step (Zhao et al. 2023,
    sec. 3.1-3.2, data prediction): the data predictions x0s and their log-SNRs lambdas are
    newest first, as in :func:`ddpm.sampling.dpm_solver.dpm_solver_update`.

    x_prev = sigma_prev / sigma_t x - alpha_prev (e^-h - 1) D0 - alpha_prev B(h) sum_k rho_k
    D_k, with D_k = (x0s[k] - x0s[0]) / r_k for the history and, in the corrector, x0_new - D0
    for the new point (r = 1); rho from :func:`unipc_coefficients`.
    """
    h = lambda_prev - lambdas[0]
    out = sigma_ratio * x - alpha_prev * math.expm1(-h) * x0s[0]
    rks = [(lam - lambdas[0]) / h for lam in lambdas[1:]]
    rhos = unipc_coefficients(rks, h, bh, corrector=x0_new is not None)
    if not rhos:
        return out
    diffs = [(x0 - x0s[0]) / r for x0, r in zip(x0s[1:], rks, strict=True)]
    if x0_new is not None:
        diffs.append(x0_new - x0s[0])
    b_h = -h if bh == "bh1" else math.expm1(-h)
    return out - alpha_prev * b_h * sum(rho * d for rho, d in zip(rhos, diffs, strict=True))


class UniPC:
    """UniP of ``config.order`` (1: DDIM) and, after every step but the last, UniC
    (``config.corrector``), which refines the new point with the network's prediction there,
    the one the next step needs anyway: one more order of accuracy at no extra network
    evaluation. The last step, to t = -1 (sigma = 0), returns the predicted x0 itself (a
    first-order step there: diffusers' UniPC gives NaN with bh1 and, without
    lower_order_final, diverges)."""

    stochastic = False

    def __init__(self, diffusion: GaussianDiffusion, config: SamplerConfig, timesteps) -> None:
        if config.order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3; got {config.order}")
        self.diffusion, self.order, self.bh = diffusion, config.order, config.bh
        self.lower_order_final, self.corrector = config.lower_order_final, config.corrector
        self.n = len(timesteps)
        self.x0s: list[torch.Tensor] = []  # the data predictions so far, newest first
        self.lambdas: list[float] = []
        self.last: tuple[torch.Tensor, int, int] | None = None  # the last UniP: x, its t, order

    def step(self, i, t, t_prev, x, denoise: Denoiser, noise):
        x0 = denoise(x, t).x0
        lambda_t = half_log_snr(self.diffusion, t)
        if self.corrector and self.last is not None and t_prev >= 0:  # UniC: correct x with x0
            x_last, t_last, k = self.last
            x = unipc_update(x_last, self.x0s[:k], self.lambdas[:k], lambda_t,
                             *ratios(self.diffusion, t_last, t), self.bh, x0)  # fmt: skip
        self.x0s.insert(0, x0)
        self.lambdas.insert(0, lambda_t)
        if t_prev < 0:
            x = x0
        else:  # UniP: predict the next point with as much history as allowed
            k = unipc_order(self.order, i, self.n, self.lower_order_final)
            self.last = (x, t, k)
            ratio, alpha_prev = ratios(self.diffusion, t, t_prev)
            lambda_prev = half_log_snr(self.diffusion, t_prev)
            x = unipc_update(x, self.x0s[:k], self.lambdas[:k], lambda_prev, ratio, alpha_prev,
                             self.bh)  # fmt: skip
        del self.x0s[self.order :], self.lambdas[self.order :]
        return x, x0
