"""The prepared-split format: written atomically, loaded in one read per array.

A prepared folder holds, for each split ``S`` (``train``, ``val`` and, where the data set has
test files, ``test``)::

    S_images.npy    uint8 [N, H, W, 3]   RGB, channels last, H = W = image_size
    S_labels.npy    int64 [N]            index into class_names, -1 where there are no classes
    manifest.json   format, dataset, image_size, seed, source (URL, archive, md5, folder...),
                    class_names, num_classes, splits: {S: {count, shape, class_counts,
                    images_sha256, files}}

``images_sha256`` hashes the raw array bytes, a stable key for cached statistics (FID
references). The folder is first written under a temporary sibling name and then renamed into
place, so a killed stage never leaves a half-written folder behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ddpm.data.errors import DataError
from ddpm.data.split import Extracted, RowFile, Split
from ddpm.files import replace_dir

FORMAT = "ddpm-prepared/1"
MANIFEST = "manifest.json"
CHUNK_BYTES = 32 * 2**20  # images written (and hashed) at a time


class PreparedSplit(NamedTuple):
    """One split loaded for training or evaluation.

    Attributes:
        images: uint8 tensor (N, H, W, 3) (a read-only ``np.memmap`` when loaded with ``mmap``).
        labels: int64 tensor (N,).
        manifest: the folder's manifest.json.
    """

    images: torch.Tensor | np.ndarray
    labels: torch.Tensor
    manifest: dict[str, Any]


def write_prepared(out_dir: Path, data: Extracted) -> dict[str, Any]:
    """Write ``data`` to ``out_dir`` atomically, replacing what was there; return the manifest.

    The images go to disk ``CHUNK_BYTES`` at a time, hashed on the way, so a split held in a
    :class:`~ddpm.data.split.RowFile` is never in memory whole.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        hashes = {}
        for name, split in data.splits.items():
            hashes[name] = write_npy(tmp / f"{name}_images.npy", split.images)
            write_npy(tmp / f"{name}_labels.npy", split.labels)
        manifest = build_manifest(data, hashes)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def write_npy(path: Path, array: np.ndarray | RowFile) -> str:
    """Write ``array`` as ``.npy`` (what ``np.save`` writes), a chunk at a time; the sha256 of
    its raw bytes."""
    digest = hashlib.sha256()
    header = {
        "descr": np.lib.format.dtype_to_descr(array.dtype),
        "fortran_order": False,
        "shape": tuple(array.shape),
    }
    rows = max(1, CHUNK_BYTES // max(1, array.dtype.itemsize * int(np.prod(array.shape[1:]))))
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for start in range(0, len(array), rows):
            chunk = np.ascontiguousarray(array[start : start + rows])
            digest.update(chunk)
            f.write(chunk.data)
    return digest.hexdigest()


def build_manifest(data: Extracted, hashes: dict[str, str]) -> dict[str, Any]:
    """The manifest of ``data``: its info plus class names and a summary of every split
    (``hashes``: the sha256 of each split's image bytes)."""
    num_classes = len(data.class_names)
    splits = {
        name: _split_entry(name, split, num_classes, hashes[name])
        for name, split in data.splits.items()
    }
    return {
        "format": FORMAT,
        **data.info,
        "class_names": list(data.class_names),
        "num_classes": num_classes,
        "splits": splits,
    }


def load_prepared(root: Path, split: str = "train", mmap: bool = False) -> PreparedSplit:
    """Load one split of a prepared folder into tensors (see the module docstring).

    Args:
        root: the prepared folder (holds manifest.json).
        split: a split named in the manifest: ``train``, ``val`` or ``test``.
        mmap: leave the images on disk: ``images`` is then a read-only ``np.memmap`` (N, H, W, 3)
            whose pages are read when used (the labels are loaded).

    Raises:
        DataError: no manifest, an unknown split, or arrays that disagree with the manifest.
    """
    manifest = read_manifest(root)
    entry = manifest["splits"].get(split)
    if entry is None:
        raise DataError(f"{root} has no split {split!r}; choose one of {list(manifest['splits'])}")
    images = np.load(
        Path(root) / entry["files"]["images"], allow_pickle=False, mmap_mode="r" if mmap else None
    )
    labels = np.load(Path(root) / entry["files"]["labels"], allow_pickle=False)
    if (
        list(images.shape) != entry["shape"]
        or images.dtype != np.uint8
        or len(labels) != len(images)
    ):
        raise DataError(
            f"{root}/{entry['files']['images']} is {images.dtype} {list(images.shape)} with "
            f"{len(labels)} labels, but the manifest says uint8 {entry['shape']}; prepare it again"
        )
    return PreparedSplit(
        images if mmap else torch.from_numpy(images), torch.from_numpy(labels), manifest
    )


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest.json of a prepared folder."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DataError(f"{root} is not a prepared data folder (no {MANIFEST}); prepare it first")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def _split_entry(name: str, split: Split, num_classes: int, sha256: str) -> dict[str, Any]:
    labelled = split.labels[split.labels >= 0]
    return {
        "count": len(split.images),
        "shape": list(split.images.shape),
        "class_counts": np.bincount(labelled, minlength=num_classes).tolist(),
        "images_sha256": sha256,
        "files": {"images": f"{name}_images.npy", "labels": f"{name}_labels.npy"},
    }
