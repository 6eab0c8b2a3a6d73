"""Rendering images of the sample set: the one code path of ``sample``'s PNGs and the extra
seed ranges ``evaluate`` scores in memory (``evaluate.repeats``).

Image ``i`` of the set sampled with ``seed`` draws its noise from its own generator (seeded by
(seed, i)), and the batches are cut where the sample stage cuts them, at multiples of the
batch size, so that an image is computed with the companions it has there: images N..2N-1
rendered here are the PNGs ``sample`` writes with ``num_images`` 2N, bit for bit (when N is a
multiple of the batch size; otherwise the first batch of a range has fewer companions, which
can move a pixel's last bit).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ddpm.checkpoint import SamplingModel
from ddpm.generation import generate
from ddpm.pixels import to_uint8
from pipeline.settings import SampleParams


def aligned_batches(indices: range, batch_size: int) -> list[range]:
    """``indices`` (consecutive) cut at the multiples of ``batch_size``: the sample stage's
    batches, [k B, (k + 1) B), restricted to these indices."""
    cuts = range(indices.start - indices.start % batch_size + batch_size, indices.stop, batch_size)
    starts, stops = [indices.start, *cuts], [*cuts, indices.stop]
    return [range(a, b) for a, b in zip(starts, stops, strict=True) if a < b]


def rendered(
    net: SamplingModel,
    s: SampleParams,
    seed: int,
    batches: Sequence[range],
    device: torch.device,
) -> Iterator[tuple[range, torch.Tensor]]:
    """Each batch of image indices sampled with the sample settings ``s``, as uint8
    (B, H, W, 3), in turn."""
    sampler = s.sampler_config()
    for batch in batches:
        x = generate(net.model, net.diffusion, batch, seed, sampler, classes=s.classes,
                     device=device, bf16=s.bf16)  # fmt: skip
        yield batch, to_uint8(x)
