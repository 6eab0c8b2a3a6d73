"""DPM-Solver++ of every order against diffusers' DPMSolverMultistepScheduler loop (the test
oracle, never a runtime dependency): the same network from the same noise over the same
timesteps, to 1e-4 relative."""

from __future__ import annotations

import math

import pytest
import torch
from smooth import DIFFUSION, SHAPE, Smooth

from ddpm.sampling.api import ddim_sample, dpm_solver_sample
from ddpm.sampling.dpm_solver import dpm_solver_order
from ddpm.sampling.spacing import sampling_timesteps

diffusers = pytest.importorskip("diffusers")


def diffusers_loop(x_T: torch.Tensor, timesteps: list[int], order: int, final: bool):
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, trained_betas=DIFFUSION.betas.double().tolist(),
        solver_order=order, algorithm_type="dpmsolver++", solver_type="midpoint",
        lower_order_final=final, final_sigmas_type="zero", prediction_type="epsilon",
    )  # fmt: skip
    # its sigmas from float64 alpha-bars, as ours: in float32, 1 - abar at t = 0 (leading
    # spacing ends there) loses 2e-4 of itself, which the last steps magnify to 1e-3
    scheduler.alphas_cumprod = DIFFUSION.alphas_cumprod64.clone()
    scheduler.set_timesteps(timesteps=timesteps)
    scheduler.sigmas = scheduler.sigmas.double()
    net, x = Smooth(), x_T.double()
    for t in scheduler.timesteps:
        eps = net(x, torch.full((x.shape[0],), int(t)))
        x = scheduler.step(eps, t, x).prev_sample
    return x.float()


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [5, 10, 20])
def test_each_order_is_diffusers_dpm_solver_plus_plus(order, spacing, steps):
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps))
    ours = dpm_solver_sample(Smooth(), DIFFUSION, SHAPE, steps=steps, spacing=spacing,
                             order=order, clip_x0=False, x_T=x_T)  # fmt: skip
    timesteps = sampling_timesteps(DIFFUSION, steps, spacing).tolist()
    theirs = diffusers_loop(x_T, timesteps, order, final=True)
    assert bool(torch.isfinite(ours).all())
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))


def test_without_lower_order_final_the_step_before_the_last_is_third_order():
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    kw = {"steps": 10, "spacing": "trailing", "order": 3, "clip_x0": False, "x_T": x_T}
    full = dpm_solver_sample(Smooth(), DIFFUSION, SHAPE, lower_order_final=False, **kw)
    timesteps = sampling_timesteps(DIFFUSION, 10, "trailing").tolist()
    torch.testing.assert_close(full, diffusers_loop(x_T, timesteps, 3, final=False),
                               rtol=1e-4, atol=1e-4 * float(full.abs().max()))  # fmt: skip
    lowered = dpm_solver_sample(Smooth(), DIFFUSION, SHAPE, lower_order_final=True, **kw)
    assert not torch.allclose(full, lowered)  # the setting changes the result


def test_the_orders_follow_diffusers_rule():
    assert [dpm_solver_order(3, i, 10, True) for i in range(10)] == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]
    assert [dpm_solver_order(3, i, 20, True) for i in range(20)] == [1, 2] + [3] * 17 + [1]
    assert [dpm_solver_order(3, i, 5, False) for i in range(5)] == [1, 2, 3, 3, 1]
    assert [dpm_solver_order(2, i, 5, True) for i in range(5)] == [1, 2, 2, 2, 1]


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_order_one_is_ddim(spacing):
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    kw = {"steps": 10, "spacing": spacing, "clip_x0": True, "x_T": x_T}
    dpm = dpm_solver_sample(Smooth(), DIFFUSION, SHAPE, order=1, **kw)
    torch.testing.assert_close(dpm, ddim_sample(Smooth(), DIFFUSION, SHAPE, eta=0.0, **kw),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_higher_orders_converge_faster_on_a_smooth_ode():
    """Against a 500-step solution of the same ODE, order 3 at 10 steps is closer than order 2,
    and order 2 closer than order 1 (the point of higher orders)."""
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    kw = {"spacing": "trailing", "clip_x0": False, "x_T": x_T, "lower_order_final": False}
    reference = dpm_solver_sample(Smooth(), DIFFUSION, SHAPE, steps=500, order=3, **kw)
    errors = [
        float((dpm_solver_sample(Smooth(), DIFFUSION, SHAPE, steps=10, order=k, **kw)
               - reference).pow(2).mean().sqrt())
        for k in (1, 2, 3)
    ]  # fmt: skip
    assert errors[2] < errors[1] < errors[0] and all(map(math.isfinite, errors)), errors


def test_the_sample_settings_reach_the_solver():
    """SamplerConfig's order and lower_order_final are what sample() runs dpm-solver with."""
    from ddpm.config import SamplerConfig
    from ddpm.sampling.api import sample

    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    config = SamplerConfig(sampler="dpm-solver", steps=8, order=3, lower_order_final=False,
                           clip_x0=False)  # fmt: skip
    direct = dpm_solver_sample(Smooth(), DIFFUSION, SHAPE, steps=8, order=3,
                               lower_order_final=False, clip_x0=False, x_T=x_T)  # fmt: skip
    assert torch.equal(sample(Smooth(), DIFFUSION, SHAPE, config, x_T=x_T), direct)
    second = SamplerConfig(sampler="dpm-solver", steps=8, clip_x0=False)
    assert not torch.equal(sample(Smooth(), DIFFUSION, SHAPE, second, x_T=x_T), direct)
