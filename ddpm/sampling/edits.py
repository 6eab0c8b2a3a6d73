"""The edits made with a trained model, each a use of the table's samplers on the driver:
RePaint inpainting (:func:`inpaint`), SDEdit (:func:`sdedit`), DDIM inversion and the round trip
through it (:func:`ddim_invert`, :func:`reconstruct`), the masks inpainting is tried with
(:func:`make_masks`) and the network evaluations each costs (``*_nfe``).

Images in and out are float (B, C, H, W) tensors in [-1, 1]. Noise comes from ``generator``
as in sampling (:mod:`ddpm.sampling.driver`): with one generator per image an image's result
does not depend on its batch; each function says in which order it draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ddpm.config import SamplerConfig, Spacing
from ddpm.diffusion import GaussianDiffusion
from ddpm.noise import Generators, randn
from ddpm.progress import Progress
from ddpm.sampling.ancestral import Ancestral
from ddpm.sampling.api import sample
from ddpm.sampling.chain import abar
from ddpm.sampling.denoiser import Denoiser
from ddpm.sampling.driver import StepCallback, chain_timesteps, sample_chain
from ddpm.sampling.spacing import sampling_timesteps
from ddpm.sampling.table import SAMPLERS

MASKS = ("box", "half", "lines", "random")
"""The kinds of :func:`make_masks`."""


# RePaint (Lugmayr et al. 2022)


def jump_schedule(steps: int, jump_length: int, resample: int) -> list[int]:
    """RePaint's walk over the chain indices steps - 1 .. 0 with its jumps back up (Lugmayr et
    al. 2022, sec. 4.2, Figure 9; the authors' ``get_schedule_jump`` with t_T = steps,
    jump_len = jump_length, jump_n_sample = resample, less its final -1; diffusers'
    ``RePaintScheduler.set_timesteps`` gives the same list times T // steps).

    Each entry is the index of the state reached. On reaching an index j = 0, L, 2L, ... below
    steps - L (L = jump_length) the walk climbs L indices and descends again, resample - 1
    times for each j. resample = 1, or L >= steps, is the plain descent.
    """
    for name, value in (("steps", steps), ("jump_length", jump_length), ("resample", resample)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1; got {value}")
    jumps = {j: resample - 1 for j in range(0, steps - jump_length, jump_length)}
    t, walk = steps, []
    while t >= 1:
        t -= 1
        walk.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                walk.append(t)
    return walk


def _moves(walk: list[int]) -> list[tuple[int, int]]:
    """The walk, ended at -1 (the data), as maximal runs (a, b) of chain indices: a descent
    when b < a (b - a network evaluations), a climb when b > a."""
    moves: list[tuple[int, int]] = []
    for a, b in zip(walk, [*walk[1:], -1], strict=True):
        if moves and (moves[-1][1] < moves[-1][0]) == (b < a):
            moves[-1] = (moves[-1][0], b)
        else:
            moves.append((a, b))
    return moves


def inpaint_nfe(steps: int, jump_length: int, resample: int) -> int:
    """Network evaluations per image of :func:`inpaint` over a chain of ``steps`` timesteps
    (config.steps for the leading, linspace and trailing spacings): one per descending step of
    :func:`jump_schedule`, the climbs free; unguided (guidance doubles it, as
    :func:`ddpm.sampling.api.nfe` counts)."""
    return sum(a - b for a, b in _moves(jump_schedule(steps, jump_length, resample)) if b < a)


class _RePaintStep:
    """The driver's stepper and known region for RePaint: the ancestral step (``Ancestral``,
    with config.variance), whose noise the known region reuses (the two regions are disjoint)."""

    stochastic = True

    def __init__(self, diffusion: GaussianDiffusion, config: SamplerConfig, x0, mask) -> None:
        self.ancestral = Ancestral(diffusion, config, [])
        self.diffusion, self.x0, self.mask = diffusion, x0, mask
        self.noise: torch.Tensor | None = None

    def __call__(self, diffusion, config, timesteps) -> _RePaintStep:
        return self  # the MakeStepper: the ancestral step is memoryless, one serves every run

    def step(self, i, t, t_prev, x, denoise: Denoiser, noise):
        self.noise = noise
        return self.ancestral.step(i, t, t_prev, x, denoise, noise)

    def known(self, x: torch.Tensor, t_prev: int) -> torch.Tensor:
        """The known region noised to t_prev, q(x_{t_prev} | x0) = sqrt(abar) x0 +
        sqrt(1 - abar) eps with the step's eps (Algorithm 1, line 5); x0 itself at the end."""
        if t_prev < 0:
            return torch.where(self.mask, self.x0, x)
        a = float(abar(self.diffusion, t_prev))
        return torch.where(self.mask, math.sqrt(a) * self.x0 + math.sqrt(1 - a) * self.noise, x)


