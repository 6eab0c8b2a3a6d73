"""Samplers: plain functions over :class:`ddpm.diffusion.GaussianDiffusion`'s maths.

Each sampler walks a materialised list of timesteps (never ``t - T // steps``), predicts x0 and
eps with the network (with classifier-free guidance when labels and a scale are given) and
applies its update rule. Noise comes from ``generator`` (a CPU generator gives the same images
on every device), so a sampler is deterministic for a given generator state. ``generator`` may
also be a list with one generator per image: each image's noise then comes from its own
generator, so an image does not depend on the batch it is sampled in (``ddpm.generation`` seeds
one per image index). ``x_T`` replaces the initial noise (interpolations between noises).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from ddpm.config import BH, SamplerConfig, Spacing, Variance
from ddpm.diffusion import GaussianDiffusion, posterior_coefficients
from ddpm.gaussians import learned_log_variance
from ddpm.noise import Generators, initial_noise, step_noise
from ddpm.progress import Progress

StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
"""Called after each step as ``callback(step_index, t, x_t, x0_pred)``."""


def _leading(num_timesteps: int, steps: int, log_snr: np.ndarray | None) -> np.ndarray:
    """0, k, 2k, .. with k = T // steps (DDIM paper); never reaches T-1."""
    return np.arange(steps) * (num_timesteps // steps)


def _linspace(num_timesteps: int, steps: int, log_snr: np.ndarray | None) -> np.ndarray:
    """round(linspace(0, T-1, steps)): both ends of the chain."""
    return np.linspace(0, num_timesteps - 1, steps).round()


def _trailing(num_timesteps: int, steps: int, log_snr: np.ndarray | None) -> np.ndarray:
    """round(arange(T, 0, -T/steps)) - 1 (Lin et al. 2023, table 2): always starts at T-1."""
    return np.round(np.arange(num_timesteps, 0, -num_timesteps / steps)) - 1


def _quadratic(num_timesteps: int, steps: int, log_snr: np.ndarray | None) -> np.ndarray:
    """int(linspace(0, sqrt(0.8 T), steps)^2): the DDIM paper's CIFAR-10 steps (Song et al.
    2020, Table 1; ``skip_type="quad"`` in the authors' code). Dense near the data, and never
    past 0.8 T: the last fifth of the chain is not visited at all."""
    return (np.linspace(0, np.sqrt(0.8 * num_timesteps), steps) ** 2).astype(np.int64)


def _logsnr(num_timesteps: int, steps: int, log_snr: np.ndarray | None) -> np.ndarray:
    """Uniform in log-SNR lambda_t = log(abar_t / (1 - abar_t)) / 2 between the chain's ends,
    each rounded to the nearest timestep (DPM-Solver's choice for low resolutions, Lu et al.
    2022, sec. 3.3 and appendix D)."""
    if log_snr is None:
        raise ValueError("logsnr spacing needs the schedule: pass alphas_cumprod")
    targets = np.linspace(log_snr[-1], log_snr[0], steps)  # lambda falls as t grows
    t = np.arange(num_timesteps, dtype=np.float64)
    return np.round(np.interp(targets, log_snr[::-1], t[::-1]))


SPACINGS: dict[str, Callable[[int, int, np.ndarray | None], np.ndarray]] = {
    "leading": _leading,
    "linspace": _linspace,
    "trailing": _trailing,
    "quadratic": _quadratic,
    "logsnr": _logsnr,
}


def make_timesteps(
    num_timesteps: int,
    steps: int,
    spacing: Spacing = "trailing",
    alphas_cumprod: torch.Tensor | None = None,
) -> torch.Tensor:
    """The distinct timesteps a sampler visits, in decreasing order. Shape (n,), int64.

    ``spacing`` names a rule of :data:`SPACINGS`; ``logsnr`` needs the schedule's
    ``alphas_cumprod`` (T,). n = steps for leading, linspace and trailing; quadratic and
    logsnr crowd near t = 0, and a timestep they name twice is visited once, so n can be less
    (quadratic: 49 of 50 and 96 of 100 at T = 1000). For quadratic that is exactly the DDIM
    authors' sampler, whose repeated steps are no-ops at eta = 0, at fewer network evaluations.

    Raises:
        ValueError: a step count out of range, or an unknown spacing.
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be between 1 and T={num_timesteps}; got {steps}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {sorted(SPACINGS)}")
    log_snr = None
    if alphas_cumprod is not None:
        abar = alphas_cumprod.double().cpu().numpy()
        log_snr = 0.5 * np.log(abar / (1 - abar))
    ts = np.unique(SPACINGS[spacing](num_timesteps, steps, log_snr).astype(np.int64))[::-1]
    assert ts[0] < num_timesteps and ts[-1] >= 0 and len(ts) <= steps, ts
    return torch.from_numpy(ts.copy())


def sampling_timesteps(diffusion: GaussianDiffusion, steps: int, spacing: Spacing) -> torch.Tensor:
    """The timesteps a sampler of ``steps`` steps visits on ``diffusion``'s chain (its T and,
    for logsnr, its schedule): :func:`make_timesteps` given the diffusion, not its parts."""
    return make_timesteps(diffusion.num_timesteps, steps, spacing, diffusion.alphas_cumprod64)


@torch.no_grad()
def model_problems(
    config: SamplerConfig, model: nn.Module, diffusion: GaussianDiffusion
) -> list[str]:
    """What ``model`` (a UNet) and its ``diffusion`` cannot do with the sampler ``config``, one
    line each: :meth:`SamplerConfig.problems` with the model's own facts."""
    unet = model.config
    conditional = unet.num_classes is not None
    return config.problems(diffusion.num_timesteps, conditional, unet.learn_sigma, unet.null_class)


