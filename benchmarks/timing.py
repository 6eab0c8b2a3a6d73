"""Timing on any device, shared by the benchmark scripts: a device's queue drained around a call."""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, the device's queue drained on both sides."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


class _Stop(Exception):
    """Raised by the step callback to end a sampler after k steps."""


def sampler_step_times(
    sample: Callable[..., torch.Tensor], k: int, device: torch.device
) -> list[float]:
    """Seconds of each of the first ``k`` steps of ``sample(callback=...)``."""
    stamps = [time.perf_counter()]

    def callback(i: int, t: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        sync(device)
        stamps.append(time.perf_counter())
        if i + 1 >= k:
            raise _Stop

    with contextlib.suppress(_Stop):
        sample(callback=callback)
    return [b - a for a, b in itertools.pairwise(stamps)]
