"""Our UNet against diffusers' UNet2DModel at the DDPM CIFAR-10 configuration (35.7M parameters).

Everything comes from one run, and the two networks are timed in alternation (the order flips
every round), so that a shared machine's noise falls on both alike; every figure is a median.

1. Training step (forward, MSE, backward, fused AdamW with the same settings) of both networks
   at batch 8, 32x32, on the CPU: fp32, fp32 channels_last, bf16 autocast, and ours under
   torch.compile. The ratio is ours / theirs (time; < 1 means ours is faster).
2. Sampling with ``ddpm.sampling`` at batch 64: the time of one sampler step divided by the time
   of a bare network forward (1.0 = no per-step overhead), measured over the first ``k`` steps of
   DDPM-1000, DDIM-50, DPM-Solver++-20 (orders 2 and 3) and UniPC-20 (order 3, its corrector
   included) and extrapolated to the whole run; ``--full`` runs the whole samplers instead
   (hours on a CPU; meant for a GPU). Each sampler's own work per step (goal: at most 1% of a
   forward) is also timed exactly, with a network that costs nothing, and so is the nll
   stage's variational bound (goal: at most 5% of a forward); the DDIM-50 vs DDPM-1000
   cost ratio is computed from it and the bare forward, so that the forward's noise (a 6 s
   call on a shared CPU) does not swamp a difference of milliseconds.
3. Both data feeds of ``ddpm.feed`` (index, flip, scale a cars-sized uint8 split: held on the
   device, and streamed from a memory-mapped .npy file by the background thread) against the
   training step, in images per second.
4. On CUDA: training at batch 128 under bf16 autocast, with and without torch.compile, peak
   memory, and model FLOPs utilisation (forward FLOPs from ``torch.utils.flop_counter``,
   training counted as 3x forward, over ``--peak-tflops``).

The table is printed and written to ``benchmarks/RESULTS.md``::

    python benchmarks/bench_vs_diffusers.py             # ~8 min on 2 idle CPU cores
    python benchmarks/bench_vs_diffusers.py --quick     # ~4 min
    python benchmarks/bench_vs_diffusers.py --full      # on a GPU: also the full samplers

diffusers is a benchmark-only dependency (the ``bench`` extra); ``ddpm`` never imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from results import RESULTS, write_section
from timing import sampler_step_times, sync, timed
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ddpm.checkpoint import SamplingModel
from ddpm.config import SamplerConfig, UNetConfig
from ddpm.diffusers_format import state_to_diffusers, unet_config_to_diffusers
from ddpm.diffusion import GaussianDiffusion
from ddpm.feed import DeviceFeed, StreamFeed, draw
from ddpm.generation import image_generators
from ddpm.likelihood import variational_bound
from ddpm.pixels import to_uint8
from ddpm.progress import Progress
from ddpm.sampling.api import (
    ddim_sample,
    ddpm_sample,
    dpm_solver_sample,
    heun_sample,
    unipc_sample,
)
from ddpm.unet import UNet
from pipeline.frontier import Point, render_point
from pipeline.settings import FrontierParams, FrontierPoint

TARGET_RATIO = 0.9  # ours / theirs training-step time, fp32
GPU_TARGET = 5_000  # training images per second at batch 128, bf16, one H100
CARS_SHAPE = (4250, 3, 32, 32)  # the prepared CIFAR-10 cars tensor, uint8


class Figure(NamedTuple):
    """One network's numbers in a row; the row's ``kind`` says which of them its cell shows."""

    seconds: float = math.nan  # per call: a training step, a sampler step, a forward, a draw
    images: int = 0  # per call, so that images / seconds is the rate
    mfu: float = math.nan  # model FLOPs utilisation, a fraction of --peak-tflops
    step_gib: float | None = None  # peak memory of a training step above what was resident
    total_gib: float | None = None  # the process's peak memory
    value: float = math.nan  # a plain number: parameters, GFLOP

    @property
    def rate(self) -> float:
        """Images per second."""
        return self.images / self.seconds


class Row(NamedTuple):
    """One line of the results table, in numbers; :func:`cells` turns it into text."""

    what: str
    kind: str  # a key of CELL, or "cost" / "skipped" (no figures)
    ours: Figure | None = None
    theirs: Figure | None = None
    ratio: float | None = None
    note: str = ""
    key: str = ""  # the short name the interpretation quotes: "train fp32", "DDIM-50"


CELL: dict[str, Callable[[Figure], str]] = {
    "count": lambda f: f"{f.value:,.0f}",
    "gflop": lambda f: f"{f.value:.2f}",
    "step": lambda f: f"{f.seconds * 1e3:.0f} ms ({f.rate:.1f} img/s)",
    "sampler step": lambda f: f"{f.seconds * 1e3:.0f} ms/step",
    "own work": lambda f: f"{f.seconds * 1e3:.2f} ms/step",
    "nll work": lambda f: f"{f.seconds * 1e3:.2f} ms/step",
    "feed": lambda f: f"{f.rate:,.0f} img/s",
    "full": lambda f: f"{f.rate:.2f} img/s",
    "gpu": lambda f: f"{f.rate:,.0f} img/s, MFU {f.mfu:.1%}",
}
OWN_WORK_GOAL = 0.01  # a sampler's own work per step, over one network forward
NLL_GOAL = 0.05  # the variational bound's own arithmetic per step, over one network forward
RATIO = {"own work": "{:.4f}", "nll work": "{:.4f}", "feed": "{:,.0f}x"}  # else "{:.2f}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="fewer iterations (~4 min on 2 cores)")
    add("--full", action="store_true", help="also run the full samplers (meant for a GPU)")
    add("--warmup", type=int, default=None, help="untimed steps per model (default: 3, quick 2)")
    add("--iters", type=int, default=None, help="timed steps per model (default: 12, quick 6)")
    add("--sampler-steps", type=int, default=None, help="steps k timed per sampler (default 3)")
    add("--sample-batch", type=int, default=64, help="sampling batch (default: 64)")
    add("--no-compile", action="store_true", help="skip the torch.compile rows")
    add("--gpu-only", action="store_true", help="on CUDA: skip the CPU training rows")
    add("--gpu-batch", type=int, default=128, help="CUDA training batch (default: 128)")
    add("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM: 989)")
    add("--threads", type=int, default=None, help="torch.set_num_threads")
    add("--results", type=Path, default=RESULTS, help=f"markdown output (default: {RESULTS})")
    add("--no-write", action="store_true", help="print only; do not write --results")
    args = parser.parse_args()
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    args.iters = args.iters if args.iters is not None else (6 if args.quick else 12)
    args.sampler_steps = args.sampler_steps or (2 if args.quick else 3)
    args.sampler_rounds = 1 if args.quick else 2
    return args


class DiffusersUNet(nn.Module):
    """diffusers' ``UNet2DModel`` built to match a :class:`UNetConfig`, called as net(x, t)."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        try:
            from diffusers import UNet2DModel
        except ImportError as err:
            raise SystemExit("diffusers is missing: pip install -e '.[bench]'") from err
        # The same function as our UNet, not only the same parameter count (tested in
        # tests/ddpm/test_diffusers_format.py): the paper's padding, epsilon and embedding.
        config_json = unet_config_to_diffusers(config)
        self.net = UNet2DModel(**{k: v for k, v in config_json.items() if not k.startswith("_")})

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), t (B,) -> (B, C, H, W)."""
        return self.net(x, t, return_dict=False)[0]


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def interleave(
    fns: dict[str, Callable[[], None]], warmup: int, iters: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each fn, the fns called in turn (order flipped every round)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(iters):
        for name in names if i % 2 == 0 else names[::-1]:
            times[name].append(timed(fns[name], device))
    return times


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def make_train_step(
    model: nn.Module, batch: int, fmt: torch.memory_format, bf16: bool, device: torch.device
) -> Callable[[], None]:
    """A training step of ``model`` (already in ``fmt``) on fixed random data: forward, MSE
    against eps, backward, fused AdamW (a fresh optimizer: state in the model's format)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, fused=True)
    gen = torch.Generator(device).manual_seed(0)
    shape = (batch, 3, 32, 32)
    x_t = torch.randn(shape, generator=gen, device=device).contiguous(memory_format=fmt)
    eps = torch.randn(shape, generator=gen, device=device)
    t = torch.randint(0, 1000, (batch,), generator=gen, device=device)

    def step() -> None:
        with autocast(device, bf16):
            loss = F.mse_loss(model(x_t, t).float(), eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def pair_row(key: str, times: dict[str, list[float]], batch: int, note: str = "") -> Row:
    """Medians of ours and theirs, ratio of the medians; the median of the per-round ratios
    (each pair measured back to back) is a second, noise-robust estimate."""
    ours, theirs = statistics.median(times["ours"]), statistics.median(times["theirs"])
    paired = statistics.median(a / b for a, b in zip(times["ours"], times["theirs"], strict=True))
    note = f"paired {paired:.2f}; n={len(times['ours'])}" + (f"; {note}" if note else "")
    what = f"{key}, batch {batch}"
    return Row(what, "step", Figure(ours, batch), Figure(theirs, batch), ours / theirs, note, key)


def cpu_train_rows(
    ours: nn.Module, theirs: nn.Module, args: argparse.Namespace, rates: dict[str, float]
) -> list[Row]:
    """Training steps at batch 8 on the CPU; ``rates`` gets our images/s of each row."""
    device, batch, rows = torch.device("cpu"), 8, []
    variants = [
        ("train fp32", torch.contiguous_format, False),
        ("train fp32 channels_last", torch.channels_last, False),
        ("train bf16 autocast channels_last", torch.channels_last, True),
    ]
    for what, fmt, bf16 in variants:
        steps = {}
        for name, model in (("ours", ours), ("theirs", theirs)):
            model.to(memory_format=fmt)
            steps[name] = make_train_step(model, batch, fmt, bf16, device)
        times = interleave(steps, args.warmup, args.iters, device)
        rows.append(pair_row(what, times, batch))
        rates[what] = batch / statistics.median(times["ours"])
        show(rows[-1])
    rows.append(compile_row(ours, theirs, args, device, batch, rates))
    show(rows[-1])
    return rows


def compile_row(
    ours: nn.Module,
    theirs: nn.Module,
    args: argparse.Namespace,
    device: torch.device,
    batch: int,
    rates: dict[str, float],
) -> Row:
    """Ours under torch.compile (fp32, channels_last) against diffusers in eager mode."""
    key = "train fp32 channels_last, ours torch.compile"
    what = f"{key}, batch {batch}"
    if args.no_compile:
        return Row(what, "skipped", note="--no-compile", key=key)
    fmt = torch.channels_last
    ours.to(memory_format=fmt)
    theirs.to(memory_format=fmt)
    step = make_train_step(torch.compile(ours), batch, fmt, False, device)
    try:
        compile_s = timed(step, device)  # the first call compiles forward and backward
    except Exception as err:  # a missing compiler, an inductor bug: report, do not abort
        return Row(what, "skipped", note=f"{type(err).__name__}: {str(err)[:120]}", key=key)
    steps = {"ours": step, "theirs": make_train_step(theirs, batch, fmt, False, device)}
    times = interleave(steps, args.warmup, args.iters, device)
    rates["train fp32 channels_last, compiled"] = batch / statistics.median(times["ours"])
    return pair_row(key, times, batch, f"first call (compile) {compile_s:.0f} s")


def samplers(model: nn.Module, batch: int, device: torch.device) -> dict[str, tuple[Callable, int]]:
    """name -> (sampler bound to model, diffusion and shape; its number of network calls)."""
    diffusion = GaussianDiffusion().to(device)
    kw = {"generator": torch.Generator().manual_seed(0), "device": device}
    shape = (batch, 3, 32, 32)
    return {
        "DDPM-1000": (functools.partial(ddpm_sample, model, diffusion, shape, **kw), 1000),
        "DDIM-50": (functools.partial(ddim_sample, model, diffusion, shape, steps=50, **kw), 50),
        "DPM-Solver++-20": (
            functools.partial(dpm_solver_sample, model, diffusion, shape, steps=20, **kw),
            20,
        ),
        "DPM-Solver++(3)-20": (
            functools.partial(dpm_solver_sample, model, diffusion, shape, steps=20, order=3, **kw),
            20,
        ),
        "UniPC(3)-20": (
            functools.partial(unipc_sample, model, diffusion, shape, steps=20, order=3, **kw),
            20,
        ),
        "DPM-Solver++-20 karras": (
            functools.partial(
                dpm_solver_sample, model, diffusion, shape, steps=20, spacing="karras", **kw
            ),
            20,
        ),
        # two network evaluations a step: its step over a forward is about 2, its cost per NFE
        # the others'
        "Heun-20 (2 NFE a step)": (
            functools.partial(heun_sample, model, diffusion, shape, steps=20, **kw),
            20,
        ),
    }


class FreeNetwork(nn.Module):
    """Stands in for the UNet at no cost, so that a sampler step times the sampler alone."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        return torch.zeros_like(x)


@torch.no_grad()
def sampler_overheads(batch: int, device: torch.device, k: int = 50) -> dict[str, float]:
    """Seconds per step each sampler spends outside the network (median of its first k)."""
    fns = samplers(FreeNetwork(), batch, device)
    return {
        name: statistics.median(sampler_step_times(fn, k, device)) for name, (fn, _) in fns.items()
    }


@torch.no_grad()
def sampler_rows(model: nn.Module, args: argparse.Namespace, device: torch.device) -> list[Row]:
    """Per-step cost of each sampler over a bare forward, and the extrapolated totals."""
    model.eval().to(memory_format=torch.contiguous_format)
    batch, k = args.sample_batch, args.sampler_steps
    x = torch.randn(batch, 3, 32, 32, device=device)
    t = torch.full((batch,), 500, device=device)
    fns = {"forward": (lambda callback=None: model(x, t), 1)} | samplers(model, batch, device)
    model(x, t)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(args.sampler_rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            if name == "forward":
                times[name] += [timed(functools.partial(model, x, t), device) for _ in range(k)]
            else:
                times[name] += sampler_step_times(fns[name][0], k, device)
    rows = sampler_step_rows(times, {name: calls for name, (_, calls) in fns.items()}, args, device)
    if args.full:
        rows += full_sampler_rows(fns, batch, device)
    return rows


def sampler_step_rows(
    times: dict[str, list[float]],
    calls: dict[str, int],
    args: argparse.Namespace,
    device: torch.device,
) -> list[Row]:
    """The bare forward, each sampler's step over it, its own work, and DDIM-50 vs DDPM-1000."""
    batch, k, rounds = args.sample_batch, args.sampler_steps, args.sampler_rounds
    forward = statistics.median(times["forward"])
    note = f"n={len(times['forward'])}"
    rows = [
        Row(f"sample: bare forward, batch {batch}", "step", Figure(forward, batch), None, 1.0, note)
    ]
    totals = {}
    for name in [name for name in times if name != "forward"]:
        step = statistics.median(times[name])
        totals[name] = step * calls[name]
        note = (
            f"first {k} steps x {rounds} rounds; extrapolated {calls[name]} steps: "
            f"{totals[name]:.0f} s, {batch / totals[name]:.3f} img/s"
        )
        what = f"sample: {name} step / forward, batch {batch}"
        rows.append(
            Row(what, "sampler step", Figure(step, batch), None, step / forward, note, name)
        )
    noisy = totals["DDIM-50"] / totals["DDPM-1000"] * 20
    return rows + own_work_rows(forward, noisy, batch, device) + nll_rows(forward, batch, device)


@torch.no_grad()
def nll_rows(forward: float, batch: int, device: torch.device, steps: int = 50) -> list[Row]:
    """The nll stage's own work per step: :func:`ddpm.likelihood.variational_bound` (noise
    from one generator per image, q_sample, the KL or decoder term) with a network that costs
    nothing, over ``steps`` kept steps; the ratio is over one bare forward at the same batch."""
    diffusion = GaussianDiffusion().to(device)
    x0 = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    stride = diffusion.num_timesteps // steps
    times = []
    for _ in range(3):
        start = time.perf_counter()
        variational_bound(FreeNetwork(), diffusion, x0.to(device), stride=stride,
                          generator=image_generators(0, range(batch)))  # fmt: skip
        sync(device)
        times.append((time.perf_counter() - start) / steps)
    per_step = statistics.median(times)
    note = (f"stride {stride} ({steps} steps), a zero-cost network, median of 3 bounds; "
            f"ratio over a forward; goal <= {NLL_GOAL}")  # fmt: skip
    what = f"nll: the bound's own work / step, batch {batch}"
    return [Row(what, "nll work", Figure(per_step, batch), None, per_step / forward, note, "nll")]


def own_work_rows(forward: float, noisy: float, batch: int, device: torch.device) -> list[Row]:
    """Each sampler's own work per step, and the DDIM-50 vs DDPM-1000 cost ratio built on it
    (``noisy``: the same ratio from the step medians)."""
    # The network call is the same in every sampler; what may differ is each sampler's own work
    # per step. Timed with a network that costs nothing, that work is measured exactly, and the
    # cost ratio (forward + own work) / (forward + own work) is free of the forward's noise.
    own = sampler_overheads(batch, device)
    note = "the sampler with a zero-cost network, median of 50 steps; ratio over a forward"
    rows = [
        Row(
            f"sample: {name} own work / step, batch {batch}",
            "own work",
            Figure(s, batch),
            None,
            s / forward,
            note,
            name,
        )
        for name, s in own.items()
    ]
    cost = (forward + own["DDIM-50"]) / (forward + own["DDPM-1000"])
    note = (
        f"(forward + own work) per step; from the noisy step medians above: {noisy:.2f}; "
        "target 1.00 +/- 0.10"
    )
    return [*rows, Row("sample: DDIM-50 cost x 20 / DDPM-1000 cost", "cost", ratio=cost, note=note)]


def full_sampler_rows(fns: dict, batch: int, device: torch.device) -> list[Row]:
    """The whole samplers, once each: images per second, and DDIM-50 x 20 / DDPM-1000."""
    totals = {name: timed(fns[name][0], device) for name in fns if name != "forward"}
    rows = [
        Row(f"sample: {name} full, batch {batch}", "full", Figure(s, batch), note=f"{s:.1f} s")
        for name, s in totals.items()
    ]
    cost = totals["DDIM-50"] / totals["DDPM-1000"] * 20
    return [*rows, Row("sample: full DDIM-50 x 20 / DDPM-1000", "cost", ratio=cost)]


@torch.no_grad()
def ddim_loop_rows(model: UNet, args: argparse.Namespace, device: torch.device) -> list[Row]:
    """The frontier stage's sampling against a plain DDIM loop (what it adds per image), and
    our DDIM against diffusers' DDIMScheduler loop with the same weights, at the sample batch."""
    from diffusers import DDIMScheduler

    batch, k = args.sample_batch, args.sampler_steps
    model = model.eval().to(device)
    diffusion = GaussianDiffusion().to(device)
    theirs = DiffusersUNet(model.config).to(device).eval()
    theirs.net.load_state_dict(state_to_diffusers(model.state_dict(), model.config))
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", clip_sample=True,
        set_alpha_to_one=True, timestep_spacing="trailing",
    )  # fmt: skip
    x_T = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    point = Point("ddim", SamplerConfig(sampler="ddim", steps=k), k)
    sizes = FrontierParams(num_images=batch, batch_size=batch, grid_images=1,
                           points=[FrontierPoint(sampler="ddim", steps=k)])  # fmt: skip
    net, quiet = SamplingModel(model, diffusion, None, 0), Progress(None, "", enabled=False)

    def diffusers_loop() -> None:
        scheduler.set_timesteps(k)
        x = x_T
        for t in scheduler.timesteps:
            eps = theirs(x, t.expand(batch).to(device))
            x = scheduler.step(eps, t, x, use_clipped_model_output=True).prev_sample
        to_uint8(x)

    fns = {
        "stage": lambda: render_point(net, point, sizes, 0, None, device, quiet),
        "plain": lambda: to_uint8(ddim_sample(model, diffusion, x_T.shape, steps=k, x_T=x_T)),
        "diffusers": diffusers_loop,
    }
    times = {n: statistics.median(v) for n, v in interleave(fns, 1, 2, device).items()}
    what = f"DDIM-{k}, batch {batch}"
    return [
        Row(f"frontier stage / plain DDIM loop, {what}", "full", Figure(times["stage"], batch),
            Figure(times["plain"], batch), times["stage"] / times["plain"],
            "'diffusers' column: a plain ddim_sample + to_uint8; target 1.00", "frontier"),
        Row(f"DDIM / diffusers DDIMScheduler loop, same weights, {what}", "full",
            Figure(times["plain"], batch), Figure(times["diffusers"], batch),
            times["plain"] / times["diffusers"], "time per image, ours over theirs; goal <= 0.8",
            "DDIM loop"),
    ]  # fmt: skip


def _batches(feed: DeviceFeed | StreamFeed, start: int, count: int) -> None:
    for step in range(start, start + count):
        feed.batch(step)


def feed_rows(batch: int, device: torch.device, train_rate: float, train_what: str) -> list[Row]:
    """Both feeds of a cars-sized uint8 split, images/s of ready [-1, 1] batches on ``device``:
    the split held there, and streamed from a memory-mapped .npy file (the prepared format)."""
    images = np.random.default_rng(0).integers(0, 256, CARS_SHAPE, dtype=np.uint8)
    calls, rows = 200, []
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "train_images.npy", images)
        mapped = np.load(Path(tmp) / "train_images.npy", mmap_mode="r")
        for name, feed in (("device", DeviceFeed), ("stream from disk", StreamFeed)):
            source = feed(mapped, None, device)
            seconds = []
            for start in range(0, 8 * calls, calls):  # one warm-up pass, then 7 timed
                source.start(start, lambda step: draw(step, len(images), batch, hflip=True))
                run = functools.partial(_batches, source, start, calls)
                seconds.append(timed(run, device) / calls)
            source.close()
            per_call = statistics.median(seconds[1:])
            rows.append(Row(
                f"data feed ({name}), batch {batch} ({device.type})", "feed",
                Figure(per_call, batch), ratio=batch / per_call / train_rate,
                note=f"over our fastest training row ({train_what}: {train_rate:.1f} img/s); "
                "target >= 10x",
            ))  # fmt: skip
    return rows


