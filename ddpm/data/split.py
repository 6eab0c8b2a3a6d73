"""Arrays of one split, what every source module returns, and the seeded train/val split.

Every reader in :mod:`ddpm.data` returns an :class:`Extracted`: named :class:`Split` arrays
(``train`` and ``val``), the class names, and a ``source`` dict for the manifest. Labels index
``class_names``; a source without classes has ``class_names == []`` and labels ``-1``, so that
using them by mistake fails loudly instead of training on a fake class.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ddpm.data.errors import DataError

NO_LABEL = -1


class Split(NamedTuple):
    """One split in memory.

    Attributes:
        images: uint8 (N, H, W, 3), RGB, channels last.
        labels: int64 (N,), indices into the class names, or ``NO_LABEL``.
    """

    images: np.ndarray
    labels: np.ndarray


class Extracted(NamedTuple):
    """A data set turned into arrays, ready to be written by :func:`ddpm.data.write_prepared`.

    Attributes:
        splits: ``{"train": Split, "val": Split}``.
        class_names: the name of each label (empty when the source has no classes).
        info: what the manifest records: dataset, image_size, seed, source, ...
    """

    splits: dict[str, Split]
    class_names: list[str]
    info: dict[str, Any]


def make_split(images: np.ndarray, labels: np.ndarray) -> Split:
    """Check shapes and dtypes at the boundary and return a contiguous :class:`Split`."""
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3); got {images.dtype} {images.shape}")
    if labels.shape != (len(images),):
        raise ValueError(f"labels must be ({len(images)},); got {labels.shape}")
    return Split(np.ascontiguousarray(images), np.ascontiguousarray(labels, dtype=np.int64))


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
    images: np.ndarray, labels: np.ndarray, val_size: int, seed: int
) -> dict[str, Split]:
    """Hold out ``val_size`` images chosen by a seeded shuffle; both parts keep source order.

    Args:
        images: uint8 (N, H, W, 3).
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
    return {
        "train": make_split(images[train], labels[train]),
        "val": make_split(images[val], labels[val]),
    }


def check_image_size(image_size: int, native: int, dataset: str) -> None:
    """Refuse to upscale: ``image_size`` must not exceed the data set's ``native`` size."""
    if not 1 <= image_size <= native:
        raise DataError(
            f"image_size={image_size} is not available from {dataset}, whose images are "
            f"{native}x{native}; choose image_size <= {native} (smaller sizes are downscaled) "
            "or another dataset"
        )
