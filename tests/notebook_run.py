"""Running examples/*.ipynb as a user's Jupyter would (importable as ``notebook_run``: pytest
puts this folder on ``sys.path`` for its conftest): nbclient, the ``python3`` kernel, which
jupyter_client starts with this interpreter, the venv's own Python."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def execute(path: Path, cwd: Path, timeout: int = 300) -> nbformat.NotebookNode:
    """``path`` run top to bottom in a fresh kernel working in ``cwd``; the executed notebook.

    A cell that raises fails the call (nbclient's CellExecutionError, with the traceback).
    The kernel gets one CPU thread (tiny models run faster on one thread than on two busy
    ones) and no ``MLFLOW_TRACKING_URI``, so a project's own ``mlflow.db`` is the store.
    """
    nb = nbformat.read(path, as_version=4)
    env = dict(os.environ, DDPM_NUM_THREADS="1", OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    client = NotebookClient(
        nb, kernel_name="python3", timeout=timeout, resources={"metadata": {"path": str(cwd)}}
    )
    client.execute(env=env)
    return nb


def cell(nb: nbformat.NotebookNode, cell_id: str) -> nbformat.NotebookNode:
    """The cell with this id (the notebooks name their cells by what they do)."""
    (found,) = [c for c in nb.cells if c.get("id") == cell_id]
    return found


def mime_types(code_cell: nbformat.NotebookNode) -> set[str]:
    """The MIME types of a code cell's displayed outputs (``image/png``, ``text/html``, ...)."""
    return {kind for out in code_cell.outputs for kind in out.get("data", {})}


def stdout(code_cell: nbformat.NotebookNode) -> str:
    return "".join(o.text for o in code_cell.outputs if o.output_type == "stream")
