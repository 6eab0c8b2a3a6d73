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
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, closing, contextmanager, nullcontext
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
from ddpm.sampling.api import ddim_sample, nfe
from ddpm.seeds import mix
from ddpm.timesteps import LossSecondMoment
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


# FID during training (``train.fid``): called on every process at each evaluation with (step,
# the EMA network); it samples the images (its share of them under DDP), scores them and
# returns the same metrics on every process, "fid" among them (pipeline.quality.TrainFid).
Scorer = Callable[[int, nn.Module], dict[str, float]]


class TrainResult(NamedTuple):
    step: int
    best_val_loss: float
    final_val_loss: float
    wall_time_s: float
    images_per_second: float
    stopped_early: bool
    resumed_from_step: int
    best_fid: float = math.nan  # nan: no FID during training
    best_fid_step: int | None = None
    best_by: str = "val_loss"
    best_step: int | None = None  # the step of best.pt


class Trained(NamedTuple):
    """What :func:`train` returns: the summary, the EMA and the live model (on the device)."""

    result: TrainResult
    ema: EMA
    model: UNet


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one training step on one process: a pure function of (seed, rank, step)."""
    return mix(mix(seed, rank), step)


DRAW, DROPOUT = 1, 2  # substreams of a step's seed; 0 (the seed itself): timesteps, noise


def substream(rng: int, k: int) -> int:
    """Seed ``k`` of a step: distinct seeds, so batches, dropout and noise are not correlated."""
    return mix(rng, k)


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
            total += diffusion.training_losses(model, x0, tt, noise, y)["loss"].sum().item()
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
    """The best value so far of one measure (lower is better: val_loss, fid), its step, and
    early stopping on it: ``patience`` evaluations in a row without an improvement of at
    least ``min_delta`` (only the measure ``train.best_by`` names stops a run)."""

    patience: int | None = None
    min_delta: float = 0.0
    value: float = math.inf
    step: int | None = None
    misses: int = 0  # evaluations in a row without an improvement

    def update(self, value: float, step: int) -> bool:
        """Record a value; True when it improves on the best by the minimum delta."""
        improved = value < self.value - self.min_delta
        self.misses = 0 if improved else self.misses + 1
        if improved:
            self.value, self.step = value, step
        return improved

    @property
    def stop(self) -> bool:
        return self.patience is not None and self.misses >= self.patience

    def state_dict(self) -> dict[str, float | int | None]:
        return {"value": self.value, "step": self.step, "misses": self.misses}

    def load_state_dict(self, state: dict[str, float | int | None]) -> None:
        self.value, self.step, self.misses = state["value"], state["step"], state["misses"]


def bests(config: TrainConfig) -> dict[str, _Best]:
    """The measures followed, by name; ``config.best_by``'s decides best.pt and stops early."""
    out = {}
    for name in ("val_loss", "fid"):
        chosen = name == config.best_by
        out[name] = _Best(
            config.early_stopping_patience if chosen else None,
            config.early_stopping_min_delta if chosen else 0.0,
        )
    return out


def fid_steps(config: TrainConfig) -> list[int]:
    """The steps FID is evaluated at: every ``fid.every``, and the last one."""
    every = config.fid.every
    if every == 0:
        return []
    steps = list(range(every, config.steps + 1, every))
    return steps if steps and steps[-1] == config.steps else [*steps, config.steps]


