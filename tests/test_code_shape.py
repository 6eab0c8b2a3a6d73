"""The shape a newcomer can hold in their head: short functions, and layers that only look down.

``ddpm`` is the library: it never imports the pipeline, the CLI or the trackers. Within it and
within ``pipeline``, training and sampling are siblings (tests/test_dag.py checks the imports).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.glob("ddpm/**/*.py"), *ROOT.glob("pipeline/**/*.py")])
MAX_LINES = 60


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_is_longer_than_a_screen(path):
    tree = ast.parse(path.read_text())
    long = [
        f"{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_LINES
    ]
    assert not long, f"{path.relative_to(ROOT)}: split {long} into named helpers"


LIBRARY = [p for p in SOURCES if p.relative_to(ROOT).parts[0] == "ddpm"]


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_never_imports_the_pipeline_or_its_tools(path):
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    banned = {"pipeline", "typer", "mlflow", "dvc", "torch_fidelity", "diffusers"}
    assert not {name.split(".")[0] for name in names} & banned
