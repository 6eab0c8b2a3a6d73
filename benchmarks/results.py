"""benchmarks/RESULTS.md holds one section per benchmark script; each script rewrites only its
own, between ``<!-- NAME -->`` and ``<!-- /NAME -->``, and keeps the others."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def write_section(path: Path, name: str, text: str) -> None:
    """Put ``text`` in the section ``name`` of ``path``: in place of its old text, or at the end."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{begin}\n{text.strip()}\n{end}\n"
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        new = (old.rstrip("\n") + "\n\n" if old.strip() else "") + block
    path.write_text(new)
