"""The chain every sampler walks: its timesteps, each image's noise, the denoiser, the start
and the end, an optional known region, the callback and the progress bar. It knows no
stepper: :mod:`ddpm.sampling.api` hands it one.

Noise comes from ``generator`` (a CPU generator gives the same images on every device), so a
sampler is deterministic for a given generator state; ``generator`` may be a list with one
generator per image, so an image does not depend on the batch it is sampled in
(``ddpm.generation`` seeds one per image index). x_T is drawn first, then one draw per
stochastic step, in order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from torch import nn

from ddpm.config import SamplerConfig
from ddpm.diffusion import GaussianDiffusion
from ddpm.noise import Generators, initial_noise, step_noise
from ddpm.progress import Progress
from ddpm.sampling.denoiser import Denoiser
from ddpm.sampling.spacing import sampling_timesteps

StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
"""Called after each step as ``callback(step_index, t, x_t, x0_pred)``."""

KnownRegion = Callable[[torch.Tensor, int], torch.Tensor]
"""``known(x, t_prev)``: x after a step to ``t_prev`` (-1: the end) with the known region
put back as it should be at t_prev (inpainting); called after every step."""


class Stepper(Protocol):
    """One sampler's update rule. Built for one chain (``diffusion``, ``config`` and the
    visited ``timesteps``); a multistep stepper keeps its own history between calls."""

    stochastic: bool
    """Whether a step to t_prev >= 0 takes a fresh noise draw (``noise``)."""

    def step(
        self,
        i: int,
        t: int,
        t_prev: int,
        x: torch.Tensor,
        denoise: Denoiser,
        noise: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t -> (x_{t_prev}, the x0 predicted on the way); t_prev = -1 is the clean data."""
        ...


MakeStepper = Callable[[GaussianDiffusion, SamplerConfig, list[int]], Stepper]


def pairs(
    timesteps: list[int], progress: bool, desc: str, end: int = -1
) -> Iterator[tuple[int, int]]:
    """(t, t_prev) along the timesteps, t_prev = ``end`` after the last (-1: the clean data);
    progress when asked."""
    with Progress(len(timesteps), desc, "step", enabled=progress) as bar:
        for pair in zip(timesteps, [*timesteps[1:], end], strict=True):
            yield pair
            bar.update()


def chain_timesteps(
    diffusion: GaussianDiffusion, config: SamplerConfig, start: int | None = None, end: int = -1
) -> list[int]:
    """The timesteps a chain visits (each a network evaluation), decreasing: the spacing's,
    from ``start`` (its first, SDEdit's part-way start) when given, and above ``end``, where
    the chain stops (-1: the clean data; a timestep: a segment of a longer walk, RePaint's)."""
    T = diffusion.num_timesteps
    ts = sampling_timesteps(diffusion, config.steps, config.spacing).tolist()
    if not -1 <= end < T - 1:
        raise ValueError(f"end must be -1 (the data) or a timestep in [0, {T - 1}); got {end}")
    if start is not None:
        if not end < start < T:
            raise ValueError(f"start must be a timestep in ({end}, {T}); got {start}")
        ts = [start, *(t for t in ts if t < start)]
    ts = [t for t in ts if t > end]
    if not ts:
        raise ValueError(f"the chain visits no timestep above end={end}")
    return ts


def sample_chain(
    make_stepper: MakeStepper,
    model: nn.Module,
    diffusion: GaussianDiffusion,
    shape: tuple[int, ...],
    config: SamplerConfig,
    *,
    y: torch.Tensor | None = None,
    generator: Generators = None,
    x_T: torch.Tensor | None = None,
    start: int | None = None,
    end: int = -1,
    known: KnownRegion | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Walk the chain ``config`` describes with the stepper ``make_stepper`` builds. Returns
    x0 (B, C, H, W).

    Args:
        x_T: the chain's first x instead of the seeded noise: x_T, or x_start with ``start``.
        start: the timestep ``x_T`` is at (None: the spacing's first, for pure noise).
        end: where the chain stops: -1, the clean data (returns x0), or a timestep (returns
            x_end): a walk split at a timestep into two chains is the unbroken one.
        known: the known-region constraint after every step (:data:`KnownRegion`).
    """
    if start is not None and x_T is None:
        raise ValueError("a chain that starts part-way (start) needs its x_T")
    timesteps = chain_timesteps(diffusion, config, start, end)
    stepper = make_stepper(diffusion, config, timesteps)
    denoise = Denoiser(model, diffusion, y, config.guidance_scale, config.clip_x0)
    x = initial_noise(shape, x_T, generator, device)  # x_T ~ N(0, I), or the given start
    count = (len(timesteps) - (end < 0)) if stepper.stochastic else 0
    noises = step_noise(shape, generator, device, count=count)
    for i, (t, t_prev) in enumerate(pairs(timesteps, progress, config.sampler, end)):
        noise = next(noises) if stepper.stochastic and t_prev >= 0 else None
        x, x0 = stepper.step(i, t, t_prev, x, denoise, noise)
        if known is not None:
            x = known(x, t_prev)
        if callback is not None:
            callback(i, t, x, x0)
    return x
