"""The smoke pipeline: the real dvc.yaml stages, tiny and offline, in a throwaway copy.

``make smoke`` copies the project's files into ``.smoke/`` (git-ignored), makes it a git + DVC
project of its own, shrinks params.yaml (synthetic data, a tiny UNet, a few hundred steps and
samples, an untrained Inception weights file built locally) and runs ``dvc repro`` there. The
user's own data, models, metrics and MLflow store are never touched; ``.smoke/`` stays for
inspection, and ``dvc exp run -S schedule=cosine`` works inside it.

Metrics computed with the locally built weights are smoke figures, not real FID/IS.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pipeline.fidelity import write_untrained_inception_weights

ROOT = Path(__file__).resolve().parents[1]

OVERRIDES = {
    "dataset": "synthetic",
    "image_size": 16,
    # Inception at 299 px (0.15 s an image on one thread) and FID's eigenvalues of a 2048 x
    # 2048 matrix (2 s a score) are most of the smoke's time: 50 reference images, 50 samples
    # and 10 images a frontier point (KID's subset size) keep it short
    "data": {"num_images": 400, "val_fraction": 0.125},
    "model": {
        "base_channels": 32,
        "channel_mults": [1, 2],
        "num_res_blocks": 1,
        "attention_resolutions": [8],
        "num_groups": 8,
        "dropout": 0.0,
    },
    "diffusion": {"timesteps": 200},
    "train": {
        "steps": 150,  # val loss 0.24 at 100 steps, 1.0 untrained
        "batch_size": 16,
        "lr": 1.0e-3,
        "warmup_steps": 20,
        "val_every": 75,
        "val_images": 64,
        "val_timesteps": 4,
        "checkpoint_every": 75,
        "sample_every": 75,
        "sample_images": 16,
        "sample_steps": 10,
        "bf16": False,
        # off in the smoke's baseline (`dvc exp run -S train.fid.every=50` turns it on): 16
        # images of DDIM-10 against the val split, as evaluate scores the samples
        "fid": {
            "every": 0,
            "num_images": 16,
            "steps": 10,
            "batch_size": 16,
            "reference_split": "val",
        },
    },
    "ema": {"decay": 0.99},
    "sample": {
        "steps": 20,
        "num_images": 50,
        "batch_size": 50,
        "grid_images": 36,
        "gif_images": 8,
        "interpolation_steps": 8,
    },
    "evaluate": {
        "reference_split": "val",
        "kid_subset_size": 10,
        "isc_splits": 5,
    },
    # Built by this script and DVC-tracked in the copy, so that queued experiments' temporary
    # copies (`dvc exp run --queue`), which hold only tracked files, have it too
    "inception_weights": "weights/inception-untrained.pth",
    "registry": {"enabled": True, "model_name": "ddpm-smoke"},  # track registers the model
    # synthetic data has no test files; 20 images x every 10th of 200 steps: 400 evaluations
    "nll": {"split": "val", "num_images": 20, "batch_size": 20, "stride": 10},
    # 4 val images, RePaint over 10 steps with jumps of 2 resampled twice: 20 NFE an image
    "edit": {"num_images": 4, "batch_size": 4, "steps": 10, "jump_length": 2, "resample": 2},
    "frontier": {  # two samplers at two step counts, and heun
        "num_images": 10,
        "batch_size": 10,
        "points": [
            {"sampler": "ddim", "steps": 5},
            {"sampler": "ddim", "steps": 10},
            {"sampler": "dpm-solver", "steps": 5},
            {"sampler": "dpm-solver", "steps": 10},
            {"sampler": "heun", "steps": 3},  # 5 NFE
        ],
    },
}


def merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) else value
    return out


def project_files() -> list[str]:
    """Tracked files plus new ones git does not ignore: what a commit of the tree would hold."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\0")  # fmt: skip
    return [f for f in listed if f and (ROOT / f).is_file()]


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    print(f"+ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=cwd, env=env, check=True)


def make_copy(dest: Path, extra_overrides: dict | None = None) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in project_files():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = merge(merge(params, OVERRIDES), extra_overrides or {})
    write_untrained_inception_weights(dest / params["inception_weights"])
    (dest / "params.yaml").write_text(
        "# Smoke-test params, written by scripts/smoke.py from the project's params.yaml\n"
        + yaml.safe_dump(params, sort_keys=False)
    )


def environment(dest: Path) -> dict[str, str]:
    """PATH with this venv first, the copy's own MLflow store, and one CPU thread per stage
    (tiny models run faster on one thread than on two busy ones)."""
    env = dict(os.environ)
    env.pop("DDPM_INCEPTION_WEIGHTS", None)  # the copy's params name its own weights file
    env.setdefault("DDPM_NUM_THREADS", "1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("MLFLOW_TRACKING_URI", None)  # the smoke project keeps its own SQLite store
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(
        GIT_AUTHOR_NAME="smoke", GIT_AUTHOR_EMAIL="smoke@localhost",
        GIT_COMMITTER_NAME="smoke", GIT_COMMITTER_EMAIL="smoke@localhost",
    )  # fmt: skip
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=ROOT / ".smoke", help="Throwaway copy.")
    args = parser.parse_args()
    start = time.perf_counter()
    dest = args.dest.resolve()
    make_copy(dest)
    env = environment(dest)
    run(["git", "init", "-q", "-b", "main"], dest, env)
    weights = yaml.safe_load((dest / "params.yaml").read_text())["inception_weights"]
    run([sys.executable, "-m", "dvc", "add", "-q", weights], dest, env)
    run(["git", "add", "-A"], dest, env)
    run(["git", "commit", "-q", "-m", "smoke copy"], dest, env)
    run([sys.executable, "-m", "dvc", "repro"], dest, env)
    print(f"smoke pipeline done in {time.perf_counter() - start:.0f}s; results in {dest}")


if __name__ == "__main__":
    main()
