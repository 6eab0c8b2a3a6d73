"""Preparing a large image folder: images per second and peak memory, side by side.

A folder of generated JPEGs at CelebA's size (178 x 218, default 20,000 of them, made once and
kept in ``--folder``) is prepared at 64 x 64 three ways, each in a fresh process so that its
peak memory is its own:

- ``in memory, 1 process``: decoded images held in memory (what ``prepare`` did before);
- ``on disk, 1 process``: decoded images written to a scratch file, splits written in chunks;
- ``on disk, N processes``: the same, decoding in N worker processes (what ``prepare`` does).

Peak memory is the process's peak resident set (``VmHWM``) above what it held after its imports,
and the largest worker's; the time leaves out importing torch. The section "prepare" of
``benchmarks/RESULTS.md`` is rewritten::

    python benchmarks/bench_prepare.py          # ~3 min on 2 CPU cores (first run: + ~1 min)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from results import RESULTS, write_section

SIZE = (178, 218)  # CelebA's aligned images, width x height
MIB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--images", type=int, default=20_000, help="images in the generated folder")
    add("--image-size", type=int, default=64, help="prepared size, pixels")
    add("--workers", type=int, default=os.cpu_count() or 1, help="decoding processes")
    add("--folder", type=Path, default=Path(tempfile.gettempdir()) / "ddpm-bench-folder")
    add("--results", type=Path, default=RESULTS, help=f"markdown output (default: {RESULTS})")
    add("--no-write", action="store_true", help="print only; do not write --results")
    add("--child", type=str, default=None, help=argparse.SUPPRESS)  # one measured run
    return parser.parse_args(argv)


def make_folder(folder: Path, count: int) -> Path:
    """``count`` JPEGs of smooth random colour fields with noise, in 10 class subfolders."""
    done = folder / f".complete-{count}"
    if done.exists():
        return folder
    rng = np.random.default_rng(0)
    for i in range(count):
        path = folder / f"class_{i % 10}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize(SIZE, Image.Resampling.BICUBIC)
        noisy = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (*SIZE[::-1], 3))
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    done.touch()
    return folder


def rss_mib(field: str) -> float:
    """A field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> float:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); return that RSS in MiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return rss_mib("VmRSS")


def child(spec: dict) -> None:
    """One measured prepare (run in its own process); prints its figures as JSON.

    Decoding runs before torch is imported (``write_prepared``'s module imports it, and torch's
    import starts a 400 MiB helper process), so the largest child is a decoding worker."""
    from ddpm.data.imagefolder import image_folder

    with tempfile.TemporaryDirectory() as tmp:
        start, base = time.perf_counter(), reset_peak()
        work = Path(tmp) / "work" if spec["disk"] else None
        if work is not None:
            work.mkdir()
        data = image_folder(
            Path(spec["folder"]), image_size=spec["size"], val_fraction=0.1, progress=False,
            work_dir=work, workers=spec["workers"],
        )  # fmt: skip
        decode_peak = rss_mib("VmHWM") - base
        workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        paused = time.perf_counter()
        from ddpm.data.prepared import write_prepared

        resumed, base = time.perf_counter(), reset_peak()
        manifest = write_prepared(Path(tmp) / "prepared", data)
        seconds = time.perf_counter() - resumed + paused - start
        arrays = [Path(tmp) / "prepared" / f"{name}_images.npy" for name in manifest["splits"]]
        nbytes = sum(path.stat().st_size for path in arrays)
    print(json.dumps({
        "seconds": seconds, "images": sum(s["count"] for s in manifest["splits"].values()),
        "peak_mib": max(decode_peak, rss_mib("VmHWM") - base), "worker_mib": workers,
        "array_mib": nbytes / MIB,
    }))  # fmt: skip


def measure(folder: Path, size: int, disk: bool, workers: int) -> dict:
    spec = json.dumps({"folder": str(folder), "size": size, "disk": disk, "workers": workers})
    out = subprocess.run(
        [sys.executable, __file__, "--child", spec], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(name: str, m: dict) -> str:
    rate = m["images"] / m["seconds"]
    worker = f"{m['worker_mib']:,.0f} MiB" if m["worker_mib"] > 0 else "none"
    return (
        f"| {name} | {m['images']:,} | {m['seconds']:.1f} s | {rate:,.0f} img/s | "
        f"{m['peak_mib']:,.0f} MiB | {worker} | {m['array_mib']:,.0f} MiB |"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return
    folder = make_folder(args.folder, args.images)
    runs = [
        ("in memory, 1 process", False, 1),
        ("on disk, 1 process", True, 1),
        (f"on disk, {args.workers} processes", True, args.workers),
    ]
    lines = [
        "| prepare | images | time | rate | peak memory above imports | largest worker "
        "| prepared arrays |",
        "|---|---|---|---|---|---|---|",
    ]
    figures = {}
    for name, disk, workers in runs:
        figures[name] = measure(folder, args.image_size, disk, workers)
        lines.append(row(name, figures[name]))
        print(lines[-1], flush=True)
    command = shlex.join(["python", "benchmarks/bench_prepare.py", *(argv or sys.argv[1:])])
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join([
        f"## Preparing an image folder: {args.images:,} JPEGs of {SIZE[0]}x{SIZE[1]} to "
        f"{args.image_size}x{args.image_size}",
        "",
        f"- command: `{command}`; {os.cpu_count()} CPU cores; {when}",
        "- each run in its own process; peak memory is its VmHWM above its RSS after imports",
        "",
        *lines,
    ])  # fmt: skip
    if not args.no_write:
        write_section(args.results, "prepare", text)
        print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
