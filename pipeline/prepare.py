"""``pipeline prepare``: the raw archive (or folder, or generator) to the prepared split.

It writes ``<out-dir>/`` in the format of :mod:`ddpm.data.prepared`. Raw archives and prepared
splits are separate DVC outputs, so changing a split or size param reruns only ``prepare``.
Bad input ends the stage with one message: exit code 2 for params.yaml, 1 for the data.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import typer

from ddpm.data.build import DataRequest, build_dataset
from ddpm.data.prepared import write_prepared
from pipeline.errors import stage_errors
from pipeline.settings import Params, load_params


def prepare_stage(params: Path, raw_dir: Path, out_dir: Path) -> None:
    """Extract the chosen dataset into train/val uint8 arrays, labels and a manifest."""
    with stage_errors():
        p = load_params(params)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        # An image folder's decoded images wait on disk, beside the output, not in memory.
        scratch = tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.work-", dir=out_dir.parent)
        with scratch as work:
            manifest = write_prepared(out_dir, build_dataset(_request(p, raw_dir, Path(work))))
        _summarise(manifest, out_dir)


def _request(p: Params, raw_dir: Path, work_dir: Path) -> DataRequest:
    return DataRequest(
        dataset=p.dataset,
        image_size=p.image_size,
        seed=p.seed,
        raw_dir=raw_dir,
        url=p.data.url,
        md5=p.data.md5,
        image_folder=Path(p.image_folder) if p.image_folder else None,
        val_size=p.data.val_size,
        val_fraction=p.data.val_fraction,
        num_images=p.data.num_images,
        bad_images=p.data.bad_images,
        work_dir=work_dir,
    )


def _summarise(manifest: dict[str, Any], out_dir: Path) -> None:
    counts = ", ".join(f"{name} {s['count']}" for name, s in manifest["splits"].items())
    size, classes = manifest["image_size"], manifest["num_classes"]
    typer.echo(f"{out_dir}: {manifest['dataset']} {size}x{size}, {classes} classes: {counts}")
    if manifest.get("num_skipped"):
        shown = ", ".join(manifest["skipped"][:5])
        typer.echo(f"skipped {manifest['num_skipped']} unreadable images: {shown}", err=True)
    if manifest.get("num_upscaled"):
        n = manifest["num_upscaled"]
        typer.echo(f"warning: {n} images were smaller than {size}px and upscaled", err=True)
