"""UniPC against diffusers' UniPCMultistepScheduler loop (the test oracle, never a runtime
dependency): the same network from the same noise over the same timesteps, to 1e-4 relative,
up to the step where diffusers breaks (bh1's last step to sigma = 0 is NaN there)."""

from __future__ import annotations

import math

import pytest
import torch
from smooth import DIFFUSION, SHAPE, Smooth

from ddpm.config import SamplerConfig
from ddpm.sampling.api import ddim_sample, sample, unipc_sample
from ddpm.sampling.denoiser import predict
from ddpm.sampling.spacing import sampling_timesteps
from ddpm.sampling.unipc import unipc_coefficients, unipc_order

diffusers = pytest.importorskip("diffusers")


def diffusers_states(x_T: torch.Tensor, timesteps: list[int], order: int, bh: str, final: bool):
    """The sample after each of diffusers' steps, up to the first it cannot take (its last
    may be NaN, or its linear solve fail)."""
    scheduler = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000, trained_betas=DIFFUSION.betas.double().tolist(),
        solver_order=order, solver_type=bh, lower_order_final=final, predict_x0=True,
        final_sigmas_type="zero", prediction_type="epsilon",
    )  # fmt: skip
    scheduler.set_timesteps(len(timesteps))
    # our timesteps, and their sigmas in float64 from float64 alpha-bars, as ours (its own are
    # float32, whose 1 - abar at small t loses digits the last steps magnify)
    abar = DIFFUSION.alphas_cumprod64[timesteps]
    scheduler.timesteps = torch.tensor(timesteps)
    scheduler.sigmas = torch.cat([((1 - abar) / abar).sqrt(), torch.zeros(1, dtype=abar.dtype)])
    net, x, states = Smooth(), x_T.double(), []
    for t in scheduler.timesteps:
        eps = net(x, torch.full((x.shape[0],), int(t)))
        try:
            x = scheduler.step(eps, t, x).prev_sample
        except torch.linalg.LinAlgError:  # the order-3 step to sigma = 0: a singular system
            break
        states.append(x.float())
    return states


def our_states(x_T: torch.Tensor, steps: int, spacing: str, **kw) -> list[torch.Tensor]:
    states: list[torch.Tensor] = []
    unipc_sample(Smooth(), DIFFUSION, SHAPE, steps=steps, spacing=spacing, clip_x0=False,
                 x_T=x_T, callback=lambda i, t, x, x0: states.append(x), **kw)  # fmt: skip
    return states


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert bool(torch.isfinite(ours).all())
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))


@pytest.mark.parametrize("bh", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [5, 10, 20])
def test_each_order_and_b_h_is_diffusers_unipc(bh, order, spacing, steps):
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps))
    ours = our_states(x_T, steps, spacing, order=order, bh=bh)
    timesteps = sampling_timesteps(DIFFUSION, steps, spacing).tolist()
    theirs = diffusers_states(x_T, timesteps, order, bh, final=True)
    assert len(ours) == len(theirs) == steps
    for i in range(steps - 1):  # every state before the step to sigma = 0
        assert_close(ours[i], theirs[i])
    if bh == "bh2":
        assert_close(ours[-1], theirs[-1])
    else:  # diffusers: NaN; ours: the x0 predicted at the last state, finite
        assert not bool(torch.isfinite(theirs[-1]).all())
        x0, _ = predict(Smooth(), DIFFUSION, ours[-2], timesteps[-1], clip_x0=False)
        assert_close(ours[-1], x0)


def test_without_lower_order_final_ours_stays_finite_where_diffusers_diverges():
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    ours = our_states(x_T, 10, "trailing", order=3, bh="bh2", lower_order_final=False)
    timesteps = sampling_timesteps(DIFFUSION, 10, "trailing").tolist()
    theirs = diffusers_states(x_T, timesteps, 3, "bh2", final=False)
    for i in range(9):  # the third-order steps up to the last agree
        assert_close(ours[i], theirs[i])
    assert len(theirs) == 9  # diffusers cannot take the last step
    assert bool(torch.isfinite(ours[-1]).all())  # the x0 predicted at the last state
    lowered = our_states(x_T, 10, "trailing", order=3, bh="bh2", lower_order_final=True)
    assert not torch.allclose(ours[-2], lowered[-2])  # the setting changes the result


