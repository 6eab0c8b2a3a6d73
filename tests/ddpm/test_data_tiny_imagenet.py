"""Tiny ImageNet extraction from a tiny zip built in the official layout."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
from archives import TINY_COLOURS, TINY_WNIDS

from ddpm.data.build import DataRequest, build_dataset
from ddpm.data.errors import ArchiveError, DataError
from ddpm.data.tiny_imagenet import tiny_imagenet

WNIDS = sorted(TINY_WNIDS)


def test_labels_follow_the_sorted_wnids_and_names_come_from_words_txt(tiny_imagenet_archive):
    data = tiny_imagenet(tiny_imagenet_archive[0], progress=False)
    assert data.class_names == ["goldfish", "European fire salamander", "Egyptian cat"]
    assert data.info["wnids"] == WNIDS
    train, val = data.splits["train"], data.splits["val"]
    assert train.images.shape == (12, 64, 64, 3) and val.images.shape == (6, 64, 64, 3)
    assert np.bincount(train.labels).tolist() == [4, 4, 4]
    assert np.bincount(val.labels).tolist() == [2, 2, 2]
    for split in (train, val):
        expected = np.array([TINY_COLOURS[WNIDS[label]] for label in split.labels])
        assert np.abs(split.images.mean(axis=(1, 2)) - expected).max() < 3  # JPEG is lossy


def test_val_labels_come_from_val_annotations(tiny_imagenet_archive):
    val = tiny_imagenet(tiny_imagenet_archive[0], progress=False).splits["val"]
    # the fake writes val_k with wnid TINY_WNIDS[k % 3], in file order
    assert [WNIDS[label] for label in val.labels] == [TINY_WNIDS[k % 3] for k in range(6)]


def test_greyscale_jpegs_become_rgb(tiny_imagenet_archive):
    train = tiny_imagenet(tiny_imagenet_archive[0], progress=False).splits["train"]
    grey = train.images[0]  # n01443537_0.JPEG, saved as a one-channel JPEG
    assert grey.shape == (64, 64, 3) and np.all(grey[..., 0] == grey[..., 1])


def test_smaller_sizes_are_downscaled_larger_ones_refused(tiny_imagenet_archive):
    data = tiny_imagenet(tiny_imagenet_archive[0], image_size=32, progress=False)
    assert data.splits["train"].images.shape == (12, 32, 32, 3)
    with pytest.raises(DataError, match=r"image_size=128 .* 64x64"):
        tiny_imagenet(tiny_imagenet_archive[0], image_size=128)


def test_a_corrupt_member_is_a_clear_error_naming_the_archive(tiny_imagenet_archive, tmp_path):
    path = tmp_path / "bad.zip"
    data = bytearray(tiny_imagenet_archive[0].read_bytes())
    with zipfile.ZipFile(tiny_imagenet_archive[0]) as zf:
        info = zf.getinfo("tiny-imagenet-200/train/n01629819/images/n01629819_1.JPEG")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start + 20 : start + 40] = bytes(20)
    path.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match=r"bad\.zip is corrupt or truncated.*download it again"):
        tiny_imagenet(path, progress=False)


def test_a_truncated_zip_is_a_clear_error(tiny_imagenet_archive, tmp_path):
    path = tmp_path / "cut.zip"
    path.write_bytes(tiny_imagenet_archive[0].read_bytes()[:5000])
    with pytest.raises(ArchiveError, match=r"cut\.zip is corrupt or truncated"):
        tiny_imagenet(path)


def test_a_zip_of_something_else_says_what_it_lacks(tmp_path):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(ArchiveError, match=r"not the Tiny ImageNet zip.*wnids\.txt"):
        tiny_imagenet(path)


def test_build_dataset_reads_the_zip_from_raw_dir_with_its_md5(tiny_imagenet_archive):
    archive, md5 = tiny_imagenet_archive
    request = DataRequest("tiny-imagenet", 64, raw_dir=archive.parent, md5=md5, progress=False)
    data = build_dataset(request)
    assert data.info["source"] == {
        "url": "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
        "archive": "tiny-imagenet-200.zip",
        "md5": md5,
    }
    assert len(data.splits["train"].labels) == 12
