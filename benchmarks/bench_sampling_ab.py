"""A/B of the samplers between two commits of this repository, side by side in one run.

Each sampler's time per step, at batch 64 on this machine, with (a) a network that costs
nothing (the sampler's own work: what a refactor of the samplers can slow) and (b) a small
UNet (32 px, 64 channels: the whole step). Rounds alternate A, B, B, A, ... each in a fresh
process over the same seeds; the table gives medians and B / A.

    python benchmarks/bench_sampling_ab.py                # 4a589d2 vs the working tree
    python benchmarks/bench_sampling_ab.py --base REV --rounds 6

The base is checked out with ``git worktree`` into a temporary folder (removed at the end);
the working tree is B. Either layout is measured: ``ddpm.samplers`` (before the sampling
package) or ``ddpm.sampling.api``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, statistics, torch
torch.set_num_threads(int(sys.argv[2]))
import ddpm
assert ddpm.__file__.startswith(sys.argv[1]), (ddpm.__file__, sys.argv[1])  # this tree's
try:  # the layout before the sampling package first: the editable install maps the new one
    from ddpm.samplers import ddim_sample, ddpm_sample, dpm_solver_sample, unipc_sample
except ImportError:
    from ddpm.sampling.api import ddim_sample, ddpm_sample, dpm_solver_sample, unipc_sample
from ddpm.config import UNetConfig
from ddpm.diffusion import GaussianDiffusion
from ddpm.unet import UNet

class Free(torch.nn.Module):
    def forward(self, x, t, y=None):
        return torch.zeros_like(x)

SAMPLERS = {
    "DDPM-1000": (ddpm_sample, {}),
    "DDIM-50": (ddim_sample, {"steps": 50}),
    "DDIM-50 eta 1": (ddim_sample, {"steps": 50, "eta": 1.0}),
    "DPM-Solver++(3)-20": (dpm_solver_sample, {"steps": 20, "order": 3}),
    "UniPC(3)-20": (unipc_sample, {"steps": 20, "order": 3}),
}
diffusion = GaussianDiffusion()
torch.manual_seed(0)
unet = UNet(UNetConfig(base_channels=64, attention_resolutions=(16,), dropout=0.0)).eval()
out = {}
with torch.no_grad():
    for net_name, net, k in (("free", Free(), 40), ("unet", unet, 4)):
        for name, (fn, kw) in SAMPLERS.items():
            stamps = [time.perf_counter()]
            class Stop(Exception):
                pass
            def callback(i, t, x, x0):
                stamps.append(time.perf_counter())
                if i + 1 >= k:
                    raise Stop
            try:
                fn(net, diffusion, (64, 3, 32, 32), generator=torch.Generator().manual_seed(0),
                   callback=callback, **kw)
            except Stop:
                pass
            steps = [b - a for a, b in zip(stamps, stamps[1:])][1:]  # the first warms up
            out[f"{name} | {net_name}"] = statistics.median(steps)
print(json.dumps(out))
"""


def run(tree: Path, threads: int) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", CHILD, str(tree), str(threads)], cwd=tree,
                          env={"PYTHONPATH": str(tree), "PATH": ""}, capture_output=True,
                          text=True)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"the sampler timing in {tree} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="4a589d2", help="the commit A (default: before the "
                        "sampling package)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=4, help="processes per side")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), args.base],
                       cwd=ROOT, check=True)  # fmt: skip
        try:
            times: dict[str, dict[str, list[float]]] = {"A": {}, "B": {}}
            for r in range(args.rounds):
                for side in ("A", "B") if r % 2 == 0 else ("B", "A"):
                    result = run(base if side == "A" else ROOT, args.threads)
                    for key, seconds in result.items():
                        times[side].setdefault(key, []).append(seconds)
                print(f"round {r + 1} of {args.rounds} done", file=sys.stderr)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT)
    print(f"A = {args.base}, B = the working tree; batch 64, 32 px, {args.threads} threads, "
          f"{args.rounds} processes a side, median ms per step\n")  # fmt: skip
    print("| sampler | network | A | B | B / A |\n|---|---|---|---|---|")
    for key in times["A"]:
        a, b = (statistics.median(times[s][key]) * 1e3 for s in ("A", "B"))
        sampler, network = key.split(" | ")
        print(f"| {sampler} | {network} | {a:.2f} | {b:.2f} | {b / a:.3f} |")


if __name__ == "__main__":
    main()
