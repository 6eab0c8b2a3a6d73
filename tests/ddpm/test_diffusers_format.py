"""diffusers folders in and out, checked against diffusers itself (a test-only dependency): the
converted network is the same function, in both directions, and DDIM gives the same images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ddpm.checkpoint import configs_from_checkpoint
from ddpm.config import DiffusionConfig, UNetConfig
from ddpm.diffusers_format import (
    ConversionError,
    diffusion_from_scheduler,
    read_diffusers,
    state_from_diffusers,
    unet_config_from_diffusers,
    write_diffusers,
)
from ddpm.diffusion import GaussianDiffusion
from ddpm.sampling.api import ddim_sample
from ddpm.unet import UNet

diffusers = pytest.importorskip("diffusers")

# google/ddpm-cifar10-32's config.json: the DDPM paper's CIFAR-10 network.
DDPM_CIFAR10 = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.0.4",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
TINY = {
    **DDPM_CIFAR10,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 16,
}
# Two heads of 32 channels, classes, symmetric padding, shift 0, cos-first embedding
# (diffusers' default): the options beyond the paper.
TINY_MORE = {**TINY, "attention_head_dim": 32, "num_class_embeds": 4, "downsample_padding": 1,
             "freq_shift": 0, "norm_eps": 1e-5, "flip_sin_to_cos": True}  # fmt: skip
# improved-diffusion's scale-shift norm (diffusers drops the middle attention's norm unless
# attn_norm_num_groups is set)
TINY_SCALE_SHIFT = {**TINY, "resnet_time_scale_shift": "scale_shift", "attn_norm_num_groups": 8}
LAYOUTS = {"ddpm-cifar10": DDPM_CIFAR10, "tiny": TINY, "tiny-heads-classes": TINY_MORE,
           "tiny-scale-shift": TINY_SCALE_SHIFT}  # fmt: skip


def diffusers_unet(config: dict, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised UNet2DModel, every weight moved so no layer is trivially zero."""
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    model = diffusers.UNet2DModel(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    return model


def inputs(config: dict, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(1)
    size = config["sample_size"]
    x = torch.randn(batch, config["in_channels"], size, size, generator=gen)
    t = torch.tensor([0, 417, 999])[:batch]
    classes = config.get("num_class_embeds")
    y = None if classes is None else torch.arange(batch) % classes
    return x, t, y


def their_output(model, x, t, y) -> torch.Tensor:
    with torch.no_grad():
        return model(x, t, class_labels=y).sample


def our_model(folder: Path) -> tuple[UNet, DiffusionConfig | None]:
    unet, diffusion, state = read_diffusers(folder)
    model = UNet(unet).eval()
    model.load_state_dict(state)
    return model, diffusion


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_diffusers_unet_converts_to_the_same_function(tmp_path, layout):
    config = LAYOUTS[layout]
    theirs = diffusers_unet(config)
    theirs.save_pretrained(tmp_path)
    ours, _ = our_model(tmp_path)
    x, t, y = inputs(config)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, y), their_output(theirs, x, t, y), atol=1e-5, rtol=0)
    if layout == "ddpm-cifar10":  # the paper's network: its published parameter count
        assert ours.num_parameters() == 35_746_307
        assert ours.config == UNetConfig(dropout=0.0)  # our defaults are the paper's details


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_ours_exported_is_loaded_by_diffusers_as_the_same_function(tmp_path, layout):
    theirs = diffusers_unet(LAYOUTS[layout], seed=3)
    theirs.save_pretrained(tmp_path / "in")
    ours, _ = our_model(tmp_path / "in")
    diffusion = DiffusionConfig(schedule="cosine", timesteps=1000, prediction="v")
    write_diffusers(tmp_path / "out", ours.config, diffusion, ours.state_dict())
    back = diffusers.UNet2DModel.from_pretrained(tmp_path / "out", subfolder="unet").eval()
    x, t, y = inputs(LAYOUTS[layout])
    with torch.no_grad():
        torch.testing.assert_close(their_output(back, x, t, y), ours(x, t, y), atol=1e-5, rtol=0)
    # Export then import is the identity, configs and every tensor
    again, again_diffusion = our_model(tmp_path / "out")
    assert again.config == ours.config and again_diffusion == diffusion
    for name, tensor in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_an_exported_folder_is_a_ddpm_pipeline_with_our_betas(tmp_path):
    model = UNet(UNetConfig(**unet_config_from_diffusers(TINY).model_dump()))
    for schedule in ("linear", "cosine", "sigmoid", "dns"):
        diffusion = DiffusionConfig(schedule=schedule, timesteps=200, prediction="eps")
        write_diffusers(tmp_path / schedule, model.config, diffusion, model.state_dict())
        pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / schedule)
        ours = GaussianDiffusion(diffusion).alphas_cumprod64
        torch.testing.assert_close(pipe.scheduler.alphas_cumprod.double(), ours, atol=1e-6, rtol=0)
        _, read_back, _ = read_diffusers(tmp_path / schedule)
        assert read_back == diffusion


