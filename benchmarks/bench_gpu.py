"""The GPU figures the project is held to, in one run on one device (no diffusers needed):

1. Training, the default 35.7M UNet at 32 px, batch 128, bf16 autocast, channels_last: images
   per second eager and under torch.compile, MFU (3x the forward FLOPs of
   ``torch.utils.flop_counter`` over ``--peak-tflops``), peak memory. Goal >= 5,000 img/s on
   one H100.
2. Sampling at batch 256 through ``ddpm.generation.generate`` (per-image noise, as the sample
   stage draws it): a bare forward in each memory format and in bf16; DDIM-100 whole; the
   first steps of DDPM-1000, extrapolated; each sampler step over a bare forward (the
   sampler's overhead, goal <= 5%); the same in bf16, and how far bf16's images move from
   float32's for the same noises (with ``--weights``, a trained model's).
3. FID of 10,000 images against reference statistics torch-fidelity has cached (goal: under a
   minute), with a locally built Inception weights file (the same network, so the same cost).

    python benchmarks/bench_gpu.py --json out.json --markdown out.md     # on a GPU: ~3 min
    python benchmarks/bench_gpu.py --dry                                 # tiny sizes, any device

The GPU check (``scripts/gpu_check.sh``) runs it; figures land in benchmarks/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import sampler_step_times, sync, timed

from ddpm.checkpoint import CHANNELS_LAST_DEVICES, load_sampling_model
from ddpm.config import SamplerConfig, UNetConfig
from ddpm.diffusion import GaussianDiffusion
from ddpm.generation import generate
from ddpm.pixels import to_uint8
from ddpm.unet import UNet

GOALS = {"train_images_per_second": 5000, "sampler_overhead": 0.05, "fid_10k_seconds": 60}
TINY = UNetConfig(image_size=16, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                  attention_resolutions=(8,), num_groups=8)  # fmt: skip


def median_time(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device) for _ in range(iters))


def peak_gib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak GiB allocated while ``fn`` runs (NaN off CUDA)."""
    if device.type != "cuda":
        return math.nan
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def forward_flops(model: nn.Module, config: UNetConfig, batch: int, device) -> int:
    x = torch.randn(batch, 3, config.image_size, config.image_size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, torch.zeros(batch, dtype=torch.long, device=device))
    return counter.get_total_flops()