@torch.no_grad()
def forward_seconds(model: nn.Module, batch: int, device: torch.device) -> float:
    """Seconds one forward pass of ``model`` (a UNet) takes on a batch of ``batch`` noise
    images: the unit of a sampler's cost (one warm-up pass, then the mean of two)."""
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    t = torch.zeros(batch, dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model(x, t)
    sync()
    start = time.perf_counter()
    for _ in range(2):
        model(x, t)
    sync()
    return (time.perf_counter() - start) / 2


def _validation_set(val_data: Dataset, n: int, device: torch.device) -> Dataset:
    """The first ``n`` validation images uint8 (n, C, H, W) and their labels, on the device."""
    images = in_memory(val_data.images[:n])
    labels = None if val_data.labels is None else in_memory(val_data.labels[:n])
    return Dataset(
        images.to(device).permute(0, 3, 1, 2).contiguous(),
        None if labels is None else labels.to(device),
    )


def optimizer_step(
    state: _State,
    net: nn.Module,
    diffusion: GaussianDiffusion,
    batch: tuple[torch.Tensor, torch.Tensor | None],
    config: TrainConfig,
    rng: int,
    amp: AbstractContextManager,
    sampler: LossSecondMoment | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One optimizer step on ``batch`` (x0, labels), every other random draw seeded by ``rng``:
    (its loss terms, :func:`step_terms`; the gradient norm), tensors left on the device. With
    a ``sampler``, t is drawn by importance and the loss weighted back (the terms reported are
    the unweighted ones, which the sampler records)."""
    x0, y = batch
    device = x0.device
    gen = torch.Generator(device).manual_seed(rng)
    torch.manual_seed(substream(rng, DROPOUT))  # dropout draws from the global generator
    if state.model.null_class is not None and config.label_dropout > 0:  # conditional
        drop = torch.rand(y.shape, device=device, generator=gen) < config.label_dropout
        y = torch.where(drop, state.model.null_class, y)
    if sampler is None:
        t, weights = diffusion.sample_timesteps(x0.shape[0], device, gen), None
    else:
        t, weights = sampler.sample(x0.shape[0], gen)
    noise = torch.randn(x0.shape, device=device, generator=gen)
    with amp:
        terms = diffusion.training_losses(net, x0, t, noise, y)
    loss = terms["loss"].mean() if weights is None else (terms["loss"] * weights).mean()
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip = config.grad_clip if config.grad_clip is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), clip)
    state.optimizer.step()
    state.scheduler.step()
    if sampler is not None:
        sampler.update(t, terms["loss"])
    return step_terms(terms, t, diffusion.num_timesteps), grad_norm


QUARTERS = 4  # the timestep range's quarters, each with its loss (improved-diffusion's loss_q*)


def step_terms(
    terms: dict[str, torch.Tensor], t: torch.Tensor, num_timesteps: int
) -> dict[str, torch.Tensor]:
    """A step's losses for the report, detached: the batch means of ``loss``, ``mse`` and
    (hybrid, vlb) ``vb``, and the loss summed and counted in each quarter of the timestep
    range (``quarter_sum``, ``quarter_count``: where the model is weak)."""
    quarter = (t * QUARTERS // num_timesteps).clamp(max=QUARTERS - 1)
    loss = terms["loss"].detach().float()
    out = {name: value.detach().float().mean() for name, value in terms.items()}
    out["quarter_sum"] = torch.zeros(QUARTERS, device=t.device).index_add_(0, quarter, loss)
    out["quarter_count"] = torch.bincount(quarter, minlength=QUARTERS).float()
    return out


def window_terms(window: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """The report's ``mse``, ``vb`` (when trained) and ``loss_q0`` .. ``loss_q3`` (a quarter
    no step drew a timestep from is left out) over the steps since the last one: one copy to
    the CPU."""
    names = [n for n in ("mse", "vb") if n in window[0]]
    rows = [torch.cat([torch.stack([w[n] for n in names]), w["quarter_sum"], w["quarter_count"]])
            for w in window]  # fmt: skip
    total = torch.stack(rows).cpu().double()
    means, sums = total[:, : len(names)].mean(dim=0), total[:, len(names) :].sum(dim=0)
    out = {name: float(value) for name, value in zip(names, means, strict=True)}
    for k in range(QUARTERS):
        if sums[QUARTERS + k] > 0:
            out[f"loss_q{k}"] = float(sums[k] / sums[QUARTERS + k])
    return out


def checked_losses(window: list[torch.Tensor], step: int, last: Path) -> torch.Tensor:
    """The losses of the steps since the last report, on the CPU (one device sync per report,
    not per step); an error naming the first bad step if any of them is not finite."""
    losses = torch.stack(window).float().cpu()
    if not bool(torch.isfinite(losses).all()):
        bad = step - len(window) + 1 + int((~torch.isfinite(losses)).nonzero()[0])
        raise NonFiniteLossError(
            f"non-finite loss at step {bad}; the last good checkpoint is {last}. "
            "Lower the learning rate, enable grad_clip, or check the data."
        )
    return losses


@contextmanager
def determinism_named(device: torch.device) -> Iterator[None]:
    """A kernel without a deterministic version, under ``train.deterministic``, as the setting
    to change rather than torch's message."""
    try:
        yield
    except RuntimeError as exc:
        if "does not have a deterministic implementation" not in str(exc):
            raise
        raise DeterminismError(
            f"train.deterministic: {str(exc).split(',')[0]} on {device.type}; set "
            "train.deterministic: false for this device"
        ) from exc


class _Loop:
    """One training run (after improved-diffusion's ``TrainLoop``): set-up in ``__init__``,
    :meth:`resume`, then :meth:`run`, which reads top to bottom; each helper is named after
    what it does."""

    def __init__(
        self,
        configs: tuple[UNetConfig, DiffusionConfig, TrainConfig, EMAConfig],
        data: tuple[Dataset, Dataset],
        checkpoint_dir: Path,
        seed: int,
        device: torch.device,
        hooks: Hooks,
        dist: Distributed,
        scorer: Scorer | None = None,
    ) -> None:
        unet_config, diffusion_config, self.config, ema_config = configs
        self.seed, self.device, self.hooks, self.dist = seed, device, hooks, dist
        if self.config.fid.every and scorer is None:
            raise ValueError("train.fid.every > 0 needs a scorer: train(..., scorer=...)")
        self.scorer = scorer if self.config.fid.every else None
        self.fid_at = set(fid_steps(self.config))
        self.say = hooks.log if dist.is_main else (lambda _msg: None)
        if self.config.deterministic:
            make_deterministic(device)
        torch.manual_seed(seed)
        self.diffusion = GaussianDiffusion(diffusion_config).to(device)
        importance = self.config.timestep_sampler == "loss-second-moment"
        T = diffusion_config.timesteps
        self.sampler = LossSecondMoment(T, device, dist.gather) if importance else None
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
        self.step, self.window = 0, []
        self.bests = bests(self.config)
        self.best = self.bests[self.config.best_by]  # best.pt and early stopping
        self.terms: list[dict[str, torch.Tensor]] = []  # each step's, since the last report
        self.grad_norm = torch.tensor(math.nan)  # of the last step

    def resume(self, source: Path | None, why_not: str) -> None:
        """Continue from ``source``, loudly, or say why this is a fresh start."""
        if source is None:
            self.say(f"starting fresh: {why_not}")
            return
        unet = self.state.model.config
        ckpt = _resume(self.state, source, unet, self.diffusion.config, self.config, self.device)
        self.step = ckpt["step"]
        if "best" in ckpt:  # every measure's best, its step and its misses
            for name, state in ckpt["best"].items():
                self.bests[name].load_state_dict(state)
        elif ckpt["best_val_loss"] is not None:  # written before FID during training
            self.bests["val_loss"].value = ckpt["best_val_loss"]
        self.say(f"resumed from {source} at step {self.step}")
        if self.sampler is not None:
            if "timestep_sampler" in ckpt:
                self.sampler.load_state_dict(ckpt["timestep_sampler"])
            else:
                self.say(f"{source} holds no timestep history (trained with uniform t): "
                         "loss-second-moment starts its warm-up here")  # fmt: skip

    def run(self, log_every: int, progress: bool) -> Trained:
        """Train to ``train.steps`` (or an early stop): a step, then whatever is due."""
        c, first, val_loss = self.config, self.step, math.nan
        if self.hooks.on_start and self.dist.is_main:
            self.hooks.on_start(first)
        clock = _Clock(first, self.say_cost)
        shown = progress and self.dist.is_main
        self.feed.start(first, self.draw)
        with (
            closing(self.feed),  # its prefetching thread, whatever happens
            determinism_named(self.device),
            Progress(c.steps, "train", "step", initial=first, enabled=shown) as bar,
        ):
            while self.step < c.steps:
                self.window.append(self.take_step())  # its draws: f(seed, rank, step)
                self.update_ema()
                bar.update()
                clock.tick(self.step)
                end = self.step == c.steps
                validate = end or self.step % c.val_every == 0
                score = self.step in self.fid_at
                save = validate or score or self.step % c.checkpoint_every == 0
                if save or self.step % log_every == 0:
                    metrics = self.window_metrics(clock)  # raises on a non-finite loss
                    if validate:
                        metrics["val_loss"] = val_loss = self.validate()  # best.pt if better
                    if score:
                        metrics |= self.score()  # best.pt if better
                        clock.lap()  # the next report's images/s counts training only
                    self.report(metrics)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                if save:
                    self.save_checkpoint(self.last)
                if end or self.step % c.sample_every == 0:
                    self.preview()
                if self.best.stop:  # only set on an evaluation step, saved just above
                    self.say(f"early stopping at step {self.step}: no improvement of "
                             f"{c.best_by} in {self.best.misses} evaluations")  # fmt: skip
                    break
            if math.isnan(val_loss):  # where the model stands, even with nothing left to train
                val_loss = self.validation_loss()
        return self.finish(first, val_loss, clock.seconds())

    def draw(self, step: int) -> Draw:
        """The images and flips of ``step``: a function of (seed, rank, step) only."""
        rng = substream(step_seed(self.seed, self.dist.rank, step), DRAW)
        return draw(rng, self.num_images, self.config.batch_size, self.config.hflip)

    def take_step(self) -> torch.Tensor:
        """One optimizer step on this step's batch; its loss (left on the device; the other
        terms wait in ``self.terms`` for the report)."""
        rng = step_seed(self.seed, self.dist.rank, self.step)
        batch = self.feed.batch(self.step)
        terms, self.grad_norm = optimizer_step(
            self.state, self.net, self.diffusion, batch, self.config, rng, self.amp, self.sampler
        )
        self.terms.append(terms)
        self.step += 1
        return terms["loss"]

    def update_ema(self) -> None:
        self.state.ema.update(self.state.model, self.step)

    def say_cost(self, step: int, seconds_per_step: float) -> None:
        left = self.config.steps - step
        training = left * seconds_per_step
        line = (
            f"cost: {self.config.steps:,} steps, {left:,} to go at {seconds_per_step:.3g} s/step "
            f"on {self.device.type} (measured over {COST_STEPS} steps)"
        )
        if self.scorer is None:
            self.say(f"{line}: about {timedelta(seconds=round(training))} more")
            return
        evaluations, each = self.fid_cost(step)
        total = training + evaluations * each
        self.say(
            f"{line}, and {evaluations} FID evaluations at about {each:.3g} s each (their "
            f"network evaluations at one timed forward pass each; Inception's features add a "
            f"little): about {timedelta(seconds=round(total))} more, the FID "
            f"{evaluations * each / max(training, 1e-9):.1%} on top of training"
        )

    def fid_cost(self, step: int) -> tuple[int, float]:
        """The FID evaluations after ``step``, and the seconds each one's sampling takes:
        this process's share of the images, in batches, times the sampler's network
        evaluations, at the time of one forward pass of the EMA network."""
        c = self.config.fid
        share = math.ceil(c.num_images / self.dist.world_size)
        batch = min(c.batch_size, share)
        calls = math.ceil(share / batch) * nfe(c.sampler_config(), self.diffusion)
        seconds = forward_seconds(self.state.ema.module, batch, self.device)
        return sum(1 for s in self.fid_at if s > step), calls * seconds

    def window_metrics(self, clock: _Clock) -> dict[str, float]:
        """The metrics of the steps since the last report, checked finite before anything is
        written."""
        losses = checked_losses(self.window, self.step, self.last)
        seen = len(self.window) * self.config.batch_size * self.dist.world_size
        terms = window_terms(self.terms)
        self.window, self.terms = [], []
        return terms | {
            "loss": float(losses.mean()),
            "lr": self.state.scheduler.get_last_lr()[0],
            "grad_norm": float(self.grad_norm),
            "images_per_second": seen / clock.lap(),
            "ema_decay": self.state.ema.current_decay,
        }

    def validate(self) -> float:
        """The validation loss; ``best.pt`` when it improves on the best so far (best_by
        val_loss)."""
        val_loss = self.validation_loss()
        self.record_best("val_loss", val_loss)
        return val_loss

    def score(self) -> dict[str, float]:
        """FID (and what else the scorer gives) of the EMA weights; ``best.pt`` when the FID
        improves on the best so far (best_by fid)."""
        start = time.perf_counter()
        metrics = self.scorer(self.step, self.state.ema.module)
        fid = self.bests["fid"]
        self.record_best("fid", metrics["fid"])
        self.say(
            f"fid: step {self.step}: FID {metrics['fid']:.4g}"
            + (f", KID {metrics['kid_mean']:.4g}" if "kid_mean" in metrics else "")
            + f" (best {fid.value:.4g} at step {fid.step}; {time.perf_counter() - start:.1f}s)"
        )
        return metrics

    def record_best(self, name: str, value: float) -> None:
        if self.bests[name].update(value, self.step) and name == self.config.best_by:
            self.save_checkpoint(self.best_path)

    def validation_loss(self) -> float:
        """The loss of the EMA weights (the ones we sample from) on the fixed validation set."""
        c = self.config
        ema = self.state.ema.module
        return validation_loss(ema, self.diffusion, self.val, c.val_timesteps, c.batch_size)

    def report(self, metrics: dict[str, float]) -> None:
        if self.dist.is_main and self.hooks.on_metrics:
            self.hooks.on_metrics(self.step, metrics)

    def save_checkpoint(self, path: Path) -> None:
        """Everything a resume needs, atomically, from rank 0."""
        if self.dist.is_main:
            s = self.state
            best = {name: b.state_dict() for name, b in self.bests.items()}
            payload = training_checkpoint(
                self.step, self.configs, s.model, s.ema, s.optimizer, s.scheduler, best
            )
            if self.sampler is not None:
                payload["timestep_sampler"] = self.sampler.state_dict()
            save_checkpoint(payload, path)

    def preview(self) -> None:
        if self.dist.is_main and self.hooks.on_samples:
            images = preview(self.state.ema, self.diffusion, self.config, self.device)
            self.hooks.on_samples(self.step, images)

    def finish(self, first: int, val_loss: float, wall: float) -> Trained:
        step = self.step
        trained = (step - first) * self.config.batch_size * self.dist.world_size
        fid = self.bests["fid"]
        result = TrainResult(
            step=step,
            best_val_loss=self.bests["val_loss"].value,
            final_val_loss=val_loss,
            wall_time_s=wall,
            images_per_second=trained / wall if wall > 0 else 0.0,
            stopped_early=self.best.stop,
            resumed_from_step=first,
            best_fid=fid.value if fid.step is not None else math.nan,
            best_fid_step=fid.step,
            best_by=self.config.best_by,
            best_step=self.best.step,
        )
        self.say(
            f"trained to step {step} ({step - first} this run) in {wall:.0f}s, "
            f"{result.images_per_second:.0f} img/s; val loss {val_loss:.4f}, "
            f"best {self.bests['val_loss'].value:.4f}"
            + (f"; best FID {fid.value:.4g} at step {fid.step}" if fid.step is not None else "")
        )
        return Trained(result, self.state.ema, self.state.model)


class _Clock:
    """The run's wall time, the rate between reports, and the cost estimate: the steps after
    the first (warm-up, compilation) timed for ``COST_STEPS`` steps, then ``say_cost``."""

    def __init__(self, first: int, say_cost: Callable[[int, float], None]) -> None:
        self.first, self.say_cost = first, say_cost
        self.start = self.lap_start = self.cost_start = time.perf_counter()

    def tick(self, step: int) -> None:
        if step == self.first + 1:
            self.cost_start = time.perf_counter()
        if step == self.first + 1 + COST_STEPS:
            self.say_cost(step, (time.perf_counter() - self.cost_start) / COST_STEPS)

    def lap(self) -> float:
        """Seconds since the last lap (or the start)."""
        now = time.perf_counter()
        seconds, self.lap_start = now - self.lap_start, now
        return seconds

    def seconds(self) -> float:
        return time.perf_counter() - self.start


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
    scorer: Scorer | None = None,
) -> Trained:
    """Train a UNet; checkpoints ``last.pt`` and ``best.pt`` go to ``checkpoint_dir``.

    Args:
        train_data, val_data: uint8 images (N, H, W, C) and labels, on any device.
        resume: continue from ``checkpoint_dir/last.pt`` when it exists.
        resume_from: continue from this checkpoint instead; it must exist and match the model.
        scorer: FID during training (``train_config.fid.every`` > 0): see :data:`Scorer`.
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
        scorer,
    )
    last = checkpoint_dir / "last.pt"
    source = resume_from or (last if resume and last.exists() else None)
    loop.resume(source, f"no checkpoint in {checkpoint_dir}" if resume else "--fresh")
    return loop.run(log_every, progress)