def forward_flops(model: nn.Module, batch: int, device: torch.device) -> int:
    """FLOPs of one forward at ``batch`` (torch.utils.flop_counter: matmuls, convs, SDPA)."""
    x = torch.randn(batch, 3, 32, 32, device=device)
    t = torch.zeros(batch, dtype=torch.long, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t)
    return counter.get_total_flops()


def peak_memory(step: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """GiB: peak of a step above what was resident before it, and the process's total peak
    (NaN off CUDA, where torch keeps no such counters)."""
    if device.type != "cuda":
        step()
        return math.nan, math.nan
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device)
    step()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return (peak - resident) / 2**30, peak / 2**30


def gpu_row(
    what: str,
    seconds: dict[str, float],
    flops: dict[str, int],
    mem: dict[str, tuple[float, float]],
    args: argparse.Namespace,
) -> Row:
    """Images/s and MFU (3x forward FLOPs per image over the bf16 peak) of each network, and
    the peak memory of those in ``mem``."""
    batch, peak = args.gpu_batch, args.peak_tflops * 1e12
    figures = {
        name: Figure(s, batch, 3 * flops[name] / s / peak, *mem.get(name, (None, None)))
        for name, s in seconds.items()
    }
    ratio = seconds["ours"] / seconds["theirs"] if "theirs" in seconds else None
    return Row(what, "gpu", figures["ours"], figures.get("theirs"), ratio)


