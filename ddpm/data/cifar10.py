"""CIFAR-10 from the official python archive (Krizhevsky 2009), read straight from the tar.gz.

The archive holds ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``: Python
pickles of dicts with byte-string keys. ``data`` is uint8 (10000, 3072), each row the red, green
and blue 32x32 planes in turn; ``labels`` a list of ints; ``label_names`` in ``batches.meta``.
The pickles are read by an unpickler that only builds numpy arrays, never arbitrary objects.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ddpm.data.errors import ArchiveError
from ddpm.data.images import resize_images
from ddpm.data.split import Extracted, Split, check_image_size, make_split, seeded_split

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
SIZE = 32
CARS = "automobile"

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("_codecs", "encode"): ("_codecs", "encode"),
}


class Cifar10(NamedTuple):
    """The whole archive in memory: 50,000 train and 10,000 test images at 32x32."""

    train: Split
    test: Split
    class_names: list[str]


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(*target)


def read_cifar10(archive: Path) -> Cifar10:
    """Read the train and test batches and the class names from the tar.gz ``archive``.

    Raises:
        ArchiveError: the file is truncated, corrupt or lacks a batch; the message names it.
    """
    members = _read_members(Path(archive))
    meta = _unpickle(members, META, archive, (b"label_names",))
    class_names = [name.decode() for name in meta[b"label_names"]]
    train = [_batch_split(members, name, archive) for name in TRAIN_BATCHES]
    test = _batch_split(members, TEST_BATCH, archive)
    train_images = np.concatenate([s.images for s in train])
    train_labels = np.concatenate([s.labels for s in train])
    return Cifar10(make_split(train_images, train_labels), test, class_names)


def cifar10_cars(
    archive: Path, *, image_size: int = SIZE, val_size: int = 750, seed: int = 0
) -> Extracted:
    """The automobile class of the training batches, split into train and val by a seeded
    shuffle, and of the published test batch as ``test`` (held out for likelihoods).

    The official archive gives 5,000 cars: 4,250 train and 750 val with the defaults, and 1,000
    test. Labels are all 0, ``class_names == ["automobile"]``.
    """
    check_image_size(image_size, SIZE, "cifar10-cars")
    data = read_cifar10(archive)
    label = data.class_names.index(CARS)
    images = resize_images(data.train.images[data.train.labels == label], image_size)
    splits = seeded_split(images, np.zeros(len(images), dtype=np.int64), val_size, seed)
    test = resize_images(data.test.images[data.test.labels == label], image_size)
    splits["test"] = make_split(test, np.zeros(len(test), dtype=np.int64))
    info = {"class_filter": {"class": CARS, "cifar10_label": label},
            "test_source": "the published test_batch"}  # fmt: skip
    return Extracted(splits, [CARS], info)


def cifar10_full(archive: Path, *, image_size: int = SIZE) -> Extracted:
    """All ten classes with labels: ``train`` is the five training batches, ``val`` and
    ``test`` both the published test batch (50,000 and 10,000 images): val as before, test by
    the name every data set's held-out split has."""
    check_image_size(image_size, SIZE, "cifar10")
    data = read_cifar10(archive)
    test = make_split(resize_images(data.test.images, image_size), data.test.labels)
    splits = {
        "train": make_split(resize_images(data.train.images, image_size), data.train.labels),
        "val": test,
        "test": test,
    }
    info = {"val_source": "the published test_batch", "test_source": "the published test_batch"}
    return Extracted(splits, data.class_names, info)


def _read_members(archive: Path) -> dict[str, bytes]:
    """The batch files of the archive, read in one pass over the gzip stream."""
    wanted = {f"{FOLDER}/{name}" for name in (*TRAIN_BATCHES, TEST_BATCH, META)}
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    members[member.name.removeprefix(f"{FOLDER}/")] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise ArchiveError(
            f"{archive} is corrupt or truncated ({exc}); delete it and download it again"
        ) from exc
    missing = sorted(wanted - {f"{FOLDER}/{name}" for name in members})
    if missing:
        raise ArchiveError(f"{archive} is not the CIFAR-10 python archive: it lacks {missing}")
    return members


def _unpickle(
    members: dict[str, bytes], name: str, archive: Path, keys: tuple[bytes, ...]
) -> dict[bytes, Any]:
    """Unpickle member ``name``: a dict that must hold ``keys``."""
    try:
        obj = _ArraysOnly(io.BytesIO(members[name]), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise ArchiveError(f"{archive}: {FOLDER}/{name} is not a CIFAR-10 batch ({exc})") from exc
    if not isinstance(obj, dict) or any(key not in obj for key in keys):
        raise ArchiveError(f"{archive}: {FOLDER}/{name} is not a dict with keys {list(keys)}")
    return obj


def _batch_split(members: dict[str, bytes], name: str, archive: Path) -> Split:
    """(N, 3072) rows of R, G, B planes -> uint8 (N, 32, 32, 3) channels last."""
    batch = _unpickle(members, name, archive, (b"data", b"labels"))
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * SIZE * SIZE or len(labels) != len(data):
        raise ArchiveError(
            f"{archive}: {FOLDER}/{name} has data {data.shape}, labels {labels.shape}"
        )
    images = data.reshape(-1, 3, SIZE, SIZE).transpose(0, 2, 3, 1)
    return make_split(images, labels)
