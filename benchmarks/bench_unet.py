"""Time the UNet at the DDPM CIFAR-10 configuration: a training step and a sampling step.

A training step is forward, MSE loss, backward and an AdamW step; a sampling step is one
no-grad forward. Runs on CUDA when present, else on the CPU::

    python benchmarks/bench_unet.py                      # batch 8 on CPU, 128 on CUDA
    python benchmarks/bench_unet.py --channels-last --bf16 --batch-size 16
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ddpm.config import UNetConfig
from ddpm.unet import UNet


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 CPU, 128 CUDA")
    parser.add_argument("--image-size", type=int, default=32, help="pixels (default: 32)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations (default: 3)")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations (default: 10)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last format")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--attention", choices=["softmax", "linear"], default="softmax")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    return parser.parse_args()


def time_calls(
    fn: Callable[[], None], warmup: int, iters: int, device: torch.device
) -> list[float]:
    """Seconds taken by each of ``iters`` calls of ``fn``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def report(name: str, times: list[float], batch_size: int) -> None:
    # The median, not the mean: on a shared machine a few slow calls are other people's work.
    median, best = statistics.median(times), min(times)
    print(
        f"{name}: median {median * 1e3:8.1f} ms  {batch_size / median:8.1f} images/s  "
        f"(best {best * 1e3:.1f} ms, {batch_size / best:.1f} images/s)"
    )


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = args.batch_size or (128 if device.type == "cuda" else 8)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()

    config = UNetConfig(image_size=args.image_size, attention_type=args.attention)
    model = UNet(config).to(device, memory_format=fmt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
    gen = torch.Generator(device).manual_seed(0)
    shape = (batch_size, config.in_channels, config.image_size, config.image_size)
    x = torch.randn(shape, device=device, generator=gen).contiguous(memory_format=fmt)
    target = torch.randn(shape, device=device, generator=gen)
    t = torch.randint(0, 1000, (batch_size,), device=device, generator=gen)

    def train_step() -> None:
        with amp:
            loss = F.mse_loss(model(x, t).float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def sample_step() -> None:
        with amp:
            model(x, t)

    model.train()
    train_times = time_calls(train_step, args.warmup, args.iters, device)
    model.eval()
    sample_times = time_calls(sample_step, args.warmup, args.iters, device)

    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}")
    else:
        print(f"device: cpu, {torch.get_num_threads()} threads")
    print(f"parameters: {model.num_parameters():,}")
    print(
        f"batch {batch_size}, {config.image_size} px, channels_last={args.channels_last}, "
        f"bf16={args.bf16}, attention={args.attention}"
    )
    report("train step ", train_times, batch_size)
    report("sample step", sample_times, batch_size)


if __name__ == "__main__":
    main()
