"""``pipeline download``: fetch the raw archive of the chosen data set into ``<raw-dir>/``.

Verified by md5, resumable, retried; no network I/O when a valid archive is there; nothing to
do for imagefolder and synthetic. Bad input ends the stage with one message: exit code 2 for
params.yaml, 1 for the data or the network.
"""

from __future__ import annotations

from pathlib import Path

import typer

import ddpm.data.download as downloads
from ddpm.data.sources import resolve_source
from pipeline.errors import stage_errors
from pipeline.settings import load_params


def download_stage(params: Path, raw_dir: Path) -> None:
    """Fetch and verify the raw archive of the chosen dataset (skipped when already valid)."""
    with stage_errors():
        p = load_params(params)
        raw_dir.mkdir(parents=True, exist_ok=True)
        source = resolve_source(p.dataset, p.data.url, p.data.md5)
        if source is None:
            typer.echo(f"dataset {p.dataset!r} has nothing to download; {raw_dir}/ left as is")
            return
        path = downloads.download(source.url, raw_dir / source.filename, source.md5)
        typer.echo(f"{path}: md5 {source.md5} verified")
