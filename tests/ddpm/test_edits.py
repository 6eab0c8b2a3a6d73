"""The edits (ddpm.sampling.edits): RePaint against diffusers' RePaintScheduler step and
undo_step walked along the authors' schedule with the same noise, DDIM inversion against
diffusers' DDIMInverseScheduler loop given our timesteps (the test oracle, never a runtime
dependency), SDEdit at strength 1 as plain sampling, the masks, and each edit's NFE counted."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from smooth import DIFFUSION, SHAPE, Smooth

from ddpm.config import DiffusionConfig, SamplerConfig
from ddpm.diffusion import GaussianDiffusion
from ddpm.generation import image_generators
from ddpm.sampling.api import nfe, sample
from ddpm.sampling.edits import (
    ddim_invert,
    inpaint,
    inpaint_nfe,
    jump_schedule,
    make_masks,
    reconstruct,
    reconstruct_nfe,
    sdedit,
    sdedit_nfe,
)
from ddpm.sampling.spacing import sampling_timesteps
from ddpm.schedules import make_betas

diffusers = pytest.importorskip("diffusers")
repaint_module = pytest.importorskip("diffusers.schedulers.scheduling_repaint")

ABAR = DIFFUSION.alphas_cumprod64
MU, STD = 0.3, 0.7


class Counting(torch.nn.Module):
    """A network that records the timestep of every call."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(int(t[0]))
        return self.net(x, t)


class Mixing(torch.nn.Module):
    """The exact eps for data N(MU, STD^2) on ``diffusion``'s chain plus a term from the
    neighbouring pixels: the images stay bounded, and the unknown region hears the known one
    (Smooth is pixelwise, so an inpainting test with it never sees the known region)."""

    def __init__(self, diffusion: GaussianDiffusion) -> None:
        super().__init__()
        self.abar = diffusion.alphas_cumprod64

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, xd = self.abar[t].reshape(-1, 1, 1, 1), x.double()
        x0 = MU + a.sqrt() * STD**2 / (a * STD**2 + 1 - a) * (xd - a.sqrt() * MU)
        near = torch.roll(xd, 1, dims=-1) + torch.roll(xd, 1, dims=-2)
        return ((xd - a.sqrt() * x0) / (1 - a).sqrt() + 0.3 * torch.sin(near)).to(x.dtype)