def _climb(diffusion, x, t: int, t_next: int, generator: Generators, device) -> torch.Tensor:
    """x_t -> x_{t_next} ~ q(x_{t_next} | x_t) = N(sqrt(1 - beta) x_t, beta I), beta = 1 -
    abar_{t_next} / abar_t: one respaced step of the forward chain (Algorithm 1, line 8)."""
    alpha = float(abar(diffusion, t_next) / abar(diffusion, t))
    noise = randn(tuple(x.shape), generator, device)
    return math.sqrt(alpha) * x + math.sqrt(1 - alpha) * noise


def _counted(callback: StepCallback | None, bar: Progress) -> StepCallback:
    """A driver callback numbering the steps of every run in one sequence, the bar moved."""
    done = [0]

    def each(i: int, t: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        if callback is not None:
            callback(done[0], t, x, x0)
        done[0] += 1
        bar.update()

    return each


@torch.no_grad()
def inpaint(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    mask: torch.Tensor,
    config: SamplerConfig,
    *,
    jump_length: int,
    resample: int,
    y: torch.Tensor | None = None,
    generator: Generators = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """RePaint (Lugmayr et al. 2022, Algorithm 1, with the jumps of sec. 4.2): fill in where
    ``mask`` (bool, broadcastable to x0, True = known) is False.

    Each step to t_prev is the ancestral step (Ho et al. 2020, Algorithm 2; the ``ddpm`` row,
    with config.variance, steps, spacing, clip_x0 and guidance_scale; config.sampler is not
    read: RePaint's step is ancestral) in the unknown region and the input noised to t_prev,
    q(x_{t_prev} | x0), in the known one; at the end the known region is x0 exactly. The
    walk is :func:`jump_schedule` over the chain's timesteps in increasing order (index k: the
    k-th), each descent a run of the driver (start, end, known), each climb one respaced
    forward step per index. Its entries are states, as in the authors' loop: a step from
    index a runs the network at t_a, so at jump_length 1 every timestep but the last is
    visited ``resample`` times, as in Algorithm 1 (diffusers' RePaintPipeline reads the
    same list as the network's timesteps, which moves each jump one index down).

    Noise, per image: x_T; then, in the walk's order, one draw per step to t_prev >= 0 (its
    ancestral noise, and the known region's, the regions being disjoint; diffusers'
    RePaintScheduler.step shares it likewise) and one per index climbed.

    Args:
        callback: ``callback(i, t, x, x0_pred)`` after every step, i counting them all.
    """
    ts = sampling_timesteps(diffusion, config.steps, config.spacing).flip(0).tolist()
    x0 = x0.to(device, torch.float32)
    mask = torch.as_tensor(mask, dtype=torch.bool).to(device)
    repaint = _RePaintStep(diffusion, config, x0, mask)
    moves = _moves(jump_schedule(len(ts), jump_length, resample))
    x: torch.Tensor | None = None
    total = sum(a - b for a, b in moves if b < a)
    with Progress(total, "repaint", "step", enabled=progress) as bar:
        each = _counted(callback, bar)
        for a, b in moves:
            if b > a:
                for k in range(a, b):
                    x = _climb(diffusion, x, ts[k], ts[k + 1], generator, device)
                continue
            x = sample_chain(repaint, model, diffusion, tuple(x0.shape), config, y=y,
                             generator=generator, x_T=x, start=None if x is None else ts[a],
                             end=ts[b] if b >= 0 else -1, known=repaint.known, device=device,
                             callback=each)  # fmt: skip
    return x


# SDEdit (Meng et al. 2022)


def sdedit_timestep(strength: float, num_timesteps: int) -> int:
    """SDEdit's t0 = round(strength T) - 1: strength 1 is the last timestep, T - 1."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1]; got {strength}")
    t0 = round(strength * num_timesteps) - 1
    if t0 < 0:
        raise ValueError(f"strength={strength} is below the chain's first timestep at "
                         f"T={num_timesteps}; choose at least {1 / num_timesteps:g}")  # fmt: skip
    return t0


def sdedit_nfe(config: SamplerConfig, diffusion: GaussianDiffusion, strength: float) -> int:
    """Network evaluations per image of :func:`sdedit`: the sampler's row over the timesteps
    visited from t0, doubled by guidance (as :func:`ddpm.sampling.api.nfe` counts)."""
    t0 = sdedit_timestep(strength, diffusion.num_timesteps)
    visited = len(chain_timesteps(diffusion, config, None if strength == 1 else t0))
    return SAMPLERS[config.sampler].nfe(visited) * (2 if config.guidance_scale != 1.0 else 1)


@torch.no_grad()
def sdedit(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    strength: float,
    config: SamplerConfig,
    *,
    y: torch.Tensor | None = None,
    generator: Generators = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    callback: StepCallback | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDEdit (Meng et al. 2022, Algorithm 1): x0 noised to t0 = round(strength T) - 1,
    x_t0 = sqrt(abar_t0) x0 + sqrt(1 - abar_t0) eps (Ho et al. 2020, eq. 4), then the sampler
    ``config`` names (any row of the table) from t0 down to the data. Returns (x_t0, result).

    Noise, per image: eps first (the draw plain sampling takes as x_T), then the sampler's own.
    At strength 1 the chain is plain sampling from eps itself (not q_sample at T - 1), at the
    spacing's first timestep: the result is :func:`ddpm.sampling.api.sample`'s with the same
    generators, bit for bit, and x_t0 is eps.

    Raises:
        ValueError: strength outside (0, 1], or below the first timestep.
    """
    t0 = sdedit_timestep(strength, diffusion.num_timesteps)
    x0 = x0.to(device, torch.float32)
    eps = randn(tuple(x0.shape), generator, device)
    x_t0, start = eps, None
    if strength != 1:
        a = float(abar(diffusion, t0))
        x_t0, start = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps, t0
    result = sample(model, diffusion, tuple(x0.shape), config, y=y, generator=generator,
                    x_T=x_t0, start=start, device=device, progress=progress,
                    callback=callback)  # fmt: skip
    return x_t0, result


# DDIM inversion (Song et al. 2020, sec. 4.3)


def ddim_inverse_step(
    diffusion: GaussianDiffusion,
    denoise: Denoiser,
    x: torch.Tensor,
    t: int,
    t_next: int,
    clip_x0: bool = False,
) -> torch.Tensor:
    """x_t -> x_{t_next}, t < t_next: the DDIM ODE (Song et al. 2020, eq. 13) stepped up, as
    diffusers' DDIMInverseScheduler does: eps is the network's at t_next on x_t,
    x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (clamped with ``clip_x0``), and
    x_{t_next} = sqrt(abar_next) x0 + sqrt(1 - abar_next) eps. From t = -1 (abar = 1) the
    first step is x_{t_next} = sqrt(abar_next) x0 + sqrt(1 - abar_next) eps(x0, t_next)."""
    eps = denoise(x, t_next).eps
    a, a_next = float(abar(diffusion, t)), float(abar(diffusion, t_next))
    x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
    return math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps


@torch.no_grad()
def ddim_invert(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    steps: int,
    *,
    spacing: Spacing = "trailing",
    y: torch.Tensor | None = None,
    clip_x0: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """DDIM inversion (Song et al. 2020, sec. 4.3): x0 up to x_T along the deterministic ODE,
    :func:`ddim_inverse_step` over the chain's timesteps t_1 < ... < t_n in increasing order,
    from the data (t = -1) to t_n, one network evaluation each (unguided). With the trailing
    spacing (the default) x_T is at T - 1, where DDIM starts; given the same timesteps this
    is diffusers' DDIMInverseScheduler loop (set_alpha_to_one). No noise."""
    ts = sampling_timesteps(diffusion, steps, spacing).flip(0).tolist()
    denoise = Denoiser(model, diffusion, y, 1.0, clip_x0=False)
    x = x0.to(device, torch.float32)
    with Progress(len(ts), "ddim-invert", "step", enabled=progress) as bar:
        for t, t_next in zip([-1, *ts[:-1]], ts, strict=True):
            x = ddim_inverse_step(diffusion, denoise, x, t, t_next, clip_x0)
            bar.update()
    return x


@torch.no_grad()
def reconstruct(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    steps: int,
    *,
    spacing: Spacing = "trailing",
    y: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The round trip (x_T, x0 reconstructed): :func:`ddim_invert` up, then plain DDIM (eta 0,
    Song et al. 2020, eq. 12) back down from x_T over the same steps and spacing, unclipped
    both ways (clipping is not invertible). Deterministic; 2 steps network evaluations."""
    x_T = ddim_invert(model, diffusion, x0, steps, spacing=spacing, y=y, device=device,
                      progress=progress)  # fmt: skip
    config = SamplerConfig(sampler="ddim", steps=steps, spacing=spacing, eta=0.0, clip_x0=False)
    x = sample(model, diffusion, tuple(x_T.shape), config, y=y, x_T=x_T, device=device,
               progress=progress)  # fmt: skip
    return x_T, x


def reconstruct_nfe(steps: int) -> int:
    """Network evaluations per image of :func:`reconstruct`: ``steps`` up and ``steps`` down
    (for the leading, linspace and trailing spacings, which visit ``steps`` timesteps)."""
    return 2 * steps


# Masks


def _box(fraction: float, size: int, g: torch.Generator) -> torch.Tensor:
    """A square hole of side round(sqrt(fraction) size) (at least 1); one draw: its top and
    left corner, uniform over the places it fits."""
    side = min(size, max(1, round(math.sqrt(fraction) * size)))
    top, left = torch.randint(0, size - side + 1, (2,), generator=g, device=g.device).tolist()
    hole = torch.zeros(size, size, dtype=torch.bool)
    hole[top : top + side, left : left + side] = True
    return hole


def _half(fraction: float, size: int, g: torch.Generator) -> torch.Tensor:
    """One of the four halves (left, right, top, bottom: one draw), size // 2 wide."""
    side = int(torch.randint(0, 4, (1,), generator=g, device=g.device))
    hole = torch.zeros(size, size, dtype=torch.bool)
    low, high, whole = slice(0, size // 2), slice(size - size // 2, size), slice(None)
    hole[[(whole, low), (whole, high), (low, whole), (high, whole)][side]] = True
    return hole


def _lines(fraction: float, size: int, g: torch.Generator) -> torch.Tensor:
    """n whole rows and n whole columns, one pixel wide, n = round((1 - sqrt(1 - fraction))
    size) within [1, size - 1], so that 1 - (1 - n / size)^2, the area they cover, is
    fraction within 1 / size; two draws: a permutation of the rows, then of the columns."""
    n = min(size - 1, max(1, round((1 - math.sqrt(1 - fraction)) * size)))
    rows = torch.randperm(size, generator=g, device=g.device)[:n].cpu()
    cols = torch.randperm(size, generator=g, device=g.device)[:n].cpu()
    hole = torch.zeros(size, size, dtype=torch.bool)
    hole[rows, :] = True
    hole[:, cols] = True
    return hole


def _random(fraction: float, size: int, g: torch.Generator) -> torch.Tensor:
    """Each pixel unknown with probability fraction; one draw: uniforms (size, size)."""
    return (torch.rand(size, size, generator=g, device=g.device) < fraction).cpu()


_HOLES: dict[str, Callable[[float, int, torch.Generator], torch.Tensor]] = {
    "box": _box,
    "half": _half,
    "lines": _lines,
    "random": _random,
}
assert tuple(_HOLES) == MASKS


def make_masks(
    kind: str, fraction: float, size: int, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """Inpainting masks, bool (B, 1, size, size) on the CPU, True = known, image i's drawn from
    ``generators[i]`` alone (its draws in the order its kind says): ``box``, a square hole of
    about ``fraction`` of the area at a random place; ``half``, a random one of the four
    halves (``fraction`` is checked but not used); ``lines``, random whole rows and columns
    covering about ``fraction``; ``random``, each pixel unknown with probability ``fraction``.

    Raises:
        ValueError: an unknown kind, or fraction outside (0, 1).
    """
    if kind not in _HOLES:
        raise ValueError(f"unknown mask kind {kind!r}; choose one of {', '.join(MASKS)}")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1); got {fraction}")
    holes = [_HOLES[kind](fraction, size, g) for g in generators]
    return ~torch.stack(holes).unsqueeze(1)
