import math

import pytest
import torch

from ddpm.checkpoint import CheckpointError, load_checkpoint, load_sampling_model, save_checkpoint
from ddpm.config import SamplerConfig
from ddpm.errors import NonFiniteSamplesError
from ddpm.generation import generate, image_generators, image_labels, slerp
from ddpm.noise import randn
from ddpm.pixels import to_uint8


@pytest.fixture
def net(tmp_path, tiny_checkpoint):
    return load_sampling_model(tiny_checkpoint(tmp_path / "ema.pt"))


OPTIONS = {
    "ddpm": SamplerConfig(sampler="ddpm", steps=20),
    "ddim": SamplerConfig(sampler="ddim", steps=5, eta=0.5),  # eta > 0: per-image step noise
    "dpm-solver": SamplerConfig(sampler="dpm-solver", steps=5),
}
DDIM3 = SamplerConfig(sampler="ddim", steps=3)


@pytest.mark.parametrize("sampler", list(OPTIONS))
def test_an_image_does_not_depend_on_the_batch_it_is_sampled_in(net, sampler):
    kw = {"sampler": OPTIONS[sampler]}
    together = generate(net.model, net.diffusion, [0, 1, 2, 3, 4], seed=3, **kw)
    apart = torch.cat(
        [
            generate(net.model, net.diffusion, [3, 0], seed=3, **kw),
            generate(net.model, net.diffusion, [4, 2, 1], seed=3, **kw),
        ]
    )
    order = [1, 4, 3, 0, 2]  # rows of ``apart`` holding images 0 .. 4
    assert together.shape == (5, 3, 16, 16)
    # The same noise; the network's float sums may differ in the last bits between batch sizes
    # (oneDNN picks kernels by shape), which the sampler carries along but does not amplify.
    torch.testing.assert_close(apart[order], together, atol=1e-4, rtol=0)
    pixels = to_uint8(apart[order]).int() - to_uint8(together).int()
    assert pixels.abs().max() <= 1 and (pixels != 0).float().mean() < 1e-3


@pytest.mark.parametrize("sampler", list(OPTIONS))
def test_a_seed_gives_the_same_images_and_another_seed_others(net, sampler):
    kw = {"sampler": OPTIONS[sampler]}
    a = generate(net.model, net.diffusion, [0, 1], seed=1, **kw)
    b = generate(net.model, net.diffusion, [0, 1], seed=1, **kw)
    c = generate(net.model, net.diffusion, [0, 1], seed=2, **kw)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert bool((a.abs() <= 1 + 1e-6).all())  # clip_x0 keeps every sampler's output in range
    assert not torch.allclose(a[0], a[1])


def test_row_generators_draw_each_row_from_its_own_generator():
    noise = randn((3, 2, 4), image_generators(7, [5, 6, 7]), "cpu")
    for row, generator in zip(noise, image_generators(7, [5, 6, 7]), strict=True):
        assert torch.equal(row, torch.randn((2, 4), generator=generator))
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        randn((3, 2), image_generators(0, [0, 1]), "cpu")


def test_given_initial_noise_replaces_the_seeded_draw(net):
    x_T = torch.randn(2, 3, 16, 16, generator=image_generators(4, [0])[0])
    seeded = generate(net.model, net.diffusion, [0, 9], 4, DDIM3)
    given = generate(net.model, net.diffusion, [0, 0], 4, DDIM3, x_T=x_T)
    assert torch.equal(given[0], seeded[0]) and not torch.equal(given[1], seeded[1])


def test_nan_samples_are_refused_naming_the_images(net):
    nan = lambda x, t: torch.where(x[:, :1] > 10, float("nan"), x)  # noqa: E731
    nan.config = net.model.config
    x_T = torch.zeros(3, 3, 16, 16)
    x_T[1] = 100.0
    with pytest.raises(NonFiniteSamplesError, match=r"images \[8\]"):
        generate(nan, net.diffusion, [7, 8, 9], 0, DDIM3, x_T=x_T)


def test_to_uint8_maps_minus_one_to_zero_and_one_to_255_and_clamps():
    x = torch.tensor([-3.0, -1.0, -0.999, 0.0, 0.5, 1.0, 2.0]).reshape(1, 1, 1, 7)
    pixels = to_uint8(x.expand(2, 3, 1, 7))
    assert pixels.dtype == torch.uint8 and pixels.shape == (2, 1, 7, 3)  # channels last
    assert pixels[0, 0, :, 0].tolist() == [0, 0, 0, 128, 191, 255, 255]
    with pytest.raises(NonFiniteSamplesError):
        to_uint8(torch.full((1, 3, 2, 2), float("nan")))


