"""The training loop: AdamW, warm-up, EMA, validation, checkpoints and exact resume.

``train`` is one readable loop over helpers. Everything random in a step (batch indices, flips,
timesteps, noise, dropout) is drawn from generators seeded by (seed, rank, step), so a run
resumed from a checkpoint takes exactly the steps an unbroken run would have taken. Tracking
stays outside: the loop reports through the callbacks in :class:`Hooks`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ddpm.checkpoint import (
    CheckpointError,
    config_differences,
    load_checkpoint,
    save_checkpoint,
)
from ddpm.config import DiffusionConfig, TrainConfig, UNetConfig
from ddpm.diffusion import GaussianDiffusion
from ddpm.ema import EMA, EMAConfig
from ddpm.samplers import ddim_sample
from ddpm.sampling import to_uint8
from ddpm.unet import UNet


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint on disk is the last good state."""


class Dataset(NamedTuple):
    """Images as one uint8 tensor (N, H, W, C) and labels (N,) int64, or None."""

    images: torch.Tensor
    labels: torch.Tensor | None = None


@dataclass
class Hooks:
    """Where the loop reports. Each is optional; all run on rank 0 only."""

    on_metrics: Callable[[int, dict[str, float]], None] | None = None
    on_samples: Callable[[int, torch.Tensor], None] | None = None  # uint8 (B, H, W, C)
    on_checkpoint: Callable[[int, Path], None] | None = None
    log: Callable[[str], None] = print


class TrainResult(NamedTuple):
    step: int
    best_val_loss: float
    final_val_loss: float
    wall_time_s: float
    images_per_second: float
    stopped_early: bool
    resumed_from_step: int


@dataclass
class Distributed:
    """This process's place in a torch.distributed job (rank 0 of 1 when there is none)."""

    rank: int = 0
    world_size: int = 1
    wrap: Callable[[nn.Module], nn.Module] = field(default=lambda m: m)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) in [0, 255] -> float (B, C, H, W) in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one training step on one process: a pure function of (seed, rank, step)."""
    return ((seed * 1_000_003 + rank) * 1_000_003 + step) % 2**63


def draw_batch(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    batch_size: int,
    hflip: bool,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A random batch from images uint8 (N, C, H, W) on the device: x0 (B, C, H, W) in [-1, 1]."""
    idx = torch.randint(
        0, images.shape[0], (batch_size,), device=images.device, generator=generator
    )
    x = images[idx]
    if hflip:
        flip = torch.rand(batch_size, device=images.device, generator=generator) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    return to_float(x), None if labels is None else labels[idx]


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up to 1, then constant or cosine decay to 0 at ``config.steps``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def validation_loss(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    data: Dataset,
    num_timesteps: int,
    batch_size: int,
) -> float:
    """Mean loss over ``data`` at fixed, evenly spaced timesteps with fixed noise (seed 0).

    The same images, timesteps and noise every time, so values compare across steps and runs.
    """
    images, labels = data
    device = images.device
    gen = torch.Generator().manual_seed(0)
    ts = torch.linspace(0, diffusion.num_timesteps - 1, num_timesteps).round().long().tolist()
    total, count = 0.0, 0
    for t in ts:
        for i in range(0, images.shape[0], batch_size):
            x0 = to_float(images[i : i + batch_size])
            noise = torch.randn(x0.shape, generator=gen).to(device)
            tt = torch.full((x0.shape[0],), t, device=device)
            y = None if labels is None else labels[i : i + batch_size]
            total += diffusion.training_losses(model, x0, tt, noise, y).sum().item()
            count += x0.shape[0]
    return total / count


def preview(
    ema: EMA, diffusion: GaussianDiffusion, config: TrainConfig, device: torch.device
) -> torch.Tensor:
    """A fixed-seed DDIM grid from the EMA weights: uint8 (B, H, W, C)."""
    unet = ema.module
    b, cfg = config.sample_images, unet.config
    y = None if cfg.num_classes is None else torch.arange(b, device=device) % cfg.num_classes
    x = ddim_sample(
        unet,
        diffusion,
        (b, cfg.in_channels, cfg.image_size, cfg.image_size),
        steps=min(config.sample_steps, diffusion.num_timesteps),
        y=y,
        generator=torch.Generator().manual_seed(0),
        device=device,
    )
    return to_uint8(x).cpu()


class _State(NamedTuple):
    model: UNet
    ema: EMA
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR


def _build(
    unet_config: UNetConfig, train_config: TrainConfig, ema_config: EMAConfig, device
) -> _State:
    model = UNet(unet_config).to(device)
    if train_config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=train_config.lr,
        betas=train_config.adam_betas,
        weight_decay=train_config.weight_decay,
        fused=device.type in ("cuda", "cpu"),  # one kernel for all tensors: ~4x faster on CPU
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, train_config)
    )
    return _State(model, EMA(model, ema_config), optimizer, scheduler)


