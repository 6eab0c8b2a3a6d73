"""The prepared-split format: round trip, manifest, atomic replacement, seeded splits."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from ddpm.data import prepared as prepared_module
from ddpm.data.errors import DataError
from ddpm.data.prepared import load_prepared, read_manifest, write_prepared
from ddpm.data.split import Extracted, make_split, seeded_split, val_count


def extracted(n: int = 10, fill: int = 0) -> Extracted:
    images = np.full((n, 4, 4, 3), fill, dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n)
    labels = np.arange(n) % 2
    splits = seeded_split(images, labels, 3, seed=0)
    info = {"dataset": "test", "image_size": 4, "seed": 0, "source": {"generator": "test"}}
    return Extracted(splits, ["even", "odd"], info)


def test_a_split_round_trips_as_uint8_and_int64_tensors(tmp_path):
    data = extracted()
    write_prepared(tmp_path / "prepared", data)
    loaded = load_prepared(tmp_path / "prepared", "train")
    assert loaded.images.dtype == torch.uint8 and loaded.images.shape == (7, 4, 4, 3)
    assert loaded.labels.dtype == torch.int64
    assert np.array_equal(loaded.images.numpy(), data.splits["train"].images)
    assert np.array_equal(loaded.labels.numpy(), data.splits["train"].labels)
    assert loaded.manifest["class_names"] == ["even", "odd"]
    assert len(load_prepared(tmp_path / "prepared", "val").images) == 3


def test_the_manifest_records_source_counts_and_a_checksum_of_the_pixels(tmp_path):
    data = extracted()
    manifest = write_prepared(tmp_path / "out", data)
    assert manifest == read_manifest(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    train = manifest["splits"]["train"]
    assert manifest["format"] == "ddpm-prepared/1" and manifest["source"] == {"generator": "test"}
    assert (
        train["count"] == 7 and train["shape"] == [7, 4, 4, 3] and sum(train["class_counts"]) == 7
    )
    pixels = data.splits["train"].images.tobytes()
    assert train["images_sha256"] == hashlib.sha256(pixels).hexdigest()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "manifest.json",
        "train_images.npy",
        "train_labels.npy",
        "val_images.npy",
        "val_labels.npy",
    ]


def test_writing_again_replaces_the_folder_and_leaves_no_temporary_files(tmp_path):
    write_prepared(tmp_path / "out", extracted(fill=1))
    (tmp_path / "out" / "stale.txt").write_text("from an older run")
    write_prepared(tmp_path / "out", extracted(fill=2))
    assert not (tmp_path / "out" / "stale.txt").exists()
    assert int(load_prepared(tmp_path / "out").images[0, 1, 1, 1]) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_write_leaves_the_previous_folder_intact(tmp_path, monkeypatch):
    write_prepared(tmp_path / "out", extracted(fill=1))

    def broken_write(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(prepared_module, "write_npy", broken_write)
    with pytest.raises(OSError, match="disk full"):
        write_prepared(tmp_path / "out", extracted(fill=2))
    monkeypatch.undo()
    assert int(load_prepared(tmp_path / "out").images[0, 1, 1, 1]) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_unknown_split_and_missing_manifest_are_clear_errors(tmp_path):
    write_prepared(tmp_path / "out", extracted())
    with pytest.raises(DataError, match=r"no split 'test'; choose one of \['train', 'val'\]"):
        load_prepared(tmp_path / "out", "test")
    with pytest.raises(DataError, match="not a prepared data folder"):
        load_prepared(tmp_path / "nothing", "train")


def test_seeded_split_is_disjoint_complete_and_deterministic():
    images = np.arange(50, dtype=np.uint8).reshape(50, 1, 1, 1).repeat(3, axis=3)
    labels = np.arange(50)
    first = seeded_split(images, labels, 10, seed=5)
    again = seeded_split(images, labels, 10, seed=5)
    other = seeded_split(images, labels, 10, seed=6)
    val, train = set(first["val"].labels.tolist()), set(first["train"].labels.tolist())
    assert len(val) == 10 and not val & train and val | train == set(range(50))
    assert np.array_equal(first["val"].labels, again["val"].labels)
    assert not np.array_equal(first["val"].labels, other["val"].labels)
    assert np.array_equal(first["val"].images[:, 0, 0, 0], first["val"].labels)  # pairs kept


@pytest.mark.parametrize(("n", "fraction", "expected"), [(100, 0.1, 10), (5, 0.01, 1), (5, 0.0, 0)])
def test_val_count(n, fraction, expected):
    assert val_count(n, fraction) == expected


def test_val_count_and_seeded_split_refuse_impossible_sizes():
    with pytest.raises(DataError, match="leave none for training"):
        val_count(1, 0.5)
    with pytest.raises(DataError, match="val_size=5 must be"):
        seeded_split(np.zeros((5, 2, 2, 3), np.uint8), np.zeros(5, np.int64), 5, seed=0)


def test_make_split_checks_shapes_and_dtypes():
    with pytest.raises(ValueError, match=r"uint8 \(N, H, W, 3\)"):
        make_split(np.zeros((2, 4, 4), np.uint8), np.zeros(2))
    with pytest.raises(ValueError, match=r"labels must be \(2,\)"):
        make_split(np.zeros((2, 4, 4, 3), np.uint8), np.zeros(3))


def test_the_chunked_writer_writes_what_np_save_does(tmp_path, monkeypatch):
    monkeypatch.setattr(prepared_module, "CHUNK_BYTES", 100)  # 2 rows of 48 bytes a chunk
    images = np.random.default_rng(0).integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
    digest = prepared_module.write_npy(tmp_path / "chunked.npy", images)
    np.save(tmp_path / "saved.npy", images)
    assert (tmp_path / "chunked.npy").read_bytes() == (tmp_path / "saved.npy").read_bytes()
    assert digest == hashlib.sha256(images).hexdigest()
    prepared_module.write_npy(tmp_path / "empty.npy", images[:0])
    assert np.load(tmp_path / "empty.npy").shape == (0, 4, 4, 3)
