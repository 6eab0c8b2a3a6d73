"""A folder of the user's own images (png, jpg, jpeg, webp; nested to any depth).

Classes: when every image lies inside a first-level subfolder (``root/<class>/.../x.png``), the
subfolder names, sorted, are the classes; otherwise the images have no labels (``-1``). Each
image is converted to RGB, centre-cropped to a square and resized to ``image_size``. Images
smaller than ``image_size`` are upscaled and counted in the manifest. Unreadable files are
skipped and named, or fail the whole run, as ``bad_images`` says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from ddpm.data.errors import DataError
from ddpm.data.images import IMAGE_SUFFIXES, decode_rgb, to_square_array
from ddpm.data.split import NO_LABEL, Extracted, seeded_split, val_count
from ddpm.progress import Progress

SHOWN_BAD = 5
"""How many unreadable paths an error message names."""


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
) -> Extracted:
    """Read, square and resize every image under ``folder``; split off ``val_fraction``.

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
    images, ok, upscaled = _decode_all(paths, image_size, progress)
    bad = [
        path.relative_to(folder).as_posix()
        for path, good in zip(paths, ok, strict=True)
        if not good
    ]
    _check_bad(folder, bad, len(paths), bad_images)
    splits = seeded_split(images[ok], labels[ok], val_count(int(ok.sum()), val_fraction), seed)
    info = {
        "num_files": len(paths),
        "num_skipped": len(bad),
        "skipped": bad[:100],
        "num_upscaled": upscaled,
    }
    return Extracted(splits, class_names, info)


def _decode_all(paths: list[Path], size: int, progress: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """uint8 (N, size, size, 3) images, bool (N,) mask of the readable ones, upscaled count."""
    images = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    upscaled = 0
    with Progress(len(paths), "images", "img", enabled=progress) as bar:
        for i, path in enumerate(paths):
            bar.update()
            try:
                image = decode_rgb(path)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # broken
                continue
            upscaled += min(image.size) < size
            images[i] = to_square_array(image, size)
            ok[i] = True
    return images, ok, upscaled


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
