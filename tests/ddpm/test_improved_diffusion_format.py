"""improved-diffusion checkpoints in and out: state dicts in its layout (tests/improved_reference.py
builds them from its published code's structure) convert to our UNet as the same function,
checked against an independent functional forward; its flags become our configs; anything
that does not map is refused by name."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from improved_reference import improved_forward, improved_shapes, improved_state

from ddpm.config import DiffusionConfig, UNetConfig
from ddpm.errors import ConversionError
from ddpm.improved_diffusion_format import (
    DEFAULTS,
    configs_from_flags,
    expected_shapes,
    flags_from_configs,
    module_pairs,
    parse_flags,
    read_improved_diffusion,
    state_from_improved,
    write_improved_diffusion,
)
from ddpm.schedules import make_betas
from ddpm.unet import UNet

# improved-diffusion's README flags for its CIFAR-10 and ImageNet-64 models, at 32 channels
# (the released models have 128 and 192; the layout is the same, the tests stay fast).
SMALL = "--num_channels 32 --num_res_blocks 1"
FLAG_SETS = {
    # CIFAR-10, hybrid: 6 output channels, 4 heads (the default), scale-shift norm (default),
    # t * 1000 / 4000 (rescale_timesteps default)
    "cifar10-hybrid": f"--image_size 32 {SMALL} --learn_sigma True --dropout 0.3 "
    "--diffusion_steps 4000 --noise_schedule cosine",
    # class-conditional ImageNet-64: 1000 labels without a null class, t unscaled
    "imagenet64-cond": f"--image_size 64 {SMALL} --learn_sigma True --class_cond True "
    "--diffusion_steps 4000 --noise_schedule cosine --rescale_learned_sigmas False "
    "--rescale_timesteps False",
    # the LSUN flags' options at 32 px: one head, no scale-shift, one attention resolution,
    # 3 outputs, two blocks per level
    "one-head-plain": "--image_size 32 --num_channels 32 --num_res_blocks 2 --num_heads 1 "
    "--use_scale_shift_norm False --attention_resolutions 16 --sigma_small True",
}
README = {
    "cifar10_uncond_50M_500K": "--image_size 32 --num_channels 128 --num_res_blocks 3 "
    "--learn_sigma True --dropout 0.3 --diffusion_steps 4000 --noise_schedule cosine",
    "cifar10_uncond_vlb_50M_500K": "--image_size 32 --num_channels 128 --num_res_blocks 3 "
    "--learn_sigma True --dropout 0.3 --diffusion_steps 4000 --noise_schedule cosine "
    "--use_kl True",
    "imagenet64_uncond_100M_1500K": "--image_size 64 --num_channels 128 --num_res_blocks 3 "
    "--learn_sigma True --diffusion_steps 4000 --noise_schedule cosine",
    "imagenet64_cond_270M_250K": "--image_size 64 --num_channels 192 --num_res_blocks 3 "
    "--learn_sigma True --class_cond True --diffusion_steps 4000 --noise_schedule cosine "
    "--rescale_learned_sigmas False --rescale_timesteps False",
}


def converted(flags: str, seed: int = 0) -> tuple[UNet, dict, dict]:
    parsed = parse_flags(flags)
    values, theirs = parsed.values, improved_state(parsed.values, seed)
    unet, _, _ = configs_from_flags(parsed)
    model = UNet(unet).eval()
    model.load_state_dict(state_from_improved(theirs, unet))
    return model, theirs, values


def inputs(values: dict, batch: int = 3):
    gen = torch.Generator().manual_seed(1)
    size = values["image_size"]
    x = torch.randn(batch, 3, size, size, generator=gen)
    t = torch.tensor([0, 1234, 3999])[:batch] % values["diffusion_steps"]
    y = torch.tensor([0, 517, 999])[:batch] if values["class_cond"] else None
    return x, t, y


@pytest.mark.parametrize("name", list(FLAG_SETS))
def test_an_improved_diffusion_state_dict_converts_to_the_same_function(name):
    model, theirs, values = converted(FLAG_SETS[name])
    x, t, y = inputs(values)
    with torch.no_grad():
        expected = improved_forward(theirs, values, x, t, y)
        out = model(x, t, y)
    assert out.shape[1] == (6 if values["learn_sigma"] else 3)
    assert expected.abs().mean() > 0.1  # not a trivially small output
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=1e-4)


def test_a_plain_three_way_qkv_split_is_not_the_function_with_several_heads():
    """The qkv rows must be permuted: read in order, 4 heads attend to the wrong rows."""
    model, theirs, values = converted(FLAG_SETS["cifar10-hybrid"])
    state = model.state_dict()
    for ours, their, kind in module_pairs(model.config):
        if kind == "qkv":
            state[f"{ours}.weight"] = theirs[f"{their}.weight"][..., None]
            state[f"{ours}.bias"] = theirs[f"{their}.bias"]
    naive = UNet(model.config).eval()
    naive.load_state_dict(state)
    x, t, _ = inputs(values)
    with torch.no_grad():
        assert (naive(x, t) - model(x, t)).abs().max() > 1e-2


def test_the_readme_flag_sets_give_the_published_networks():
    """Each released model's flags build a network of its name's size, every parameter in
    the place its layout puts one (the shapes of the independent account)."""
    counts = {}
    for name, flags in README.items():
        values = parse_flags(flags).values
        unet, diffusion, variance = configs_from_flags(parse_flags(flags))
        theirs = improved_shapes(values)
        ours = expected_shapes(unet)
        assert sum(math.prod(s) for s in theirs.values()) == sum(s.numel() for s in ours.values())
        counts[name] = sum(s.numel() for s in ours.values())
        assert variance == "learned" and diffusion.schedule == "cosine"
        assert diffusion.timesteps == 4000
    # what the file names round to 50M, 100M and 270M
    assert counts["cifar10_uncond_50M_500K"] == 52_546_438
    assert counts["imagenet64_uncond_100M_1500K"] == 121_063_942
    assert counts["imagenet64_cond_270M_250K"] == 273_049_350


def test_the_flags_become_our_configs():
    unet, diffusion, variance = configs_from_flags(parse_flags(README["cifar10_uncond_50M_500K"]))
    assert unet.channel_mults == (1, 2, 2, 2) and unet.attention_resolutions == (16, 8)
    assert (unet.num_heads, unet.dropout, unet.num_res_blocks) == (4, 0.3, 3)
    assert unet.learn_sigma and unet.scale_shift_norm and unet.flip_sin_to_cos
    assert unet.time_scale == 0.25 and unet.norm_eps == 1e-5 and unet.time_freq_shift == 0
    assert (diffusion.loss, diffusion.hybrid_lambda, variance) == ("hybrid", 0.001, "learned")
    _, vlb, _ = configs_from_flags(parse_flags(README["cifar10_uncond_vlb_50M_500K"]))
    assert vlb.loss == "vlb"
    cond, cond_diffusion, _ = configs_from_flags(parse_flags(README["imagenet64_cond_270M_250K"]))
    assert cond.num_classes == 1000 and not cond.null_class and cond.time_scale == 1.0
    assert cond.channel_mults == (1, 2, 3, 4) and cond.attention_resolutions == (16, 8)
    assert cond_diffusion.hybrid_lambda == 1 / 4000  # MSE: mse + vb, unrescaled
    # the defaults: 64 px, T = 1000, linear, fixed large variance (sigma^2 = beta), eps
    unet, diffusion, variance = configs_from_flags(parse_flags(""))
    assert (unet.image_size, diffusion.timesteps, diffusion.schedule) == (64, 1000, "linear")
    assert (variance, diffusion.loss, diffusion.prediction) == ("beta", "l2", "eps")
    _, x0, small = configs_from_flags(parse_flags("--predict_xstart t --sigma_small yes"))
    assert (x0.prediction, small) == ("x0", "posterior")


def test_flags_parse_as_its_argparse_reads_them():
    flags = parse_flags("--image_size=32 --learn_sigma TRUE --dropout 0.1 --lr 1e-4 "
                        "--batch_size 128 --schedule_sampler loss-second-moment")  # fmt: skip
    assert flags.values["image_size"] == 32 and flags.values["learn_sigma"] is True
    assert flags.values["dropout"] == 0.1 and flags.values["num_heads"] == DEFAULTS["num_heads"]
    assert flags.script == {"lr": "1e-4", "batch_size": "128",
                            "schedule_sampler": "loss-second-moment"}  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        ("--image_sizes 32", "--image_sizes is not a flag"),
        ("--learn_sigma maybe", "--learn_sigma maybe: a boolean flag takes True or False"),
        ("--num_channels 12.5", "--num_channels 12.5: not a valid int"),
        ("--image_size", "--image_size has no value"),
        ("image_size 32", "expected --name value pairs"),
        ("--image_size 128", "--image_size 128: improved-diffusion's script builds [32, 64, 256]"),
        ("--num_heads_upsample 2", "--num_heads_upsample 2: our UNet has one head count"),
        ("--noise_schedule sqrt", "--noise_schedule sqrt"),
        ("--num_channels 48", "num_groups=32 does not divide 48"),
        ("--attention_resolutions 16,x", "--attention_resolutions '16,x'"),
    ],
)
def test_flags_we_cannot_map_are_refused_by_name(flags, words):
    with pytest.raises(ConversionError, match=words.replace("[", r"\[")):
        configs_from_flags(parse_flags(flags))


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda s: s.update({"input_blocks.9.0.extra": torch.zeros(1)}), "input_blocks.9.0.extra"),
        (lambda s: s.pop("middle_block.1.qkv.bias"), "middle_block.1.qkv.bias is missing"),
        (lambda s: s.update({"out.2.weight": torch.zeros(3, 32, 3, 3)}),
         r"out.2.weight has shape \(3, 32, 3, 3\) where the flags' network has \(6, 32, 3, 3\)"),
    ],
)  # fmt: skip
def test_a_checkpoint_the_flags_do_not_describe_is_refused_naming_the_key(edit, words):
    values = parse_flags(FLAG_SETS["cifar10-hybrid"]).values
    state = improved_state(values)
    edit(state)
    unet, _, _ = configs_from_flags(parse_flags(FLAG_SETS["cifar10-hybrid"]))
    with pytest.raises(ConversionError, match=words):
        state_from_improved(state, unet)


def test_a_file_is_read_with_its_flags_and_refused_when_not_a_state_dict(tmp_path):
    flags = FLAG_SETS["imagenet64-cond"]
    theirs = {k: v.half() for k, v in improved_state(parse_flags(flags).values).items()}
    torch.save(theirs, tmp_path / "model.pt")
    unet, diffusion, variance, state = read_improved_diffusion(tmp_path / "model.pt", flags)
    assert state["class_embed.weight"].dtype == torch.float32  # fp16 files widen
    assert unet.num_classes == 1000 and variance == "learned" and diffusion.timesteps == 4000
    torch.save({"model": theirs, "step": 3}, tmp_path / "wrapped.pt")
    with pytest.raises(ConversionError, match="not a bare state dict"):
        read_improved_diffusion(tmp_path / "wrapped.pt", flags)
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ConversionError, match=r"text\.pt is not a readable checkpoint, one "):
        read_improved_diffusion(tmp_path / "text.pt", flags)


@pytest.mark.parametrize("name", ["cifar10-hybrid", "imagenet64-cond", "one-head-plain"])
def test_export_then_import_is_the_identity(tmp_path, name):
    model, _, values = converted(FLAG_SETS[name], seed=4)
    unet, diffusion, variance = configs_from_flags(parse_flags(FLAG_SETS[name]))
    flags = write_improved_diffusion(tmp_path / "out.pt", unet, diffusion, variance,
                                     model.state_dict())  # fmt: skip
    back = read_improved_diffusion(tmp_path / "out.pt", flags)
    assert (back.unet, back.diffusion, back.variance) == (unet, diffusion, variance)
    for key, tensor in model.state_dict().items():
        assert torch.equal(back.state[key], tensor), key
    # and the file is its layout: the reference network computes our model's function
    theirs = torch.load(tmp_path / "out.pt", weights_only=True)
    x, t, y = inputs(values)
    with torch.no_grad():
        torch.testing.assert_close(
            improved_forward(theirs, parse_flags(flags).values, x, t, y), model(x, t, y),
            atol=2e-4, rtol=1e-4,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({}, "norm_eps=1e-06, its 1e-05"),  # the DDPM paper's network: not its layout
        ({"norm_eps": 1e-5, "downsample_padding": "symmetric", "time_freq_shift": 0.0,
          "flip_sin_to_cos": True, "channel_mults": (1, 2, 2)}, "channel_mults=[1, 2, 2]"),
    ],
)  # fmt: skip
def test_a_model_improved_diffusion_cannot_hold_is_not_exported(change, words):
    unet = UNetConfig(**change)
    with pytest.raises(ConversionError, match=words.replace("[", r"\[")):
        flags_from_configs(unet, DiffusionConfig(), "posterior")


def _their_betas(name: str, T: int) -> np.ndarray:
    """improved-diffusion's get_named_beta_schedule, from its paper's definitions."""
    if name == "linear":
        scale = 1000 / T
        return np.linspace(scale * 0.0001, scale * 0.02, T, dtype=np.float64)
    ab = [math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(T + 1)]
    return np.array([min(1 - ab[i + 1] / ab[i], 0.999) for i in range(T)])


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("T", [1000, 4000])
def test_our_schedules_are_its_schedules(name, T):
    np.testing.assert_allclose(make_betas(name, T).numpy(), _their_betas(name, T), rtol=1e-10)