class GaussianDenoiser(torch.nn.Module):
    """The exact eps for data N(MU, STD^2) on DIFFUSION's chain (as in test_heun_karras): the
    probability-flow ODE is then exact, so DDIM's round trip converges to its input."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar, x = ABAR[t].reshape(-1, 1, 1, 1), x.double()
        x0 = MU + abar.sqrt() * STD**2 / (abar * STD**2 + 1 - abar) * (x - abar.sqrt() * MU)
        return ((x - abar.sqrt() * x0) / (1 - abar).sqrt()).float()


def images(shape=SHAPE, seed: int = 1) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# RePaint


@pytest.mark.parametrize(("steps", "j", "r"), [(50, 10, 10), (20, 5, 3), (10, 3, 2), (10, 1, 1)])
def test_jump_schedule_is_diffusers(steps, j, r):
    scheduler = diffusers.RePaintScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps, j, r)
    walk = jump_schedule(steps, j, r)
    assert scheduler.timesteps.tolist() == [k * (1000 // steps) for k in walk]
    assert walk[0] == steps - 1 and walk[-1] == 0
    if r == 1:
        assert walk == list(range(steps - 1, -1, -1))


def test_jump_schedule_refuses_what_it_cannot_walk():
    for bad in [(0, 1, 1), (10, 0, 1), (10, 1, 0)]:
        with pytest.raises(ValueError, match="must be at least 1"):
            jump_schedule(*bad)


def undo_draws(z: torch.Tensor, betas: torch.Tensor) -> list[torch.Tensor]:
    """diffusers' undo_step climbs one respaced step as k plain ones, k draws: given these, its
    sum of k noises is sqrt(beta) z, our one draw's (beta the respaced step's)."""
    coefs = [betas[i].sqrt() * (1 - betas[i + 1 :]).prod().sqrt() for i in range(len(betas))]
    beta = 1 - (1 - betas).prod()
    return [z.double() * float(c / beta.sqrt()) for c in coefs]


def repaint_loop(monkeypatch, diffusion, x0, mask, seed: int, steps: int, j: int, r: int):
    """The authors' loop (their p_sample_loop_progressive: a step from index a to a - 1 runs
    the network at a, a climb from a to a + 1 undoes one step) with diffusers' step (eta 1:
    DDIM's form of the ancestral step, posterior variance) and undo_step, float64, fed our
    draws in our documented order."""
    T = diffusion.num_timesteps
    k, betas = T // steps, make_betas(diffusion.config.schedule, T)
    scheduler = repaint_module.RePaintScheduler(
        num_train_timesteps=T, trained_betas=betas.numpy(), eta=1.0, clip_sample=False
    )
    scheduler.alphas_cumprod = diffusion.alphas_cumprod64.clone()
    scheduler.set_timesteps(steps, j, r)
    walk = jump_schedule(steps, j, r)
    assert scheduler.timesteps.tolist() == [i * k for i in walk]  # "leading": our chain too
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(x0.shape, generator=g).double()
    draws = []
    for a, b in zip(walk, [*walk[1:], -1], strict=True):
        z = torch.randn(x0.shape, generator=g) if b != -1 else torch.zeros(x0.shape)
        draws += [z.double()] if b < a else undo_draws(z, betas[a * k + 1 : a * k + k + 1])
    monkeypatch.setattr(repaint_module, "randn_tensor", lambda *args, **kw: draws.pop(0))
    net, known = Mixing(diffusion), mask.double().expand(x0.shape)
    for a, b in zip(walk, [*walk[1:], -1], strict=True):
        if b < a:
            eps = net(x, torch.full((x.shape[0],), a * k))
            x = scheduler.step(eps, a * k, x, x0.double(), known).prev_sample
        else:
            x = scheduler.undo_step(x, a * k + 1)
    assert not draws
    return x.float()


@pytest.mark.parametrize(("T", "steps", "j", "r"), [(1000, 20, 5, 3), (100, 100, 10, 3),
                                                    (1000, 10, 3, 2)])  # fmt: skip
def test_inpaint_is_repaint_with_diffusers_steps(monkeypatch, T, steps, j, r):
    diffusion = GaussianDiffusion(DiffusionConfig(schedule="linear", timesteps=T))
    x0 = images()
    mask = torch.rand((SHAPE[0], 1, *SHAPE[2:]), generator=torch.Generator().manual_seed(2)) < 0.5
    config = SamplerConfig(sampler="ddpm", steps=steps, spacing="leading", clip_x0=False,
                           variance="posterior")  # fmt: skip
    ours = inpaint(Mixing(diffusion), diffusion, x0, mask, config, jump_length=j, resample=r,
                   generator=torch.Generator().manual_seed(3))  # fmt: skip
    theirs = repaint_loop(monkeypatch, diffusion, x0, mask, 3, steps, j, r)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))
    known = mask.expand(x0.shape)
    assert torch.equal(ours[known], x0[known]) and not torch.equal(ours[~known], x0[~known])


def test_inpaint_resamples_every_timestep_but_the_last_as_algorithm_1():
    """jump_length 1: the network sees each timestep `resample` times, the last (to the data)
    once; the count is inpaint_nfe."""
    net = Counting(Smooth())
    config = SamplerConfig(sampler="ddim", steps=6)  # whatever the sampler, the step is ancestral
    mask = torch.zeros((1, 1, 8, 8), dtype=torch.bool)
    inpaint(net, DIFFUSION, images(), mask, config, jump_length=1, resample=3,
            generator=torch.Generator().manual_seed(0))  # fmt: skip
    ts = chain_increasing(config)
    assert Counter(net.seen) == {t: 3 if t != ts[0] else 1 for t in ts}
    assert len(net.seen) == inpaint_nfe(6, 1, 3) == 16


def chain_increasing(config: SamplerConfig) -> list[int]:
    return sampling_timesteps(DIFFUSION, config.steps, config.spacing).flip(0).tolist()


@pytest.mark.parametrize(("steps", "j", "r"), [(10, 3, 2), (12, 4, 3), (8, 10, 5)])
def test_inpaint_nfe_is_the_networks_calls(steps, j, r):
    net = Counting(Smooth())
    inpaint(net, DIFFUSION, images(), torch.ones(1, 1, 8, 8, dtype=torch.bool),
            SamplerConfig(sampler="ddpm", steps=steps), jump_length=j, resample=r)  # fmt: skip
    assert len(net.seen) == inpaint_nfe(steps, j, r)


def test_an_inpainted_image_does_not_depend_on_its_batch():
    x0 = images()
    mask = make_masks("box", 0.3, 8, image_generators(0, range(4)))
    config = SamplerConfig(sampler="ddpm", steps=10)
    steps = []
    batch = inpaint(Mixing(DIFFUSION), DIFFUSION, x0, mask, config, jump_length=3, resample=2,
                    generator=image_generators(5, range(4)),
                    callback=lambda i, t, x, x0_pred: steps.append((i, t)))  # fmt: skip
    alone = inpaint(Mixing(DIFFUSION), DIFFUSION, x0[2:3], mask[2:3], config, jump_length=3,
                    resample=2, generator=image_generators(5, [2]))  # fmt: skip
    assert torch.equal(batch[2:3], alone)
    assert [i for i, _ in steps] == list(range(inpaint_nfe(10, 3, 2)))


# SDEdit


def first_draws(seed: int) -> torch.Tensor:
    """Each image's first draw from its generator: plain sampling's x_T."""
    gens = image_generators(seed, range(SHAPE[0]))
    return torch.stack([torch.randn(SHAPE[1:], generator=g) for g in gens])


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sdedit_at_strength_1_is_plain_sampling(sampler, spacing):
    config = SamplerConfig(sampler=sampler, steps=10, spacing=spacing, eta=0.0)
    x_t0, result = sdedit(Smooth(), DIFFUSION, images(), 1.0, config,
                          generator=image_generators(7, range(4)))  # fmt: skip
    plain = sample(Smooth(), DIFFUSION, SHAPE, config, generator=image_generators(7, range(4)))
    assert torch.equal(result, plain)
    assert torch.equal(x_t0, first_draws(7))


def test_sdedit_noises_the_input_to_t0_with_the_first_draw():
    x0 = images()
    x_t0, _ = sdedit(Smooth(), DIFFUSION, x0, 0.3, SamplerConfig(steps=5),
                     generator=image_generators(7, range(4)))  # fmt: skip
    expected = DIFFUSION.q_sample(x0, torch.full((4,), 299), first_draws(7))  # round(0.3 T) - 1
    torch.testing.assert_close(x_t0, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sdedit_strays_further_from_the_input_as_the_strength_grows(sampler):
    """Data N(MU, STD^2) and its exact denoiser: a weak edit stays near its input, a full one
    is an independent sample (mean squared distance 2 STD^2 = 0.98)."""
    shape = (256, 1, 2, 2)
    x0 = MU + STD * torch.randn(shape, generator=torch.Generator().manual_seed(0))
    config = SamplerConfig(sampler=sampler, steps=20, clip_x0=False)
    distances = []
    for strength in (0.05, 0.2, 0.5, 1.0):
        _, x = sdedit(GaussianDenoiser(), DIFFUSION, x0, strength, config,
                      generator=image_generators(1, range(shape[0])))  # fmt: skip
        distances.append(float(((x - x0) ** 2).mean()))
    assert distances == sorted(distances), distances
    assert distances[0] < 0.05 < 0.5 < distances[-1] < 1.5, distances


def test_sdedit_refuses_a_strength_outside_0_1():
    for strength in (0.0, -0.1, 1.5, 1e-5):
        with pytest.raises(ValueError, match="strength"):
            sdedit(Smooth(), DIFFUSION, images(), strength, SamplerConfig(steps=5))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "heun", "dpm-solver"])
@pytest.mark.parametrize("strength", [0.5, 0.33, 1.0])
def test_sdedit_nfe_is_the_networks_calls(sampler, strength):
    net, config = Counting(Smooth()), SamplerConfig(sampler=sampler, steps=10)
    sdedit(net, DIFFUSION, images(), strength, config, generator=torch.Generator())
    assert len(net.seen) == sdedit_nfe(config, DIFFUSION, strength)
    if strength == 1.0:
        assert sdedit_nfe(config, DIFFUSION, strength) == nfe(config, DIFFUSION)


# DDIM inversion


def inverse_loop(x0: torch.Tensor, steps: int, spacing: str) -> torch.Tensor:
    """diffusers' DDIMInverseScheduler loop (the network at each timestep t of the increasing
    chain, on the x at the timestep before), float64 alpha-bars, given our timesteps."""
    scheduler = diffusers.DDIMInverseScheduler(
        num_train_timesteps=1000, trained_betas=DIFFUSION.betas.double().tolist(),
        clip_sample=False, set_alpha_to_one=True, timestep_spacing=spacing,
        prediction_type="epsilon",
    )  # fmt: skip
    scheduler.alphas_cumprod = ABAR.clone()
    scheduler.set_timesteps(steps)
    ours = sampling_timesteps(DIFFUSION, steps, spacing).flip(0)
    assert scheduler.timesteps.tolist() == ours.tolist()
    net, x = Smooth(), x0.double()
    for t in scheduler.timesteps:
        x = scheduler.step(net(x, torch.full((x.shape[0],), int(t))), int(t), x).prev_sample
    return x.float()


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_invert_is_diffusers_inverse_scheduler(spacing, steps):
    x0 = images()
    ours = ddim_invert(Smooth(), DIFFUSION, x0, steps, spacing=spacing)
    theirs = inverse_loop(x0, steps, spacing)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))


def test_the_round_trip_converges_with_the_steps():
    """Exact denoiser, so the only error is the discretisation's: PSNR rises with the steps."""
    x0 = MU + STD * torch.randn((64, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    psnr = []
    for steps in (10, 20, 50):
        net = Counting(GaussianDenoiser())
        x_T, x = reconstruct(net, DIFFUSION, x0, steps, spacing="trailing")
        assert len(net.seen) == reconstruct_nfe(steps)
        assert net.seen[:steps] == sampling_timesteps(DIFFUSION, steps, "trailing").flip(0).tolist()
        psnr.append(10 * math.log10(4 / float(((x - x0) ** 2).mean())))
        assert abs(float(x_T.std()) - 1) < 0.2  # x_T at T - 1 looks like noise
    assert psnr == sorted(psnr) and psnr[-1] > psnr[0] + 6, psnr


# Masks


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.8])
@pytest.mark.parametrize("kind", ["box", "lines", "random", "half"])
def test_masks_hide_about_the_fraction(kind, fraction):
    """box: its side rounded, the area off by at most (sqrt(f) size + 1/4) pixels; lines: the
    count rounded, off by at most 1 / size; random: binomial, 5 standard deviations of one
    image's size^2 pixels; half: half, whatever the fraction."""
    size, batch = 32, 16
    masks = make_masks(kind, fraction, size, image_generators(3, range(batch)))
    assert masks.shape == (batch, 1, size, size) and masks.dtype == torch.bool
    unknown = (~masks).float().mean(dim=(1, 2, 3))
    tolerance = {
        "box": (math.sqrt(fraction) * size + 0.25) / size**2,
        "lines": 1 / size,
        "random": 5 * math.sqrt(fraction * (1 - fraction)) / size,
        "half": 0.0,
    }[kind]
    target = 0.5 if kind == "half" else fraction
    assert float((unknown - target).abs().max()) <= tolerance + 1e-9, unknown
    assert len({m.numpy().tobytes() for m in masks}) > 1  # each image its own


@pytest.mark.parametrize("kind", ["box", "half", "lines", "random"])
def test_an_images_mask_depends_on_its_generator_alone(kind):
    batch = make_masks(kind, 0.3, 16, image_generators(4, range(6)))
    again = make_masks(kind, 0.3, 16, image_generators(4, range(6)))
    alone = make_masks(kind, 0.3, 16, image_generators(4, [3]))
    assert torch.equal(batch, again) and torch.equal(batch[3:4], alone)


def test_masks_refuse_an_unknown_kind_or_fraction():
    with pytest.raises(ValueError, match="box, half, lines, random"):
        make_masks("circle", 0.3, 8, image_generators(0, [0]))
    for fraction in (0.0, 1.0, -0.2):
        with pytest.raises(ValueError, match="fraction"):
            make_masks("box", fraction, 8, image_generators(0, [0]))
