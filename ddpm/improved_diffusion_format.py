"""openai/improved-diffusion checkpoints in and out, exactly: the improved-DDPM models run here.

Nichol & Dhariwal (2021) released their models (CIFAR-10, ImageNet 64x64, LSUN) as bare state
dicts of improved-diffusion's ``UNetModel``; what the network and its diffusion are lives in the
command-line flags of its scripts, which its README gives next to each checkpoint. This module
reads those flags with the scripts' defaults (:data:`DEFAULTS`), maps them onto our configs and
maps the state dict onto our :class:`~ddpm.unet.UNet`, one parameter at a time:

- the keys: ``input_blocks`` / ``middle_block`` / ``output_blocks`` of sequential layers against
  our ``down`` / ``mid_*`` / ``up`` lists (:func:`module_pairs`);
- attention: its qkv is a 1-d conv whose 3C output rows are laid out head by head,
  ``[q_h, k_h, v_h]`` for head h, where ours are ``[q, k, v]``, each split into heads; the rows
  are permuted (:func:`qkv_order`), since a plain three-way split is wrong once there are two
  heads or more; its 1-d convs become our 1x1 convs;
- the rest is configuration: the embedding ``[cos, sin]`` at frequencies 10000^(-i / half)
  (``flip_sin_to_cos``, ``time_freq_shift`` 0) of t * 1000 / T (``rescale_timesteps``:
  ``time_scale``), GroupNorm(32, eps 1e-5), stride-2 convs padded on every side, scale-shift
  norm, learned variances, and a label embedding without a null class (``null_class`` false).

Anything that cannot be mapped exactly is refused with a :class:`ConversionError` naming the
first flag or key.
"""

from __future__ import annotations

import io
import shlex
from pathlib import Path
from typing import Any, NamedTuple

import torch
from pydantic import ValidationError

from ddpm.checkpoint import read_safely
from ddpm.config import DiffusionConfig, UNetConfig, Variance
from ddpm.errors import ConversionError
from ddpm.files import atomic_write_bytes
from ddpm.unet import UNet

# improved_diffusion.script_util.model_and_diffusion_defaults(): what a flag left out means.
DEFAULTS: dict[str, Any] = {
    "image_size": 64, "num_channels": 128, "num_res_blocks": 2, "num_heads": 4,
    "num_heads_upsample": -1, "attention_resolutions": "16,8", "dropout": 0.0,
    "learn_sigma": False, "sigma_small": False, "class_cond": False, "diffusion_steps": 1000,
    "noise_schedule": "linear", "timestep_respacing": "", "use_kl": False,
    "predict_xstart": False, "rescale_timesteps": True, "rescale_learned_sigmas": True,
    "use_checkpoint": False, "use_scale_shift_norm": True,
}  # fmt: skip
# Flags of its training and sampling scripts (and gradient checkpointing, and the sampler's
# respacing): they do not change the network or its diffusion, so they are accepted and named
# back as not carried over.
SCRIPT_FLAGS = {
    "data_dir", "schedule_sampler", "lr", "weight_decay", "lr_anneal_steps", "batch_size",
    "microbatch", "ema_rate", "log_interval", "save_interval", "resume_checkpoint", "use_fp16",
    "fp16_scale_growth", "clip_denoised", "num_samples", "use_ddim", "model_path",
    "timestep_respacing", "use_checkpoint",
}  # fmt: skip
CHANNEL_MULTS = {32: (1, 2, 2, 2), 64: (1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4)}  # by image_size
NUM_CLASSES = 1000  # class_cond: ImageNet's classes
GROUPS, EPS = 32, 1e-5  # its GroupNorm32: 32 groups, torch's eps
TRUE, FALSE = ("yes", "true", "t", "y", "1"), ("no", "false", "f", "n", "0")  # its str2bool


class Flags(NamedTuple):
    """Every model and diffusion flag's value (defaults filled in) and the script flags given."""

    values: dict[str, Any]
    script: dict[str, str]