def gpu_rows(
    config: UNetConfig, args: argparse.Namespace, device: torch.device | None = None
) -> list[Row]:
    """Training at batch 128 under bf16 autocast on CUDA, eager (both) and compiled (ours).

    ``device`` is CUDA unless a test dry-runs these rows elsewhere."""
    device = device or torch.device("cuda")
    fmt, batch = torch.channels_last, args.gpu_batch
    models = {
        "ours": UNet(config).to(device, memory_format=fmt),
        "theirs": DiffusersUNet(config).to(device, memory_format=fmt),
    }
    flops = {name: forward_flops(m, batch, device) for name, m in models.items()}
    steps = {name: make_train_step(m, batch, fmt, True, device) for name, m in models.items()}
    times = interleave(steps, args.warmup, args.iters * 4, device)
    seconds = {name: statistics.median(ts) for name, ts in times.items()}
    mem = {name: peak_memory(step, device) for name, step in steps.items()}
    rows = [gpu_row(f"GPU train bf16 eager, batch {batch}", seconds, flops, mem, args)]
    best = seconds["ours"]
    show(rows[-1])
    if not args.no_compile:
        step = make_train_step(torch.compile(models["ours"]), batch, fmt, True, device)
        compile_s = timed(step, device)
        both = {"ours": step, "theirs": steps["theirs"]}
        times = interleave(both, args.warmup, args.iters * 4, device)
        seconds = {name: statistics.median(ts) for name, ts in times.items()}
        row = gpu_row(
            f"GPU train bf16, ours torch.compile, batch {batch}",
            seconds,
            flops,
            {"ours": peak_memory(step, device)},
            args,
        )
        rows.append(row._replace(note=f"compile {compile_s:.0f} s; theirs eager"))
        best = min(best, seconds["ours"])
        show(rows[-1])
    rows += feed_rows(batch, device, batch / best, "GPU bf16")
    return rows


