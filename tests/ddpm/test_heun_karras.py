"""Heun's sampler (EDM, Algorithm 1) and the Karras spacing: against diffusers'
HeunDiscreteScheduler and DPMSolverMultistepScheduler loops given our timesteps (the test
oracle, never a runtime dependency), EDM's eq. 5 written out, and Heun's order on a chain
whose ODE has a closed form."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from smooth import DIFFUSION, SHAPE, Smooth

from ddpm.sampling.api import ddim_sample, dpm_solver_sample, heun_sample, nfe
from ddpm.sampling.spacing import sampling_timesteps

diffusers = pytest.importorskip("diffusers")

ABAR = DIFFUSION.alphas_cumprod64


def sigma(t: int) -> float:
    return math.sqrt((1 - float(ABAR[t])) / float(ABAR[t]))


def karras_by_hand(steps: int) -> list[int]:
    """EDM eq. 5 with rho = 7 between sigma_0 and sigma_999, each sigma to the timestep nearest
    in log sigma, repeats visited once: written out with math, apart from the library."""
    lo, hi = sigma(0) ** (1 / 7), sigma(999) ** (1 / 7)
    out = []
    for i in range(steps):
        target = math.log((hi + i / (steps - 1) * (lo - hi)) ** 7)
        t = min(range(1000), key=lambda t: abs(math.log(sigma(t)) - target))
        if t not in out:
            out.append(t)
    return out


# the formula's values at T = 1000 (linear schedule), pinned
KARRAS_10 = [999, 937, 864, 775, 663, 511, 301, 102, 18, 0]
KARRAS_20 = [999, 971, 940, 908, 872, 833, 790, 743, 689, 627, 556, 472, 373, 265, 164, 88,
             41, 16, 4, 0]  # fmt: skip


@pytest.mark.parametrize(("steps", "pinned"), [(10, KARRAS_10), (20, KARRAS_20)])
def test_karras_timesteps_are_edms_formula(steps, pinned):
    ours = sampling_timesteps(DIFFUSION, steps, "karras").tolist()
    assert ours == pinned == karras_by_hand(steps)


def test_karras_visits_a_repeated_timestep_once():
    ts = sampling_timesteps(DIFFUSION, 200, "karras")
    assert len(ts) < 200 and bool((ts.diff() < 0).all()) and ts[0] == 999 and ts[-1] == 0


def heun_loop(x_T: torch.Tensor, timesteps: list[int]) -> torch.Tensor:
    """diffusers' Heun loop over our timesteps: its sample is x / sqrt(abar) (sigma space), its
    model input that divided by sqrt(sigma^2 + 1); sigmas in float64 from float64 alpha-bars."""
    scheduler = diffusers.HeunDiscreteScheduler(
        num_train_timesteps=1000, trained_betas=DIFFUSION.betas.double().tolist(),
        prediction_type="epsilon",
    )  # fmt: skip
    scheduler.alphas_cumprod = ABAR.clone()
    scheduler.set_timesteps(timesteps=timesteps)
    abar = ABAR[timesteps]
    s = ((1 - abar) / abar).sqrt()
    scheduler.sigmas = torch.cat([s[:1], s[1:].repeat_interleave(2), torch.zeros(1).double()])
    net, x = Smooth(), x_T.double() * (s[0] ** 2 + 1).sqrt()
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        eps = net(model_input, torch.full((x.shape[0],), int(t)))
        x = scheduler.step(eps, t, x).prev_sample
    return x.float()


@pytest.mark.parametrize("spacing", ["leading", "trailing", "karras"])
@pytest.mark.parametrize("steps", [5, 10, 20])
def test_heun_is_diffusers_heun(spacing, steps):
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps))
    ours = heun_sample(Smooth(), DIFFUSION, SHAPE, steps=steps, spacing=spacing, clip_x0=False,
                       x_T=x_T)  # fmt: skip
    theirs = heun_loop(x_T, sampling_timesteps(DIFFUSION, steps, spacing).tolist())
    assert bool(torch.isfinite(ours).all())
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))


def dpm_loop(x_T: torch.Tensor, timesteps: list[int], order: int) -> torch.Tensor:
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, trained_betas=DIFFUSION.betas.double().tolist(),
        solver_order=order, algorithm_type="dpmsolver++", solver_type="midpoint",
        lower_order_final=True, final_sigmas_type="zero", prediction_type="epsilon",
    )  # fmt: skip
    scheduler.alphas_cumprod = ABAR.clone()
    scheduler.set_timesteps(timesteps=timesteps)
    scheduler.sigmas = scheduler.sigmas.double()
    net, x = Smooth(), x_T.double()
    for t in scheduler.timesteps:
        x = scheduler.step(net(x, torch.full((x.shape[0],), int(t))), t, x).prev_sample
    return x.float()


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("steps", [10, 20])
def test_dpm_solver_karras_is_diffusers_given_the_same_timesteps(order, steps):
    """DPM++ 2M Karras: diffusers' own use_karras_sigmas keeps the continuous sigmas while its
    network sees rounded timesteps; given our timesteps, its loop is ours."""
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(order))
    ours = dpm_solver_sample(Smooth(), DIFFUSION, SHAPE, steps=steps, spacing="karras",
                             order=order, clip_x0=False, x_T=x_T)  # fmt: skip
    theirs = dpm_loop(x_T, sampling_timesteps(DIFFUSION, steps, "karras").tolist(), order)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))


MU, STD = 0.3, 0.7


class GaussianDenoiser(torch.nn.Module):
    """The exact eps for data N(MU, STD^2): along the probability-flow ODE, (x~ - MU) /
    sqrt(STD^2 + sigma^2) is constant (x~ = x / sqrt(abar)), so every chain's end is known."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        abar, x = ABAR[t].reshape(-1, 1, 1, 1), x.double()
        x0 = MU + abar.sqrt() * STD**2 / (abar * STD**2 + 1 - abar) * (x - abar.sqrt() * MU)
        return ((x - abar.sqrt() * x0) / (1 - abar).sqrt()).float()


