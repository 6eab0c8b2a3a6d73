"""Arrays of one split, what every source module returns, and the seeded train/val split.

Every reader in :mod:`ddpm.data` returns an :class:`Extracted`: named :class:`Split` arrays
(``train`` and ``val``), the class names, and a ``source`` dict for the manifest. Labels index
``class_names``; a source without classes has ``class_names == []`` and labels ``-1``, so that
using them by mistake fails loudly instead of training on a fake class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ddpm.data.errors import DataError

NO_LABEL = -1


class RowFile:
    """Some rows, in order, of a headerless uint8 file of images (M, H, W, 3): a split too big
    to hold in memory, read a slice at a time (``rows[a:b]`` is an array) when it is written.

    It has what the writer uses of an array: ``shape``, ``dtype``, ``ndim``, ``len`` and slices.
    """

    def __init__(self, path: Path, row_shape: tuple[int, ...], index: np.ndarray) -> None:
        self.path, self.row_shape = Path(path), tuple(row_shape)
        self.index = np.asarray(index, dtype=np.int64)
        self.dtype, self.ndim = np.dtype(np.uint8), 1 + len(self.row_shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.row_shape)

    def __len__(self) -> int:
        return len(self.index)

    def take(self, index: np.ndarray) -> RowFile:
        """The rows at ``index`` (positions in this selection), still on disk."""
        return RowFile(self.path, self.row_shape, self.index[index])

    def __getitem__(self, key: slice) -> np.ndarray:
        rows = self.index[key]
        out = np.empty((len(rows), *self.row_shape), dtype=np.uint8)
        size = int(np.prod(self.row_shape))
        with open(self.path, "rb") as f:
            for j, i in enumerate(rows.tolist()):
                f.seek(i * size)
                if f.readinto(out[j]) != size:
                    raise DataError(f"{self.path} ends before row {i}; prepare it again")
        return out


class Split(NamedTuple):
    """One split.

    Attributes:
        images: uint8 (N, H, W, 3), RGB, channels last: an array, or a :class:`RowFile`.
        labels: int64 (N,), indices into the class names, or ``NO_LABEL``.
    """

    images: np.ndarray | RowFile
    labels: np.ndarray


class Extracted(NamedTuple):
    """A data set turned into arrays, ready to be written by :func:`ddpm.data.write_prepared`.

    Attributes:
        splits: ``{"train": Split, "val": Split}``, and ``"test"`` where the data set has its
            own test files (CIFAR-10's test_batch).
        class_names: the name of each label (empty when the source has no classes).
        info: what the manifest records: dataset, image_size, seed, source, ...
    """

    splits: dict[str, Split]
    class_names: list[str]
    info: dict[str, Any]


def make_split(images: np.ndarray | RowFile, labels: np.ndarray) -> Split:
    """Check shapes and dtypes at the boundary and return a contiguous :class:`Split`."""
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3); got {images.dtype} {images.shape}")
    if labels.shape != (len(images),):
        raise ValueError(f"labels must be ({len(images)},); got {labels.shape}")
    if not isinstance(images, RowFile):
        images = np.ascontiguousarray(images)
    return Split(images, np.ascontiguousarray(labels, dtype=np.int64))


def val_count(n: int, val_fraction: float) -> int:
    """Validation images for ``n`` images: round(n * fraction), at least 1 when asked for any."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction}")
    count = max(round(n * val_fraction), 1) if val_fraction > 0 else 0
    if count >= n:
        raise DataError(
            f"{n} images leave none for training with val_fraction={val_fraction}; "
            "add images or lower val_fraction"
        )
    return count


def seeded_split(
    images: np.ndarray | RowFile, labels: np.ndarray, val_size: int, seed: int
) -> dict[str, Split]:
    """Hold out ``val_size`` images chosen by a seeded shuffle; both parts keep source order.

    Args:
        images: uint8 (N, H, W, 3), an array or a :class:`RowFile` (the parts stay on disk).
        labels: int64 (N,).
        val_size: images in the validation split, 0 <= val_size < N.
        seed: seeds ``np.random.default_rng``; the same seed gives the same split.

    Returns:
        ``{"train": Split (N - val_size), "val": Split (val_size)}``.
    """
    n = len(images)
    if not 0 <= val_size < n:
        raise DataError(f"val_size={val_size} must be at least 0 and below the {n} images")
    order = np.random.default_rng(seed).permutation(n)
    val, train = np.sort(order[:val_size]), np.sort(order[val_size:])
    pick = images.take if isinstance(images, RowFile) else images.__getitem__
    return {
        "train": make_split(pick(train), labels[train]),
        "val": make_split(pick(val), labels[val]),
    }


def check_image_size(image_size: int, native: int, dataset: str) -> None:
    """Refuse to upscale: ``image_size`` must not exceed the data set's ``native`` size."""
    if not 1 <= image_size <= native:
        raise DataError(
            f"image_size={image_size} is not available from {dataset}, whose images are "
            f"{native}x{native}; choose image_size <= {native} (smaller sizes are downscaled) "
            "or another dataset"
        )
