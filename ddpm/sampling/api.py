"""Sampling's front door: :func:`sample` runs the sampler a :class:`SamplerConfig` names,
joining the table's row (:data:`ddpm.sampling.table.SAMPLERS`, which says what the sampler
reads) to its stepper (:data:`STEPPERS`) on the one driver; the shorthands ``ddim_sample``
... take the settings as keywords, for scripts and tests."""

from __future__ import annotations

import torch
from torch import nn

from ddpm.config import SamplerConfig
from ddpm.diffusion import GaussianDiffusion
from ddpm.sampling.ancestral import Ancestral
from ddpm.sampling.ddim import DDIM
from ddpm.sampling.dpm_solver import DPMSolver
from ddpm.sampling.driver import MakeStepper, StepCallback, sample_chain  # noqa: F401
from ddpm.sampling.heun import Heun
from ddpm.sampling.spacing import sampling_timesteps
from ddpm.sampling.table import SAMPLERS
from ddpm.sampling.unipc import UniPC

STEPPERS: dict[str, MakeStepper] = {
    "ddpm": Ancestral,
    "ddim": DDIM,
    "dpm-solver": DPMSolver,
    "unipc": UniPC,
    "heun": Heun,
}
assert STEPPERS.keys() == SAMPLERS.keys(), "a row of the table without a stepper, or the reverse"

INPUTS = {"y", "generator", "x_T", "start", "known", "device", "progress", "callback"}
"""What :func:`sample` takes beside the settings: the driver's inputs."""


def sample(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    shape: tuple[int, ...],
    config: SamplerConfig,
    **inputs,
) -> torch.Tensor:
    """Run the sampler ``config`` names with its settings. Returns x0 (B, C, H, W).

    Args:
        inputs: the driver's (:func:`ddpm.sampling.driver.sample_chain`): ``y``,
            ``generator``, ``x_T``, ``start``, ``known``, ``device``, ``progress``,
            ``callback``.
    """
    return sample_chain(STEPPERS[config.sampler], model, diffusion, shape, config, **inputs)


def nfe(config: SamplerConfig, diffusion: GaussianDiffusion) -> int:
    """Network evaluations per image of ``config`` on ``diffusion``'s chain: its row's count
    over the timesteps it visits, doubled by classifier-free guidance (as the literature
    counts it, although the two are one batched forward pass)."""
    visited = len(sampling_timesteps(diffusion, config.steps, config.spacing))
    return SAMPLERS[config.sampler].nfe(visited) * (2 if config.guidance_scale != 1.0 else 1)


@torch.no_grad()
def model_problems(
    config: SamplerConfig, model: nn.Module, diffusion: GaussianDiffusion
) -> list[str]:
    """What ``model`` (a UNet) and its ``diffusion`` cannot do with the sampler ``config``, one
    line each: :meth:`SamplerConfig.problems` with the model's own facts."""
    unet = model.config
    conditional = unet.num_classes is not None
    return config.problems(diffusion.num_timesteps, conditional, unet.learn_sigma, unet.null_class)


def _run(name: str, model, diffusion, shape, **options) -> torch.Tensor:
    settings = {k: v for k, v in options.items() if k not in INPUTS}
    inputs = {k: v for k, v in options.items() if k in INPUTS}
    return sample(model, diffusion, shape, SamplerConfig(sampler=name, **settings), **inputs)


def ddpm_sample(model, diffusion, shape, *, steps: int | None = None, spacing="linspace", **kw):
    """Ancestral sampling over all T steps (or ``steps`` respaced ones); ``kw``: the other
    settings (:class:`SamplerConfig`'s fields) and the driver's inputs."""
    steps = steps or diffusion.num_timesteps
    return _run("ddpm", model, diffusion, shape, steps=steps, spacing=spacing, **kw)


def ddim_sample(model, diffusion, shape, *, steps: int = 50, **kw):
    """DDIM over ``steps`` timesteps (``eta``, the other settings and inputs in ``kw``)."""
    return _run("ddim", model, diffusion, shape, steps=steps, **kw)


def dpm_solver_sample(model, diffusion, shape, *, steps: int = 20, **kw):
    """DPM-Solver++ over ``steps`` timesteps (``order``, ``lower_order_final`` ... in ``kw``)."""
    return _run("dpm-solver", model, diffusion, shape, steps=steps, **kw)


def unipc_sample(model, diffusion, shape, *, steps: int = 10, **kw):
    """UniPC over ``steps`` timesteps (``order``, ``bh``, ``corrector`` ... in ``kw``)."""
    return _run("unipc", model, diffusion, shape, steps=steps, **kw)


def heun_sample(model, diffusion, shape, *, steps: int = 10, **kw):
    """Heun (EDM) over ``steps`` timesteps: 2 steps - 1 network evaluations."""
    return _run("heun", model, diffusion, shape, steps=steps, **kw)
