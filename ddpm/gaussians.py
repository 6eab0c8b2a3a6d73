"""Gaussian densities on images: the KL divergence, the discretised decoder's likelihood and
improved DDPM's learned log-variance. Elementwise; the callers average over dimensions.
Shared by the training objective (:mod:`ddpm.diffusion`) and the bound (:mod:`ddpm.likelihood`).
"""

from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)
HALF_BIN = 1.0 / 255.0  # half the width of a pixel's bin on [-1, 1]


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """The mean over every dimension but the first: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(
    mean1: torch.Tensor,
    logvar1: torch.Tensor | float,
    mean2: torch.Tensor,
    logvar2: torch.Tensor | float,
) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats:
    (logvar2 - logvar1 + (e^logvar1 + (mean1 - mean2)^2) / e^logvar2 - 1) / 2."""
    spread = torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    return 0.5 * (logvar2 - logvar1 + spread - 1.0)


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """log P(x) per element for x on the 256 values k / 127.5 - 1 of [-1, 1] under
    N(mean, e^(2 log_scale)) discretised to bins of width 2/255 (Ho et al. 2020, eq. 13); the
    bin of -1 reaches down to -inf and that of 1 up to +inf, so the 256 probabilities sum to 1.
    """
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + HALF_BIN)
    lower = inv_std * (x - mean - HALF_BIN)
    log_cdf_upper = torch.special.log_ndtr(upper)  # log P(X < upper edge)
    log_sf_lower = torch.special.log_ndtr(-lower)  # log P(X > lower edge)
    inside = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, inside))


def learned_log_variance(
    v: torch.Tensor, min_log: torch.Tensor, max_log: torch.Tensor
) -> torch.Tensor:
    """log Sigma = frac log beta + (1 - frac) log beta-tilde with frac = (v + 1) / 2: the
    network's second half v in [-1, 1] interpolates between the two fixed choices
    (Nichol & Dhariwal 2021, eq. 15), ``max_log`` = log beta, ``min_log`` = log beta-tilde."""
    frac = (v + 1) / 2
    return frac * max_log + (1 - frac) * min_log


def vb_bits(
    x0: torch.Tensor,
    x_t: torch.Tensor,
    x0_pred: torch.Tensor,
    coef_x0: torch.Tensor | float,
    coef_xt: torch.Tensor | float,
    true_log_variance: torch.Tensor | float,
    model_log_variance: torch.Tensor,
    first: torch.Tensor | bool,
) -> torch.Tensor:
    """One term of the bound per example, in bits per dimension (B,) (Ho et al. 2020, eq. 5).

    Both Gaussians share the posterior mean's coefficients, mean = coef_x0 x0 + coef_xt x_t,
    the true one with x0 itself, the model's with ``x0_pred``. Where ``first`` (the step to
    the data), the discretised decoder's -log p(x0 | x1); elsewhere the KL from the true
    posterior to the model's. ``first`` a bool computes only that term; a (B,) tensor computes
    both and picks per example.
    """
    model_mean = coef_x0 * x0_pred + coef_xt * x_t

    def decoder() -> torch.Tensor:
        log_scale = 0.5 * model_log_variance
        return -mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, log_scale)) / LN2

    def kl() -> torch.Tensor:
        true_mean = coef_x0 * x0 + coef_xt * x_t
        kl = normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)
        return mean_flat(kl) / LN2

    if isinstance(first, bool):
        return decoder() if first else kl()
    return torch.where(first, decoder(), kl())


def clipped_log(variance: torch.Tensor) -> torch.Tensor:
    """log of a chain's posterior variances with the first, 0 (the step to the data), replaced
    by the second (improved-diffusion's clipping)."""
    return torch.cat([variance[1:2], variance[1:]]).log()
