"""The samplers' Gaussian noise: x_T and every stochastic step's, from CPU generators, moved to
the device in one copy per step and drawn ahead of the network on a GPU.

A set of images stays reproducible image by image (``ddpm.generation`` gives each image its own
CPU generator), so a step's (B, C, H, W) noise is B small draws on the CPU. Copying each row to
the GPU with its own blocking ``.to(device)`` made DDPM-1000 at batch 256 issue 256,000 tiny
copies a batch, each of which waited for the network queued before it. Here the rows are drawn
into one pinned tensor and copied with one non-blocking copy, and on CUDA a background thread
draws the next steps' noise while the network runs (the draws release the GIL). The values are
the same whatever the device or path: each generator is consumed in the same order.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None
"""One generator for the batch, one per image (row), or None for the global generator."""

AHEAD = 2  # steps of noise drawn ahead of the network on CUDA


def _check(shape: tuple[int, ...], generator: Generators) -> None:
    if isinstance(generator, Sequence) and len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}; give one per row")


def draw(shape: tuple[int, ...], generator: Generators, pin: bool = False) -> torch.Tensor:
    """Standard normal noise of ``shape`` on the generators' device (the CPU for None), in pinned
    memory when ``pin`` and it is on the CPU. With a list, row i comes from ``generator[i]``."""
    _check(shape, generator)
    if isinstance(generator, Sequence):
        gen_device = generator[0].device if generator else torch.device("cpu")
        out = torch.empty(shape, device=gen_device, pin_memory=pin and gen_device.type == "cpu")
        for row, g in zip(out, generator, strict=True):
            row.copy_(torch.randn(shape[1:], generator=g, device=g.device))
        return out
    gen_device = generator.device if generator is not None else torch.device("cpu")
    pin = pin and gen_device.type == "cpu"
    return torch.randn(shape, generator=generator, device=gen_device, pin_memory=pin)


def to_device(noise: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """One copy to ``device``, non-blocking from pinned memory."""
    return noise.to(device, non_blocking=noise.is_pinned())


def _pin(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def randn(
    shape: tuple[int, ...], generator: Generators, device: torch.device | str
) -> torch.Tensor:
    """Standard normal noise drawn on the generators' device, then moved to ``device`` in one
    copy. With a list of generators, row i of the (B, ...) result is drawn from ``generator[i]``.
    """
    return to_device(draw(shape, generator, pin=_pin(device)), device)


def initial_noise(
    shape: tuple[int, ...],
    x_T: torch.Tensor | None,
    generator: Generators,
    device: torch.device | str,
) -> torch.Tensor:
    """x_T ~ N(0, I) of ``shape``, or the given ``x_T`` (checked against ``shape``)."""
    if x_T is None:
        return randn(shape, generator, device)
    if tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}; expected {tuple(shape)}")
    return x_T.to(device)


def step_noise(
    shape: tuple[int, ...],
    generator: Generators,
    device: torch.device | str,
    count: int,
    ahead: int | None = None,
) -> Iterator[torch.Tensor]:
    """The noise of a sampler's ``count`` stochastic steps, in order, each a (B, ...) tensor on
    ``device``.

    Args:
        ahead: steps drawn ahead by a background thread; default :data:`AHEAD` on CUDA with CPU
            generators, 0 (each draw when it is asked for) elsewhere, where nothing runs
            alongside the draws. The values are the same either way.
    """
    _check(shape, generator)
    ahead = default_ahead(generator, device) if ahead is None else ahead
    if ahead == 0 or count == 0:
        return (randn(shape, generator, device) for _ in range(count))
    return _drawn_ahead(shape, generator, device, count, ahead)


def default_ahead(generator: Generators, device: torch.device | str) -> int:
    """:data:`AHEAD` for CPU generators feeding a GPU, else 0. (The global generator, None, is
    not drawn from by a thread: others may use it meanwhile.)"""
    if generator is None or not _pin(device):
        return 0
    first = generator if isinstance(generator, torch.Generator) else generator[0]
    return AHEAD if first.device.type == "cpu" else 0


def _drawn_ahead(
    shape: tuple[int, ...], generator: Generators, device: torch.device | str, count: int, ahead
) -> Iterator[torch.Tensor]:
    """:func:`step_noise` with a thread that keeps up to ``ahead`` draws ready. The thread stops
    when the consumer does, also when it stops early (a generator's ``finally``)."""
    ready: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()
    pin = _pin(device)

    def offer(item: object) -> bool:
        """Queue ``item`` unless the consumer has stopped; False once it has."""
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for _ in range(count):
                if not offer(draw(shape, generator, pin)):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            offer(exc)

    thread = threading.Thread(target=produce, name="ddpm-noise", daemon=True)
    thread.start()
    try:
        for _ in range(count):
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            yield to_device(item, device)
    finally:
        stop.set()
        thread.join()
