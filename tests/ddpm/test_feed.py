"""The two training feeds: the same batches from the device and from disk, and the budget."""

import threading

import numpy as np
import pytest
import torch
from test_train import run, short

from ddpm.checkpoint import load_checkpoint
from ddpm.data.synthetic import make_synthetic
from ddpm.feed import DeviceFeed, StreamFeed, choose_feed, draw, make_feed
from ddpm.train import Dataset, Hooks

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory) -> tuple[np.ndarray, torch.Tensor]:
    """160 synthetic images saved as .npy and opened memory-mapped, as train opens a split."""
    split = make_synthetic(160, 16, seed=0)
    path = tmp_path_factory.mktemp("prepared") / "train_images.npy"
    np.save(path, split.images)
    labels = torch.from_numpy(np.arange(160) % 4)
    return np.load(path, mmap_mode="r"), labels


def draws(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return draw(1000 + step, 160, 32, hflip=True)


def test_batches_are_scaled_to_minus_one_one_and_flipped_half_the_time():
    images = torch.zeros(4, 2, 2, 3, dtype=torch.uint8)
    images[:, :, 1, :] = 255  # the right column white: flipped images have it on the left
    feed = DeviceFeed(images.numpy(), None, CPU)
    feed.start(0, lambda step: draw(step, 4, 2000, hflip=True))
    x, y = feed.batch(0)
    assert x.shape == (2000, 3, 2, 2) and y is None
    assert x.min() == -1 and x.max() == 1
    assert 0.45 < (x[:, 0, 0, 0] == 1).float().mean().item() < 0.55
    feed.start(0, lambda step: draw(step, 4, 100, hflip=False))
    assert bool((feed.batch(0)[0][:, :, :, 0] == -1).all())


def test_the_stream_gives_the_batches_of_the_device_feed_from_any_start(on_disk):
    images, labels = on_disk
    device, stream = DeviceFeed(images, labels, CPU), StreamFeed(images, labels, CPU)
    for start in (0, 7):  # 7: a run resumed at step 7
        device.start(start, draws)
        stream.start(start, draws)
        for step in range(start, start + 10):
            (x, y), (xs, ys) = device.batch(step), stream.batch(step)
            assert torch.equal(x, xs) and torch.equal(y, ys), step
            assert xs.is_contiguous() and xs.shape == (32, 3, 16, 16)
    stream.close()
    assert stream.thread is None
    assert not any(t.name == "ddpm-stream-feed" for t in threading.enumerate())


def test_a_failure_in_the_stream_thread_is_raised_in_the_training_thread(on_disk):
    images, labels = on_disk
    stream = StreamFeed(images, labels, CPU)
    stream.start(0, lambda step: draw(step, 10_000, 4, hflip=False))  # indices past the end
    with pytest.raises(IndexError):
        stream.batch(0)
    stream.close()


def test_the_budget_holds_a_split_that_fits_and_streams_one_that_does_not(monkeypatch, on_disk):
    mib = 2**20
    assert choose_feed(100 * mib, 1.0, CPU)[0] == "device"
    kind, why = choose_feed(2 * 2**30, 1.0, CPU)
    assert kind == "stream"
    assert "2.0 GiB of images streamed from disk: over the 1.0 GiB allowed" in why
    assert "train.data_budget=1.0" in why
    assert choose_feed(1, 0.0, CPU)[0] == "stream"  # 0: always stream
    monkeypatch.setattr("ddpm.feed.free_memory", lambda device: 400 * mib)
    assert choose_feed(100 * mib, "auto", CPU)[0] == "device"  # a quarter of 400 MiB
    kind, why = choose_feed(101 * mib, "auto", CPU)
    assert kind == "stream" and "a quarter of the free memory" in why
    images, labels = on_disk
    assert isinstance(make_feed(images, labels, CPU, 0.0)[0], StreamFeed)
    assert isinstance(make_feed(images, labels, CPU, "auto")[0], DeviceFeed)


def test_a_run_streamed_and_resumed_on_the_device_ends_where_one_on_the_device_does(
    tmp_path, on_disk
):
    images, _ = on_disk
    data = Dataset(images[:128]), Dataset(images[128:])
    messages: list[str] = []
    run(tmp_path / "device", data, short(), hooks=Hooks(log=messages.append))
    assert any("held on cpu" in m for m in messages), messages

    def kill(step, metrics):
        if step == 9:
            raise KeyboardInterrupt

    streamed = Hooks(on_metrics=kill, log=messages.append)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "mixed", data, short(data_budget=0.0), hooks=streamed)
    assert any("streamed from disk" in m for m in messages), messages
    assert not any(t.name == "ddpm-stream-feed" for t in threading.enumerate())
    assert load_checkpoint(tmp_path / "mixed" / "last.pt")["step"] == 6  # 6 streamed steps
    messages.clear()
    run(tmp_path / "mixed", data, short(), hooks=Hooks(log=messages.append))
    assert any("resumed from" in m and "at step 6" in m for m in messages), messages
    assert any("held on cpu" in m for m in messages), messages
    a, b = (load_checkpoint(tmp_path / name / "last.pt") for name in ("device", "mixed"))
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