def machine() -> str:
    """CPU model, cores, threads, and the versions that matter, in one line."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next(
        (ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")),
        platform.processor() or "unknown CPU",
    )
    flags = [f for f in ("avx512_bf16", "amx_bf16") if f in cpuinfo]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    try:
        from diffusers import __version__ as diffusers_version
    except ImportError:
        diffusers_version = "missing"
    return (
        f"{model} ({', '.join(flags) or 'no bf16 flags'}), {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads; {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, diffusers {diffusers_version}"
    )


def training_verdict(rows: list[Row]) -> list[str]:
    """The fp32 training ratios against TARGET_RATIO."""
    fp32 = [r for r in rows if r.kind == "step" and r.key.startswith("train fp32")]
    if not fp32:
        return []
    best = min(r.ratio for r in fp32)
    ratios = ", ".join(f"{r.key}: {ratio_text(r)}" for r in fp32)
    met = "met" if best <= TARGET_RATIO else "not met"
    return [
        f"fp32 training step, ours/theirs time ({ratios}); target <= {TARGET_RATIO}"
        f" {met} (best {best:.2f})."
    ]


def sampler_verdict(rows: list[Row]) -> list[str]:
    """Each sampler's step over a forward, its own work, and DDIM-50 vs DDPM-1000 cost."""
    steps = [r for r in rows if r.kind == "sampler step"]
    if not steps:
        return []
    per = ", ".join(f"{r.key} {ratio_text(r)}" for r in steps)
    own = ", ".join(f"{r.key} {CELL[r.kind](r.ours)}" for r in rows if r.kind == "own work")
    cost = next(r for r in rows if r.what.startswith("sample: DDIM-50 cost"))
    ok = "within" if abs(cost.ratio - 1) <= 0.1 else "outside"
    worst = max((r for r in rows if r.kind == "own work"), key=lambda r: r.ratio)
    goal = "met" if worst.ratio <= OWN_WORK_GOAL else "not met"
    return [
        f"Sampler step time / bare forward: {per}. Each sampler's own work per step: {own}; "
        f"the largest, {worst.key}'s, is {worst.ratio:.2%} of a forward: goal <= "
        f"{OWN_WORK_GOAL:.0%} {goal}. "
        f"DDIM-50 costs {ratio_text(cost)} x 1/20 of DDPM-1000, {ok} the 10% target."
    ]


