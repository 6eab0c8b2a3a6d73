import math

import pytest
import torch
from torch import nn

from ddpm.config import DiffusionConfig
from ddpm.diffusion import GaussianDiffusion
from ddpm.sampling.ancestral import ddpm_step
from ddpm.sampling.api import ddim_sample, ddpm_sample, dpm_solver_sample
from ddpm.sampling.ddim import ddim_step
from ddpm.sampling.denoiser import predict
from ddpm.sampling.spacing import SPACINGS, make_timesteps

MU, STD = 0.3, 0.7


class GaussianOracle(nn.Module):
    """The exact denoiser for data x0 ~ N(MU, STD^2) per pixel, in any parameterisation.

    E[x0 | x_t] = MU + sqrt(abar) STD^2 / (abar STD^2 + 1 - abar) (x_t - sqrt(abar) MU), so a
    correct sampler driven by it must produce samples with mean MU and std STD.
    """

    def __init__(self, diffusion: GaussianDiffusion) -> None:
        super().__init__()
        self.diffusion = diffusion
        self.calls = 0

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        abar = self.diffusion.alphas_cumprod64[t].reshape(-1, 1, 1, 1).float()
        x0 = MU + abar.sqrt() * STD**2 / (abar * STD**2 + 1 - abar) * (x_t - abar.sqrt() * MU)
        eps = self.diffusion.predict_eps_from_x0(x_t, t, x0)
        return {"eps": eps, "x0": x0, "v": self.diffusion.predict_v(x0, t, eps)}[
            self.diffusion.config.prediction
        ]


def diffusion_for(prediction: str = "eps", schedule: str = "linear", timesteps: int = 200):
    config = DiffusionConfig(prediction=prediction, schedule=schedule, timesteps=timesteps)
    return GaussianDiffusion(config)


@pytest.mark.parametrize(
    ("sampler", "kwargs", "std_tol"),
    [
        (ddpm_sample, {}, 0.03),
        (ddpm_sample, {"variance": "beta"}, 0.03),
        (ddpm_sample, {"steps": 50}, 0.1),  # beta-tilde is the lower bound; coarse steps show it
        (ddim_sample, {"steps": 50}, 0.06),
        (ddim_sample, {"steps": 50, "eta": 1.0}, 0.1),
        (dpm_solver_sample, {"steps": 20}, 0.03),  # second order: closer in fewer steps
        (dpm_solver_sample, {"steps": 20, "spacing": "logsnr"}, 0.03),
    ],
)
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_samplers_with_the_exact_denoiser_recover_the_data_distribution(
    sampler, kwargs, std_tol, prediction
):
    diffusion = diffusion_for(prediction, timesteps=1000)
    oracle = GaussianOracle(diffusion)
    gen = torch.Generator().manual_seed(0)
    x = sampler(oracle, diffusion, (10_000, 1, 1, 1), generator=gen, clip_x0=False, **kwargs)
    assert x.shape == (10_000, 1, 1, 1) and bool(torch.isfinite(x).all())
    assert x.mean().item() == pytest.approx(MU, abs=0.015)
    assert x.std().item() == pytest.approx(STD, rel=std_tol)


ABAR = GaussianDiffusion(DiffusionConfig(schedule="linear", timesteps=1000)).alphas_cumprod64


@pytest.mark.parametrize("spacing", list(SPACINGS))
@pytest.mark.parametrize("steps", [1, 7, 50, 1000])
def test_timesteps_are_distinct_decreasing_and_in_range(spacing, steps):
    ts = make_timesteps(1000, steps, spacing, ABAR)
    assert ts.dtype == torch.int64 and 1 <= len(ts) <= steps
    assert bool((ts.diff() < 0).all()) and ts[0] <= 999 and ts[-1] >= 0
    if spacing in ("leading", "linspace", "trailing"):  # uniform rules: one timestep per step
        assert len(ts) == steps


def test_each_spacing_starts_where_its_definition_says():
    assert make_timesteps(1000, 10, "leading").tolist() == list(range(900, -1, -100))
    assert make_timesteps(1000, 10, "trailing").tolist() == list(range(999, 0, -100))
    assert make_timesteps(1000, 4, "linspace").tolist() == [999, 666, 333, 0]
    for spacing in ["leading", "linspace", "trailing"]:
        assert torch.equal(make_timesteps(20, 20, spacing), torch.arange(19, -1, -1))


