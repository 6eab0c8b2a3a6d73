"""Sampling on the device: the same per-image noise as on the CPU, finite images, bf16."""

from __future__ import annotations

import pytest
import torch

from ddpm.checkpoint import load_sampling_model
from ddpm.config import SamplerConfig
from ddpm.generation import generate, image_generators
from ddpm.noise import initial_noise, step_noise

pytestmark = pytest.mark.gpu

SHAPE = (6, 3, 16, 16)
SAMPLERS = {
    "ddpm-10": SamplerConfig(sampler="ddpm", steps=10),
    "ddim-10": SamplerConfig(sampler="ddim", steps=10),
}


def test_the_noise_on_the_device_is_the_cpu_noise(device):
    indices = range(3, 3 + SHAPE[0])
    cpu = initial_noise(SHAPE, None, image_generators(7, indices), "cpu")
    here = initial_noise(SHAPE, None, image_generators(7, indices), device)
    assert here.device.type == device.type and torch.equal(here.cpu(), cpu)
    # the steps' noise: drawn ahead by a thread into pinned memory on CUDA, lazily on the CPU
    cpu_steps = list(step_noise(SHAPE, image_generators(7, indices), "cpu", count=4))
    steps = list(step_noise(SHAPE, image_generators(7, indices), device, count=4))
    assert all(torch.equal(a.cpu(), b) for a, b in zip(steps, cpu_steps, strict=True))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_samples_are_finite_and_follow_the_cpu_images(device, tmp_path, tiny_checkpoint, name):
    path = tiny_checkpoint(tmp_path / "ema.pt", timesteps=100)
    here, cpu = load_sampling_model(path, device=device), load_sampling_model(path)
    if device.type == "cuda":  # sampling runs in channels_last there
        assert here.model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    indices, sampler = list(range(SHAPE[0])), SAMPLERS[name]
    a = generate(here.model, here.diffusion, indices, 0, sampler, device=device)
    b = generate(cpu.model, cpu.diffusion, indices, 0, sampler)
    assert a.device.type == device.type and bool(torch.isfinite(a).all())
    # the same noise; the network's arithmetic (TF32 convolutions on CUDA) differs a little
    difference = (a.cpu() - b).abs()
    assert float(difference.mean()) < 1e-2 and float(difference.max()) < 0.1, difference.max()
    half = generate(here.model, here.diffusion, indices, 0, sampler, device=device, bf16=True)
    assert bool(torch.isfinite(half).all()) and float((half - a).abs().mean()) < 0.05


def test_torch_fidelity_scores_on_the_device(device, inception_weights, tmp_path, monkeypatch):
    from pipeline.fidelity import INCEPTION, Extraction, UInt8Images, fidelity, resolve_weights
    from pipeline.settings import EvaluateParams

    monkeypatch.setenv("DDPM_DEVICE", device.type)
    generator = torch.Generator().manual_seed(0)
    fake, real = (torch.randint(0, 256, (20, 16, 16, 3), dtype=torch.uint8, generator=generator)
                  for _ in range(2))  # fmt: skip
    weights = resolve_weights(INCEPTION, str(inception_weights))
    extraction = Extraction(INCEPTION, weights, {"fid": True, "isc": True, "kid": True})
    e = EvaluateParams(reference_split="train", fid=True, isc=True, kid=True, prc=False,
                       kid_subset_size=10, kid_subsets=10, isc_splits=2, batch_size=20,
                       prc_weights="", repeats=1)  # fmt: skip
    scores = [fidelity(UInt8Images(fake), UInt8Images(real), "ref", extraction, e, 0, tmp_path,
                       verbose=False) for _ in range(2)]  # fmt: skip
    assert set(scores[0]) >= {"fid", "isc_mean", "kid_mean"}
    assert scores[0]["fid"] > 0 and list((tmp_path).glob("ref-*"))  # reference cached
    assert scores[1] == pytest.approx(scores[0], rel=1e-3)  # the second from the cache