def ddim_loop_verdict(rows: list[Row]) -> list[str]:
    """The frontier stage's overhead over a plain loop, and our DDIM loop against diffusers'."""
    found = {r.key: r for r in rows if r.key in ("frontier", "DDIM loop")}
    if len(found) < 2:
        return []
    stage, loop = found["frontier"], found["DDIM loop"]
    met = "met" if loop.ratio <= 0.8 else "not met"
    return [
        f"The frontier stage samples at {CELL['full'](stage.ours)}, {ratio_text(stage)} x the "
        f"time of a plain DDIM loop at the same batch. Our DDIM loop takes {ratio_text(loop)} x "
        f"the time per image of diffusers' DDIMScheduler loop with the same weights; goal <= 0.8 "
        f"{met}."
    ]


def gpu_verdict(rows: list[Row]) -> list[str]:
    """The best GPU training rate against GPU_TARGET."""
    rates = {r.what: r.ours.rate for r in rows if r.kind == "gpu"}
    if not rates:
        return []
    what, best = max(rates.items(), key=lambda item: item[1])
    met = "met" if best >= GPU_TARGET else "not met"
    return [
        f"GPU training: best {best:,.0f} img/s ({what}); target >= {GPU_TARGET:,} img/s on "
        f"one H100 {met}."
    ]


