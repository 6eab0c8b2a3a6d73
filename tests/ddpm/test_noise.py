import threading

import pytest
import torch

import ddpm.noise
from ddpm.config import DiffusionConfig
from ddpm.diffusion import GaussianDiffusion
from ddpm.generation import image_generators
from ddpm.noise import draw, step_noise
from ddpm.sampling.api import ddim_sample, ddpm_sample

SHAPE = (4, 3, 8, 8)


def old_rows(generators, steps):
    """What the samplers drew before: x_T, then each step, a row at a time per generator."""
    return [torch.stack([torch.randn(SHAPE[1:], generator=g) for g in generators])
            for _ in range(steps)]  # fmt: skip


@pytest.mark.parametrize("ahead", [0, 2])
def test_step_noise_gives_each_row_its_own_generator_in_order_on_either_path(ahead):
    drawn = list(step_noise(SHAPE, image_generators(3, range(4)), "cpu", count=5, ahead=ahead))
    assert len(drawn) == 5
    for new, old in zip(drawn, old_rows(image_generators(3, range(4)), 5), strict=True):
        assert torch.equal(new, old)


def test_one_generator_for_the_batch_draws_the_whole_tensor_at_once():
    a = draw(SHAPE, torch.Generator().manual_seed(1))
    assert torch.equal(a, torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="2 generators for a batch of 4"):
        draw(SHAPE, image_generators(0, [0, 1]))


def noise_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ddpm-noise"]


def test_a_consumer_that_stops_early_stops_the_drawing_thread():
    noises = step_noise(SHAPE, image_generators(0, range(4)), "cpu", count=100, ahead=2)
    next(noises), next(noises)
    assert noise_threads()
    noises.close()
    assert not noise_threads()


def test_a_failed_draw_is_raised_where_the_noise_is_asked_for():
    bad = [torch.Generator(), "not a generator", torch.Generator(), torch.Generator()]
    noises = step_noise(SHAPE, bad, "cpu", count=3, ahead=2)
    with pytest.raises(AttributeError):  # raised in the thread, re-raised here
        list(noises)
    assert not noise_threads()


def test_the_sampler_makes_the_same_images_when_its_noise_is_drawn_ahead(monkeypatch):
    """On CUDA the stochastic samplers' noise comes from a thread; here both paths run on the
    CPU and must agree bit for bit (the generators are consumed in the same order)."""
    diffusion = GaussianDiffusion(DiffusionConfig(timesteps=50))

    def net(x, t, y=None):
        return 0.1 * x + 0.01 * t.float()[:, None, None, None]

    def run(sampler, **kw):
        gens = image_generators(5, range(SHAPE[0]))
        return sampler(net, diffusion, SHAPE, steps=10, generator=gens, **kw)

    now = {name: run(fn, **kw) for name, (fn, kw) in
           {"ddpm": (ddpm_sample, {}), "ddim": (ddim_sample, {"eta": 0.5})}.items()}  # fmt: skip
    monkeypatch.setattr(ddpm.noise, "default_ahead", lambda generator, device: 2)
    assert torch.equal(run(ddpm_sample), now["ddpm"])
    assert torch.equal(run(ddim_sample, eta=0.5), now["ddim"])
    assert not noise_threads()
