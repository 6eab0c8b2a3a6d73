"""Training batches: from the whole split on the device, or streamed from memory-mapped arrays.

Which images a step trains on, and which of them are flipped, is a function of the step's seed
alone (:func:`draw`, on a CPU generator), so both feeds give the same batch for the same seed and
step, and a resumed run is exact whichever feed it takes:

- :class:`DeviceFeed` copies the split to the device once; a batch is one gather there.
- :class:`StreamFeed` leaves the split on disk (the prepared ``.npy`` opened with
  ``mmap_mode="r"``). A background thread gathers the next batches into pinned host memory,
  a few steps ahead, so the device does not wait on the disk; only the batch crosses to the
  device.

:func:`choose_feed` picks one: the device feed when the split fits ``budget`` (GiB), or, for
``"auto"``, a quarter of the device's free memory (host RAM on a CPU).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import Literal, NamedTuple

import numpy as np
import torch

from ddpm.pixels import to_float

AUTO_FRACTION = 0.25  # of the free device memory the split may take under budget "auto"
AHEAD = 4  # batches the stream prepares ahead of the step that trains on them

Budget = float | Literal["auto"]


class Draw(NamedTuple):
    """One step's draw: image indices (B,) int64 and flips (B,) bool, both on the CPU."""

    index: torch.Tensor
    flip: torch.Tensor


def draw(rng: int, num_images: int, batch_size: int, hflip: bool) -> Draw:
    """The images and flips of the step whose seed is ``rng``."""
    gen = torch.Generator().manual_seed(rng)
    index = torch.randint(0, num_images, (batch_size,), generator=gen)
    flip = (
        torch.rand(batch_size, generator=gen) < 0.5
        if hflip
        else torch.zeros(batch_size, dtype=torch.bool)
    )
    return Draw(index, flip)


def to_batch(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) and flips (B,) on one device -> float x0 (B, C, H, W) in [-1, 1]."""
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)
    return to_float(images)


def in_memory(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A CPU tensor of ``images``, read into memory when they are a read-only (mapped) array."""
    if isinstance(images, torch.Tensor):
        return images
    return torch.from_numpy(images if images.flags.writeable else np.array(images))


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device`` without stalling the host: a copy from pageable memory to a
    GPU waits for all the work queued there, one from pinned memory does not."""
    if device.type == "cuda" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: CUDA's free memory, or the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def budget_bytes(budget: Budget, device: torch.device) -> int:
    """The bytes of images the device feed may hold: ``budget`` GiB, or the ``auto`` share."""
    if budget == "auto":
        return int(AUTO_FRACTION * free_memory(device))
    return int(budget * 2**30)


def size_text(nbytes: int) -> str:
    """1,536 -> '1.5 KiB'; the largest binary unit that leaves at least 1."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes} B"


def choose_feed(nbytes: int, budget: Budget, device: torch.device) -> tuple[str, str]:
    """``("device" | "stream", why)``: the feed for a split of ``nbytes`` under ``budget``."""
    limit = budget_bytes(budget, device)
    what, allowed = f"{size_text(nbytes)} of images", size_text(limit)
    rule = "a quarter of the free memory" if budget == "auto" else f"train.data_budget={budget}"
    if nbytes <= limit:
        return "device", f"{what} held on {device.type} ({allowed} allowed: {rule})"
    return "stream", f"{what} streamed from disk: over the {allowed} allowed ({rule})"


class DeviceFeed:
    """The whole split on the device as uint8 (N, C, H, W)."""

    def __init__(self, images: np.ndarray, labels: torch.Tensor | None, device: torch.device):
        self.images = in_memory(images).to(device).permute(0, 3, 1, 2).contiguous()
        self.labels = None if labels is None else labels.to(device)
        self.device = device
        self.draws: Callable[[int], Draw] | None = None

    def start(self, step: int, draws: Callable[[int], Draw]) -> None:
        self.draws = draws

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x0 (B, C, H, W) in [-1, 1] and labels (B,) or None, on the device."""
        index, flip = (to_device(t, self.device) for t in self.draws(step))
        y = None if self.labels is None else self.labels[index]
        return to_batch(self.images[index], flip), y

    def close(self) -> None:
        pass


class StreamFeed:
    """The split stays on disk; a thread gathers batches ``AHEAD`` steps ahead into pinned
    memory (on CUDA), and :meth:`batch` moves one to the device."""

    def __init__(self, images: np.ndarray, labels: torch.Tensor | None, device: torch.device):
        self.images, self.labels, self.device = images, labels, device
        self.pin = device.type == "cuda"
        self.thread: threading.Thread | None = None

    def start(self, step: int, draws: Callable[[int], Draw]) -> None:
        """Begin gathering the batches of ``step``, ``step + 1``, ... in the background."""
        self.close()
        self.queue: queue.Queue = queue.Queue(maxsize=AHEAD)
        self.stopping = threading.Event()
        self.thread = threading.Thread(
            target=self._fill, args=(step, draws), name="ddpm-stream-feed", daemon=True
        )
        self.thread.start()

    def _gather(self, d: Draw) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """uint8 images (B, H, W, C), labels and flips; pinned here, in the background, on
        CUDA, so that :meth:`batch` never waits for a copy."""
        index = d.index.numpy()
        shape = (len(index), *self.images.shape[1:])
        out = torch.empty(shape, dtype=torch.uint8, pin_memory=self.pin)
        np.take(self.images, index, axis=0, out=out.numpy())
        y = None if self.labels is None else self.labels[d.index]
        if not self.pin:
            return out, y, d.flip
        return out, None if y is None else y.pin_memory(), d.flip.pin_memory()

    def _fill(self, step: int, draws: Callable[[int], Draw]) -> None:
        while not self.stopping.is_set():
            try:
                item = (step, self._gather(draws(step)))
            except Exception as error:  # raised again in the training thread, by batch()
                item = (step, error)
            while not self.stopping.is_set():
                try:
                    self.queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item[1], Exception):
                return
            step += 1

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x0 (B, C, H, W) in [-1, 1] and labels (B,) or None, on the device."""
        if self.thread is None:
            raise RuntimeError("StreamFeed.batch before start")
        got, item = self.queue.get()
        if isinstance(item, Exception):
            raise item
        assert got == step, f"the stream is at step {got}, the loop at {step}"
        images, y, flip = (None if t is None else to_device(t, self.device) for t in item)
        return to_batch(images.permute(0, 3, 1, 2).contiguous(), flip), y

    def close(self) -> None:
        """Stop the thread (it exits within 0.1 s of its current gather)."""
        if self.thread is not None:
            self.stopping.set()
            self.thread.join()
            self.thread = None


Feed = DeviceFeed | StreamFeed


def make_feed(
    images: np.ndarray | torch.Tensor,
    labels: torch.Tensor | None,
    device: torch.device,
    budget: Budget = "auto",
) -> tuple[Feed, str]:
    """The feed :func:`choose_feed` picks for uint8 images (N, H, W, C), and why."""
    host = images.cpu().numpy() if isinstance(images, torch.Tensor) else images
    kind, why = choose_feed(host.nbytes, budget, device)
    labels = None if labels is None else torch.as_tensor(labels).cpu()
    feed = DeviceFeed if kind == "device" else StreamFeed
    return feed(host, labels, device), why
