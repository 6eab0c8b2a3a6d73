"""Self-describing checkpoints: written atomically, loaded with ``weights_only=True``.

A checkpoint is a plain dict of tensors, numbers and strings::

    {"version": 1, "step": int, "config": {"unet": {...}, "diffusion": {...}, "train": {...}},
     "model": state_dict, "ema": state_dict, "optimizer": ..., "lr_scheduler": ...,
     "rng": {"torch": ByteTensor, "cuda": [ByteTensor, ...]}, "best_val_loss": float | None}

The model is always rebuilt from the config it carries, so sampling never re-specifies the
architecture (the cause of many "samples are noise" reports).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ddpm.config import DiffusionConfig, UNetConfig

CHECKPOINT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or from an incompatible configuration."""


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """Write ``payload`` to ``path`` via a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save({"version": CHECKPOINT_VERSION, **payload}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: the file is missing, truncated, not a checkpoint, or of another version.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint; train first (`pipeline train`)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc}); it may be "
            "truncated. Delete it to start fresh, or restore it from the DVC cache."
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION:
        version = ckpt.get("version") if isinstance(ckpt, dict) else None
        raise CheckpointError(
            f"{path}: checkpoint version {version!r}, this code reads {CHECKPOINT_VERSION}"
        )
    return ckpt


def config_differences(ckpt: dict[str, Any], unet: UNetConfig, diffusion: DiffusionConfig):
    """Fields whose value in the checkpoint differs from the given configs, as text lines."""
    lines = []
    for section, config in (("unet", unet), ("diffusion", diffusion)):
        saved = ckpt["config"][section]
        for key, value in config.model_dump(mode="json").items():
            if saved.get(key) != value:
                lines.append(f"{section}.{key}: checkpoint {saved.get(key)!r}, params {value!r}")
    return lines


def configs_from_checkpoint(ckpt: dict[str, Any]) -> tuple[UNetConfig, DiffusionConfig]:
    """The model and diffusion configs a checkpoint was trained with."""
    return (
        UNetConfig.model_validate(ckpt["config"]["unet"]),
        DiffusionConfig.model_validate(ckpt["config"]["diffusion"]),
    )