class Converted(NamedTuple):
    """An improved-diffusion model as ours: configs, the variance its sampler uses, weights."""

    unet: UNetConfig
    diffusion: DiffusionConfig
    variance: Variance
    state: dict[str, torch.Tensor]


# Flags ----------------------------------------------------------------------------------------


def _typed(name: str, text: str) -> Any:
    """A flag's value as its script's argparse reads it: the type of the default."""
    kind = type(DEFAULTS[name])
    if kind is bool:
        if text.lower() in TRUE + FALSE:
            return text.lower() in TRUE
        raise ConversionError(f"--{name} {text}: a boolean flag takes True or False")
    try:
        return kind(text)
    except ValueError:
        raise ConversionError(f"--{name} {text}: not a valid {kind.__name__}") from None


def parse_flags(text: str) -> Flags:
    """``--name value`` (or ``--name=value``) pairs, as in improved-diffusion's README, with its
    defaults for the flags left out; an unknown flag is refused by name."""
    words, given, script = shlex.split(text), {}, {}
    while words:
        word = words.pop(0)
        if not word.startswith("--") or len(word) == 2:
            raise ConversionError(f"{word!r} in the flags: expected --name value pairs")
        name, eq, value = word[2:].partition("=")
        if not eq:
            if not words:
                raise ConversionError(f"--{name} has no value")
            value = words.pop(0)
        if name in SCRIPT_FLAGS:
            script[name] = value
        elif name in DEFAULTS:
            given[name] = _typed(name, value)
        else:
            raise ConversionError(
                f"--{name} is not a flag of improved-diffusion's model, diffusion or scripts; "
                f"the model's are {', '.join(sorted(set(DEFAULTS) - SCRIPT_FLAGS))}"
            )
    return Flags({**DEFAULTS, **given}, script)


