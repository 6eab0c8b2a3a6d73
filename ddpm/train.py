"""The training loop: AdamW, warm-up, EMA, validation, checkpoints and exact resume.

``train`` is one readable loop over helpers. Everything random in a step (batch indices, flips,
timesteps, noise, dropout) is drawn from generators seeded by (seed, rank, step), so a run
resumed from a checkpoint takes exactly the steps an unbroken run would have taken. Tracking
stays outside: the loop reports through the callbacks in :class:`Hooks`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ddpm.checkpoint import (
    config_differences,
    configs_to_json,
    load_checkpoint,
    save_checkpoint,
    training_checkpoint,
)
from ddpm.config import DiffusionConfig, EMAConfig, TrainConfig, UNetConfig
from ddpm.diffusion import GaussianDiffusion
from ddpm.distributed import Distributed
from ddpm.ema import EMA
from ddpm.errors import CheckpointError, DeterminismError, NonFiniteLossError
from ddpm.feed import Draw, draw, in_memory, make_feed
from ddpm.pixels import to_float, to_uint8
from ddpm.progress import Progress
from ddpm.samplers import ddim_sample
from ddpm.unet import UNet

COST_STEPS = 5  # steps timed, after the first (warm-up, compilation), for the cost estimate


class Dataset(NamedTuple):
    """Images uint8 (N, H, W, C), a tensor or an array (a memory-mapped one stays on disk
    unless it fits the device budget, see :mod:`ddpm.feed`), and labels (N,) int64, or None."""

    images: torch.Tensor | np.ndarray
    labels: torch.Tensor | np.ndarray | None = None


@dataclass
class Hooks:
    """Where the loop reports. Each is optional; all run on rank 0 only."""

    on_start: Callable[[int], None] | None = None  # the step training starts from
    on_metrics: Callable[[int, dict[str, float]], None] | None = None
    on_samples: Callable[[int, torch.Tensor], None] | None = None  # uint8 (B, H, W, C)
    log: Callable[[str], None] = print


class TrainResult(NamedTuple):
    step: int
    best_val_loss: float
    final_val_loss: float
    wall_time_s: float
    images_per_second: float
    stopped_early: bool
    resumed_from_step: int


class Trained(NamedTuple):
    """What :func:`train` returns: the summary, the EMA and the live model (on the device)."""

    result: TrainResult
    ema: EMA
    model: UNet


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one training step on one process: a pure function of (seed, rank, step)."""
    return ((seed * 1_000_003 + rank) * 1_000_003 + step) % 2**63


DRAW, DROPOUT = 1, 2  # substreams of a step's seed; 0 (the seed itself): timesteps, noise


def substream(rng: int, k: int) -> int:
    """Seed ``k`` of a step: distinct seeds, so batches, dropout and noise are not correlated."""
    return (rng * 1_000_003 + k) % 2**63


CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")  # the workspace sizes cuBLAS is deterministic with


def make_deterministic(device: torch.device) -> None:
    """Deterministic kernels from here on, or an error that says why they cannot be had.

    No ``warn_only``: a kernel without a deterministic version raises (see :func:`train`), so a
    run that asked for bit-identical results never gets others silently. On CUDA, cuBLAS needs
    ``CUBLAS_WORKSPACE_CONFIG`` before its first use; it is set here when unset.
    """
    if device.type == "cuda":
        workspace = os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC[0])
        if workspace not in CUBLAS_DETERMINISTIC:
            raise DeterminismError(
                f"train.deterministic needs CUBLAS_WORKSPACE_CONFIG={CUBLAS_DETERMINISTIC[0]} "
                f"(or {CUBLAS_DETERMINISTIC[1]}); it is {workspace!r}: unset it, or set "
                "train.deterministic: false"
            )
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)  # importing torch._dynamo with it: ~2 s


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


def _resume(state: _State, path: Path, unet_config, diffusion_config, train_config, device) -> dict:
    """Load a training checkpoint into ``state``; refuse one of another model configuration,
    or one whose learning-rate curve this run would not continue."""
    ckpt = load_checkpoint(path, map_location=device)
    saved = ckpt["config"].get("train", {})
    cosine = train_config.lr_schedule == "cosine" or saved.get("lr_schedule") == "cosine"
    if cosine and saved.get("steps") not in (None, train_config.steps):
        raise CheckpointError(
            f"{path} was trained for train.steps={saved['steps']} under a cosine learning-rate "
            f"schedule, whose curve depends on the length; resuming with "
            f"train.steps={train_config.steps} would jump along it. Set train.steps back to "
            f"{saved['steps']}, or train this length from scratch (--fresh)."
        )
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


