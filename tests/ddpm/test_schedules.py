import math

import pytest
import torch

from ddpm.schedules import MAX_BETA, SCHEDULES, make_betas


def test_linear_matches_ho_et_al_endpoints_at_t1000():
    betas = make_betas("linear", 1000)
    assert betas[0].item() == pytest.approx(1e-4)
    assert betas[-1].item() == pytest.approx(0.02)
    steps = betas.diff()
    assert torch.allclose(steps, steps[0].expand_as(steps))


def test_linear_scales_with_timesteps():
    betas = make_betas("linear", 500)
    assert betas[0].item() == pytest.approx(2e-4)
    assert betas[-1].item() == pytest.approx(0.04)


def test_cosine_alphas_cumprod_follows_closed_form():
    timesteps, s = 1000, 0.008
    abar = torch.cumprod(1 - make_betas("cosine", timesteps), 0)

    def f(t: float) -> float:
        return math.cos((t / timesteps + s) / (1 + s) * math.pi / 2) ** 2

    for t in [0, 10, 250, 500, 900]:  # before the 0.999 clipping bites
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)


def test_sigmoid_alphas_cumprod_follows_closed_form():
    timesteps, start, end = 1000, -3.0, 3.0

    def sig(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    def f(t: float) -> float:
        return (sig(end) - sig(t / timesteps * (end - start) + start)) / (sig(end) - sig(start))

    abar = torch.cumprod(1 - make_betas("sigmoid", timesteps), 0)
    for t in [0, 100, 500, 900]:
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("timesteps", [2, 10, 1000, 4000])
def test_every_schedule_is_valid_for_any_length(name, timesteps):
    betas = make_betas(name, timesteps)
    assert betas.shape == (timesteps,) and betas.dtype == torch.float64
    assert bool((betas > 0).all()) and bool((betas <= MAX_BETA).all())
    abar = torch.cumprod(1 - betas, 0)
    assert bool((abar.diff() < 0).all())
    assert abar[-1].item() < 0.06  # the chain ends close to pure noise


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown schedule 'cosin'.*\['cosine', 'dns', 'linear'"):
        make_betas("cosin", 1000)


def test_too_few_timesteps_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        make_betas("linear", 1)


@pytest.mark.parametrize("timesteps", [1000, 2000])
def test_dns_betas_are_the_formula_of_the_project_it_comes_from(timesteps):
    """betterlmy's "dynamic negative square": low + (high - low) ((t + 5) / (T + 6))^2 with
    the linear schedule's ends scaled by 1000 / T, every t of the chain."""
    low, high = 1e-4 * 1000 / timesteps, 0.02 * 1000 / timesteps
    expected = [low + (high - low) * ((t + 5) / (timesteps + 6)) ** 2 for t in range(timesteps)]
    betas = make_betas("dns", timesteps)
    assert betas.tolist() == pytest.approx(expected, rel=1e-12, abs=0)
    # by hand at T = 1000: 1e-4 + 0.0199 (5 / 1006)^2 and 1e-4 + 0.0199 (1004 / 1006)^2
    if timesteps == 1000:
        assert betas[0].item() == pytest.approx(1.00491583e-4, rel=1e-8)
        assert betas[-1].item() == pytest.approx(0.0199209534, rel=1e-8)
    # beta rising with t squared noises later than the linear schedule: more signal mid-chain
    half = timesteps // 2
    abar = torch.cumprod(1 - betas, 0)
    assert abar[half] > torch.cumprod(1 - make_betas("linear", timesteps), 0)[half]
