"""Run the pipeline's stage commands one after the other in a work folder, without DVC or
MLflow, and time each: the GPU check's real run, and the CUDA smoke test.

The stages are the very commands DVC runs (``python -m pipeline.cli STAGE``), started with the
work folder as their directory, so every default path (``data/``, ``models/``, ``samples/``,
``metrics/``) lands there, and with this checkout on ``PYTHONPATH``. The params are the
project's params.yaml with a preset's overrides and any ``--set key=value`` on top; the
evaluation uses a locally built Inception weights file (no network: its FID/IS are not real).

    python scripts/stage_run.py WORK --preset gpu                  # the default network, 32 px
    python scripts/stage_run.py WORK --preset smoke --set train.steps=20
    python scripts/stage_run.py WORK --preset gpu --stages prepare,train --report WORK/run.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from smoke import OVERRIDES as SMOKE  # noqa: E402
from smoke import merge  # noqa: E402

STAGES = ("download", "prepare", "train", "sample", "evaluate", "frontier", "nll")
WEIGHTS = "weights/inception-untrained.pth"
# The default experiment's network (35.7M, 32 px) on the synthetic set: 2,000 training steps at
# batch 128, 1,000 images from DDIM-100 at batch 256, scored against the training split.
GPU = {
    "dataset": "synthetic",
    "image_size": 32,
    "data": {"num_images": 2000, "val_fraction": 0.1},
    "train": {
        "steps": 2000,
        "val_every": 1000,
        "val_images": 200,
        "checkpoint_every": 1000,
        "sample_every": 2000,
    },
    "sample": {"num_images": 1000, "batch_size": 256, "gif_images": 16},
    "evaluate": {"reference_split": "train", "kid_subset_size": 500, "batch_size": 250},
    "frontier": {
        "num_images": 500,
        "batch_size": 250,
        "points": [{"sampler": "ddim", "steps": 10}, {"sampler": "dpm-solver", "steps": 10}],
    },
    # the bound of 200 val images over every 10th step: 20,000 evaluations at batch 200
    "nll": {"split": "val", "num_images": 200, "batch_size": 200, "stride": 10},
}
PRESETS = {"gpu": GPU, "smoke": SMOKE}


def setting(text: str) -> dict:
    """``a.b=value`` as the nested dict {"a": {"b": value}}, the value read as YAML."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected key=value, e.g. train.steps=20")
    tree: dict = yaml.safe_load(value)
    for part in reversed(key.split(".")):
        tree = {part: tree}
    return tree


def write_params(work: Path, preset: str, settings: list[dict]) -> dict:
    """params.yaml in ``work``: the project's, the preset's overrides, then ``settings``."""
    from pipeline.fidelity import write_untrained_inception_weights

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for overrides in [PRESETS[preset], {"inception_weights": WEIGHTS}]:
        params = merge(params, overrides)
    for overrides in settings:
        params = merge(params, overrides)
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if not (work / WEIGHTS).exists():
        write_untrained_inception_weights(work / WEIGHTS)
    return params


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["DDPM_TRACKING"] = "false"  # no MLflow needed; the check measures the stages
    env.pop("DDPM_INCEPTION_WEIGHTS", None)  # params name the local weights file
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_stages(work: Path, stages: list[str], log=print) -> dict[str, dict]:
    """Each stage's wall time and exit code, in order; stops at the first that fails."""
    results: dict[str, dict] = {}
    for stage in stages:
        log(f"+ python -m pipeline.cli {stage}   (in {work})")
        start = time.perf_counter()
        code = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", stage], cwd=work, env=environment()
        ).returncode
        results[stage] = {"seconds": round(time.perf_counter() - start, 1), "exit_code": code}
        log(f"  {stage}: exit {code} in {results[stage]['seconds']} s")
        if code != 0:
            break
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, help="The work folder (made if missing).")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    parser.add_argument(
        "--set", dest="settings", type=setting, action="append", default=[],
        metavar="KEY=VALUE", help="A params override, e.g. train.steps=20.",
    )  # fmt: skip
    parser.add_argument("--stages", default="download,prepare,train,sample,evaluate,nll",
                        help=f"Comma-separated, in order, of {', '.join(STAGES)}.")  # fmt: skip
    parser.add_argument("--report", type=Path, help="Write the timings as JSON here.")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")
    work = args.work.resolve()
    params = write_params(work, args.preset, args.settings)
    results = run_stages(work, stages)
    ok = len(results) == len(stages) and all(r["exit_code"] == 0 for r in results.values())
    report = {"preset": args.preset, "ok": ok, "stages": results, "params": params}
    for name in ("train", "eval", "nll"):
        path = work / "metrics" / f"{name}.json"
        if path.exists():
            report[f"{name}_metrics"] = json.loads(path.read_text())
    if args.report:
        args.report.write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
