"""The command line as a person meets it: ``--help`` answers at once.

How fast is a property of what ``--help`` imports, so that is what is checked (a timed test
would be noise on a shared machine): torch, MLflow and torch-fidelity take seconds to import,
and only the command that needs them may load them. Measured on the 2-core dev machine:
``python -m pipeline.cli train --help`` takes 0.2 s (4.5 s before the commands imported lazily).
"""

from __future__ import annotations

import pytest
from probe import cli_imports

HEAVY = {"torch", "mlflow", "torch_fidelity", "torchvision", "numpy", "PIL"}


def imported_with(args: list[str], code: int = 0) -> tuple[str, set[str]]:
    """The output and the top-level packages ``python -m pipeline.cli ARGS`` imports."""
    text, names = cli_imports(args, code)
    return text, {name.split(".")[0] for name in names}


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
