"""An image folder: class subfolders, nesting, odd image modes, broken files, empty folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpm.data.errors import DataError
from ddpm.data.imagefolder import image_folder, list_images


def save(path: Path, colour: tuple[int, ...], size: tuple[int, int] = (20, 20), mode: str = "RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


def read(folder: Path, **options: object):
    defaults = {"image_size": 8, "val_fraction": 0.0, "seed": 0, "progress": False}
    return image_folder(folder, **{**defaults, **options})


def test_class_subfolders_become_sorted_labels_and_nesting_is_followed(tmp_path):
    save(tmp_path / "dogs" / "a.png", (200, 0, 0))
    save(tmp_path / "dogs" / "puppies" / "deep" / "b.jpg", (200, 0, 0))
    save(tmp_path / "cats" / "c.webp", (0, 0, 200))
    data = read(tmp_path)
    assert data.class_names == ["cats", "dogs"]
    train = data.splits["train"]
    assert train.labels.tolist() == [0, 1, 1]  # files sorted by path: cats/c, dogs/a, dogs/p...
    assert (
        np.abs(train.images[:, 4, 4].astype(int) - [[0, 0, 200], [200, 0, 0], [200, 0, 0]]).max()
        < 8
    )


def test_images_at_the_top_level_mean_no_labels(tmp_path):
    save(tmp_path / "a.png", (1, 2, 3))
    save(tmp_path / "sub" / "b.png", (1, 2, 3))
    data = read(tmp_path)
    assert data.class_names == [] and data.splits["train"].labels.tolist() == [-1, -1]


def test_every_mode_becomes_rgb_and_transparency_white(tmp_path):
    save(tmp_path / "grey.png", (90,), mode="L")
    save(tmp_path / "clear.png", (255, 0, 0, 0), mode="RGBA")
    save(tmp_path / "cmyk.jpg", (0, 0, 0, 0), mode="CMYK")
    Image.new("P", (20, 20), 3).save(tmp_path / "palette.png")
    images = read(tmp_path).splits["train"].images
    assert images.shape == (4, 8, 8, 3)
    by_name = dict(zip(["clear", "cmyk", "grey", "palette"], images[:, 4, 4].tolist(), strict=True))
    assert by_name["clear"] == [255, 255, 255] and by_name["grey"] == [90, 90, 90]
    assert min(by_name["cmyk"]) > 240  # no ink is white


def test_non_square_images_are_centre_cropped(tmp_path):
    image = Image.new("RGB", (30, 10), (255, 0, 0))
    image.paste((0, 255, 0), (10, 0, 20, 10))  # the middle third is green
    image.save(tmp_path / "wide.png")
    data = read(tmp_path)
    assert np.all(data.splits["train"].images[0, 1:-1, 1:-1] == [0, 255, 0])
    assert data.info["num_upscaled"] == 0  # the short side, 10 px, is downscaled to 8


def test_small_images_are_counted_as_upscaled(tmp_path):
    save(tmp_path / "tiny.png", (5, 5, 5), size=(4, 6))
    save(tmp_path / "big.png", (5, 5, 5), size=(16, 16))
    assert read(tmp_path).info["num_upscaled"] == 1


def test_broken_files_are_skipped_counted_and_named(tmp_path):
    save(tmp_path / "good.png", (0, 0, 0))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "notes.txt").write_text("ignored: not an image suffix")
    data = read(tmp_path)
    assert len(data.splits["train"].images) == 1
    assert data.info["num_skipped"] == 1 and data.info["skipped"] == ["broken.jpg"]


def test_broken_files_fail_the_run_when_asked(tmp_path):
    save(tmp_path / "good.png", (0, 0, 0))
    (tmp_path / "x" / "broken.png").parent.mkdir()
    (tmp_path / "x" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match=r"1 of 2 images .* \(x/broken\.png\); fix or remove"):
        read(tmp_path, bad_images="fail")


def test_a_folder_of_only_broken_files_is_an_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="1 of 1 images"):
        read(tmp_path)


def test_an_empty_or_missing_folder_is_an_error_before_any_work(tmp_path):
    (tmp_path / "empty" / ".hidden.png").parent.mkdir()
    (tmp_path / "empty" / ".hidden.png").write_bytes(b"")
    with pytest.raises(DataError, match="holds no images"):
        read(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        read(tmp_path / "missing")


def test_too_few_images_for_a_validation_split_is_an_error(tmp_path):
    save(tmp_path / "only.png", (0, 0, 0))
    with pytest.raises(DataError, match="leave none for training"):
        read(tmp_path, val_fraction=0.5)


def test_the_validation_split_is_seeded(tmp_path):
    for i in range(20):
        save(tmp_path / f"{i:02d}.png", (i * 10, 0, 0))

    def val_reds(seed: int) -> list[int]:
        data = read(tmp_path, val_fraction=0.25, seed=seed)
        assert len(data.splits["train"].images) == 15
        return data.splits["val"].images[:, 4, 4, 0].tolist()

    assert val_reds(0) == val_reds(0) and val_reds(0) != val_reds(1)


def test_list_images_matches_suffixes_in_any_case(tmp_path):
    for name in ("a.PNG", "b.JpEg", "c.webp", "d.gif", "e.jpg"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["a.PNG", "b.JpEg", "c.webp", "e.jpg"]


def test_decoding_in_workers_onto_disk_gives_the_arrays_decoding_in_memory_does(tmp_path):
    from ddpm.data.prepared import load_prepared, write_prepared
    from ddpm.data.split import RowFile

    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i in range(40):
        pixels = rng.integers(0, 256, (12, 10 + i % 5, 3), dtype=np.uint8)
        path = folder / ("cats" if i % 3 else "dogs") / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
    (folder / "cats" / "broken.png").write_bytes(b"truncated")
    options = {"val_fraction": 0.25, "seed": 3}
    memory = read(folder, **options)
    work = tmp_path / "work"
    work.mkdir()
    disk = read(folder, work_dir=work, workers=2, **options)
    assert disk.info == memory.info and disk.info["num_skipped"] == 1
    for name in ("train", "val"):
        assert isinstance(disk.splits[name].images, RowFile)
        assert np.array_equal(disk.splits[name].images[:], memory.splits[name].images)
        assert np.array_equal(disk.splits[name].labels, memory.splits[name].labels)
    assert (len(memory.splits["train"].images), len(memory.splits["val"].images)) == (30, 10)
    a, b = write_prepared(tmp_path / "a", memory), write_prepared(tmp_path / "b", disk)
    assert a == b  # the same manifest, checksums included
    for name in ("train_images.npy", "val_images.npy", "train_labels.npy"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert np.array_equal(load_prepared(tmp_path / "b", "val").images, memory.splits["val"].images)
