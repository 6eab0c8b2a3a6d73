"""Training on the device: bf16 and channels_last from both data feeds, an exact resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import tiny_unet

from ddpm.checkpoint import load_checkpoint, save_checkpoint
from ddpm.config import DiffusionConfig, EMAConfig, TrainConfig
from ddpm.data.synthetic import make_synthetic
from ddpm.feed import DeviceFeed, StreamFeed, draw
from ddpm.train import Dataset, Hooks, train

pytestmark = pytest.mark.gpu

UNET = tiny_unet(dropout=0.1)  # dropout: the resume must reproduce its draws too


def config(**kw) -> TrainConfig:
    base = dict(steps=12, batch_size=8, lr=1e-3, warmup_steps=3, val_every=6,
                checkpoint_every=3, sample_every=1000, val_images=16, val_timesteps=3,
                bf16=True, channels_last=True)  # fmt: skip
    return TrainConfig(**(base | kw))


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> tuple[np.ndarray, torch.Tensor]:
    """160 synthetic 16-px images as a memory-mapped .npy (as train opens a split), labels."""
    images = make_synthetic(160, 16, seed=0).images
    path = tmp_path_factory.mktemp("prepared") / "train_images.npy"
    np.save(path, images)
    return np.load(path, mmap_mode="r"), torch.from_numpy(np.arange(160) % 4)


def run(folder: Path, images, device, log: list[str] | None = None, **kw):
    data = (Dataset(images[:128]), Dataset(torch.from_numpy(np.asarray(images[128:]))))
    hooks = kw.pop("hooks", None) or Hooks(log=(log.append if log is not None else print))
    return train(UNET, DiffusionConfig(timesteps=100), config(**kw), EMAConfig(decay=0.9), *data,
                 checkpoint_dir=folder, device=device, progress=False, log_every=3,
                 hooks=hooks)  # fmt: skip


def test_both_feeds_give_identical_batches_on_the_device(split, device):
    images, labels = split
    feeds = [DeviceFeed(images, labels, device), StreamFeed(images, labels, device)]
    for feed in feeds:
        feed.start(5, lambda step: draw(1000 + step, 160, 32, hflip=True))
    try:
        for step in range(5, 10):
            (x_a, y_a), (x_b, y_b) = (feed.batch(step) for feed in feeds)
            assert x_a.device.type == device.type and x_b.device.type == device.type
            assert torch.equal(x_a, x_b) and torch.equal(y_a, y_b)
    finally:
        for feed in feeds:
            feed.close()


def test_bf16_channels_last_training_runs_from_either_feed(split, device, tmp_path):
    images, _ = split
    logs: dict[str, list[str]] = {"device": [], "stream": []}
    results = {}
    for name, budget in (("device", "auto"), ("stream", 0.0)):
        results[name] = run(tmp_path / name, images, device, logs[name], steps=6,
                            data_budget=budget)  # fmt: skip
    assert any("held on" in m for m in logs["device"]), logs["device"]
    assert any("streamed from disk" in m for m in logs["stream"]), logs["stream"]
    for result in results.values():
        assert result.result.step == 6 and np.isfinite(result.result.final_val_loss)
        weight = result.model.conv_in.weight
        assert weight.device.type == device.type
        assert weight.is_contiguous(memory_format=torch.channels_last)
    a, b = (load_checkpoint(tmp_path / name / "last.pt")["model"] for name in logs)
    for key, tensor in a.items():  # the same batches and draws: the same training, up to
        torch.testing.assert_close(tensor, b[key], atol=1e-3, rtol=1e-3)  # kernel order


class Killed(Exception):
    pass


def test_a_deterministic_resume_is_bit_identical_to_an_unbroken_run(
    split, device, tmp_path, strict_mode_restored
):
    images, _ = split
    run(tmp_path / "a", images, device, [], deterministic=True)

    def kill(step, metrics):
        if step == 9:
            raise Killed

    with pytest.raises(Killed):
        run(tmp_path / "b", images, device, deterministic=True,
            hooks=Hooks(on_metrics=kill, log=lambda m: None))  # fmt: skip
    last = tmp_path / "b" / "last.pt"
    ckpt = load_checkpoint(last)
    assert ckpt["step"] == 6 and "rng" not in ckpt
    # As an eight-GPU run wrote it before: eight CUDA generator states, which one GPU could not
    # restore (IndexError); they are ignored now.
    eight = [torch.zeros(16, dtype=torch.uint8)] * 8
    save_checkpoint({**ckpt, "rng": {"torch": torch.get_rng_state(), "cuda": eight}}, last)
    log: list[str] = []
    resumed = run(tmp_path / "b", images, device, log, deterministic=True)
    assert resumed.result.resumed_from_step == 6, log
    full, again = (load_checkpoint(tmp_path / d / "last.pt") for d in "ab")
    for key in ("model", "ema"):
        for name, tensor in full[key].items():
            assert torch.equal(tensor, again[key][name]), (key, name)


def test_importance_sampled_training_is_deterministic_on_the_device(
    split, device, tmp_path, strict_mode_restored
):
    """loss-second-moment's history, draws and updates on the device (T = 4: warm after 5
    steps), under deterministic kernels: two runs, the same weights."""
    images, _ = split
    data = (Dataset(images[:128]), Dataset(torch.from_numpy(np.asarray(images[128:]))))
    cfg = config(deterministic=True, timestep_sampler="loss-second-moment")
    for folder in "ab":
        train(UNET, DiffusionConfig(timesteps=4), cfg, EMAConfig(decay=0.9), *data,
              checkpoint_dir=tmp_path / folder, device=device, progress=False, log_every=3,
              hooks=Hooks(log=lambda m: None))  # fmt: skip
    a, b = (load_checkpoint(tmp_path / f / "last.pt") for f in "ab")
    assert int(a["timestep_sampler"]["count"].min()) >= 10
    assert torch.equal(a["timestep_sampler"]["history"], b["timestep_sampler"]["history"])
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
