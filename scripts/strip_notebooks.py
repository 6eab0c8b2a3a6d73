"""Strip Jupyter notebooks to the form git holds: each cell's source and tags, nothing run.

Outputs, execution counts and the metadata an editor adds (timings, widths, the kernel's
``language_info``) change on every run and bury the diff that matters, so the committed
notebooks keep only their cells' sources and tags and the notebook's ``kernelspec``.
``make strip-notebooks`` rewrites ``examples/*.ipynb`` in place; ``--check`` only lists the
notebooks that are not stripped and exits 1 (tests/test_notebooks.py is the guard).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

from ddpm.files import atomic_write_bytes

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_METADATA = ("kernelspec",)
CELL_METADATA = ("tags",)


def stripped(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of ``nb`` without outputs, execution counts or metadata beyond the kept keys."""
    nb = nbformat.from_dict(nb)
    nb.metadata = {k: v for k, v in nb.metadata.items() if k in NOTEBOOK_METADATA}
    for cell in nb.cells:
        cell.metadata = {k: v for k, v in cell.metadata.items() if k in CELL_METADATA}
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb


def as_text(nb: nbformat.NotebookNode) -> str:
    """The notebook as nbformat writes it to a file (one-space indent, sorted keys, a final
    newline), so that a stripped notebook has exactly one text."""
    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"


def strip_file(path: Path, check: bool) -> bool:
    """Whether ``path`` was already stripped; rewrites it (atomically) when not and not
    ``check``."""
    text = path.read_text(encoding="utf-8")
    clean = as_text(stripped(nbformat.reads(text, as_version=nbformat.NO_CONVERT)))
    if clean != text and not check:
        atomic_write_bytes(path, clean.encode("utf-8"))
    return clean == text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="Notebooks (examples/*.ipynb).")
    parser.add_argument("--check", action="store_true", help="Change nothing; exit 1 if any is.")
    args = parser.parse_args()
    paths = args.paths or sorted((ROOT / "examples").glob("*.ipynb"))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        sys.exit(f"no such notebook: {', '.join(missing)}")
    dirty = [p for p in paths if not strip_file(p, args.check)]
    for path in dirty:
        print(f"{path}: {'not stripped' if args.check else 'stripped'}")
    if args.check and dirty:
        sys.exit("run `make strip-notebooks` (scripts/strip_notebooks.py) and commit the result")


if __name__ == "__main__":
    main()
