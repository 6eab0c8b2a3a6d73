"""What ``python -m pipeline.cli ARGS`` imports (importable as ``probe``: pytest puts this
folder on ``sys.path`` for its conftest). Used by the DAG test and the --help test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli_imports(args: list[str], code: int = 0) -> tuple[str, set[str]]:
    """The command's output and every module it imported, by ``python -X importtime``.

    Asserts that the command exits with ``code``.
    """
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pipeline.cli", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == code, done.stderr[-2000:]
    names = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    return done.stdout + done.stderr, names
