"""Generating a set of images: per-image seeds and labels, one batch of indices at a time.

Image ``i`` of a set sampled with ``seed`` draws all its noise (x_T and every step's) from its
own CPU generator seeded by :func:`image_seed`, so the set is the same whatever the batch size
or the number of processes the indices are spread over. (The network's float arithmetic can
still differ in the last bits between batch compositions, thread counts and devices; the noise
never does.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from ddpm.config import SamplerConfig
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import NonFiniteSamplesError
from ddpm.sampling.api import StepCallback, sample
from ddpm.seeds import image_seed


def image_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image index, seeded by :func:`image_seed`."""
    return [torch.Generator().manual_seed(image_seed(seed, int(i))) for i in indices]


def image_labels(
    indices: Sequence[int], num_classes: int | None, classes: Sequence[int] | None = None
) -> torch.Tensor | None:
    """Class labels by image index: ``classes`` in turn, or all classes in turn (balanced).

    Returns None for an unconditional model (``num_classes`` None); raises ValueError for
    classes given to one, or classes out of range.
    """
    if num_classes is None:
        if classes:
            raise ValueError(f"classes {list(classes)} were given, but the model is unconditional")
        return None
    chosen = list(classes) if classes else list(range(num_classes))
    bad = [c for c in chosen if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"classes {bad} are out of range; the model has {num_classes} classes")
    return torch.tensor([chosen[int(i) % len(chosen)] for i in indices], dtype=torch.long)


def precision(device: torch.device | str, bf16: bool) -> AbstractContextManager:
    """bf16 autocast of the network when asked for; the samplers' own arithmetic (elementwise,
    on the float32 predictions) is untouched by autocast and stays float32."""
    return torch.autocast(torch.device(device).type, torch.bfloat16) if bf16 else nullcontext()


def generate(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    indices: Sequence[int],
    seed: int,
    sampler: SamplerConfig,
    *,
    classes: Sequence[int] | None = None,
    x_T: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    callback: StepCallback | None = None,
    bf16: bool = False,
) -> torch.Tensor:
    """Sample the images with the given global ``indices`` as one batch.

    Args:
        model: the network, on ``device``; ``model.config`` gives the image shape.
        indices: global image indices; image i's noise comes from ``image_generators(seed, [i])``.
        sampler: which sampler, with its steps, spacing and the rest.
        classes: a conditional model's labels, taken in turn by image index (None: all its
            classes, balanced; :func:`image_labels`); must be None for an unconditional one.
        x_T: (B, C, H, W) initial noise instead of the seeded draw (the per-step noise of the
            stochastic samplers still comes from the seeded generators).
        bf16: run the network under bf16 autocast (faster on GPUs; the images move a little).

    Returns:
        float (B, C, H, W) samples, nominally in [-1, 1].

    Raises:
        ValueError: classes given to an unconditional model, or out of range.
        NonFiniteSamplesError: some sample holds NaN or inf, naming the image indices.
    """
    cfg = model.config
    shape = (len(indices), cfg.in_channels, cfg.image_size, cfg.image_size)
    labels = image_labels(indices, cfg.num_classes, classes)
    with precision(device, bf16):
        x = sample(
            model,
            diffusion,
            shape,
            sampler,
            generator=image_generators(seed, indices),
            x_T=x_T,
            y=None if labels is None else labels.to(device),
            device=device,
            callback=callback,
        )
    bad = ~torch.isfinite(x).flatten(1).all(dim=1)
    if bool(bad.any()):
        names = [int(i) for i, b in zip(indices, bad.tolist(), strict=True) if b]
        raise NonFiniteSamplesError(
            f"the {sampler.label} sampler produced NaN or inf values for images {names[:10]} "
            f"({len(names)} of {len(indices)} in this batch); the weights or the sampler "
            "settings are broken"
        )
    return x


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """Spherical interpolation between two noise tensors of the same shape (Shoemake 1985).

    slerp(a, b, t) = sin((1 - t) theta) / sin(theta) a + sin(t theta) / sin(theta) b, with
    theta the angle between a and b: it keeps the norm of Gaussian noise, where a straight
    line would pass through low-norm points the model never saw (DDIM paper, sec. 5.3).

    Args:
        a, b: tensors of any shape S.
        alpha: a float, or a (K,) tensor of positions in [0, 1].

    Returns:
        shape S for a float alpha, (K, *S) for a tensor.
    """
    assert a.shape == b.shape, (a.shape, b.shape)
    alphas = torch.as_tensor(alpha, dtype=torch.float64)
    a64, b64 = a.double(), b.double()
    cos = (a64.flatten() @ b64.flatten()) / (a64.norm() * b64.norm())
    theta = torch.arccos(cos.clamp(-1, 1))
    t = alphas.reshape(-1, *([1] * a.ndim))
    if float(theta) < 1e-4:  # (nearly) parallel: the sines vanish, the straight line is exact
        out = (1 - t) * a64 + t * b64
    else:
        out = (torch.sin((1 - t) * theta) * a64 + torch.sin(t * theta) * b64) / math.sin(theta)
    out = out.to(a.dtype)
    return out[0] if alphas.ndim == 0 else out