def train_step(model: nn.Module, config: UNetConfig, batch: int, device) -> Callable[[], None]:
    """Forward, MSE against eps, backward, fused AdamW, under bf16 autocast on CUDA, inputs in
    channels_last: what a training step of the loop costs, without its bookkeeping."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, fused=device.type != "mps")
    gen = torch.Generator(device).manual_seed(0)
    shape = (batch, 3, config.image_size, config.image_size)
    x_t = torch.randn(shape, generator=gen, device=device)
    x_t = x_t.contiguous(memory_format=torch.channels_last)
    eps = torch.randn(shape, generator=gen, device=device)
    t = torch.randint(0, 1000, (batch,), generator=gen, device=device)
    amp = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with amp:
            loss = F.mse_loss(model(x_t, t).float(), eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def training(config: UNetConfig, args, device: torch.device) -> dict:
    """Images/s, MFU and peak memory, eager and compiled."""
    model = UNet(config).to(device, memory_format=torch.channels_last).train()
    flops = 3 * forward_flops(model, config, 1, device)  # per image: forward + 2x backward
    out = {"batch": args.train_batch, "train_flop_per_image": flops}
    variants = {"eager": model}
    if not args.no_compile:
        variants["compiled"] = torch.compile(model)
    for name, net in variants.items():
        step = train_step(net, config, args.train_batch, device)
        start = time.perf_counter()
        step()  # the first step: compilation, cuDNN autotuning, allocator warm-up
        sync(device)
        first = time.perf_counter() - start
        seconds = median_time(step, device, args.warmup, args.iters)
        rate = args.train_batch / seconds
        out[name] = {
            "images_per_second": rate,
            "step_ms": seconds * 1e3,
            "mfu": rate * flops / (args.peak_tflops * 1e12),
            "peak_gib": peak_gib(step, device),
            "first_step_s": first,
        }
        print(f"train {name}: {rate:,.0f} img/s, MFU {out[name]['mfu']:.1%}, "
              f"first step {first:.1f} s", flush=True)  # fmt: skip
    return out


def sampling_model(args, device: torch.device):
    """The trained weights of ``--weights``, or a random network whose output is not zero."""
    if args.weights:
        return load_sampling_model(args.weights, device=device)
    config = TINY if args.dry else UNetConfig()
    model = UNet(config)
    with torch.no_grad():  # the zero-initialised output layers would make every image equal
        for module in model.modules():
            if isinstance(module, nn.Conv2d) and not module.weight.any():
                nn.init.normal_(module.weight, std=0.02)
    model = model.to(device).eval().requires_grad_(False)
    if device.type in CHANNELS_LAST_DEVICES:
        model = model.to(memory_format=torch.channels_last)
    from ddpm.checkpoint import SamplingModel

    return SamplingModel(model, GaussianDiffusion().to(device), None, 0)


def sampling(args, device: torch.device) -> dict:
    net = sampling_model(args, device)
    model, diffusion, batch = net.model, net.diffusion, args.sample_batch
    size = model.config.image_size
    x = torch.randn(batch, 3, size, size, device=device)
    t = torch.full((batch,), 500, device=device)
    out: dict = {"batch": batch, "weights": str(args.weights or "random")}
    forwards = {}
    with torch.no_grad():
        for name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", None)):
            m = model.to(memory_format=fmt) if fmt is not None else model
            forwards[name] = median_time(lambda m=m: m(x, t), device, 2, args.iters)
        if device.type in CHANNELS_LAST_DEVICES:
            model.to(memory_format=torch.channels_last)
        else:
            model.to(memory_format=torch.contiguous_format)
        with torch.autocast(device.type, torch.bfloat16):
            forwards["bf16"] = median_time(lambda: model(x, t), device, 2, args.iters)
    used = "channels_last" if device.type in CHANNELS_LAST_DEVICES else "contiguous"
    out["forward_ms"] = {k: v * 1e3 for k, v in forwards.items()}
    out["forward_format_used"] = used
    indices = list(range(batch))

    def run(sampler: SamplerConfig, bf16: bool = False, **kw) -> torch.Tensor:
        return generate(model, diffusion, indices, 0, sampler, device=device, bf16=bf16, **kw)

    T = diffusion.num_timesteps  # the whole chain: DDPM-1000 for the default T
    k, ddim_steps = args.sampler_steps, min(T, 4 if args.dry else 100)
    ddpm, ddim = SamplerConfig(sampler="ddpm", steps=T), SamplerConfig(steps=ddim_steps)
    plan = [(f"ddpm-{T} step", ddpm, False, forwards[used]),
            (f"ddim-{ddim_steps} step", ddim, False, forwards[used]),
            (f"ddpm-{T} bf16 step", ddpm, True, forwards["bf16"])]  # fmt: skip
    for name, sampler, bf16, forward in plan:
        steps = sampler_step_times(lambda callback, s=sampler, b=bf16: run(s, b, callback=callback),
                                   k, device)[1:]  # the first step draws x_T too  # fmt: skip
        step = statistics.median(steps)
        out[name] = {"step_ms": step * 1e3, "overhead": step / forward - 1,
                     "images_per_second_extrapolated": batch / (step * sampler.steps)}  # fmt: skip
        print(f"{name}: step {step * 1e3:.2f} ms, overhead {step / forward - 1:+.1%}", flush=True)
    images = {}
    for bf16 in (False, True):
        seconds = timed(lambda b=bf16: images.__setitem__(b, to_uint8(run(ddim, b))), device)
        name = f"ddim-{ddim_steps}{' bf16' if bf16 else ''} whole"
        out[name] = {"images_per_second": batch / seconds}
    diff = (images[True].int() - images[False].int()).abs().float()
    out["bf16_vs_fp32_uint8"] = {
        "mean_abs": float(diff.mean()),
        "max_abs": float(diff.max()),
        "share_over_2_levels": float((diff > 2).float().mean()),
    }
    print(
        f"bf16 vs fp32 images (DDIM-{ddim_steps}, uint8): {out['bf16_vs_fp32_uint8']}", flush=True
    )
    return out


def fid_timing(args, device: torch.device) -> dict:
    """Seconds for FID (with KID and IS) of N uint8 images against cached reference features."""
    from pipeline.fidelity import (
        INCEPTION,
        Extraction,
        UInt8Images,
        fidelity,
        resolve_weights,
        write_untrained_inception_weights,
    )
    from pipeline.settings import EvaluateParams

    n = args.fid_images
    gen = torch.Generator().manual_seed(0)
    fake, real = (torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=gen)
                  for _ in range(2))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = write_untrained_inception_weights(Path(tmp) / "inception.pth")
        extraction = Extraction(INCEPTION, resolve_weights(INCEPTION, str(path)),
                                {"fid": True, "isc": True, "kid": True})  # fmt: skip
        e = EvaluateParams(reference_split="train", fid=True, isc=True, kid=True, prc=False,
                           kid_subset_size=min(1000, n), kid_subsets=100, isc_splits=10,
                           batch_size=250, prc_weights="", repeats=1)  # fmt: skip
        score = lambda: fidelity(UInt8Images(fake), UInt8Images(real), "bench", extraction,  # noqa: E731
                                 e, 0, Path(tmp), verbose=False)  # fmt: skip
        first = timed(score, device)  # computes and caches the reference's features
        cached = timed(score, device)
    print(f"FID of {n:,} images: {cached:.1f} s with the reference cached ({first:.1f} s "
          "without)", flush=True)  # fmt: skip
    return {"images": n, "seconds_cached_reference": cached, "seconds_first": first}


def verdicts(r: dict) -> list[str]:
    lines = []
    train = r.get("training", {})
    best = max((train[k]["images_per_second"] for k in ("eager", "compiled") if k in train),
               default=None)  # fmt: skip
    if best is not None:
        goal = GOALS["train_images_per_second"]
        lines.append(f"training: best {best:,.0f} img/s at batch {train['batch']}; goal >= "
                     f"{goal:,} on one H100 {'met' if best >= goal else 'not met'}")  # fmt: skip
    s = r.get("sampling", {})
    for name in [k for k in s if k.endswith(" step") and "bf16" not in k]:
        over, goal = s[name]["overhead"], GOALS["sampler_overhead"]
        met = "met" if over <= goal else "not met"
        lines.append(f"{name}: sampler overhead {over:+.1%} of a forward at batch "
                     f"{s['batch']}; goal <= {goal:.0%} {met}")  # fmt: skip
    if "fid" in r:
        sec, goal = r["fid"]["seconds_cached_reference"], GOALS["fid_10k_seconds"]
        lines.append(f"FID of {r['fid']['images']:,} images: {sec:.1f} s; goal < {goal} s "
                     f"{'met' if sec < goal else 'not met'}")  # fmt: skip
    return lines


def markdown(r: dict) -> str:
    rows = [f"- machine: {r['machine']}", f"- date: {r['date']}", f"- command: `{r['command']}`"]
    t = r.get("training", {})
    table = ["| measurement | figure |", "|---|---|"]
    for name in ("eager", "compiled"):
        if name in t:
            f = t[name]
            table.append(f"| train bf16 {name}, batch {t['batch']} | {f['images_per_second']:,.0f} "
                         f"img/s, MFU {f['mfu']:.1%}, peak {f['peak_gib']:.2f} GiB, first step "
                         f"{f['first_step_s']:.1f} s |")  # fmt: skip
    s = r.get("sampling", {})
    if s:
        fw = ", ".join(f"{k} {v:.2f} ms" for k, v in s["forward_ms"].items())
        table.append(f"| sample: bare forward, batch {s['batch']} | {fw} (used: "
                     f"{s['forward_format_used']}) |")  # fmt: skip
        for name, f in s.items():
            if isinstance(f, dict) and "step_ms" in f:
                table.append(f"| sample: {name} | {f['step_ms']:.2f} ms, overhead "
                             f"{f['overhead']:+.1%}, extrapolated "
                             f"{f['images_per_second_extrapolated']:,.1f} img/s |")  # fmt: skip
            elif isinstance(f, dict) and "images_per_second" in f:
                table.append(f"| sample: {name} | {f['images_per_second']:,.1f} img/s |")
        d = s["bf16_vs_fp32_uint8"]
        table.append(f"| sample: bf16 vs fp32 images ({s['weights']}) | mean {d['mean_abs']:.2f}, "
                     f"max {d['max_abs']:.0f} levels; {d['share_over_2_levels']:.1%} of pixels "
                     "off by more than 2 |")  # fmt: skip
    if "fid" in r:
        f = r["fid"]
        table.append(f"| FID+KID+IS of {f['images']:,} images, reference cached | "
                     f"{f['seconds_cached_reference']:.1f} s ({f['seconds_first']:.1f} s "
                     "uncached) |")  # fmt: skip
    return "\n".join([*rows, "", *table, "", *[f"- {v}" for v in r["verdicts"]], ""])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry", action="store_true", help="tiny sizes: proves the script anywhere")
    p.add_argument("--weights", type=Path, help="sample from these weights (a trained ema.pt)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100: 989)")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--markdown", type=Path, help="write the table here")
    args = p.parse_args(argv)
    dry = args.dry
    args.train_batch, args.sample_batch = (4, 8) if dry else (128, 256)
    args.warmup, args.iters = (1, 2) if dry else (5, 20)
    args.sampler_steps = 4 if dry else 25
    args.fid_images = 20 if dry else 10_000
    args.no_compile = args.no_compile or dry
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "no GPU"
    r: dict = {
        "machine": f"{name}; torch {torch.__version__}; {'dry run' if args.dry else 'full'}",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", "benchmarks/bench_gpu.py", *(argv or sys.argv[1:])]),
    }
    torch.manual_seed(0)
    r["training"] = training(TINY if args.dry else UNetConfig(), args, device)
    r["sampling"] = sampling(args, device)
    r["fid"] = fid_timing(args, device)
    r["verdicts"] = verdicts(r)
    print("\n".join(r["verdicts"]))
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
    if args.markdown:
        args.markdown.write_text(markdown(r))
    return r


if __name__ == "__main__":
    main()