def _attention_pixels(f: dict[str, Any], levels: int) -> tuple[int, ...]:
    """Its attention_resolutions become downsampling rates size // r; the levels at those rates
    get attention, and rates the network never reaches are ignored, as there."""
    size = f["image_size"]
    try:
        rates = {size // int(r) for r in f["attention_resolutions"].split(",")}
    except (ValueError, ZeroDivisionError):
        raise ConversionError(
            f"--attention_resolutions {f['attention_resolutions']!r}: expected pixel sizes such "
            "as 16,8"
        ) from None
    return tuple(size // 2**level for level in range(levels) if 2**level in rates)


def _unet_config(f: dict[str, Any], T: int) -> UNetConfig:
    size = f["image_size"]
    if size not in CHANNEL_MULTS:
        raise ConversionError(
            f"--image_size {size}: improved-diffusion's script builds {sorted(CHANNEL_MULTS)}"
        )
    if f["num_heads_upsample"] not in (-1, f["num_heads"]):
        raise ConversionError(
            f"--num_heads_upsample {f['num_heads_upsample']}: our UNet has one head count; it "
            f"must be -1 or --num_heads ({f['num_heads']})"
        )
    mults = CHANNEL_MULTS[size]
    try:
        return UNetConfig(
            image_size=size, in_channels=3, base_channels=f["num_channels"], channel_mults=mults,
            num_res_blocks=f["num_res_blocks"],
            attention_resolutions=_attention_pixels(f, len(mults)), num_heads=f["num_heads"],
            dropout=f["dropout"], num_groups=GROUPS, norm_eps=EPS,
            downsample_padding="symmetric", time_freq_shift=0.0, flip_sin_to_cos=True,
            time_scale=1000 / T if f["rescale_timesteps"] else 1.0,
            num_classes=NUM_CLASSES if f["class_cond"] else None, null_class=False,
            scale_shift_norm=f["use_scale_shift_norm"], learn_sigma=f["learn_sigma"],
        )  # fmt: skip
    except ValidationError as exc:
        raise ConversionError(
            f"these flags give no UNet of ours: {exc.errors()[0]['msg']}"
        ) from exc


def _diffusion_config(f: dict[str, Any]) -> DiffusionConfig:
    T, schedule = f["diffusion_steps"], f["noise_schedule"]
    if schedule not in ("linear", "cosine"):
        raise ConversionError(f"--noise_schedule {schedule}: improved-diffusion has linear, cosine")
    if T < 21 and schedule == "linear":  # 0.02 * 1000 / T >= 1: its betas leave (0, 1)
        raise ConversionError(f"--diffusion_steps {T}: its linear schedule needs T > 20")
    if f["use_kl"]:  # RESCALED_KL: T times the step's bound term
        loss, lam = "vlb", 0.001
    elif f["learn_sigma"]:  # RESCALED_MSE: mse + T / 1000 vb; MSE: mse + vb
        loss, lam = "hybrid", 0.001 if f["rescale_learned_sigmas"] else 1 / T
    else:
        loss, lam = "l2", 0.001
    prediction = "x0" if f["predict_xstart"] else "eps"
    return DiffusionConfig(
        schedule=schedule, timesteps=T, prediction=prediction, loss=loss, hybrid_lambda=lam
    )


def configs_from_flags(flags: Flags) -> tuple[UNetConfig, DiffusionConfig, Variance]:
    """Our UNet and diffusion configs, and the variance its sampler uses, for the flags."""
    f = flags.values
    diffusion = _diffusion_config(f)
    unet = _unet_config(f, diffusion.timesteps)
    variance = "learned" if f["learn_sigma"] else "posterior" if f["sigma_small"] else "beta"
    return unet, diffusion, variance


def flags_from_configs(unet: UNetConfig, diffusion: DiffusionConfig, variance: Variance) -> str:
    """The flags under which improved-diffusion's scripts build our model (refused where they
    cannot), written as its README writes them."""
    T = diffusion.timesteps
    wrong = _unrepresentable(unet, diffusion, variance)
    if wrong:
        raise ConversionError(f"improved-diffusion cannot hold this model: {wrong[0]}")
    attention = sorted(unet.attention_resolutions, reverse=True)
    values = {
        "image_size": unet.image_size, "num_channels": unet.base_channels,
        "num_res_blocks": unet.num_res_blocks, "num_heads": unet.num_heads,
        "attention_resolutions": ",".join(map(str, attention)), "dropout": unet.dropout,
        "learn_sigma": unet.learn_sigma, "sigma_small": variance == "posterior",
        "class_cond": unet.num_classes is not None, "diffusion_steps": T,
        "noise_schedule": diffusion.schedule, "use_kl": diffusion.loss == "vlb",
        "predict_xstart": diffusion.prediction == "x0",
        "rescale_timesteps": unet.time_scale == 1000 / T,
        "rescale_learned_sigmas": diffusion.hybrid_lambda == 0.001,
        "use_scale_shift_norm": unet.scale_shift_norm,
    }  # fmt: skip
    return " ".join(f"--{k} {v}" for k, v in values.items())


def _unrepresentable(unet: UNetConfig, diffusion: DiffusionConfig, variance: Variance) -> list:
    T, lam = diffusion.timesteps, diffusion.hybrid_lambda
    fixed = {
        "in_channels": 3, "num_groups": GROUPS, "norm_eps": EPS, "attention_type": "softmax",
        "downsample_padding": "symmetric", "time_freq_shift": 0.0, "flip_sin_to_cos": True,
    }  # fmt: skip
    checks = [(f"{k}={getattr(unet, k)!r}, its {v!r}", getattr(unet, k) == v)
              for k, v in fixed.items()]  # fmt: skip
    checks += [
        (f"channel_mults={list(unet.channel_mults)}: its script fixes them by image size "
         f"{ {k: list(v) for k, v in CHANNEL_MULTS.items()} }",
         CHANNEL_MULTS.get(unet.image_size) == unet.channel_mults),
        ("no attention resolution (its flag needs one)", bool(unet.attention_resolutions)),
        (f"time_scale={unet.time_scale}: it feeds t or t * 1000 / T",
         unet.time_scale in (1.0, 1000 / T)),
        (f"num_classes={unet.num_classes} with a null class: it has {NUM_CLASSES} classes and "
         "no null class", unet.num_classes is None or (unet.num_classes == NUM_CLASSES
                                                       and not unet.null_class)),
        (f"schedule {diffusion.schedule}: it has linear and cosine",
         diffusion.schedule in ("linear", "cosine")),
        (f"prediction {diffusion.prediction}: it predicts eps or x0",
         diffusion.prediction in ("eps", "x0")),
        (f"loss {diffusion.loss}: it trains l2, hybrid or vlb", diffusion.loss != "l1"),
        ("min_snr_gamma: it has no loss weighting", diffusion.min_snr_gamma is None),
        (f"hybrid_lambda={lam}: it has 0.001 or 1 / T",
         diffusion.loss != "hybrid" or lam in (0.001, 1 / T)),
        (f"variance {variance} on a model with learn_sigma={unet.learn_sigma}",
         (variance == "learned") == unet.learn_sigma),
    ]  # fmt: skip
    return [text for text, ok in checks if not ok]


# State dicts -----------------------------------------------------------------------------------


def _res(ours: str, theirs: str) -> list[tuple[str, str, str]]:
    names = [
        ("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("emb_proj", "emb_layers.1"),
        ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("skip", "skip_connection"),
    ]  # fmt: skip
    return [(f"{ours}.{a}", f"{theirs}.{b}", "same") for a, b in names]


def _attn(ours: str, theirs: str) -> list[tuple[str, str, str]]:
    return [
        (f"{ours}.norm", f"{theirs}.norm", "same"),
        (f"{ours}.qkv", f"{theirs}.qkv", "qkv"),
        (f"{ours}.proj", f"{theirs}.proj_out", "conv1d"),
    ]


def module_pairs(cfg: UNetConfig) -> list[tuple[str, str, str]]:
    """(our module, its module, how the parameters map) for every module of the UNet."""
    levels, n = len(cfg.channel_mults), cfg.num_res_blocks
    attn = [r in cfg.attention_resolutions for r in cfg.resolutions]
    pairs = [
        ("time_embed.linear1", "time_embed.0", "same"),
        ("time_embed.linear2", "time_embed.2", "same"),
        ("class_embed", "label_emb", "same"),
        ("conv_in", "input_blocks.0.0", "same"),
    ]
    k = 1  # input_blocks.0 is the first conv
    for level in range(levels):
        for j in range(n):
            pairs += _res(f"down.{level}.{j}.res", f"input_blocks.{k}.0")
            if attn[level]:
                pairs += _attn(f"down.{level}.{j}.attn", f"input_blocks.{k}.1")
            k += 1
        if level < levels - 1:
            pairs.append((f"downsample.{level}.conv", f"input_blocks.{k}.0.op", "same"))
            k += 1
    pairs += _res("mid_block1", "middle_block.0") + _attn("mid_attn", "middle_block.1")
    pairs += _res("mid_block2", "middle_block.2")
    k = 0
    for i, level in enumerate(reversed(range(levels))):
        for j in range(n + 1):
            pairs += _res(f"up.{i}.{j}.res", f"output_blocks.{k}.0")
            if attn[level]:
                pairs += _attn(f"up.{i}.{j}.attn", f"output_blocks.{k}.1")
            if level > 0 and j == n:  # the upsampling closes the level's last block
                pairs.append((f"upsample.{i}.conv", f"output_blocks.{k}.{1 + attn[level]}.conv",
                              "same"))  # fmt: skip
            k += 1
    return [*pairs, ("norm_out", "out.0", "same"), ("conv_out", "out.2", "same")]


def qkv_order(channels: int, heads: int) -> torch.Tensor:
    """Row i of our qkv is its row ``qkv_order[i]``: ours are [q | k | v], each the heads in
    turn; its are per head, [q_h | k_h | v_h] (its QKVAttention splits b * heads rows in 3)."""
    d = channels // heads
    return torch.arange(3 * channels).view(heads, 3, d).transpose(0, 1).reshape(-1)


def _to_ours(value: torch.Tensor, kind: str, heads: int) -> torch.Tensor:
    if value.is_floating_point():
        value = value.float()  # fp16 training stores fp32 masters; a half file is widened
    if kind in ("qkv", "conv1d") and value.ndim == 3:
        value = value[..., None]  # (out, in, 1) -> (out, in, 1, 1)
    if kind == "qkv":
        value = value[qkv_order(value.shape[0] // 3, heads)]
    return value.contiguous()


def _to_theirs(value: torch.Tensor, kind: str, heads: int) -> torch.Tensor:
    if kind == "qkv":
        value = value[torch.argsort(qkv_order(value.shape[0] // 3, heads))]
    if kind in ("qkv", "conv1d") and value.ndim == 4:
        value = value[..., 0]
    return value.contiguous()


def expected_shapes(cfg: UNetConfig) -> dict[str, torch.Size]:
    """Our UNet's parameter shapes for ``cfg``, built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in UNet(cfg).state_dict().items()}


def state_from_improved(state: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Our UNet's state dict from an improved-diffusion UNetModel's: every key and shape
    checked against the flags' network, the first one off named."""
    theirs, ours, shapes = dict(state), {}, expected_shapes(cfg)
    for our, their, kind in module_pairs(cfg):
        for param in ("weight", "bias"):
            key = f"{our}.{param}"
            if key not in shapes:
                continue
            value = theirs.pop(f"{their}.{param}", None)
            if value is None:
                raise ConversionError(
                    f"{their}.{param} is missing from the checkpoint, which the flags' network "
                    "has: the flags do not describe this checkpoint"
                )
            value = _to_ours(value, kind, cfg.num_heads)
            if value.shape != shapes[key]:
                raise ConversionError(
                    f"{their}.{param} has shape {tuple(value.shape)} where the flags' network "
                    f"has {tuple(shapes[key])}: the flags do not describe this checkpoint (see "
                    "the flags improved-diffusion's README gives with it)"
                )
            ours[key] = value
    if theirs:
        raise ConversionError(
            f"{sorted(theirs)[0]} has no place in the flags' network ({len(theirs)} such keys); "
            "the flags do not describe this checkpoint, or it is not a UNetModel"
        )
    return ours


def state_to_improved(state: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """An improved-diffusion UNetModel state dict from our UNet's (the inverse of the above)."""
    ours, theirs = dict(state), {}
    for our, their, kind in module_pairs(cfg):
        for param in ("weight", "bias"):
            value = ours.pop(f"{our}.{param}", None)
            if value is not None:
                theirs[f"{their}.{param}"] = _to_theirs(value, kind, cfg.num_heads)
    assert not ours, f"unmapped parameters {sorted(ours)[:3]}"
    return theirs


# Files -----------------------------------------------------------------------------------------


def read_improved_diffusion(path: Path, flags: str) -> Converted:
    """A released ``.pt`` (a bare state dict) and its flags -> our configs and weights."""
    unet, diffusion, variance = configs_from_flags(parse_flags(flags))
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    state = read_safely(path, error=ConversionError)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        what = sorted(map(str, state))[:5] if isinstance(state, dict) else type(state).__name__
        raise ConversionError(
            f"{path}: not a bare state dict of tensors, as improved-diffusion's releases are "
            f"(it holds {what})"
        )
    return Converted(unet, diffusion, variance, state_from_improved(state, unet))


def write_improved_diffusion(
    path: Path,
    unet: UNetConfig,
    diffusion: DiffusionConfig,
    variance: Variance,
    state: dict[str, torch.Tensor],
) -> str:
    """Our model as an improved-diffusion ``.pt``; returns the flags its scripts need."""
    flags = flags_from_configs(unet, diffusion, variance)
    buffer = io.BytesIO()
    torch.save(state_to_improved(state, unet), buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return flags
