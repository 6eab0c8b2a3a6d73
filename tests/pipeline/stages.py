"""Helpers shared by the stage tests (importable as ``stages``: pytest puts this folder on
``sys.path`` for the tests in it)."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from pipeline.cli import app


def prepare_split(root: Path, params: dict) -> Path:
    """Run the real ``prepare`` stage with ``params`` in ``root``; return the prepared folder."""
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(
        app, ["prepare", "--params", str(root / "params.yaml"), "--out-dir", str(root / "data")]
    )
    assert result.exit_code == 0, result.output
    return root / "data"
