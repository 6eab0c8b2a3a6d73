"""The project's one seed hash: every seeded draw (a training step's, an image's) comes from
a seed mixed with indices here, so a draw is a pure function of (seed, rank, step) or
(seed, image index) whatever the batch, process count or resume."""

from __future__ import annotations

PRIME = 1_000_003  # mixes an index into a seed
MODULUS = 2**63  # what torch.Generator.manual_seed takes


def mix(seed: int, index: int) -> int:
    """A seed for ``index`` under ``seed``: (seed * 1,000,003 + index) mod 2^63. Nested, it
    seeds a path: mix(mix(seed, rank), step)."""
    return (seed * PRIME + index) % MODULUS


def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index`` of the set sampled with ``seed``."""
    return mix(seed, index)