def test_quadratic_spacing_is_the_ddim_papers():
    """int(linspace(0, sqrt(0.8 T), S)^2), reversed: the DDIM authors' skip_type="quad", which
    never visits the last fifth of the chain."""
    expected = [800, 632, 483, 355, 246, 158, 88, 39, 9, 0]  # int(k^2 800 / 81), k = 9 .. 0
    assert expected == [int(k * k * 800 / 81 + 1e-9) for k in range(9, -1, -1)]
    assert make_timesteps(1000, 10, "quadratic").tolist() == expected
    assert make_timesteps(1000, 100, "quadratic").max() == 800
    assert len(make_timesteps(1000, 100, "quadratic")) == 96  # 4 repeats near t = 0, run once


def test_logsnr_spacing_is_uniform_in_log_snr_between_the_chain_ends():
    ts = make_timesteps(1000, 10, "logsnr", ABAR)
    assert ts.tolist() == [999, 886, 757, 603, 410, 202, 73, 22, 5, 0]
    log_snr = 0.5 * torch.log(ABAR / (1 - ABAR))
    targets = torch.linspace(float(log_snr[-1]), float(log_snr[0]), 10, dtype=torch.float64)
    # Each chosen t has the log-SNR nearest its target among the timesteps around it
    for t, target in zip(ts.tolist(), targets, strict=True):
        gap = (log_snr[max(t - 1, 0) : t + 2] - target).abs()
        assert (log_snr[t] - target).abs() <= gap.min() + 1e-12
    with pytest.raises(ValueError, match="logsnr spacing needs the schedule"):
        make_timesteps(1000, 10, "logsnr")


def test_bad_step_counts_and_spacings_are_refused():
    with pytest.raises(ValueError, match="between 1 and T=100"):
        make_timesteps(100, 101)
    with pytest.raises(ValueError, match="unknown spacing"):
        make_timesteps(100, 10, "uniform")


@pytest.mark.parametrize("t", [1, 10, 99])
def test_ddim_step_with_eta_one_is_the_ddpm_posterior_step(t):
    diffusion = diffusion_for(timesteps=100)
    gen = torch.Generator().manual_seed(t)
    x_t, noise = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    x0, eps = diffusion.split_prediction(
        torch.randn(2, 3, 4, 4, generator=gen), x_t, torch.full((2,), t)
    )
    ddim = ddim_step(diffusion, x0, eps, t, t - 1, eta=1.0, noise=noise)
    ddpm = ddpm_step(diffusion, x_t, x0, t, t - 1, noise, variance="posterior")
    torch.testing.assert_close(ddim, ddpm, atol=1e-5, rtol=1e-5)


def test_ddim_eta_one_over_all_steps_equals_ddpm_sampling():
    diffusion = diffusion_for(timesteps=50)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Tanh())
    net = lambda x, t: model(x) * (1 + t.float().reshape(-1, 1, 1, 1) / 50)  # noqa: E731
    shape = (2, 3, 4, 4)
    a = ddpm_sample(net, diffusion, shape, generator=torch.Generator().manual_seed(5))
    b = ddim_sample(
        net,
        diffusion,
        shape,
        steps=50,
        eta=1.0,
        spacing="linspace",
        generator=torch.Generator().manual_seed(5),
    )
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sampler", [ddpm_sample, ddim_sample, dpm_solver_sample])
def test_samplers_are_deterministic_for_a_generator(sampler):
    diffusion = diffusion_for(timesteps=20)
    oracle = GaussianOracle(diffusion)
    kw = {} if sampler is ddpm_sample else {"steps": 5}
    a = sampler(oracle, diffusion, (3, 1, 4, 4), generator=torch.Generator().manual_seed(1), **kw)
    b = sampler(oracle, diffusion, (3, 1, 4, 4), generator=torch.Generator().manual_seed(1), **kw)
    c = sampler(oracle, diffusion, (3, 1, 4, 4), generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_network_calls_scale_with_the_number_of_steps():
    """DDIM-50 costs 1/20 of DDPM-1000: one network call per step, nothing more."""
    diffusion = diffusion_for(timesteps=1000)
    oracle = GaussianOracle(diffusion)
    ddpm_sample(oracle, diffusion, (1, 1, 1, 1))
    ddpm_calls, oracle.calls = oracle.calls, 0
    ddim_sample(oracle, diffusion, (1, 1, 1, 1), steps=50)
    assert (ddpm_calls, oracle.calls) == (1000, 50)


def test_quadratic_ddim_from_the_marginal_at_its_first_step_recovers_the_data():
    """Quadratic steps start at t = 0.8 T, not T - 1: fed x_800 from q(x_800) itself, DDIM with
    the exact denoiser lands on the data distribution. (Fed N(0, I), as the DDIM code does, the
    mean is off by 5%: the price of skipping the last fifth of the chain.)"""
    diffusion = diffusion_for(timesteps=1000)
    abar = float(diffusion.alphas_cumprod64[800])
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn((10_000, 1, 1, 1), generator=gen, dtype=torch.float64)
    x_800 = (abar**0.5 * MU + (abar * STD**2 + 1 - abar) ** 0.5 * noise).float()
    oracle = GaussianOracle(diffusion)
    x = ddim_sample(oracle, diffusion, x_800.shape, steps=50, spacing="quadratic", x_T=x_800,
                    clip_x0=False)  # fmt: skip
    assert x.mean().item() == pytest.approx(MU, abs=0.015)
    assert x.std().item() == pytest.approx(STD, rel=0.03)


@pytest.mark.parametrize("spacing", ["quadratic", "logsnr"])
@pytest.mark.parametrize("sampler", [ddpm_sample, ddim_sample, dpm_solver_sample])
def test_every_sampler_takes_the_papers_spacings_one_call_per_timestep(sampler, spacing):
    diffusion = diffusion_for(timesteps=1000)
    oracle = GaussianOracle(diffusion)
    x = sampler(oracle, diffusion, (2, 1, 2, 2), steps=100, spacing=spacing)
    visited = make_timesteps(1000, 100, spacing, diffusion.alphas_cumprod64)
    assert bool(torch.isfinite(x).all()) and oracle.calls == len(visited) < 100


class Conditional(nn.Module):
    null_class = 3

    def forward(self, x_t, t, y):
        return x_t * 0 + y.float().reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5])
