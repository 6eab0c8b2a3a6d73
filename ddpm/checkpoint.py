"""The checkpoint format, in one place: written atomically, loaded with ``weights_only=True``.

Both kinds of file are a plain dict of tensors, numbers and strings with a ``version`` and the
configs the model was built from (:func:`configs_to_json`), so the model is always rebuilt
from the file itself and sampling never re-specifies the architecture (the cause of many
"samples are noise" reports).

A training checkpoint (``last.pt``, ``best.pt``), written by :func:`training_checkpoint`::

    {"version": 1, "step": int,
     "config": {"unet": {...}, "diffusion": {...}, "train": {...}, "ema": {...}},
     "model": state_dict, "ema": EMA state_dict, "optimizer": ..., "lr_scheduler": ...,
     "best": {"val_loss": {"value": float (inf before the first), "step": int | None,
              "misses": int (evaluations since it improved)}, "fid": {...}},
     "best_val_loss": float (best's val_loss value, for files read by older versions)}

No RNG state is saved: every random draw of a training step comes from generators seeded by
(seed, rank, step) (``ddpm.train.step_seed``), so a resume needs none, and a file written on
eight GPUs resumes on one. Files from before carry an ``rng`` entry, which is ignored.

A weights file (``models/ema.pt``), written by :func:`weights_payload`::

    {"version": 1, "step": int, "config": {"unet": {...}, "diffusion": {...}},
     "ema": EMA state_dict, "model": state_dict, "class_names": [str, ...]}

An EMA state dict is the UNet's under ``module.`` plus ``num_updates``.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from ddpm.config import DiffusionConfig, EMAConfig, TrainConfig, UNetConfig
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import CheckpointError
from ddpm.files import temporary_sibling
from ddpm.unet import UNet

CHECKPOINT_VERSION = 1
# UNet fields added after version 1 files were written, with the values those files were
# trained with: an old checkpoint keeps its function instead of taking the new defaults.
LEGACY_UNET = {"norm_eps": 1e-5, "downsample_padding": "symmetric", "time_freq_shift": 1.0}
Weights = Literal["ema", "raw"]
# Devices where a sampling network runs in channels_last: cuDNN's NHWC convolutions and the
# attention's unit-stride q, k, v; on the CPU contiguous maps are as fast for inference.
CHANNELS_LAST_DEVICES = ("cuda",)
_STATE_KEY = {"ema": "ema", "raw": "model"}

__all__ = [
    "CheckpointError",
    "SamplingModel",
    "config_differences",
    "configs_from_checkpoint",
    "configs_to_json",
    "load_checkpoint",
    "load_sampling_model",
    "read_safely",
    "save_checkpoint",
    "training_checkpoint",
    "weights_payload",
]


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """Write ``payload`` to ``path`` via a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    with open(tmp, "wb") as f:
        torch.save({"version": CHECKPOINT_VERSION, **payload}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_safely(
    path: Path,
    map_location: str | torch.device = "cpu",
    error: type[CheckpointError] = CheckpointError,
    advice: str = "",
) -> Any:
    """``torch.load(path, weights_only=True)``: the one place this project unpickles a file.

    A file that load refuses or cannot parse raises ``error`` with one line: the file, and the
    unpickler's own reason (then ``advice``). Torch's paragraphs are left out, among them its
    advice to load with ``weights_only=False``, which runs whatever code the file holds.
    """
    try:
        with warnings.catch_warnings():  # an old pickle protocol: torch asks for an issue
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle and zip errors alike: not a file we can read
        reason = unpickler_reason(exc)
        cut = isinstance(exc, EOFError) or "PytorchStreamReader" in str(exc)
        raise error(
            f"{path} is not a readable checkpoint, one this project can read safely ({reason})"
            + ("; it may be truncated" if cut else "")
            + advice
        ) from exc


def unpickler_reason(exc: Exception) -> str:
    """The short reason of a failed ``torch.load(weights_only=True)``, such as ``Unsupported
    global: GLOBAL foo.Bar`` or ``invalid load key, 'x'``: the first sentence of the weights
    unpickler's error, without torch's advice around it."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    line = line.split(" was not an allowed global")[0].split(". ")[0].rstrip(".")[:200]
    if isinstance(exc, pickle.UnpicklingError) and line:
        return line
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: the file is missing, truncated, not a checkpoint, or of another version.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint; train first (`pipeline train`)")
    advice = ". Delete it to start fresh, or restore it from the DVC cache"
    ckpt = read_safely(path, map_location, advice=advice)
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION:
        version = ckpt.get("version") if isinstance(ckpt, dict) else None
        raise CheckpointError(
            f"{path}: checkpoint version {version!r}, this code reads {CHECKPOINT_VERSION}"
        )
    return ckpt


def configs_to_json(
    unet: UNetConfig,
    diffusion: DiffusionConfig,
    train: TrainConfig | None = None,
    ema: EMAConfig | None = None,
) -> dict[str, dict[str, Any]]:
    """The ``config`` entry of a checkpoint: each given config as plain JSON values."""
    configs: dict[str, BaseModel | None] = {
        "unet": unet, "diffusion": diffusion, "train": train, "ema": ema,
    }  # fmt: skip
    return {k: c.model_dump(mode="json") for k, c in configs.items() if c is not None}


def saved_unet(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's UNet config as JSON, fields it predates filled with their old values."""
    return {**LEGACY_UNET, **ckpt["config"]["unet"]}


def configs_from_checkpoint(ckpt: dict[str, Any]) -> tuple[UNetConfig, DiffusionConfig]:
    """The model and diffusion configs a checkpoint was trained with."""
    return (
        UNetConfig.model_validate(saved_unet(ckpt)),
        DiffusionConfig.model_validate(ckpt["config"]["diffusion"]),
    )


def config_differences(
    ckpt: dict[str, Any], unet: UNetConfig, diffusion: DiffusionConfig
) -> list[str]:
    """Fields whose value in the checkpoint differs from the given configs, as text lines."""
    lines = []
    saved_unet_config, saved_diffusion = configs_from_checkpoint(ckpt)  # predated fields filled
    saved_configs = configs_to_json(saved_unet_config, saved_diffusion)
    for section, config in configs_to_json(unet, diffusion).items():
        saved = saved_configs[section]
        for key, value in config.items():
            if saved.get(key) != value:
                lines.append(f"{section}.{key}: checkpoint {saved.get(key)!r}, params {value!r}")
    return lines


def training_checkpoint(
    step: int,
    configs: dict[str, dict[str, Any]],
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    best: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Everything an exact resume needs (no RNG state: the loop seeds every step itself);
    ``best``: each measure's best value, its step and the evaluations since (early stopping)."""
    return {
        "step": step,
        "config": configs,
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "best": best,
        "best_val_loss": best["val_loss"]["value"],
    }


def weights_payload(
    step: int,
    unet: UNetConfig,
    diffusion: DiffusionConfig,
    ema: nn.Module,
    model: nn.Module,
    class_names: list[str],
) -> dict[str, Any]:
    """The trained weights with the configs that sampling needs (``models/ema.pt``)."""
    return {
        "step": step,
        "config": configs_to_json(unet, diffusion),
        "ema": ema.state_dict(),
        "model": model.state_dict(),
        "class_names": list(class_names),
    }


class SamplingModel(NamedTuple):
    """A network ready to sample from, with the diffusion it was trained with."""

    model: UNet
    diffusion: GaussianDiffusion
    class_names: list[str] | None
    step: int
    variance: str | None = None  # the variance its authors sample with, where the file says


def load_sampling_model(
    path: Path, weights: Weights = "ema", device: torch.device | str = "cpu"
) -> SamplingModel:
    """Rebuild the UNet and diffusion from a checkpoint's own config and load its weights.

    Args:
        path: a checkpoint holding ``ema`` and/or ``model`` weights, e.g. ``models/ema.pt``.
        weights: ``ema`` (the checkpoint's ``ema`` entry, an :class:`~ddpm.ema.EMA` state) or
            ``raw`` (its ``model`` entry, the live weights).

    Raises:
        CheckpointError: missing or unreadable file, no such weights in it, a config this code
            cannot build, or weights that do not fit the config.
    """
    if weights not in _STATE_KEY:
        raise ValueError(f"unknown weights {weights!r}; choose 'ema' or 'raw'")
    ckpt = load_checkpoint(Path(path), map_location="cpu")
    key = _STATE_KEY[weights]
    if key not in ckpt:
        raise CheckpointError(
            f"{path} holds no {weights} weights (no {key!r} entry; it has {sorted(ckpt)}); "
            "the train stage writes both into models/ema.pt; train again to get them"
        )
    try:
        unet_config, diffusion_config = configs_from_checkpoint(ckpt)
    except (KeyError, TypeError, ValidationError) as exc:
        raise CheckpointError(
            f"{path}: its model config cannot be rebuilt by this code ({exc}); retrain it"
        ) from exc
    state = ckpt[key]
    if weights == "ema":  # EMA state: the UNet as ``module.*`` plus an update counter
        state = {k.removeprefix("module."): v for k, v in state.items() if k != "num_updates"}
    model = UNet(unet_config)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: its {weights} weights do not fit the config it carries; it is not from "
            f"this code or was edited:\n{str(exc).splitlines()[0]}"
        ) from exc
    model = model.to(device).eval().requires_grad_(False)
    if torch.device(device).type in CHANNELS_LAST_DEVICES:
        model = model.to(memory_format=torch.channels_last)
    return SamplingModel(
        model,
        GaussianDiffusion(diffusion_config).to(device),
        ckpt.get("class_names"),
        int(ckpt.get("step", 0)),
        ckpt.get("variance"),
    )
