"""examples/*.ipynb: committed without outputs, and library.ipynb run top to bottom as a user's
Jupyter would run it (explore.ipynb needs a project: tests/test_smoke.py runs it on the smoke
project)."""

from __future__ import annotations

import re
import subprocess
import sys

import nbformat
import pytest
from notebook_run import EXAMPLES, ROOT, cell, execute, mime_types, stdout

sys.path.insert(0, str(ROOT / "scripts"))
from strip_notebooks import as_text, stripped

NOTEBOOKS = ("explore.ipynb", "library.ipynb")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_stripped(name):
    """No outputs, no execution counts, no metadata beyond the python3 kernelspec and cell
    tags, in the text the strip tool writes: a notebook saved from an editor fails here."""
    text = (EXAMPLES / name).read_text(encoding="utf-8")
    nb = nbformat.reads(text, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code), name
    assert set(nb.metadata) == {"kernelspec"} and nb.metadata.kernelspec.name == "python3"
    assert all(set(c.metadata) <= {"tags"} for c in nb.cells), name
    assert text == as_text(stripped(nb)), f"{name}: run `make strip-notebooks` and commit"


def test_the_strip_tool_checks_and_strips_a_notebook_with_outputs(tmp_path):
    path = tmp_path / "run.ipynb"
    nb = nbformat.read(EXAMPLES / "library.ipynb", as_version=4)
    nb.metadata["language_info"] = {"name": "python", "version": "3.11.9"}
    first = next(c for c in nb.cells if c.cell_type == "code")
    first.execution_count, first.metadata["execution"] = 1, {"iopub.status.idle": "now"}
    first.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hello\n")]
    nbformat.write(nb, path)
    tool = [sys.executable, str(ROOT / "scripts" / "strip_notebooks.py")]
    check = subprocess.run([*tool, "--check", str(path)], capture_output=True, text=True)
    assert check.returncode == 1 and "not stripped" in check.stdout, check
    assert "make strip-notebooks" in check.stderr
    subprocess.run([*tool, str(path)], check=True, capture_output=True)
    assert path.read_text() == (EXAMPLES / "library.ipynb").read_text()
    subprocess.run([*tool, "--check", str(path)], check=True, capture_output=True)


def test_library_notebook_trains_samples_and_plots():
    nb = execute(EXAMPLES / "library.ipynb", cwd=EXAMPLES)
    printed = stdout(cell(nb, "train"))
    losses = re.search(r"first 10 steps ([\d.]+), over the last 10 ([\d.]+)", printed)
    assert losses, printed
    first, last = map(float, losses.groups())
    assert last < first / 2, (first, last)  # L_simple starts near 1 (a zero-output net)
    assert "image/png" in mime_types(cell(nb, "data"))
    assert "image/png" in mime_types(cell(nb, "sample"))  # the samples beside the loss curve
    assert as_text(stripped(nb)) == (EXAMPLES / "library.ipynb").read_text()
