"""The machine side of a stage: device choice, torch.distributed (torchrun) set-up, and where
training checkpoints live."""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel

from ddpm.distributed import Distributed
from pipeline.errors import InputsError
from pipeline.settings import Machine


def pick_device(machine: Machine, local_rank: int = 0) -> torch.device:
    """DDPM_DEVICE if set, else cuda, then mps, then cpu."""
    if machine.device:
        device = torch.device(machine.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("DDPM_DEVICE=cuda but no CUDA device is visible; unset it or use cpu")
        return torch.device("cuda", local_rank) if device.type == "cuda" else device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@contextmanager
def distributed(machine: Machine):
    """Yield (Distributed, device): a process group under torchrun, a single process otherwise.

    NCCL on GPUs, gloo on CPU (which is how the tests run two processes on one machine).
    """
    if machine.num_threads:
        torch.set_num_threads(machine.num_threads)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield Distributed(), pick_device(machine)
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(machine, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    ids = [device.index] if device.type == "cuda" else None
    try:
        yield (
            Distributed(
                rank=torch_dist.get_rank(),
                world_size=world_size,
                wrap=lambda m: DistributedDataParallel(m, device_ids=ids),
                gather=lambda x: _all_gather(x, world_size),
            ),
            device,
        )
    finally:
        torch_dist.destroy_process_group()


def _all_gather(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every process's ``x``, concatenated in rank order (all_gather: NCCL and gloo alike)."""
    parts = [torch.empty_like(x) for _ in range(world_size)]
    torch_dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def checkpoint_root(machine: Machine, models: Path, check: bool) -> Path:
    """The folder of the training checkpoints' folders: ``DDPM_CHECKPOINT_DIR`` when set (a
    bucket mounted on a spot machine, so a preempted run loses at most
    ``train.checkpoint_every`` steps), else ``models/checkpoints``.

    With ``check`` (the process that writes them), the folder is created and a probe file
    written and removed, so a folder that cannot be written stops the stage before training
    rather than at its first checkpoint.
    """
    root = machine.checkpoint_dir or models / "checkpoints"
    if check:
        probe = root / f".probe-{uuid.uuid4().hex}"
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            named = "DDPM_CHECKPOINT_DIR" if machine.checkpoint_dir else "the checkpoint folder"
            raise InputsError(
                f"{named} {root} cannot be written ({exc.strerror or exc}): mount the "
                "bucket there, or point DDPM_CHECKPOINT_DIR at a writable folder"
            ) from exc
    return root
