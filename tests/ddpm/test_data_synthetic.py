"""The synthetic data set: deterministic from the seed, fast, all classes, varied images."""

from __future__ import annotations

import time

import numpy as np
import pytest

from ddpm.data import synthetic as synthetic_module
from ddpm.data.synthetic import CLASS_NAMES, make_synthetic, synthetic


def test_the_same_seed_gives_the_same_images_and_another_seed_others():
    a, b, c = (
        make_synthetic(64, 16, seed=7),
        make_synthetic(64, 16, seed=7),
        make_synthetic(64, 16, 8),
    )
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)


def test_the_images_do_not_depend_on_the_chunking(monkeypatch):
    whole = make_synthetic(50, 12, seed=1)
    monkeypatch.setattr(synthetic_module, "CHUNK", 7)
    assert np.array_equal(make_synthetic(50, 12, seed=1).images, whole.images)


def test_a_golden_pixel_pins_the_generator():
    """Changing the generator changes every prepared synthetic set: do it on purpose only."""
    data = make_synthetic(4, 8, seed=0)
    assert data.labels.tolist() == [3, 2, 2, 1]
    # a few pixels may round differently where float32 sin/cos differ across CPUs
    assert abs(int(data.images.astype(np.int64).sum()) - 60871) <= 20


@pytest.mark.parametrize("size", [8, 32, 64])
def test_shapes_dtypes_and_every_class_present(size):
    data = make_synthetic(200, size, seed=0)
    assert data.images.shape == (200, size, size, 3) and data.images.dtype == np.uint8
    assert set(data.labels.tolist()) == set(range(len(CLASS_NAMES)))


def test_images_vary_and_use_the_colour_range():
    images = make_synthetic(100, 32, seed=0).images
    assert len({image.tobytes() for image in images}) == 100
    assert images.min() < 20 and images.max() > 235
    assert images.reshape(100, -1).std(axis=1).min() > 5  # no flat images


def test_two_thousand_images_at_32px_take_well_under_a_few_seconds():
    start = time.perf_counter()
    make_synthetic(2000, 32, seed=0)
    assert time.perf_counter() - start < 3.0


def test_synthetic_splits_by_val_fraction_with_the_seed():
    data = synthetic(num_images=100, image_size=8, val_fraction=0.2, seed=3)
    assert len(data.splits["train"].images) == 80 and len(data.splits["val"].images) == 20
    assert data.class_names == list(CLASS_NAMES)
    again = synthetic(num_images=100, image_size=8, val_fraction=0.2, seed=3)
    assert np.array_equal(data.splits["val"].images, again.splits["val"].images)
