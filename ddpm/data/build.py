"""One entry point from a data-set name and its options to arrays: :func:`build_dataset`.

Archive-based data sets verify their archive's md5 before reading it, so a corrupt or
substituted file is reported by name before any decoding. Every result carries, in its
``info``, the data set, image size, seed and source, which end up in the manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ddpm.data.cifar10 import cifar10_cars, cifar10_full
from ddpm.data.download import verify_md5
from ddpm.data.errors import DataError, MissingArchiveError
from ddpm.data.imagefolder import image_folder
from ddpm.data.sources import DATASETS, NATIVE_SIZES, resolve_source
from ddpm.data.split import Extracted, check_image_size
from ddpm.data.synthetic import synthetic
from ddpm.data.tiny_imagenet import tiny_imagenet


@dataclass(frozen=True)
class DataRequest:
    """What to build. Fields a data set does not use are ignored.

    Attributes:
        dataset: one of :data:`ddpm.data.sources.DATASETS`.
        image_size: side of the square output images, in pixels.
        seed: seeds the train/val shuffle and the synthetic images.
        raw_dir: folder holding the downloaded archive (archive data sets).
        url, md5: mirror URL and checksum; empty for the official ones.
        image_folder: the user's images (imagefolder).
        val_size: validation images held out of the 5,000 cars (cifar10-cars).
        val_fraction: share held out for validation (imagefolder, synthetic).
        num_images: images to generate (synthetic).
        bad_images: unreadable files in an image folder: skip them or fail.
        progress: show progress bars on stderr when it is a terminal.
        work_dir: scratch space for an image folder's decoded images, which then never sit in
            memory whole; it must outlive the result (until the splits are written).
    """

    dataset: str
    image_size: int
    seed: int = 0
    raw_dir: Path | None = None
    url: str = ""
    md5: str = ""
    image_folder: Path | None = None
    val_size: int = 750
    val_fraction: float = 0.1
    num_images: int = 2000
    bad_images: Literal["skip", "fail"] = "skip"
    progress: bool = True
    work_dir: Path | None = None


def build_dataset(request: DataRequest) -> Extracted:
    """Turn the source that ``request`` names into train and val arrays.

    Raises:
        ValueError: an unknown data set name (listing the known ones).
        DataError: bad input (a missing or corrupt archive, an empty folder, an image size the
            data cannot give, ...), raised before any decoding where it can be known then.
    """
    if request.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {request.dataset!r}; choose one of {list(DATASETS)}")
    if request.dataset in NATIVE_SIZES:
        check_image_size(request.image_size, NATIVE_SIZES[request.dataset], request.dataset)
    extracted = _BUILDERS[request.dataset](request)
    info = {"dataset": request.dataset, "image_size": request.image_size, "seed": request.seed}
    return extracted._replace(info={**info, "source": _source_info(request), **extracted.info})


def archive_path(request: DataRequest) -> Path:
    """Where the archive of an archive-based data set is expected: ``raw_dir/<official name>``."""
    source = resolve_source(request.dataset, request.url, request.md5)
    if source is None or request.raw_dir is None:
        raise ValueError(f"dataset {request.dataset!r} needs no archive, or raw_dir is unset")
    return Path(request.raw_dir) / source.filename


def _verified_archive(request: DataRequest) -> Path:
    source = resolve_source(request.dataset, request.url, request.md5)
    path = archive_path(request)
    if not path.is_file():
        raise MissingArchiveError(
            f"{path} is missing; download it first, or fetch {source.url} by hand and put it "
            f"there (md5 {source.md5})"
        )
    verify_md5(path, source.md5)
    return path


def _source_info(request: DataRequest) -> dict[str, Any]:
    source = resolve_source(request.dataset, request.url, request.md5)
    if source is not None:
        return {"url": source.url, "archive": source.filename, "md5": source.md5}
    if request.dataset == "imagefolder":
        return {"folder": str(request.image_folder)}
    return {"generator": "ddpm.data.synthetic"}


def _image_folder(r: DataRequest) -> Extracted:
    if r.image_folder is None or not str(r.image_folder).strip():
        raise DataError("dataset 'imagefolder' needs an image folder; none was given")
    return image_folder(
        r.image_folder,
        image_size=r.image_size,
        val_fraction=r.val_fraction,
        seed=r.seed,
        bad_images=r.bad_images,
        progress=r.progress,
        work_dir=r.work_dir,
    )


_BUILDERS: dict[str, Callable[[DataRequest], Extracted]] = {
    "cifar10-cars": lambda r: cifar10_cars(
        _verified_archive(r), image_size=r.image_size, val_size=r.val_size, seed=r.seed
    ),
    "cifar10": lambda r: cifar10_full(_verified_archive(r), image_size=r.image_size),
    "tiny-imagenet": lambda r: tiny_imagenet(
        _verified_archive(r), image_size=r.image_size, progress=r.progress
    ),
    "imagefolder": _image_folder,
    "synthetic": lambda r: synthetic(
        num_images=r.num_images, image_size=r.image_size, val_fraction=r.val_fraction, seed=r.seed
    ),
}
assert set(_BUILDERS) == set(DATASETS)