def test_old_attention_names_and_bin_weights_import_the_same(tmp_path):
    """Files saved by diffusers 0.0.x (google/ddpm-cifar10-32's) name attention query, key,
    value and proj_attn, and hold a .bin rather than safetensors."""
    theirs = diffusers_unet(TINY)
    new = {k: v.clone() for k, v in theirs.state_dict().items()}
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for key, value in new.items():
        for modern, legacy in old_names.items():
            key = key.replace(f".{modern}.", f".{legacy}.")
        old[key] = value
    assert old.keys() != new.keys()
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    torch.save(old, tmp_path / "diffusion_pytorch_model.bin")
    ours, diffusion = our_model(tmp_path)
    assert diffusion is None  # no scheduler_config.json: the command line says what it assumes
    expected = state_from_diffusers(new, ours.config)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"time_embedding_type": "fourier"}, "time_embedding_type='fourier' is not supported"),
        ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]}, "CrossAttnDownBlock2D"),
        ({"up_block_types": ["UpBlock2D", "AttnUpBlock2D"]}, "do not mirror"),
        ({"time_cond_proj_dim": 8}, "config key 'time_cond_proj_dim'"),
        ({"block_out_channels": [32, 48]}, "multiple of the first"),
        ({"_class_name": "UNet2DConditionModel"}, "only UNet2DModel maps"),
        ({"resnet_time_scale_shift": "spatial"}, "resnet_time_scale_shift='spatial'"),
        ({"resnet_time_scale_shift": "scale_shift"}, "needs attn_norm_num_groups"),
    ],
)
def test_a_folder_we_cannot_map_is_refused_naming_what(change, words):
    with pytest.raises(ConversionError, match=words.replace("[", r"\[")):
        unet_config_from_diffusers({**TINY, **change})


@pytest.mark.parametrize(
    ("scheduler", "expected"),
    [
        ({"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}, ("linear", "eps")),
        (
            {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"},
            ("cosine", "v"),
        ),
        ({"beta_schedule": "linear", "prediction_type": "sample"}, ("linear", "x0")),
    ],
)
def test_scheduler_configs_map_to_our_schedules(scheduler, expected):
    diffusion = diffusion_from_scheduler({"num_train_timesteps": 1000, **scheduler})
    assert (diffusion.schedule, diffusion.prediction, diffusion.timesteps) == (*expected, 1000)


def test_a_scheduler_with_other_betas_is_refused():
    with pytest.raises(ConversionError, match="scaled_linear"):
        diffusion_from_scheduler({"beta_schedule": "scaled_linear"})
    with pytest.raises(ConversionError, match="match none of our schedules"):
        diffusion_from_scheduler({"beta_schedule": "linear", "beta_end": 0.012})


def test_a_checkpoint_from_before_the_paper_details_keeps_its_function():
    """Version-1 files predate norm_eps, downsample_padding and time_freq_shift: they load
    with the values they were trained with, not the new defaults."""
    old = UNetConfig().model_dump(mode="json")
    for key in ("norm_eps", "downsample_padding", "time_freq_shift"):
        del old[key]
    unet, _ = configs_from_checkpoint({"config": {"unet": old, "diffusion": {}}})
    assert (unet.norm_eps, unet.downsample_padding, unet.time_freq_shift) == (1e-5, "symmetric", 1)


def test_ddim_gives_the_images_of_diffusers_ddim_scheduler(tmp_path):
    """Same weights, same x_T: our DDIM and diffusers' DDIMScheduler loop (trailing spacing,
    clipped x0, eta 0) end at the same images."""
    theirs = diffusers_unet(TINY)
    theirs.save_pretrained(tmp_path)
    ours, _ = our_model(tmp_path)
    diffusion = GaussianDiffusion(DiffusionConfig(schedule="linear", timesteps=1000))
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", clip_sample=True,
        set_alpha_to_one=True, timestep_spacing="trailing",
    )  # fmt: skip
    scheduler.set_timesteps(10)
    x = x_T.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = theirs(x, t).sample
            x = scheduler.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    mine = ddim_sample(ours, diffusion, x_T.shape, steps=10, spacing="trailing", x_T=x_T)
    assert x.abs().max() > 0.1  # not a trivial all-zero result
    torch.testing.assert_close(mine, x, atol=2e-4, rtol=0)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"attention_type": "linear"}, "linear attention"),
        ({"learn_sigma": True}, "learn_sigma"),
        ({"time_scale": 0.25}, "time_scale=0.25"),
        ({"num_classes": 10, "null_class": False}, "without a null class"),
    ],
)
def test_a_model_diffusers_cannot_hold_is_not_exported(change, words):
    from ddpm.diffusers_format import unet_config_to_diffusers

    with pytest.raises(ConversionError, match=words):
        unet_config_to_diffusers(UNetConfig(**change))