def test_slerp_ends_at_its_endpoints_and_keeps_the_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 8, 8, generator=g), torch.randn(3, 8, 8, generator=g)
    b = b - (a.flatten() @ b.flatten()) / a.norm() ** 2 * a  # orthogonal to a
    b = b * a.norm() / b.norm()  # and of the same norm
    path = slerp(a, b, torch.linspace(0, 1, 5))
    assert path.shape == (5, 3, 8, 8)
    torch.testing.assert_close(path[0], a, atol=1e-5, rtol=0)
    torch.testing.assert_close(path[-1], b, atol=1e-5, rtol=0)
    norms = path.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, a.norm().expand(5), atol=1e-4, rtol=0)
    middle = slerp(a, b, 0.5)  # a float alpha gives one tensor, at 45 degrees from each
    torch.testing.assert_close(middle, (a + b) / (2 * math.cos(math.pi / 4)), atol=1e-5, rtol=0)
    torch.testing.assert_close(slerp(a, 2 * a, 0.5), 1.5 * a)  # parallel: the straight line


def test_labels_cycle_through_the_chosen_classes_or_all_of_them():
    assert image_labels([0, 1, 2, 3, 4], 3).tolist() == [0, 1, 2, 0, 1]
    assert image_labels([5, 0, 1], 10, [7, 2]).tolist() == [2, 7, 2]
    assert image_labels([0, 1], None) is None
    with pytest.raises(ValueError, match="unconditional"):
        image_labels([0], None, [1])
    with pytest.raises(ValueError, match=r"\[4\] are out of range"):
        image_labels([0], 4, [1, 4])


def test_a_conditional_model_samples_with_guidance(tmp_path, tiny_checkpoint):
    net = load_sampling_model(tiny_checkpoint(tmp_path / "ema.pt", num_classes=3))
    assert net.class_names == ["c0", "c1", "c2"] and net.model.null_class == 3
    plain = SamplerConfig(sampler="ddim", steps=3, clip_x0=False)  # clipping hides differences
    guided = plain.model_copy(update={"guidance_scale": 3.0})
    with_cfg = generate(net.model, net.diffusion, [0, 1], 0, guided, classes=[0, 1])
    without = generate(net.model, net.diffusion, [0, 1], 0, plain, classes=[0, 1])
    assert with_cfg.shape == (2, 3, 16, 16) and not torch.equal(with_cfg, without)


def test_ema_and_raw_weights_are_rebuilt_from_the_checkpoint_config(tmp_path, tiny_checkpoint):
    path = tiny_checkpoint(tmp_path / "ema.pt")
    ema = load_sampling_model(path)
    assert ema.step == 7 and ema.diffusion.num_timesteps == 20
    assert not ema.model.training and not any(p.requires_grad for p in ema.model.parameters())
    ckpt = load_checkpoint(path)
    raw_state = {k.removeprefix("module."): v * 2 for k, v in ckpt["ema"].items() if "module." in k}
    save_checkpoint({**ckpt, "model": raw_state}, tmp_path / "last.pt")
    raw = load_sampling_model(tmp_path / "last.pt", weights="raw")
    torch.testing.assert_close(raw.model.conv_out.weight, 2 * ema.model.conv_out.weight)


def test_missing_and_incompatible_checkpoints_are_clear_errors(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_sampling_model(tmp_path / "nope.pt")
    path = tiny_checkpoint(tmp_path / "ema.pt")
    with pytest.raises(CheckpointError, match="holds no raw weights"):
        load_sampling_model(path, weights="raw")
    ckpt = load_checkpoint(path)
    ckpt["config"]["unet"]["base_channels"] = 32
    save_checkpoint(ckpt, tmp_path / "wider.pt")
    with pytest.raises(CheckpointError, match="do not fit the config"):
        load_sampling_model(tmp_path / "wider.pt")
    ckpt["config"]["unet"]["channel_mults"] = "two"
    save_checkpoint(ckpt, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="cannot be rebuilt"):
        load_sampling_model(tmp_path / "broken.pt")
    (tmp_path / "truncated.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_sampling_model(tmp_path / "truncated.pt")


def test_bf16_runs_the_network_in_bf16_and_the_sampler_in_float32(net):
    dtypes = []
    hook = net.model.conv_in.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    try:
        fp32 = generate(net.model, net.diffusion, [0, 1], 3, OPTIONS["ddim"])
        bf16 = generate(net.model, net.diffusion, [0, 1], 3, OPTIONS["ddim"], bf16=True)
    finally:
        hook.remove()
    assert dtypes == [torch.float32] * 5 + [torch.bfloat16] * 5  # ddim-5 twice
    assert bf16.dtype == torch.float32 and bool(torch.isfinite(bf16).all())
    # the same noise, rounded network arithmetic: close to float32's, not equal to it
    difference = (bf16 - fp32).abs()
    assert 0 < float(difference.max()) < 0.25, float(difference.max())
