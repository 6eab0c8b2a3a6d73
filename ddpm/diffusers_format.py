"""Weights in the diffusers folder layout, in and out, exactly: published models run here.

A diffusers ``UNet2DModel`` at the DDPM layout (``DownBlock2D`` / ``AttnDownBlock2D`` levels, a
ResBlock-Attention-ResBlock middle, positional timestep embedding), such as google/ddpm-cifar10-32
(Ho et al.'s CIFAR-10 model), is the same function as our :class:`~ddpm.unet.UNet` once the
config carries the paper's details (``norm_eps``, ``downsample_padding``, ``time_freq_shift``).
This module maps the two configs and state dicts onto each other, one parameter at a time, and
reads and writes the folders (``config.json``, ``diffusion_pytorch_model.safetensors`` or
``.bin``, ``scheduler_config.json``). It never imports diffusers: the files are read with
safetensors, or ``torch.load(weights_only=True)`` for ``.bin``.

Anything this code cannot map exactly (another block type, an option that changes the function)
is refused with a :class:`ConversionError` that names the first key or value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ddpm.checkpoint import read_safely
from ddpm.config import DiffusionConfig, UNetConfig
from ddpm.errors import ConversionError
from ddpm.files import atomic_write_bytes
from ddpm.schedules import SCHEDULES, make_betas

WEIGHTS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# Options of UNet2DModel that must have these values for the function to be ours.
FIXED = {
    "act_fn": "silu",
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "mid_block_scale_factor": 1,
    "add_attention": True,
    "class_embed_type": None,
    "num_train_timesteps": None,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "mid_block_type": "UNetMidBlock2D",
    "time_embedding_dim": None,
}
USED = {
    "sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block",
    "down_block_types", "up_block_types", "norm_num_groups", "norm_eps", "downsample_padding",
    "freq_shift", "attention_head_dim", "dropout", "num_class_embeds", "attn_norm_num_groups",
    "resnet_time_scale_shift", "flip_sin_to_cos",
}  # fmt: skip
SCALE_SHIFT = {"default": False, "scale_shift": True}  # resnet_time_scale_shift -> ours
OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
PREDICTIONS = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


# Configs ---------------------------------------------------------------------------------------


def _check_supported(config: dict[str, Any]) -> None:
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ConversionError(f"_class_name {config['_class_name']!r}: only UNet2DModel maps")
    for key, value in config.items():
        if key.startswith("_") or key in USED:
            continue
        if key not in FIXED:
            raise ConversionError(f"config key {key!r} is not one this conversion knows")
        if value != FIXED[key] and not (key == "mid_block_scale_factor" and value == 1.0):
            raise ConversionError(f"{key}={value!r} is not supported; it must be {FIXED[key]!r}")


def _heads(config: dict[str, Any], attention_channels: list[int]) -> int:
    """Our one number of heads from diffusers' head dimension (None: one head per block)."""
    head_dim = config.get("attention_head_dim")
    if head_dim is None:
        return 1
    heads = {c // head_dim for c in attention_channels}
    if len(heads) != 1 or any(c % head_dim for c in attention_channels):
        raise ConversionError(
            f"attention_head_dim={head_dim} gives different head counts {sorted(heads)} across "
            f"levels of {attention_channels} channels; our UNet has one head count"
        )
    return heads.pop()


def unet_config_from_diffusers(config: dict[str, Any]) -> UNetConfig:
    """Our UNet config for a diffusers UNet2DModel config (refused when it cannot be exact)."""
    _check_supported(config)
    widths, size = list(config["block_out_channels"]), int(config["sample_size"])
    down = list(config["down_block_types"])
    bad = [b for b in down if b not in ("DownBlock2D", "AttnDownBlock2D")]
    if bad:
        raise ConversionError(f"down_block_types {bad}: only DownBlock2D and AttnDownBlock2D map")
    if list(config["up_block_types"]) != [b.replace("Down", "Up") for b in reversed(down)]:
        raise ConversionError(
            f"up_block_types {config['up_block_types']} do not mirror the down blocks {down}"
        )
    if any(w % widths[0] for w in widths):
        raise ConversionError(f"block_out_channels {widths}: each must be a multiple of the first")
    if config.get("out_channels", config["in_channels"]) != config["in_channels"]:
        raise ConversionError("out_channels must equal in_channels (a noise-shaped output)")
    groups = config.get("norm_num_groups", 32)
    if config.get("attn_norm_num_groups") not in (None, groups):
        raise ConversionError("attn_norm_num_groups must be null or equal norm_num_groups")
    attn_levels = [i for i, b in enumerate(down) if b.startswith("Attn")]
    classes = config.get("num_class_embeds")
    shift = config.get("resnet_time_scale_shift", "default")
    if shift not in SCALE_SHIFT:
        raise ConversionError(
            f"resnet_time_scale_shift={shift!r} is not supported; it must be one of "
            f"{list(SCALE_SHIFT)}"
        )
    if SCALE_SHIFT[shift] and config.get("attn_norm_num_groups") is None:
        # diffusers then builds its middle attention without a GroupNorm; ours has one
        raise ConversionError(
            "resnet_time_scale_shift='scale_shift' needs attn_norm_num_groups set (without it "
            "the middle attention has no norm, which our UNet always has)"
        )
    return UNetConfig(
        image_size=size,
        in_channels=config["in_channels"],
        base_channels=widths[0],
        channel_mults=tuple(w // widths[0] for w in widths),
        num_res_blocks=config["layers_per_block"],
        attention_resolutions=tuple(size // 2**i for i in attn_levels),
        num_heads=_heads(config, [widths[i] for i in attn_levels] + [widths[-1]]),
        dropout=config.get("dropout", 0.0),
        num_groups=groups,
        norm_eps=config.get("norm_eps", 1e-5),
        downsample_padding="asymmetric"
        if config.get("downsample_padding", 1) == 0
        else "symmetric",
        time_freq_shift=config.get("freq_shift", 0),
        flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)),
        num_classes=None if classes is None else classes - 1,  # the last row: our null class
        scale_shift_norm=SCALE_SHIFT[shift],
    )


def unet_config_to_diffusers(cfg: UNetConfig) -> dict[str, Any]:
    """The UNet2DModel config of the same function as our UNet ``cfg``."""
    if cfg.attention_type != "softmax":
        raise ConversionError("linear attention has no diffusers UNet2DModel equivalent")
    if cfg.learn_sigma:
        raise ConversionError("learned variances (learn_sigma) are not exported to diffusers")
    if cfg.time_scale != 1.0:
        raise ConversionError(f"time_scale={cfg.time_scale}: diffusers' UNet2DModel embeds t as is")
    if cfg.num_classes is not None and not cfg.null_class:
        raise ConversionError(
            "a class-conditional model without a null class: our diffusers files hold the null "
            "class as the class embedding's last row"
        )
    widths = [cfg.base_channels * m for m in cfg.channel_mults]
    attn = [r in cfg.attention_resolutions for r in cfg.resolutions]
    head_dims = {w // cfg.num_heads for w, a in zip(widths, attn, strict=True) if a}
    head_dims.add(widths[-1] // cfg.num_heads)
    if cfg.num_heads > 1 and len(head_dims) > 1:
        raise ConversionError(f"{cfg.num_heads} heads over levels of {widths} channels: diffusers "
                              "has one head dimension for all levels")  # fmt: skip
    down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn]
    return {
        "_class_name": "UNet2DModel",
        **FIXED,
        "sample_size": cfg.image_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.in_channels,
        "block_out_channels": widths,
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": down,
        "up_block_types": [b.replace("Down", "Up") for b in reversed(down)],
        "norm_num_groups": cfg.num_groups,
        "norm_eps": cfg.norm_eps,
        "downsample_padding": 0 if cfg.downsample_padding == "asymmetric" else 1,
        "freq_shift": cfg.time_freq_shift,
        "flip_sin_to_cos": cfg.flip_sin_to_cos,
        "attention_head_dim": None if cfg.num_heads == 1 else head_dims.pop(),
        "dropout": cfg.dropout,
        "num_class_embeds": None if cfg.num_classes is None else cfg.num_classes + 1,
        # with scale_shift, diffusers' middle attention keeps its norm only when this is set
        "attn_norm_num_groups": cfg.num_groups if cfg.scale_shift_norm else None,
        "resnet_time_scale_shift": "scale_shift" if cfg.scale_shift_norm else "default",
    }


def scheduler_betas(config: dict[str, Any]) -> torch.Tensor:
    """float64 betas of a DDPMScheduler / DDIMScheduler config, as diffusers computes them."""
    steps, kind = int(config.get("num_train_timesteps", 1000)), config.get("beta_schedule")
    if config.get("trained_betas") is not None:
        return torch.tensor(config["trained_betas"], dtype=torch.float64)
    start, end = config.get("beta_start", 1e-4), config.get("beta_end", 0.02)
    if kind == "linear":
        return torch.linspace(start, end, steps, dtype=torch.float32).double()
    if kind == "squaredcos_cap_v2":
        return make_betas("cosine", steps)  # the same formula (Nichol & Dhariwal 2021, eq. 17)
    raise ConversionError(f"scheduler beta_schedule={kind!r} is none of linear, squaredcos_cap_v2")


def diffusion_from_scheduler(config: dict[str, Any]) -> DiffusionConfig:
    """Our diffusion config whose betas and prediction are the scheduler's."""
    betas = scheduler_betas(config)
    kind = {v: k for k, v in PREDICTIONS.items()}.get(config.get("prediction_type", "epsilon"))
    if kind is None:
        raise ConversionError(f"prediction_type={config['prediction_type']!r} is not supported")
    for name in SCHEDULES:
        if torch.allclose(make_betas(name, len(betas)), betas, rtol=1e-5, atol=1e-7):
            return DiffusionConfig(schedule=name, timesteps=len(betas), prediction=kind)
    names = ", ".join(SCHEDULES)
    raise ConversionError(f"the scheduler's betas match none of our schedules ({names}) at "
                          f"T={len(betas)}")  # fmt: skip


def scheduler_config(diffusion: DiffusionConfig) -> dict[str, Any]:
    """A DDPMScheduler config with our betas (the posterior variance, x0 clipped to [-1, 1])."""
    out: dict[str, Any] = {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": diffusion.timesteps,
        "prediction_type": PREDICTIONS[diffusion.prediction],
        "variance_type": "fixed_small",
        "clip_sample": True,
        "clip_sample_range": 1.0,
    }
    if diffusion.schedule == "linear" and diffusion.timesteps >= 50:  # unclipped linspace
        scale = 1000 / diffusion.timesteps
        return {
            **out,
            "beta_schedule": "linear",
            "beta_start": scale * 1e-4,
            "beta_end": scale * 0.02,
        }
    if diffusion.schedule == "cosine":
        return {**out, "beta_schedule": "squaredcos_cap_v2"}
    betas = make_betas(diffusion.schedule, diffusion.timesteps).tolist()
    return {**out, "beta_schedule": "linear", "trained_betas": betas}


# State dicts -----------------------------------------------------------------------------------


def _res(ours: str, theirs: str) -> list[tuple[str, str, str]]:
    names = [("norm1", "norm1"), ("conv1", "conv1"), ("emb_proj", "time_emb_proj"),
             ("norm2", "norm2"), ("conv2", "conv2"), ("skip", "conv_shortcut")]  # fmt: skip
    return [(f"{ours}.{a}", f"{theirs}.{b}", "same") for a, b in names]


def _attn(ours: str, theirs: str) -> list[tuple[str, str, str]]:
    return [
        (f"{ours}.norm", f"{theirs}.group_norm", "same"),
        (f"{ours}.qkv", theirs, "qkv"),
        (f"{ours}.proj", f"{theirs}.to_out.0", "linear"),
    ]


def module_pairs(cfg: UNetConfig) -> list[tuple[str, str, str]]:
    """(our module, diffusers module, how the parameters map) for every module of the UNet."""
    levels, n = len(cfg.channel_mults), cfg.num_res_blocks
    attn = [r in cfg.attention_resolutions for r in cfg.resolutions]
    pairs = [
        ("time_embed.linear1", "time_embedding.linear_1", "same"),
        ("time_embed.linear2", "time_embedding.linear_2", "same"),
        ("class_embed", "class_embedding", "same"),
        ("conv_in", "conv_in", "same"),
    ]
    for level in range(levels):
        for j in range(n):
            pairs += _res(f"down.{level}.{j}.res", f"down_blocks.{level}.resnets.{j}")
            if attn[level]:
                pairs += _attn(f"down.{level}.{j}.attn", f"down_blocks.{level}.attentions.{j}")
        if level < levels - 1:
            pairs.append((f"downsample.{level}.conv", f"down_blocks.{level}.downsamplers.0.conv",
                          "same"))  # fmt: skip
    pairs += _res("mid_block1", "mid_block.resnets.0") + _attn("mid_attn", "mid_block.attentions.0")
    pairs += _res("mid_block2", "mid_block.resnets.1")
    for i, level in enumerate(reversed(range(levels))):
        for j in range(n + 1):
            pairs += _res(f"up.{i}.{j}.res", f"up_blocks.{i}.resnets.{j}")
            if attn[level]:
                pairs += _attn(f"up.{i}.{j}.attn", f"up_blocks.{i}.attentions.{j}")
        if level > 0:
            pairs.append((f"upsample.{i}.conv", f"up_blocks.{i}.upsamplers.0.conv", "same"))
    return [*pairs, ("norm_out", "conv_norm_out", "same"), ("conv_out", "conv_out", "same")]


def _modern_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Attention keys as diffusers names them today (old files say query, key, value, ...)."""
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        head, _, last = module.rpartition(".")
        if ".attentions." in key and last in OLD_ATTENTION_NAMES:
            key = f"{head}.{OLD_ATTENTION_NAMES[last]}.{param}"
        out[key] = value
    return out


def state_from_diffusers(
    state: dict[str, torch.Tensor], cfg: UNetConfig
) -> dict[str, torch.Tensor]:
    """Our UNet's state dict from a diffusers UNet2DModel's (every key used, or an error)."""
    theirs, ours = _modern_names(state), {}
    for our, their, kind in module_pairs(cfg):
        for param in ("weight", "bias"):
            if kind == "qkv":
                parts = [theirs.pop(f"{their}.to_{x}.{param}", None) for x in "qkv"]
                if any(p is None for p in parts):
                    raise ConversionError(f"{their}: the q/k/v {param}s are missing")
                value = torch.cat(parts)
            else:
                value = theirs.pop(f"{their}.{param}", None)
            if value is not None:
                conv = kind in ("qkv", "linear")  # Linear (out, in) -> 1x1 conv (out, in, 1, 1)
                ours[f"{our}.{param}"] = (
                    value[..., None, None] if conv and value.ndim == 2 else value
                )
    if theirs:
        raise ConversionError(f"weights {sorted(theirs)[:3]} have no place in our UNet")
    return ours


def state_to_diffusers(state: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DModel state dict from our UNet's (the inverse of the above)."""
    ours, theirs = dict(state), {}
    for our, their, kind in module_pairs(cfg):
        for param in ("weight", "bias"):
            value = ours.pop(f"{our}.{param}", None)
            if value is None:
                continue
            if kind in ("qkv", "linear") and value.ndim == 4:
                value = value[:, :, 0, 0]
            if kind == "qkv":
                for x, part in zip("qkv", value.chunk(3), strict=True):
                    theirs[f"{their}.to_{x}.{param}"] = part.contiguous()
            else:
                theirs[f"{their}.{param}"] = value.contiguous()
    assert not ours, f"unmapped parameters {sorted(ours)[:3]}"
    return theirs


# Folders ---------------------------------------------------------------------------------------


def _model_folder(root: Path) -> Path:
    """A UNet folder itself, or the ``unet/`` folder of a pipeline."""
    for folder in (root, root / "unet"):
        if (folder / "config.json").is_file():
            return folder
    raise ConversionError(f"{root}: no config.json (nor unet/config.json); not a diffusers model")


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHTS_FILES:
        path = folder / name
        if path.is_file():
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(str(path))
            return read_safely(path, error=ConversionError)
    raise ConversionError(f"{folder}: none of {list(WEIGHTS_FILES)}; download the weights too")


def read_diffusers(
    root: Path,
) -> tuple[UNetConfig, DiffusionConfig | None, dict[str, torch.Tensor]]:
    """(our UNet config, our diffusion config or None without a scheduler, our state dict)."""
    folder = _model_folder(Path(root))
    unet = unet_config_from_diffusers(json.loads((folder / "config.json").read_text()))
    state = state_from_diffusers(_read_weights(folder), unet)
    candidates = [Path(root) / "scheduler", Path(root), folder]
    for path in (c / "scheduler_config.json" for c in candidates):
        if path.is_file():
            return unet, diffusion_from_scheduler(json.loads(path.read_text())), state
    return unet, None, state


def write_diffusers(
    root: Path, unet: UNetConfig, diffusion: DiffusionConfig, state: dict[str, torch.Tensor]
) -> None:
    """A DDPMPipeline folder: model_index.json, unet/ (config, safetensors), scheduler/."""
    from safetensors.torch import save

    root = Path(root)
    weights = save(state_to_diffusers(state, unet))
    atomic_write_bytes(root / "unet" / WEIGHTS_FILES[0], weights)
    files = {
        "unet/config.json": unet_config_to_diffusers(unet),
        "scheduler/scheduler_config.json": scheduler_config(diffusion),
        "model_index.json": {
            "_class_name": "DDPMPipeline",
            "unet": ["diffusers", "UNet2DModel"],
            "scheduler": ["diffusers", "DDPMScheduler"],
        },
    }
    for name, payload in files.items():
        atomic_write_bytes(root / name, (json.dumps(payload, indent=2) + "\n").encode())
