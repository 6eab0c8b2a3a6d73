"""The GPU check's plumbing, proven on the CPU before a GPU is lent: ``make gpu-check-dry``
runs scripts/gpu_check.sh with tiny sizes (tests/gpu on the CPU, the stage commands, the GPU
bench) and must leave a report that says every step passed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What the check or make read from the environment; a user's shell sets none of them.
NOT_A_USERS = ("GPU_CHECK_WORK", "DDPM_GPU_TESTS_DEVICE", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")


@pytest.mark.slow
def test_the_gpu_check_dry_run_passes_and_reports_every_step():
    """``make gpu-check-dry`` as a user runs it, in the repository, into .gpu-dry/."""
    if subprocess.run(["make", "-q", ".venv/.installed"], cwd=ROOT).returncode != 0:
        pytest.skip("the venv is older than the lock file: `make install` first")
    out = ROOT / ".gpu-dry"
    shutil.rmtree(out, ignore_errors=True)  # as on a fresh clone
    env = {k: v for k, v in os.environ.items() if k not in NOT_A_USERS}
    result = subprocess.run(
        ["make", "gpu-check-dry"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    # at most 8 files come back from a device machine: the report, and a log a step
    assert sorted(p.name for p in out.iterdir()) == [
        "bench.log", "report.json", "report.md", "stages.log", "tests.log"
    ]  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] and [s["step"] for s in report["steps"]] == ["tests", "stages", "bench"]
    tests = report["tests"]
    assert tests["passed"] >= 9 and tests["failures"] == tests["errors"] == 0  # ran on the CPU
    stages = report["stages"]["stages"]
    assert list(stages) == ["download", "prepare", "train", "sample", "evaluate", "nll"]
    assert report["stages"]["train_metrics"]["steps"] == 8
    assert report["stages"]["nll_metrics"]["stride"] == 10
    bench = report["bench"]
    assert bench["training"]["eager"]["images_per_second"] > 0
    assert bench["sampling"]["weights"].endswith("models/ema.pt")  # the run's trained model
    assert bench["fid"]["seconds_cached_reference"] > 0 and bench["verdicts"]
    text = (out / "report.md").read_text()
    assert "| tests | 0 |" in text and "train bf16 eager" in text and "FID+KID+IS" in text
    assert "bits/dim of 15 val images, stride 10" in text


def test_a_failed_step_fails_the_check_and_the_others_still_run(tmp_path):
    """A broken interpreter for the steps: each step fails, the report says so, exit 1."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\ncase "$1" in scripts/gpu_report.py) exec {sys.executable} "$@";; '
                    '*) exit 7;; esac\n')  # fmt: skip
    fake.chmod(0o755)
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in NOT_A_USERS}
    env |= {"PYTHON": str(fake), "TMPDIR": str(tmp)}  # its own work folder, in tmp
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--dry"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    assert not report["ok"]
    assert [(s["step"], s["exit_code"]) for s in report["steps"]] == [
        ("tests", 7), ("stages", 7), ("bench", 7)
    ]  # fmt: skip
    assert list(tmp.iterdir()) == []  # the work folder is gone