def test_classifier_free_guidance_extrapolates_from_the_null_class(scale):
    diffusion = diffusion_for(prediction="x0", timesteps=10)
    y = torch.tensor([0, 1, 2])
    x0, _ = predict(Conditional(), diffusion, torch.zeros(3, 1, 1, 1), 5, y, scale, clip_x0=False)
    expected = 3 + scale * (y.float() - 3)
    torch.testing.assert_close(x0.flatten(), expected)


def test_clipping_keeps_samples_in_range():
    diffusion = diffusion_for(prediction="x0", timesteps=20)
    wild = lambda x, t: torch.full_like(x, 7.0)  # noqa: E731
    x = ddim_sample(wild, diffusion, (2, 1, 3, 3), steps=5, clip_x0=True)
    assert bool((x.abs() <= 1 + 1e-6).all())
    assert not math.isclose(
        ddim_sample(wild, diffusion, (2, 1, 3, 3), steps=5, clip_x0=False).max().item(), 1.0
    )


def test_eta_above_one_makes_the_ddim_step_take_the_root_of_a_negative_number():
    """sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev) exceeds
    sqrt(1 - abar_prev) for eta > 1 at some steps (linear, T = 1000, 100 trailing steps: t = 19
    for eta = 1.3), so eq. 12's eps coefficient is NaN; eta is bounded to [0, 1]."""
    from pydantic import ValidationError

    from ddpm.config import SamplerConfig
    from ddpm.sampling.spacing import make_timesteps

    diffusion = GaussianDiffusion(DiffusionConfig())
    ts = make_timesteps(1000, 100, "trailing").tolist()
    abar = diffusion.alphas_cumprod64

    def leftover(eta: float) -> dict[int, float]:
        out = {}
        for t, prev in zip(ts, [*ts[1:], -1], strict=True):
            a_t, a_prev = abar[t], abar[prev] if prev >= 0 else torch.tensor(1.0, dtype=abar.dtype)
            sigma2 = eta**2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
            out[t] = float(1 - a_prev - sigma2)
        return out

    assert min(leftover(1.0).values()) >= 0
    negative = [t for t, v in leftover(1.3).items() if v < 0]
    assert 19 in negative, negative
    with pytest.raises(ValidationError, match="eta"):
        SamplerConfig(eta=1.3)
    # the shorthand builds a SamplerConfig too, which refuses it by name (a ValueError)
    with pytest.raises(ValueError, match=r"eta\n.*less than or equal to 1"):
        ddim_sample(lambda x, t: x, diffusion, (1, 3, 4, 4), steps=2, eta=1.3)