def test_the_orders_follow_diffusers_rule():
    assert [unipc_order(3, i, 10, True) for i in range(10)] == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]
    assert [unipc_order(3, i, 20, True) for i in range(20)] == [1, 2] + [3] * 16 + [2, 1]
    assert [unipc_order(3, i, 5, False) for i in range(5)] == [1, 2, 3, 3, 3]
    assert [unipc_order(2, i, 5, True) for i in range(5)] == [1, 2, 2, 2, 1]


def test_the_coefficients_are_the_papers_closed_forms():
    """UniC-1's and UniP-2's rho = 1/2; UniC-2 with bh2 solves [[1, 1], [r, 1]] rho =
    [g1, g2] / B(h), g_k = hh phi_{k+1}(hh) k!, written out here from the phi functions."""
    assert unipc_coefficients([], 0.3, "bh1", corrector=True) == [0.5]
    assert unipc_coefficients([-0.8], 0.3, "bh2", corrector=False) == [0.5]
    assert unipc_coefficients([], 0.3, "bh2", corrector=False) == []
    h, r = 0.4, -0.9
    hh = -h
    phi2 = (math.exp(hh) - 1 - hh) / hh**2
    phi3 = (math.exp(hh) - 1 - hh - hh**2 / 2) / hh**3
    b_h = math.expm1(hh)
    g1, g2 = hh * phi2 / b_h, hh * phi3 * 2 / b_h
    rho_new = (g2 - r * g1) / (1 - r)  # Cramer on rho_0 + rho_1 = g1, r rho_0 + rho_1 = g2
    rho_old = g1 - rho_new
    ours = unipc_coefficients([r], h, "bh2", corrector=True)
    assert ours == pytest.approx([rho_old, rho_new], rel=1e-9)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_unip_of_order_one_is_ddim(spacing):
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    kw = {"steps": 10, "spacing": spacing, "clip_x0": True, "x_T": x_T}
    unip = unipc_sample(Smooth(), DIFFUSION, SHAPE, order=1, corrector=False, **kw)
    torch.testing.assert_close(unip, ddim_sample(Smooth(), DIFFUSION, SHAPE, eta=0.0, **kw),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_the_corrector_and_higher_orders_converge_faster_on_a_smooth_ode():
    """Against a 500-step solution of the same ODE at 10 steps: UniPC-1 (DDIM corrected) beats
    UniP-1 (DDIM), and orders 3 < 2 < 1 in error with the corrector (the point of both)."""
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    kw = {"spacing": "trailing", "clip_x0": False, "x_T": x_T, "lower_order_final": False}
    reference = unipc_sample(Smooth(), DIFFUSION, SHAPE, steps=500, order=3, **kw)

    def error(**options) -> float:
        x = unipc_sample(Smooth(), DIFFUSION, SHAPE, steps=10, **kw, **options)
        return float((x - reference).pow(2).mean().sqrt())

    errors = [error(order=k) for k in (1, 2, 3)]
    assert errors[2] < errors[1] < errors[0] and all(map(math.isfinite, errors)), errors
    assert errors[0] < error(order=1, corrector=False)


def test_the_sample_settings_reach_the_solver():
    """SamplerConfig's order, bh and lower_order_final are what sample() runs unipc with."""
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    config = SamplerConfig(sampler="unipc", steps=8, order=3, bh="bh1", lower_order_final=False,
                           clip_x0=False)  # fmt: skip
    direct = unipc_sample(Smooth(), DIFFUSION, SHAPE, steps=8, order=3, bh="bh1",
                          lower_order_final=False, clip_x0=False, x_T=x_T)  # fmt: skip
    assert torch.equal(sample(Smooth(), DIFFUSION, SHAPE, config, x_T=x_T), direct)
    for change in ({"bh": "bh2"}, {"order": 2}, {"lower_order_final": True}):
        other = config.model_copy(update=change)
        assert not torch.equal(sample(Smooth(), DIFFUSION, SHAPE, other, x_T=x_T), direct)