def _payload(state: _State, step: int, configs: dict, best: float | None) -> dict:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "step": step,
        "config": configs,
        "model": state.model.state_dict(),
        "ema": state.ema.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "lr_scheduler": state.scheduler.state_dict(),
        "grad_scaler": None,  # bf16 needs no loss scaling; kept for the format's sake
        "rng": rng,
        "best_val_loss": best,
    }


def _resume(state: _State, path: Path, unet_config, diffusion_config, device) -> dict:
    ckpt = load_checkpoint(path, map_location=device)
    diffs = config_differences(ckpt, unet_config, diffusion_config)
    if diffs:
        raise CheckpointError(
            f"{path} was trained with another model configuration:\n  "
            + "\n  ".join(diffs)
            + "\nRestore those params, or train this configuration from scratch."
        )
    state.model.load_state_dict(ckpt["model"])
    state.ema.load_state_dict(ckpt["ema"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["lr_scheduler"])
    torch.set_rng_state(ckpt["rng"]["torch"].cpu())
    if "cuda" in ckpt["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["rng"]["cuda"]])
    return ckpt


@dataclass
class _Best:
    """The best validation loss so far, and early stopping on it."""

    loss: float
    config: TrainConfig
    misses: int = 0  # validations in a row without an improvement

    def update(self, val_loss: float) -> bool:
        """Record a validation loss; True when it improves on the best by the minimum delta."""
        improved = val_loss < self.loss - self.config.early_stopping_min_delta
        self.misses = 0 if improved else self.misses + 1
        if improved:
            self.loss = val_loss
        return improved

    @property
    def stop(self) -> bool:
        patience = self.config.early_stopping_patience
        return patience is not None and self.misses >= patience


def _on_device(
    train_data: Dataset,
    val_data: Dataset,
    unet_config: UNetConfig,
    config: TrainConfig,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None, Dataset]:
    """Training images uint8 (N, C, H, W) and labels, and the validation set, on the device."""
    images = train_data.images.to(device).permute(0, 3, 1, 2).contiguous()
    labels = None if train_data.labels is None else train_data.labels.to(device)
    if unet_config.num_classes is not None and labels is None:
        raise ValueError("model.num_classes is set but the data set has no labels")
    n_val = min(config.val_images, val_data.images.shape[0])
    val = Dataset(
        val_data.images[:n_val].to(device).permute(0, 3, 1, 2).contiguous(),
        None if val_data.labels is None else val_data.labels[:n_val].to(device),
    )
    return images, labels, val


def _step(
    state: _State,
    net: nn.Module,
    diffusion: GaussianDiffusion,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    config: TrainConfig,
    rng: int,
    amp: AbstractContextManager,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step, every random draw seeded by ``rng``: (loss, gradient norm) tensors."""
    device = images.device
    gen = torch.Generator(device).manual_seed(rng)
    torch.manual_seed(rng)  # dropout draws from the global generator
    x0, y = draw_batch(images, labels, config.batch_size, config.hflip, gen)
    if state.model.null_class is not None and config.label_dropout > 0:  # conditional
        drop = torch.rand(y.shape, device=device, generator=gen) < config.label_dropout
        y = torch.where(drop, state.model.null_class, y)
    t = diffusion.sample_timesteps(x0.shape[0], device, gen)
    noise = torch.randn(x0.shape, device=device, generator=gen)
    with amp:
        loss = diffusion.training_losses(net, x0, t, noise, y).mean()
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip = config.grad_clip if config.grad_clip is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), clip)
    state.optimizer.step()
    state.scheduler.step()
    return loss.detach(), grad_norm


def _window_metrics(
    window: list[torch.Tensor],
    step: int,
    last: Path,
    state: _State,
    grad_norm: torch.Tensor,
    images_per_second: float,
) -> dict[str, float]:
    """The metrics of the steps since the last report; an error if any of their losses is not
    finite (one device sync per window, not per step)."""
    losses = torch.stack(window).float().cpu()
    if not bool(torch.isfinite(losses).all()):
        bad = step - len(window) + 1 + int((~torch.isfinite(losses)).nonzero()[0])
        raise NonFiniteLossError(
            f"non-finite loss at step {bad}; the last good checkpoint is {last}. "
            "Lower the learning rate, enable grad_clip, or check the data."
        )
    return {
        "loss": float(losses.mean()),
        "lr": state.scheduler.get_last_lr()[0],
        "grad_norm": float(grad_norm),
        "images_per_second": images_per_second,
        "ema_decay": state.ema.current_decay,
    }


def train(
    unet_config: UNetConfig,
    diffusion_config: DiffusionConfig,
    train_config: TrainConfig,
    ema_config: EMAConfig,
    train_data: Dataset,
    val_data: Dataset,
    *,
    checkpoint_dir: Path,
    seed: int = 0,
    device: torch.device | str = "cpu",
    resume: bool = True,
    resume_from: Path | None = None,
    hooks: Hooks | None = None,
    dist: Distributed | None = None,
    log_every: int = 50,
    progress: bool = True,
) -> tuple[TrainResult, EMA]:
    """Train a UNet; checkpoints ``last.pt`` and ``best.pt`` go to ``checkpoint_dir``.

    Args:
        train_data, val_data: uint8 images (N, H, W, C) and labels, on any device.
        resume: continue from ``checkpoint_dir/last.pt`` when it exists.
        resume_from: continue from this checkpoint instead; it must exist and match the model.
    Returns:
        the summary and the EMA model (on ``device``).
    """
    hooks, dist, device = hooks or Hooks(), dist or Distributed(), torch.device(device)
    say = hooks.log if dist.is_main else (lambda _msg: None)
    if train_config.deterministic:  # the call itself imports much of torch._dynamo: ~2 s
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(seed)
    diffusion = GaussianDiffusion(diffusion_config).to(device)
    state = _build(unet_config, train_config, ema_config, device)
    configs = {
        "unet": unet_config.model_dump(mode="json"),
        "diffusion": diffusion_config.model_dump(mode="json"),
        "train": train_config.model_dump(mode="json"),
        "ema": ema_config.model_dump(mode="json"),
    }
    last, best_path = checkpoint_dir / "last.pt", checkpoint_dir / "best.pt"

    # 1. Resume, loudly, or say that this is a fresh start
    step, best_loss = 0, math.inf
    source = resume_from or (last if resume and last.exists() else None)
    if source is not None:
        ckpt = _resume(state, source, unet_config, diffusion_config, device)
        step, best_loss = ckpt["step"], ckpt["best_val_loss"] or math.inf
        say(f"resumed from {source} at step {step}")
    else:
        say(f"starting fresh: {'no checkpoint in ' + str(checkpoint_dir) if resume else '--fresh'}")
    resumed_from, best = step, _Best(best_loss, train_config)

    # 2. Data on the device as (N, C, H, W) uint8; batches are drawn by index
    images, labels, val = _on_device(train_data, val_data, unet_config, train_config, device)
    net = dist.wrap(torch.compile(state.model) if train_config.compile else state.model)
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if train_config.bf16 and device.type == "cuda"
        else nullcontext()
    )

    # 3. The loop
    val_loss, window = math.nan, []
    t_start = t_window = time.perf_counter()
    bar = tqdm(
        total=train_config.steps,
        initial=step,
        disable=not (progress and dist.is_main),
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
    while step < train_config.steps:
        rng = step_seed(seed, dist.rank, step)
        loss, grad_norm = _step(state, net, diffusion, images, labels, train_config, rng, amp)
        step += 1
        state.ema.update(state.model, step)
        window.append(loss)
        bar.update(1)

        validate = step % train_config.val_every == 0 or step == train_config.steps
        save = validate or step % train_config.checkpoint_every == 0
        if step % log_every == 0 or save:
            # 4. Check the window's losses before anything is written to disk
            now = time.perf_counter()
            seen = len(window) * train_config.batch_size * dist.world_size
            metrics = _window_metrics(window, step, last, state, grad_norm, seen / (now - t_window))
            window, t_window = [], now
            bar.set_postfix(
                loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['images_per_second']:.0f}"
            )
            # 5. Validation at fixed timesteps and noise, on the EMA weights we sample from
            if validate:
                val_loss = metrics["val_loss"] = validation_loss(
                    state.ema.module,
                    diffusion,
                    val,
                    train_config.val_timesteps,
                    train_config.batch_size,
                )
                if best.update(val_loss) and dist.is_main:
                    save_checkpoint(_payload(state, step, configs, best.loss), best_path)
            if dist.is_main and hooks.on_metrics:
                hooks.on_metrics(step, metrics)
        # 6. Checkpoint and preview
        if save and dist.is_main:
            save_checkpoint(_payload(state, step, configs, best.loss), last)
            if hooks.on_checkpoint:
                hooks.on_checkpoint(step, last)
        if (
            dist.is_main
            and hooks.on_samples
            and (step % train_config.sample_every == 0 or step == train_config.steps)
        ):
            hooks.on_samples(step, preview(state.ema, diffusion, train_config, device))
        if best.stop:  # only set on a validation step, whose checkpoint is written above
            say(f"early stopping at step {step}: no improvement in {best.misses} validations")
            break
    bar.close()
    if math.isnan(val_loss):  # nothing left to train: still report where the model stands
        val_loss = validation_loss(
            state.ema.module, diffusion, val, train_config.val_timesteps, train_config.batch_size
        )

    wall = time.perf_counter() - t_start
    trained = (step - resumed_from) * train_config.batch_size * dist.world_size
    result = TrainResult(
        step=step,
        best_val_loss=best.loss,
        final_val_loss=val_loss,
        wall_time_s=wall,
        images_per_second=trained / wall if wall > 0 else 0.0,
        stopped_early=best.stop,
        resumed_from_step=resumed_from,
    )
    say(
        f"trained to step {step} ({step - resumed_from} this run) in {wall:.0f}s, "
        f"{result.images_per_second:.0f} img/s; val loss {val_loss:.4f}, best {best.loss:.4f}"
    )
    return result, state.ema
