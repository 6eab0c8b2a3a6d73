"""Tiny ImageNet (cs231n): 200 classes of 64x64 images, read straight from the official zip.

The zip holds, under ``tiny-imagenet-200/``: ``wnids.txt`` (the 200 WordNet ids),
``words.txt`` (``wnid<TAB>names`` for all of WordNet), ``train/<wnid>/images/*.JPEG`` (500 a
class), ``val/images/*.JPEG`` with ``val/val_annotations.txt`` (``file<TAB>wnid<TAB>box``), and
unlabelled ``test/images``, which is not used. Labels index the sorted wnids (the ImageFolder
convention); class names are the first name of each wnid in words.txt. A few images are
greyscale JPEGs; every image is converted to RGB.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ddpm.data.errors import ArchiveError
from ddpm.data.images import decode_rgb, to_square_array
from ddpm.data.split import Extracted, Split, check_image_size, make_split
from ddpm.progress import Progress

ROOT = "tiny-imagenet-200/"
SIZE = 64


def tiny_imagenet(archive: Path, *, image_size: int = SIZE, progress: bool = True) -> Extracted:
    """Decode the 100,000 train and 10,000 val images of ``archive`` at ``image_size``.

    Raises:
        ArchiveError: the zip is corrupt, truncated, or not laid out as Tiny ImageNet.
    """
    check_image_size(image_size, SIZE, "tiny-imagenet")
    archive = Path(archive)
    with _open_zip(archive) as zf:
        wnids = sorted(_text(zf, archive, "wnids.txt").split())
        names = _class_names(_text(zf, archive, "words.txt"), wnids)
        index = {wnid: i for i, wnid in enumerate(wnids)}
        train = _train_members(zf, index)
        val = _val_members(_text(zf, archive, "val/val_annotations.txt"), index, archive)
        splits = {
            "train": _decode(zf, train, image_size, progress, "train"),
            "val": _decode(zf, val, image_size, progress, "val"),
        }
    return Extracted(splits, names, {"wnids": wnids, "val_source": "the published val set"})


@contextmanager
def _open_zip(archive: Path) -> Iterator[zipfile.ZipFile]:
    """Open ``archive``; any zip or inflate error inside the block becomes an ArchiveError."""
    try:
        with zipfile.ZipFile(archive) as zf:
            yield zf
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise ArchiveError(
            f"{archive} is corrupt or truncated ({exc}); delete it and download it again"
        ) from exc


def _text(zf: zipfile.ZipFile, archive: Path, name: str) -> str:
    try:
        return zf.read(ROOT + name).decode()
    except KeyError:
        raise ArchiveError(
            f"{archive} is not the Tiny ImageNet zip: it lacks {ROOT}{name}"
        ) from None


def _class_names(words: str, wnids: list[str]) -> list[str]:
    """First name of each wnid: ``n01443537<TAB>goldfish, Carassius auratus`` -> goldfish."""
    lookup = dict(line.split("\t", 1) for line in words.splitlines() if "\t" in line)
    return [lookup.get(wnid, wnid).split(",")[0].strip() for wnid in wnids]


def _train_members(zf: zipfile.ZipFile, index: dict[str, int]) -> list[tuple[str, int]]:
    """(member, label) of every ``train/<wnid>/images/*.JPEG``, sorted by name."""
    members = []
    for name in sorted(zf.namelist()):
        parts = name.removeprefix(ROOT).split("/")
        if len(parts) == 4 and parts[0] == "train" and parts[2] == "images" and parts[3]:
            if parts[1] not in index:
                raise ArchiveError(f"{zf.filename}: {name} is of a class not in wnids.txt")
            members.append((name, index[parts[1]]))
    return members


def _val_members(annotations: str, index: dict[str, int], archive: Path) -> list[tuple[str, int]]:
    """(member, label) of every line ``val_0.JPEG<TAB>n03444034<TAB>...`` of the annotations."""
    members = []
    for line in annotations.splitlines():
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise ArchiveError(f"{archive}: bad line in val_annotations.txt: {line!r}")
        members.append((f"{ROOT}val/images/{fields[0]}", index[fields[1]]))
    return members


def _decode(
    zf: zipfile.ZipFile, members: list[tuple[str, int]], size: int, progress: bool, desc: str
) -> Split:
    images = np.empty((len(members), size, size, 3), dtype=np.uint8)
    with Progress(len(members), desc, "img", enabled=progress) as bar:
        for i, (name, _) in enumerate(members):
            try:
                images[i] = to_square_array(decode_rgb(zf.read(name)), size)
            except KeyError:
                raise ArchiveError(f"{zf.filename}: {name} is listed but not in the zip") from None
            except (OSError, ValueError) as exc:  # zip-level errors go up to _open_zip
                bad = f"{zf.filename}: {name} is not a readable image ({exc})"
                raise ArchiveError(bad) from exc
            bar.update()
    return make_split(images, np.array([label for _, label in members], dtype=np.int64))