def _validation_set(val_data: Dataset, n: int, device: torch.device) -> Dataset:
    """The first ``n`` validation images uint8 (n, C, H, W) and their labels, on the device."""
    images = in_memory(val_data.images[:n])
    labels = None if val_data.labels is None else in_memory(val_data.labels[:n])
    return Dataset(
        images.to(device).permute(0, 3, 1, 2).contiguous(),
        None if labels is None else labels.to(device),
    )


def _step(
    state: _State,
    net: nn.Module,
    diffusion: GaussianDiffusion,
    batch: tuple[torch.Tensor, torch.Tensor | None],
    config: TrainConfig,
    rng: int,
    amp: AbstractContextManager,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on ``batch`` (x0, labels), every other random draw seeded by ``rng``:
    (loss, gradient norm) tensors."""
    x0, y = batch
    device = x0.device
    gen = torch.Generator(device).manual_seed(rng)
    torch.manual_seed(substream(rng, DROPOUT))  # dropout draws from the global generator
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


class _Loop:
    """The state of one training run and the phases of its loop (after improved-diffusion's
    ``TrainLoop``): set-up and resume in ``__init__``, then :meth:`run`."""

    def __init__(
        self,
        configs: tuple[UNetConfig, DiffusionConfig, TrainConfig, EMAConfig],
        data: tuple[Dataset, Dataset],
        checkpoint_dir: Path,
        seed: int,
        device: torch.device,
        hooks: Hooks,
        dist: Distributed,
    ) -> None:
        unet_config, diffusion_config, self.config, ema_config = configs
        self.seed, self.device, self.hooks, self.dist = seed, device, hooks, dist
        self.say = hooks.log if dist.is_main else (lambda _msg: None)
        if self.config.deterministic:
            make_deterministic(device)
        torch.manual_seed(seed)
        self.diffusion = GaussianDiffusion(diffusion_config).to(device)
        self.state = _build(unet_config, self.config, ema_config, device)
        self.configs = configs_to_json(*configs)
        self.last, self.best_path = checkpoint_dir / "last.pt", checkpoint_dir / "best.pt"
        train_data, val_data = data
        if unet_config.num_classes is not None and train_data.labels is None:
            raise ValueError("model.num_classes is set but the data set has no labels")
        n_val = min(self.config.val_images, len(val_data.images))
        self.val = _validation_set(val_data, n_val, device)
        self.num_images = len(train_data.images)
        self.feed, why = make_feed(
            train_data.images, train_data.labels, device, self.config.data_budget
        )
        self.say(f"data: {why}")
        # DDP first, then compile the DDP module: DDPOptimizer then splits the graph at bucket
        # boundaries and all-reduce overlaps the backward (PyTorch's guidance for DDP).
        net = dist.wrap(self.state.model)
        self.net = torch.compile(net) if self.config.compile else net
        bf16 = self.config.bf16 and device.type == "cuda"
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
        self.step, self.best, self.window = 0, _Best(math.inf, self.config), []

    def resume(self, source: Path | None, why_not: str) -> None:
        """Continue from ``source``, loudly, or say why this is a fresh start."""
        if source is None:
            self.say(f"starting fresh: {why_not}")
            return
        unet = self.state.model.config
        ckpt = _resume(self.state, source, unet, self.diffusion.config, self.config, self.device)
        best = ckpt["best_val_loss"]
        self.step, self.best.loss = ckpt["step"], math.inf if best is None else best
        self.say(f"resumed from {source} at step {self.step}")

    def run(self, log_every: int, progress: bool) -> Trained:
        self.feed.start(self.step, self._draw)
        try:
            return self._run(log_every, progress)
        except RuntimeError as exc:
            if "does not have a deterministic implementation" not in str(exc):
                raise
            raise DeterminismError(
                f"train.deterministic: {str(exc).split(',')[0]} on {self.device.type}; set "
                "train.deterministic: false for this device"
            ) from exc
        finally:
            self.feed.close()

    def _draw(self, step: int) -> Draw:
        """The images and flips of ``step``: a function of (seed, rank, step) only."""
        rng = substream(step_seed(self.seed, self.dist.rank, step), DRAW)
        return draw(rng, self.num_images, self.config.batch_size, self.config.hflip)

    def _run(self, log_every: int, progress: bool) -> Trained:
        c, step, start = self.config, self.step, self.step
        if self.hooks.on_start and self.dist.is_main:
            self.hooks.on_start(step)
        val_loss = math.nan
        t_start = t_first = self.t_window = time.perf_counter()
        shown = progress and self.dist.is_main
        with Progress(c.steps, "train", "step", initial=step, enabled=shown) as bar:
            while step < c.steps:
                # 1. One optimizer step; every random draw is a function of (seed, rank, step)
                rng = step_seed(self.seed, self.dist.rank, step)
                batch = self.feed.batch(step)
                loss, grad_norm = _step(
                    self.state, self.net, self.diffusion, batch, c, rng, self.amp
                )
                step += 1
                self.state.ema.update(self.state.model, step)
                self.window.append(loss)
                bar.update()
                if step == start + 1:
                    t_first = time.perf_counter()
                if step == start + 1 + COST_STEPS:
                    self._say_cost(step, (time.perf_counter() - t_first) / COST_STEPS)
                # 2. Report, validate, checkpoint and preview when due
                validate = step % c.val_every == 0 or step == c.steps
                save = validate or step % c.checkpoint_every == 0
                if step % log_every == 0 or save:
                    metrics = self._report(step, grad_norm, validate)
                    val_loss = metrics.get("val_loss", val_loss)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                if save and self.dist.is_main:
                    self._save(self.last, step)
                if step % c.sample_every == 0 or step == c.steps:
                    self._preview(step)
                if self.best.stop:  # only set on a validation step, saved just above
                    self.say(f"early stopping at step {step}: no improvement in "
                             f"{self.best.misses} validations")  # fmt: skip
                    break
        # 3. Finish: where the model stands, even when there was nothing left to train
        if math.isnan(val_loss):
            val_loss = self._validation_loss()
        return self._finish(step, start, val_loss, time.perf_counter() - t_start)

    def _say_cost(self, step: int, seconds_per_step: float) -> None:
        left = self.config.steps - step
        eta = timedelta(seconds=round(left * seconds_per_step))
        self.say(
            f"cost: {self.config.steps:,} steps, {left:,} to go at {seconds_per_step:.3g} s/step "
            f"on {self.device.type} (measured over {COST_STEPS} steps): about {eta} more"
        )

    def _validation_loss(self) -> float:
        """The loss of the EMA weights (the ones we sample from) on the fixed validation set."""
        return validation_loss(
            self.state.ema.module,
            self.diffusion,
            self.val,
            self.config.val_timesteps,
            self.config.batch_size,
        )

    def _report(self, step: int, grad_norm: torch.Tensor, validate: bool) -> dict[str, float]:
        """The window's metrics (checked finite before anything is written), validation when
        due and ``best.pt`` when it improves; then ``on_metrics``."""
        now = time.perf_counter()
        seen = len(self.window) * self.config.batch_size * self.dist.world_size
        metrics = _window_metrics(
            self.window, step, self.last, self.state, grad_norm, seen / (now - self.t_window)
        )
        self.window, self.t_window = [], now
        if validate:
            metrics["val_loss"] = self._validation_loss()
            if self.best.update(metrics["val_loss"]) and self.dist.is_main:
                self._save(self.best_path, step)
        if self.dist.is_main and self.hooks.on_metrics:
            self.hooks.on_metrics(step, metrics)
        return metrics

    def _save(self, path: Path, step: int) -> None:
        s = self.state
        payload = training_checkpoint(
            step, self.configs, s.model, s.ema, s.optimizer, s.scheduler, self.best.loss
        )
        save_checkpoint(payload, path)

    def _preview(self, step: int) -> None:
        if self.dist.is_main and self.hooks.on_samples:
            images = preview(self.state.ema, self.diffusion, self.config, self.device)
            self.hooks.on_samples(step, images)

    def _finish(self, step: int, start: int, val_loss: float, wall: float) -> Trained:
        trained = (step - start) * self.config.batch_size * self.dist.world_size
        result = TrainResult(
            step=step,
            best_val_loss=self.best.loss,
            final_val_loss=val_loss,
            wall_time_s=wall,
            images_per_second=trained / wall if wall > 0 else 0.0,
            stopped_early=self.best.stop,
            resumed_from_step=start,
        )
        self.say(
            f"trained to step {step} ({step - start} this run) in {wall:.0f}s, "
            f"{result.images_per_second:.0f} img/s; val loss {val_loss:.4f}, "
            f"best {self.best.loss:.4f}"
        )
        return Trained(result, self.state.ema, self.state.model)


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
) -> Trained:
    """Train a UNet; checkpoints ``last.pt`` and ``best.pt`` go to ``checkpoint_dir``.

    Args:
        train_data, val_data: uint8 images (N, H, W, C) and labels, on any device.
        resume: continue from ``checkpoint_dir/last.pt`` when it exists.
        resume_from: continue from this checkpoint instead; it must exist and match the model.
    Returns:
        the summary, the EMA and the trained model (on ``device``).
    """
    loop = _Loop(
        (unet_config, diffusion_config, train_config, ema_config),
        (train_data, val_data),
        checkpoint_dir,
        seed,
        torch.device(device),
        hooks or Hooks(),
        dist or Distributed(),
    )
    last = checkpoint_dir / "last.pt"
    source = resume_from or (last if resume and last.exists() else None)
    loop.resume(source, f"no checkpoint in {checkpoint_dir}" if resume else "--fresh")
    return loop.run(log_every, progress)