def interpretation(rows: list[Row], gpu: bool) -> list[str]:
    """Plain sentences on the targets, read off the rows' numbers."""
    lines = training_verdict(rows) + sampler_verdict(rows) + ddim_loop_verdict(rows)
    for row in rows:
        if row.kind == "nll work":
            ok = "met" if row.ratio <= NLL_GOAL else "not met"
            lines.append(f"The nll stage's own work is {row.ratio:.2%} of a network forward "
                         f"per step; goal <= {NLL_GOAL:.0%} {ok}.")  # fmt: skip
    for row in rows:
        if row.kind == "feed":
            ok = "met" if row.ratio >= 10 else "not met"
            lines.append(f"{row.what}: {ratio_text(row)} a training step's images/s; >= 10x {ok}.")
    lines += gpu_verdict(rows)
    if not gpu:
        lines.append(
            "No GPU was available in this session: the batch-128 bf16 rows (with and "
            "without torch.compile, peak memory, MFU; target >= 5,000 img/s on one "
            "H100) were not measured. On a CUDA machine the same command runs them."
        )
    return lines


def ratio_text(row: Row) -> str:
    """The ratio column: two decimals, four for a sampler's own work, "12,391x" for the feed."""
    return "" if row.ratio is None else RATIO.get(row.kind, "{:.2f}").format(row.ratio)


