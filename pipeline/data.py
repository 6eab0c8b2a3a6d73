"""The data stages: ``download`` fetches the raw archive, ``prepare`` makes the prepared split.

``download`` writes ``<raw-dir>/<archive>`` (verified, resumable; nothing to do for imagefolder
and synthetic); ``prepare`` writes ``<out-dir>/`` in the format of :mod:`ddpm.data.prepared`.
Raw archives and prepared splits are separate DVC outputs, so changing a split or size param
reruns only ``prepare``. Bad input ends the stage with one message: exit code 2 for
params.yaml, 1 for the data.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

import ddpm.data
from ddpm.data import (
    ChecksumError,
    DataError,
    DataRequest,
    MissingArchiveError,
    OfflineError,
    build_dataset,
    resolve_source,
    write_prepared,
)
from pipeline.settings import Params, ParamsError, load_params

ParamsOption = Annotated[Path, typer.Option("--params", help="The params.yaml to read.")]
RawDirOption = Annotated[Path, typer.Option("--raw-dir", help="Folder of raw archives.")]
OutDirOption = Annotated[Path, typer.Option("--out-dir", help="Prepared split folder.")]

_HINTS = {
    OfflineError: "Or set `dataset: synthetic`: `make smoke` runs the whole pipeline offline.",
    MissingArchiveError: "Run `pipeline download` first.",
    ChecksumError: "An archive from a mirror with other contents needs its md5 in data.md5.",
}


def download(
    params: ParamsOption = Path("params.yaml"), raw_dir: RawDirOption = Path("data/raw")
) -> None:
    """Fetch and verify the raw archive of the chosen dataset (skipped when already valid)."""
    with _user_errors():
        p = load_params(params)
        raw_dir.mkdir(parents=True, exist_ok=True)
        source = resolve_source(p.dataset, p.data.url, p.data.md5)
        if source is None:
            typer.echo(f"dataset {p.dataset!r} has nothing to download; {raw_dir}/ left as is")
            return
        path = ddpm.data.download(source.url, raw_dir / source.filename, source.md5)
        typer.echo(f"{path}: md5 {source.md5} verified")


def prepare(
    params: ParamsOption = Path("params.yaml"),
    raw_dir: RawDirOption = Path("data/raw"),
    out_dir: OutDirOption = Path("data/prepared"),
) -> None:
    """Extract the chosen dataset into train/val uint8 arrays, labels and a manifest."""
    with _user_errors():
        p = load_params(params)
        manifest = write_prepared(out_dir, build_dataset(_request(p, raw_dir)))
        _summarise(manifest, out_dir)


def _request(p: Params, raw_dir: Path) -> DataRequest:
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


@contextmanager
def _user_errors() -> Iterator[None]:
    """Bad params.yaml: message and exit 2; bad data or no network: message and exit 1."""
    try:
        yield
    except ParamsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except DataError as exc:
        hint = next((h for kind, h in _HINTS.items() if isinstance(exc, kind)), "")
        typer.echo(f"error: {exc}" + (f"\n{hint}" if hint else ""), err=True)
        raise typer.Exit(1) from None
