"""A folder of the user's own images (png, jpg, jpeg, webp; nested to any depth).

Classes: when every image lies inside a first-level subfolder (``root/<class>/.../x.png``), the
subfolder names, sorted, are the classes; otherwise the images have no labels (``-1``). Each
image is converted to RGB, centre-cropped to a square and resized to ``image_size``. Images
smaller than ``image_size`` are upscaled and counted in the manifest. Unreadable files are
skipped and named, or fail the whole run, as ``bad_images`` says.

Large folders decode in worker processes, one per CPU core. Given a ``work_dir``, the decoded
images go straight to a file there and the splits are :class:`~ddpm.data.split.RowFile` views
of it, so memory stays bounded whatever the folder's size (CelebA's 200,000 images included).
"""

from __future__ import annotations

import functools
import multiprocessing
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np

from ddpm.data.errors import DataError
from ddpm.data.images import IMAGE_SUFFIXES, decode_square
from ddpm.data.split import NO_LABEL, Extracted, RowFile, seeded_split, val_count
from ddpm.progress import Progress

SHOWN_BAD = 5
"""How many unreadable paths an error message names."""
PARALLEL_FROM = 500
"""Folders with fewer images decode in this process: starting the workers costs about 1 s."""
DECODED = "decoded-images.u8"
"""The file in ``work_dir`` that holds the decoded images, headerless uint8 (N, S, S, 3)."""


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (by suffix, any case), sorted; hidden files are left out."""
    return sorted(
        path
        for path in Path(folder).rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def class_labels(folder: Path, paths: list[Path]) -> tuple[np.ndarray, list[str]]:
    """Labels from first-level subfolders when every image is inside one; else all -1, no names."""
    tops = [path.relative_to(folder).parts for path in paths]
    if not tops or any(len(parts) < 2 for parts in tops):
        return np.full(len(paths), NO_LABEL, dtype=np.int64), []
    names = sorted({parts[0] for parts in tops})
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[parts[0]] for parts in tops], dtype=np.int64), names


def image_folder(
    folder: Path,
    *,
    image_size: int,
    val_fraction: float = 0.1,
    seed: int = 0,
    bad_images: Literal["skip", "fail"] = "skip",
    progress: bool = True,
    work_dir: Path | None = None,
    workers: int | None = None,
) -> Extracted:
    """Read, square and resize every image under ``folder``; split off ``val_fraction``.

    Args:
        work_dir: where the decoded images are kept on disk until the splits are written (it
            must outlive the returned splits); None: in memory.
        workers: decoding processes; None: one per CPU core from ``PARALLEL_FROM`` images.

    Raises:
        DataError: the folder is missing or holds no images, every image is unreadable, or
            some are and ``bad_images == "fail"``; the message names the first few.
    """
    if bad_images not in ("skip", "fail"):
        raise ValueError(f"bad_images must be 'skip' or 'fail'; got {bad_images!r}")
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist or is not a folder")
    paths = list_images(folder)
    if not paths:
        raise DataError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}), nested or not")
    val_count(len(paths), val_fraction)  # too few images: fail before decoding any
    labels, class_names = class_labels(folder, paths)
    images, ok, upscaled = _decode_all(paths, image_size, progress, work_dir, workers)
    bad = [
        path.relative_to(folder).as_posix()
        for path, good in zip(paths, ok, strict=True)
        if not good
    ]
    _check_bad(folder, bad, len(paths), bad_images)
    splits = seeded_split(images, labels[ok], val_count(int(ok.sum()), val_fraction), seed)
    info = {
        "num_files": len(paths),
        "num_skipped": len(bad),
        "skipped": bad[:100],
        "num_upscaled": upscaled,
    }
    return Extracted(splits, class_names, info)


def _decode_all(
    paths: list[Path], size: int, progress: bool, work_dir: Path | None, workers: int | None
) -> tuple[np.ndarray | RowFile, np.ndarray, int]:
    """The readable images in path order, uint8 (n_ok, size, size, 3) in memory or, given a
    ``work_dir``, in a :class:`RowFile`; the bool (N,) mask of the readable paths; how many
    were upscaled."""
    ok = np.zeros(len(paths), dtype=bool)
    upscaled = 0

    def readable() -> Iterator[np.ndarray]:
        nonlocal upscaled
        with (
            Progress(len(paths), "images", "img", enabled=progress) as bar,
            _decoded(paths, size, workers) as decoded,
        ):
            for i, (image, small) in enumerate(decoded):
                bar.update()
                if image is not None:
                    ok[i], upscaled = True, upscaled + small
                    yield image

    if work_dir is None:
        rows = list(readable())
        images = np.stack(rows) if rows else np.zeros((0, size, size, 3), np.uint8)
        return images, ok, upscaled
    path = Path(work_dir) / DECODED
    with open(path, "wb") as sink:
        for image in readable():
            sink.write(image.data)
    return RowFile(path, (size, size, 3), np.arange(int(ok.sum()))), ok, upscaled


@contextmanager
def _decoded(
    paths: list[Path], size: int, workers: int | None
) -> Iterator[Iterator[tuple[np.ndarray | None, bool]]]:
    """``decode_square`` of every path, in order: here, or in a pool of worker processes."""
    decode = functools.partial(decode_square, size=size)
    if workers is None:
        workers = (os.cpu_count() or 1) if len(paths) >= PARALLEL_FROM else 1
    if workers <= 1:
        yield map(decode, paths)
        return
    # spawn: the parent may hold threads (torch's), which fork would copy in a broken state
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield pool.imap(decode, paths, chunksize=32)


def _check_bad(folder: Path, bad: list[str], total: int, bad_images: str) -> None:
    if not bad or (bad_images == "skip" and len(bad) < total):
        return
    shown = ", ".join(bad[:SHOWN_BAD]) + (", ..." if len(bad) > SHOWN_BAD else "")
    fix = (
        "fix or remove them, or set bad_images to 'skip'"
        if len(bad) < total
        else "check the folder"
    )
    raise DataError(f"{len(bad)} of {total} images under {folder} cannot be read ({shown}); {fix}")
