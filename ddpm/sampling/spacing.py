"""Which timesteps a sampler visits: the spacings, each a rule over the chain's T steps."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ddpm.config import Spacing
from ddpm.diffusion import GaussianDiffusion

KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5 and table 1


def _leading(num_timesteps: int, steps: int, abar: np.ndarray | None) -> np.ndarray:
    """0, k, 2k, .. with k = T // steps (DDIM paper); never reaches T-1."""
    return np.arange(steps) * (num_timesteps // steps)


def _linspace(num_timesteps: int, steps: int, abar: np.ndarray | None) -> np.ndarray:
    """round(linspace(0, T-1, steps)): both ends of the chain."""
    return np.linspace(0, num_timesteps - 1, steps).round()


def _trailing(num_timesteps: int, steps: int, abar: np.ndarray | None) -> np.ndarray:
    """round(arange(T, 0, -T/steps)) - 1 (Lin et al. 2023, table 2): always starts at T-1."""
    return np.round(np.arange(num_timesteps, 0, -num_timesteps / steps)) - 1


def _quadratic(num_timesteps: int, steps: int, abar: np.ndarray | None) -> np.ndarray:
    """int(linspace(0, sqrt(0.8 T), steps)^2): the DDIM paper's CIFAR-10 steps (Song et al.
    2020, Table 1; ``skip_type="quad"`` in the authors' code). Dense near the data, and never
    past 0.8 T: the last fifth of the chain is not visited at all."""
    return (np.linspace(0, np.sqrt(0.8 * num_timesteps), steps) ** 2).astype(np.int64)


def _needs(abar: np.ndarray | None, spacing: str) -> np.ndarray:
    if abar is None:
        raise ValueError(f"{spacing} spacing needs the schedule: pass alphas_cumprod")
    return abar


def _logsnr(num_timesteps: int, steps: int, abar: np.ndarray | None) -> np.ndarray:
    """Uniform in log-SNR lambda_t = log(abar_t / (1 - abar_t)) / 2 between the chain's ends,
    each rounded to the nearest timestep (DPM-Solver's choice for low resolutions, Lu et al.
    2022, sec. 3.3 and appendix D)."""
    a = _needs(abar, "logsnr")
    log_snr = 0.5 * np.log(a / (1 - a))
    targets = np.linspace(log_snr[-1], log_snr[0], steps)  # lambda falls as t grows
    t = np.arange(num_timesteps, dtype=np.float64)
    return np.round(np.interp(targets, log_snr[::-1], t[::-1]))


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = KARRAS_RHO):
    """EDM's noise levels (Karras et al. 2022, eq. 5): (sigma_max^(1/rho) + i / (n - 1)
    (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho for i = 0 .. n - 1, falling."""
    ramp = np.linspace(0, 1, steps) if steps > 1 else np.zeros(1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _karras(num_timesteps: int, steps: int, abar: np.ndarray | None) -> np.ndarray:
    """EDM's sigmas (eq. 5, rho = 7) between the chain's own ends, sigma_max = sigma_{T-1} and
    sigma_min = sigma_0 with sigma_t = sqrt((1 - abar_t) / abar_t), each mapped to the
    timestep nearest in log sigma: dense near the data, as DPM++ 2M Karras is."""
    a = _needs(abar, "karras")
    log_sigma = 0.5 * np.log((1 - a) / a)  # rises with t
    targets = np.log(karras_sigmas(np.exp(log_sigma[0]), np.exp(log_sigma[-1]), steps))
    return np.abs(targets[:, None] - log_sigma[None, :]).argmin(axis=1)


SPACINGS: dict[str, Callable[[int, int, np.ndarray | None], np.ndarray]] = {
    "leading": _leading,
    "linspace": _linspace,
    "trailing": _trailing,
    "quadratic": _quadratic,
    "logsnr": _logsnr,
    "karras": _karras,
}


def make_timesteps(
    num_timesteps: int,
    steps: int,
    spacing: Spacing = "trailing",
    alphas_cumprod: torch.Tensor | None = None,
) -> torch.Tensor:
    """The distinct timesteps a sampler visits, in decreasing order. Shape (n,), int64.

    ``spacing`` names a rule of :data:`SPACINGS`; ``logsnr`` and ``karras`` need the
    schedule's ``alphas_cumprod`` (T,). n = steps for leading, linspace and trailing;
    quadratic, logsnr and karras crowd near t = 0, and a timestep they name twice is visited
    once, so n can be less (quadratic: 49 of 50 and 96 of 100 at T = 1000). For quadratic that
    is exactly the DDIM authors' sampler, whose repeated steps are no-ops at eta = 0, at fewer
    network evaluations.

    Raises:
        ValueError: a step count out of range, or an unknown spacing.
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be between 1 and T={num_timesteps}; got {steps}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {sorted(SPACINGS)}")
    abar = None if alphas_cumprod is None else alphas_cumprod.double().cpu().numpy()
    ts = np.unique(SPACINGS[spacing](num_timesteps, steps, abar).astype(np.int64))[::-1]
    assert ts[0] < num_timesteps and ts[-1] >= 0 and len(ts) <= steps, ts
    return torch.from_numpy(ts.copy())


def sampling_timesteps(diffusion: GaussianDiffusion, steps: int, spacing: Spacing) -> torch.Tensor:
    """The timesteps a sampler of ``steps`` steps visits on ``diffusion``'s chain (its T and,
    for logsnr and karras, its schedule): :func:`make_timesteps` given the diffusion."""
    return make_timesteps(diffusion.num_timesteps, steps, spacing, diffusion.alphas_cumprod64)