def network_output(
    model: nn.Module,
    x_t: torch.Tensor,
    tt: torch.Tensor,
    y: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """The network's float output at the timesteps ``tt`` (B,) for the batch x_t (B, C, H, W).

    Classifier-free guidance (Ho & Salimans 2022, eq. 6): out = u + s (c - u), with c the
    output for labels y and u for the null class, both from one batched forward pass. A model
    with learned variances (twice C channels) is guided on its first half; the variance half
    is the conditional one (as GLIDE does).
    """
    if y is None:
        return model(x_t, tt).float()
    if guidance_scale == 1.0:
        return model(x_t, tt, y).float()
    if model.null_class is None:
        raise ValueError(
            f"guidance_scale={guidance_scale} needs a null class, which this model was trained "
            "without (improved-diffusion's class-conditional models): use 1.0"
        )
    null = torch.full_like(y, model.null_class)
    both = model(torch.cat([x_t, x_t]), torch.cat([tt, tt]), torch.cat([y, null]))
    cond, uncond = both.float().chunk(2)
    channels = x_t.shape[1]
    guided = uncond[:, :channels] + guidance_scale * (cond[:, :channels] - uncond[:, :channels])
    if cond.shape[1] == channels:  # fixed variances: the guided output is the whole of it
        return guided
    return torch.cat([guided, cond[:, channels:]], dim=1)


def predict_with_variance(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    x_t: torch.Tensor,
    t: int,
    y: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    clip_x0: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x0, eps, v) predicted at step ``t``: v is the learned-variance half of the output, or
    None for a model with fixed variances."""
    tt = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
    out, v = diffusion.split_output(network_output(model, x_t, tt, y, guidance_scale), x_t.shape[1])
    x0, eps = diffusion.split_prediction(out, x_t, tt, clip_x0=clip_x0)
    return x0, eps, v


def predict(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    x_t: torch.Tensor,
    t: int,
    y: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    clip_x0: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) predicted at step ``t`` for the whole batch x_t (B, C, H, W), with guidance
    when labels and a scale are given (:func:`network_output`)."""
    x0, eps, _ = predict_with_variance(model, diffusion, x_t, t, y, guidance_scale, clip_x0)
    return x0, eps


def _abar(diffusion: GaussianDiffusion, t: int) -> torch.Tensor:
    """abar_t as a float64 scalar tensor; abar_{-1} = 1 (the clean data)."""
    return diffusion.alphas_cumprod64[t] if t >= 0 else torch.tensor(1.0, dtype=torch.float64)


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
    post = posterior_coefficients(_abar(diffusion, t), _abar(diffusion, t_prev))
    mean = float(post.coef_x0) * x0 + float(post.coef_xt) * x_t
    if t_prev < 0:
        return mean
    beta = 1 - _abar(diffusion, t) / _abar(diffusion, t_prev)
    if variance == "learned":
        if v is None:
            raise ValueError("variance='learned' needs a model with learned variances")
        log_var = learned_log_variance(v, math.log(float(post.variance)), math.log(float(beta)))
        return mean + torch.exp(0.5 * log_var) * noise
    var = post.variance if variance == "posterior" else beta
    return mean + math.sqrt(float(var)) * noise


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
    abar_t, abar_prev = _abar(diffusion, t), _abar(diffusion, t_prev)
    sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
    x_prev = float(abar_prev.sqrt()) * x0 + float((1 - abar_prev - sigma**2).sqrt()) * eps
    if eta > 0 and t_prev >= 0:
        x_prev = x_prev + float(sigma) * noise
    return x_prev


def _pairs(timesteps: torch.Tensor, progress: bool, desc: str) -> Iterator[tuple[int, int]]:
    """(t, t_prev) along the timesteps, t_prev = -1 after the last; progress when asked."""
    ts = timesteps.tolist()
    with Progress(len(ts), desc, "step", enabled=progress) as bar:
        for pair in zip(ts, [*ts[1:], -1], strict=True):
            yield pair
            bar.update()


def ddpm_sample(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    shape: tuple[int, ...],
    *,
    steps: int | None = None,
    spacing: Spacing = "linspace",
    variance: Variance = "posterior",
    clip_x0: bool = True,
    y: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    generator: Generators = None,
    x_T: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Ancestral sampling over all T steps (or ``steps`` respaced ones). Returns x0 (B, C, H, W)."""
    timesteps = sampling_timesteps(diffusion, steps or diffusion.num_timesteps, spacing)
    x = initial_noise(shape, x_T, generator, device)  # 1. x_T ~ N(0, I)
    noises = step_noise(shape, generator, device, count=len(timesteps) - 1)
    for i, (t, t_prev) in enumerate(_pairs(timesteps, progress, "ddpm")):
        x0, _, v = predict_with_variance(  # 2. predict x0 (and the variance, when learned)
            model, diffusion, x, t, y, guidance_scale, clip_x0
        )
        noise = next(noises) if t_prev >= 0 else None
        x = ddpm_step(diffusion, x, x0, t, t_prev, noise, variance, v)  # 3. x_{t-1} ~ p(. | x_t)
        if callback is not None:
            callback(i, t, x, x0)
    return x


def ddim_sample(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    shape: tuple[int, ...],
    *,
    steps: int = 50,
    eta: float = 0.0,
    spacing: Spacing = "trailing",
    clip_x0: bool = True,
    y: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    generator: Generators = None,
    x_T: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DDIM sampling (Song et al. 2020) over ``steps`` timesteps. Returns x0 (B, C, H, W)."""
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be between 0 and 1; got {eta}")
    timesteps = sampling_timesteps(diffusion, steps, spacing)
    x = initial_noise(shape, x_T, generator, device)  # 1. x_T ~ N(0, I)
    noises = step_noise(shape, generator, device, count=len(timesteps) - 1 if eta > 0 else 0)
    for i, (t, t_prev) in enumerate(_pairs(timesteps, progress, "ddim")):
        x0, eps = predict(model, diffusion, x, t, y, guidance_scale, clip_x0)  # 2. predict
        noise = next(noises) if eta > 0 and t_prev >= 0 else None
        x = ddim_step(diffusion, x0, eps, t, t_prev, eta, noise)  # 3. eq. 12
        if callback is not None:
            callback(i, t, x, x0)
    return x


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


def _lambda(diffusion: GaussianDiffusion, t: int) -> float:
    """lambda_t = log(alpha_t / sigma_t) = log(abar_t / (1 - abar_t)) / 2, the half log-SNR
    the multistep solvers step in (infinite at t = -1, the clean data)."""
    abar = _abar(diffusion, t)
    return float(0.5 * torch.log(abar / (1 - abar)))


def _ratios(diffusion: GaussianDiffusion, t: int, t_prev: int) -> tuple[float, float]:
    """(sigma_prev / sigma_t, alpha_prev) of a step t -> t_prev: the two scalars of the
    exponential integrators' update in the data prediction."""
    abar_t, abar_prev = _abar(diffusion, t), _abar(diffusion, t_prev)
    return float(torch.sqrt((1 - abar_prev) / (1 - abar_t))), float(abar_prev.sqrt())


def dpm_solver_sample(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    shape: tuple[int, ...],
    *,
    steps: int = 20,
    spacing: Spacing = "trailing",
    order: int = 2,
    lower_order_final: bool = True,
    clip_x0: bool = True,
    y: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    generator: Generators = None,
    x_T: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DPM-Solver++ (Lu et al. 2022b): a deterministic multistep ODE solver in the data
    prediction; ``order`` 1 is DDIM, 2 is DPM-Solver++(2M), 3 its third-order form.

    In terms of alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and lambda_t =
    log(alpha / sigma), each step is :func:`dpm_solver_update` of the order
    :func:`dpm_solver_order` gives; the last step, to t = -1 (sigma = 0), returns the
    predicted x0 itself.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3; got {order}")
    timesteps = sampling_timesteps(diffusion, steps, spacing)
    x = initial_noise(shape, x_T, generator, device)  # 1. x_T ~ N(0, I)
    x0s: list[torch.Tensor] = []  # 2. the data predictions so far, newest first
    lambdas: list[float] = []
    n = len(timesteps)
    for i, (t, t_prev) in enumerate(_pairs(timesteps, progress, "dpm")):
        x0, _ = predict(model, diffusion, x, t, y, guidance_scale, clip_x0)
        x0s.insert(0, x0)
        lambdas.insert(0, _lambda(diffusion, t))
        if t_prev < 0:
            x = x0
        else:
            k = dpm_solver_order(order, i, n, lower_order_final)  # 3. as much history as allowed
            ratio, alpha_prev = _ratios(diffusion, t, t_prev)
            x = dpm_solver_update(  # 4. the update
                x, x0s[:k], lambdas[:k], _lambda(diffusion, t_prev), ratio, alpha_prev
            )
        del x0s[order:], lambdas[order:]
        if callback is not None:
            callback(i, t, x, x0)
    return x


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
    newest first, as in :func:`dpm_solver_update`.

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


def unipc_sample(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    shape: tuple[int, ...],
    *,
    steps: int = 10,
    spacing: Spacing = "trailing",
    order: int = 2,
    bh: BH = "bh2",
    lower_order_final: bool = True,
    corrector: bool = True,
    clip_x0: bool = True,
    y: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    generator: Generators = None,
    x_T: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023): the multistep predictor UniP of ``order`` (1: DDIM) and,
    after every step but the last, the corrector UniC, which refines the new point with the
    network's prediction there, the one the next step needs anyway: one more order of accuracy
    at no extra network evaluation. ``corrector=False`` leaves UniP alone.

    The last step, to t = -1 (sigma = 0), returns the predicted x0 itself (a first-order step
    there: diffusers' UniPC gives NaN with bh1 and, without lower_order_final, diverges).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3; got {order}")
    timesteps = sampling_timesteps(diffusion, steps, spacing)
    x = initial_noise(shape, x_T, generator, device)  # 1. x_T ~ N(0, I)
    x0s: list[torch.Tensor] = []  # 2. the data predictions so far, newest first
    lambdas: list[float] = []
    last: tuple[torch.Tensor, int, int] | None = None  # the last UniP step: x, its t, order
    n = len(timesteps)
    for i, (t, t_prev) in enumerate(_pairs(timesteps, progress, "unipc")):
        x0, _ = predict(model, diffusion, x, t, y, guidance_scale, clip_x0)
        lambda_t = _lambda(diffusion, t)
        if corrector and last is not None and t_prev >= 0:  # 3. UniC: correct x with x0
            x_last, t_last, k = last
            x = unipc_update(
                x_last, x0s[:k], lambdas[:k], lambda_t, *_ratios(diffusion, t_last, t), bh, x0
            )
        x0s.insert(0, x0)
        lambdas.insert(0, lambda_t)
        if t_prev < 0:
            x = x0
        else:  # 4. UniP: predict the next point with as much history as allowed
            k = unipc_order(order, i, n, lower_order_final)
            last = (x, t, k)
            ratio, alpha_prev = _ratios(diffusion, t, t_prev)
            x = unipc_update(
                x, x0s[:k], lambdas[:k], _lambda(diffusion, t_prev), ratio, alpha_prev, bh
            )
        del x0s[order:], lambdas[order:]
        if callback is not None:
            callback(i, t, x, x0)
    return x


SAMPLERS = {
    "ddpm": ddpm_sample,
    "ddim": ddim_sample,
    "dpm-solver": dpm_solver_sample,
    "unipc": unipc_sample,
}


def sample(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    shape: tuple[int, ...],
    config: SamplerConfig,
    **inputs,
) -> torch.Tensor:
    """Run the sampler ``config`` names with its settings. Returns x0 (B, C, H, W).

    Args:
        inputs: what every sampler takes: ``y``, ``generator``, ``x_T``, ``device``,
            ``progress``, ``callback``.
    """
    options = {
        "steps": config.steps,
        "spacing": config.spacing,
        "clip_x0": config.clip_x0,
        "guidance_scale": config.guidance_scale,
    }
    if config.sampler == "ddim":
        options["eta"] = config.eta
    if config.sampler == "ddpm":
        options["variance"] = config.variance
    if config.sampler in ("dpm-solver", "unipc"):
        options["order"] = config.order
        options["lower_order_final"] = config.lower_order_final
    if config.sampler == "unipc":
        options["bh"] = config.bh
    return SAMPLERS[config.sampler](model, diffusion, shape, **options, **inputs)
