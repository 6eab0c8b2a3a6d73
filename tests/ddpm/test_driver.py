"""The driver's own parts: a chain that starts part-way (what SDEdit needs) and a known region
held at every step (what inpainting needs), for any stepper of the table."""

from __future__ import annotations

import pytest
import torch
from smooth import DIFFUSION, SHAPE, Smooth

from ddpm.config import SamplerConfig
from ddpm.sampling.api import sample
from ddpm.sampling.driver import chain_timesteps


@pytest.mark.parametrize("sampler", ["ddim", "heun"])
def test_a_chain_started_part_way_continues_the_chain(sampler):
    """Stopped after step k and restarted from its x at the next timestep, a memoryless
    sampler ends where the unbroken chain does."""
    config = SamplerConfig(sampler=sampler, steps=10, clip_x0=False)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    states = []
    whole = sample(Smooth(), DIFFUSION, SHAPE, config, x_T=x_T,
                   callback=lambda i, t, x, x0: states.append(x))  # fmt: skip
    ts = chain_timesteps(DIFFUSION, config)
    rest = sample(Smooth(), DIFFUSION, SHAPE, config, x_T=states[3], start=ts[4])
    assert chain_timesteps(DIFFUSION, config, ts[4]) == ts[4:]
    torch.testing.assert_close(rest, whole, rtol=1e-6, atol=1e-6 * float(whole.abs().max()))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "heun"])
def test_a_chain_split_at_a_timestep_is_the_unbroken_chain(sampler):
    """end=t stops at x_t; a second chain from there ends where the unbroken one does, bit
    for bit: the noise draws (ddpm) come from the same generators in the same order."""
    config = SamplerConfig(sampler=sampler, steps=10, clip_x0=False)
    ts = chain_timesteps(DIFFUSION, config)
    gens = [torch.Generator().manual_seed(i) for i in range(SHAPE[0])]
    whole = sample(Smooth(), DIFFUSION, SHAPE, config, generator=gens)
    gens = [torch.Generator().manual_seed(i) for i in range(SHAPE[0])]
    x_mid = sample(Smooth(), DIFFUSION, SHAPE, config, generator=gens, end=ts[4])
    rest = sample(Smooth(), DIFFUSION, SHAPE, config, generator=gens, x_T=x_mid, start=ts[4])
    assert chain_timesteps(DIFFUSION, config, end=ts[4]) == ts[:4]
    assert torch.equal(rest, whole)


def test_a_start_between_the_spacings_timesteps_is_visited_first():
    config = SamplerConfig(sampler="ddim", steps=4, spacing="trailing")
    assert chain_timesteps(DIFFUSION, config) == [999, 749, 499, 249]
    assert chain_timesteps(DIFFUSION, config, 600) == [600, 499, 249]
    with pytest.raises(ValueError, match="needs its x_T"):
        sample(Smooth(), DIFFUSION, SHAPE, config, start=600)
    with pytest.raises(ValueError, match="start must be a timestep"):
        chain_timesteps(DIFFUSION, config, 1000)
    with pytest.raises(ValueError, match="end must be"):
        chain_timesteps(DIFFUSION, config, end=999)
    assert chain_timesteps(DIFFUSION, config, 600, end=249) == [600, 499]


@pytest.mark.parametrize("sampler", ["ddpm", "dpm-solver", "unipc"])
def test_a_known_region_is_held_at_every_step_and_at_the_end(sampler):
    """The constraint sees every step's x and t_prev, and its last word is the result."""
    known_x0 = torch.rand(SHAPE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mask = torch.zeros(SHAPE, dtype=torch.bool)
    mask[..., :4] = True
    seen = []

    def known(x: torch.Tensor, t_prev: int) -> torch.Tensor:
        seen.append(t_prev)
        if t_prev < 0:
            return torch.where(mask, known_x0, x)
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t_prev))
        noised = DIFFUSION.q_sample(known_x0, torch.full((SHAPE[0],), t_prev), noise)
        return torch.where(mask, noised, x)

    config = SamplerConfig(sampler=sampler, steps=6)
    x = sample(Smooth(), DIFFUSION, SHAPE, config, known=known,
               generator=torch.Generator().manual_seed(2))  # fmt: skip
    assert seen == [*chain_timesteps(DIFFUSION, config)[1:], -1]
    assert torch.equal(x[mask], known_x0[mask]) and not torch.equal(x[~mask], known_x0[~mask])