def cells(row: Row) -> list[str]:
    """The row as text: what, ours, diffusers, ratio, note. With CELL, RATIO and ratio_text,
    the one place numbers become text: the printed rows, the printed table and RESULTS.md all
    go through it, and the interpretation quotes its figures through CELL and ratio_text."""
    figures = {"ours": row.ours, "theirs": row.theirs}
    text = {name: "" if f is None else CELL[row.kind](f) for name, f in figures.items()}
    if row.kind == "skipped":
        text["ours"] = "skipped"
    memory = [
        f"{name} step peak {f.step_gib:.2f} GiB (total {f.total_gib:.2f})"
        for name, f in figures.items()
        if f is not None and f.step_gib is not None
    ]
    note = "; ".join([*memory, row.note] if row.note else memory)
    return [row.what, text["ours"], text["theirs"], ratio_text(row), note]


def show(row: Row) -> None:
    """A row as soon as it is measured."""
    print("  ".join(cell for cell in cells(row) if cell), flush=True)


def markdown(rows: list[Row], command: str, notes: list[str]) -> str:
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = ["| measurement | ours | diffusers | ratio | note |", "|---|---|---|---|---|"]
    table = [f"| {' | '.join(cells(row))} |" for row in rows]
    return "\n".join(
        [
            "# Benchmark: our UNet vs diffusers' UNet2DModel",
            "",
            f"- command: `{command}`",
            f"- machine: {machine()}",
            f"- date: {when}",
            "",
            "Training ratios are ours / theirs in time per step (< 1: ours faster), medians of "
            "steps alternated between the two networks; `paired` is the median of the per-round "
            "ratios. Sampler ratios are one sampler step over one bare network forward "
            "(1.00: no per-step overhead).",
            "",
            *header,
            *table,
            "",
            "## Interpretation",
            "",
            *[f"- {line}" for line in notes],
            "",
        ]
    )