def ode_errors(sampler, spacing: str, counts=(10, 20, 40)) -> list[float]:
    x_T = torch.randn((64, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    errors = []
    for steps in counts:
        a = float(ABAR[int(sampling_timesteps(DIFFUSION, steps, spacing)[0])])
        exact = MU + STD * (x_T.double() / a**0.5 - MU) / (STD**2 + (1 - a) / a) ** 0.5
        x = sampler(GaussianDenoiser(), DIFFUSION, x_T.shape, steps=steps, spacing=spacing,
                    clip_x0=False, x_T=x_T)  # fmt: skip
        errors.append(float((x.double() - exact).abs().max()))
    return errors


@pytest.mark.parametrize("spacing", ["linspace", "karras"])
def test_heun_converges_at_second_order(spacing):
    """Doubling the steps quarters Heun's error (4.7 and 4.4 with linspace, 5.0 and 4.5 with
    karras) where it halves DDIM's, its first-order Euler step (2.0)."""
    heun, ddim = ode_errors(heun_sample, spacing), ode_errors(ddim_sample, spacing)
    for coarse, fine in itertools.pairwise(heun):
        assert 3.5 < coarse / fine < 6.5, heun
    for coarse, fine in itertools.pairwise(ddim):
        assert 1.6 < coarse / fine < 2.5, ddim
    assert heun[-1] < ddim[-1] / 5


def test_heun_evaluates_twice_a_step_but_the_last():
    from ddpm.config import SamplerConfig

    net = GaussianDenoiser()
    heun_sample(net, DIFFUSION, (1, 1, 1, 1), steps=10, spacing="trailing")
    assert net.calls == 19 == nfe(SamplerConfig(sampler="heun", steps=10), DIFFUSION)
