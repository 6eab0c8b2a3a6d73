"""CIFAR-10 extraction from a tiny archive built in the official format."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from archives import CIFAR10_CLASSES

from ddpm.data.build import DataRequest, build_dataset
from ddpm.data.cifar10 import cifar10_cars, cifar10_full, read_cifar10
from ddpm.data.errors import ArchiveError, ChecksumError, DataError

PER_BATCH = 40  # the fixture's batches: 4 images of each class, so 20 cars in the train set


def image_ids(images: np.ndarray) -> set[int]:
    """The ids the fake archive writes into the blue plane's first two pixels."""
    return set((images[:, 0, 0, 2].astype(int) * 256 + images[:, 0, 1, 2]).tolist())


def test_read_cifar10_gives_channels_last_images_and_labels(cifar10_archive):
    data = read_cifar10(cifar10_archive[0])
    assert data.class_names == list(CIFAR10_CLASSES)
    assert data.train.images.shape == (5 * PER_BATCH, 32, 32, 3)
    assert data.test.images.shape == (PER_BATCH, 32, 32, 3)
    images, labels = data.train
    assert images.dtype == np.uint8 and labels.dtype == np.int64
    assert np.array_equal(images[:, 5, 7, 0], 20 * labels)  # red plane: the label
    assert np.all(images[:, 5, :, 1] == 8 * 5) and np.all(images[:, 5, 7, 2] == 8 * 7)
    ids = images[:, 0, 0, 2].astype(int) * 256 + images[:, 0, 1, 2]
    assert np.array_equal(ids, np.arange(5 * PER_BATCH))  # batches in order, rows in order


def test_cars_are_the_automobile_class_split_by_a_seeded_shuffle(cifar10_archive):
    data = cifar10_cars(cifar10_archive[0], val_size=5, seed=3)
    train, val = data.splits["train"], data.splits["val"]
    assert (len(train.images), len(val.images)) == (15, 5)
    assert data.class_names == ["automobile"]
    for split in (train, val):
        assert np.all(split.images[..., 0] == 20 * CIFAR10_CLASSES.index("automobile"))
        assert np.all(split.labels == 0)
    train_ids, val_ids = image_ids(train.images), image_ids(val.images)
    assert not train_ids & val_ids and len(train_ids | val_ids) == 20


def test_the_cars_test_split_is_the_test_batchs_cars_in_order(cifar10_archive):
    """Held-out images for likelihoods: the published test batch's cars, none of train's."""
    data = cifar10_cars(cifar10_archive[0], val_size=5, seed=3)
    test = data.splits["test"]
    assert len(test.images) == PER_BATCH // 10 and np.all(test.labels == 0)
    assert np.all(test.images[..., 0] == 20 * CIFAR10_CLASSES.index("automobile"))
    everything = read_cifar10(cifar10_archive[0])
    cars = everything.test.images[everything.test.labels == CIFAR10_CLASSES.index("automobile")]
    assert np.array_equal(test.images, cars)
    assert data.info["test_source"] == "the published test_batch"


def test_the_cars_split_is_deterministic_in_the_seed(cifar10_archive):
    def val(seed: int) -> np.ndarray:
        return cifar10_cars(cifar10_archive[0], val_size=5, seed=seed).splits["val"].images

    assert np.array_equal(val(0), val(0))
    assert not np.array_equal(val(0), val(1))


def test_full_cifar10_keeps_labels_and_uses_the_test_batch_for_val(cifar10_archive):
    data = cifar10_full(cifar10_archive[0])
    assert data.class_names == list(CIFAR10_CLASSES)
    train, val = data.splits["train"], data.splits["val"]
    assert len(train.labels) == 5 * PER_BATCH and len(val.labels) == PER_BATCH
    assert np.bincount(train.labels).tolist() == [5 * PER_BATCH // 10] * 10
    assert np.array_equal(val.images[:, 9, 9, 0], 20 * val.labels)
    test = data.splits["test"]  # the same batch by the held-out split's name
    assert np.array_equal(test.images, val.images) and np.array_equal(test.labels, val.labels)


def test_smaller_image_sizes_are_downscaled_larger_ones_refused(cifar10_archive):
    data = cifar10_full(cifar10_archive[0], image_size=16)
    assert data.splits["train"].images.shape == (5 * PER_BATCH, 16, 16, 3)
    assert np.array_equal(data.splits["train"].images[:, 8, 8, 0], 20 * data.splits["train"].labels)
    with pytest.raises(DataError, match=r"image_size=64 is not available from cifar10.*<= 32"):
        cifar10_full(cifar10_archive[0], image_size=64)


def test_a_truncated_archive_is_a_clear_error_naming_it(cifar10_archive, tmp_path):
    truncated = tmp_path / "cut.tar.gz"
    data = cifar10_archive[0].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ArchiveError, match=r"cut\.tar\.gz is corrupt or truncated.*download it again"
    ):
        read_cifar10(truncated)


def test_an_archive_without_the_batches_says_what_it_lacks(tmp_path):
    path = tmp_path / "other.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.addfile(tarfile.TarInfo("readme.txt"), io.BytesIO(b""))
    with pytest.raises(ArchiveError, match=r"not the CIFAR-10 python archive.*data_batch_1"):
        read_cifar10(path)


def test_pickles_that_build_anything_but_arrays_are_refused(cifar10_archive, tmp_path):
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(cifar10_archive[0]) as src, tarfile.open(path, "w:gz") as dst:
        for member in src:
            data = src.extractfile(member).read() if member.isfile() else b""
            if member.name.endswith("data_batch_2"):
                data = pickle.dumps({b"data": Path("x")}, protocol=2)
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    with pytest.raises(ArchiveError, match=r"data_batch_2 is not a CIFAR-10 batch.*refusing"):
        read_cifar10(path)


def test_build_dataset_verifies_the_archive_with_the_given_md5(cifar10_archive, tmp_path):
    archive, md5 = cifar10_archive
    request = DataRequest("cifar10-cars", 32, seed=0, raw_dir=archive.parent, md5=md5, val_size=5)
    data = build_dataset(request)
    assert data.info["source"]["md5"] == md5 and data.info["dataset"] == "cifar10-cars"
    with pytest.raises(ChecksumError, match=r"cifar-10-python\.tar\.gz is corrupt"):
        build_dataset(DataRequest("cifar10-cars", 32, raw_dir=archive.parent))  # published md5