def print_table(rows: list[Row]) -> None:
    texts = [cells(row) for row in rows]
    widths = [max(len(text[i]) for text in texts) for i in range(4)]
    for text in texts:
        padded = [cell.ljust(w) for cell, w in zip(text[:4], widths, strict=True)]
        print("  ".join(padded), " ", text[4])


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", *sys.argv])
    print(machine(), flush=True)
    torch.manual_seed(0)
    config = UNetConfig()
    ours, theirs = UNet(config), DiffusersUNet(config)
    n_ours, n_theirs = num_parameters(ours), num_parameters(theirs)
    gflops = [forward_flops(m, 1, torch.device("cpu")) / 1e9 for m in (ours, theirs)]
    print(f"parameters: ours {n_ours:,}, diffusers {n_theirs:,}", flush=True)
    assert n_ours == n_theirs, "the two networks must have the same parameter count"
    rows = [
        Row("parameters", "count", Figure(value=n_ours), Figure(value=n_theirs), n_ours / n_theirs),
        Row(
            "forward GFLOP / image",
            "gflop",
            Figure(value=gflops[0]),
            Figure(value=gflops[1]),
            gflops[0] / gflops[1],
            "torch.utils.flop_counter",
        ),
    ]
    cuda = torch.cuda.is_available()
    rates: dict[str, float] = {}
    if not (cuda and args.gpu_only):
        rows += cpu_train_rows(ours, theirs, args, rates)
        what, rate = max(rates.items(), key=lambda item: item[1])
        rows += feed_rows(8, torch.device("cpu"), rate, what)
    device = torch.device("cuda" if cuda else "cpu")
    rows += sampler_rows(ours.to(device), args, device)
    rows += ddim_loop_rows(ours, args, device)
    if cuda:
        rows += gpu_rows(config, args)
    print()
    print_table(rows)
    notes = interpretation(rows, cuda)
    print("\n".join(notes))
    if not args.no_write:
        write_section(args.results, "unet", markdown(rows, command, notes))
        print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
