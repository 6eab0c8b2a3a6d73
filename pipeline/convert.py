"""``pipeline convert``: weights in and out of the diffusers and improved-diffusion layouts.

``--from-diffusers DIR --out FILE`` turns a published ``UNet2DModel`` (google/ddpm-cifar10-32,
the DDPM paper's CIFAR-10 model, for one) into our weights file, so ``sample``, ``evaluate``,
``frontier`` and ``nll`` run on it; ``--to-diffusers DIR`` writes our trained weights as a
folder that diffusers' ``UNet2DModel.from_pretrained(DIR, subfolder="unet")`` and
``DDPMPipeline.from_pretrained(DIR)`` load. Both are exact (:mod:`ddpm.diffusers_format`).

``--from-improved-diffusion FILE --flags "..." --out FILE`` does the same for the improved-DDPM
models of Nichol & Dhariwal (openai/improved-diffusion), whose ``.pt`` files hold weights only:
the flags its README gives with each file say what the network and diffusion are
(:mod:`ddpm.improved_diffusion_format`); ``--to-improved-diffusion FILE`` writes ours in its
layout and prints the flags its scripts need.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ddpm.checkpoint import load_sampling_model, save_checkpoint, weights_payload
from ddpm.config import DiffusionConfig
from ddpm.diffusers_format import read_diffusers, write_diffusers
from ddpm.ema import EMA
from ddpm.errors import ConversionError
from ddpm.improved_diffusion_format import (
    parse_flags,
    read_improved_diffusion,
    write_improved_diffusion,
)
from ddpm.unet import UNet
from pipeline.errors import stage_errors
from pipeline.settings import DiffusionParams, ModelParams


def import_diffusers(folder: Path, out: Path) -> None:
    """A diffusers UNet2DModel folder -> our weights file (EMA and raw: the published ones)."""
    unet_config, diffusion, state = read_diffusers(folder)
    if diffusion is None:
        diffusion = DiffusionConfig(schedule="linear", timesteps=1000, prediction="eps")
        typer.echo(f"{folder}: no scheduler_config.json; assuming {_describe(diffusion)}")
    model = UNet(unet_config)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConversionError(f"{folder}: {str(exc).splitlines()[0]}") from exc
    payload = weights_payload(0, unet_config, diffusion, EMA(model), model, class_names=[])
    save_checkpoint({**payload, "converted_from": str(folder)}, out)
    typer.echo(
        f"{out}: {model.num_parameters():,} parameters from {folder}, {_describe(diffusion)}. "
        "sample, evaluate and frontier read the model from this file "
        "(e.g. `dvc repro --single-item sample evaluate frontier` with it as models/ema.pt)."
    )


def export_diffusers(weights: Path, which: str, folder: Path) -> None:
    """Our weights file -> a DDPMPipeline folder (model_index.json, unet/, scheduler/)."""
    net = load_sampling_model(weights, which)
    write_diffusers(folder, net.model.config, net.diffusion.config, net.model.state_dict())
    typer.echo(
        f"{folder}: {which} weights of {weights} as a diffusers DDPMPipeline; load with "
        f"DDPMPipeline.from_pretrained({str(folder)!r})"
    )


def import_improved_diffusion(path: Path, flags: str, out: Path) -> None:
    """An improved-diffusion ``.pt`` and its README flags -> our weights file (EMA and raw)."""
    model_in = read_improved_diffusion(path, flags)
    model = UNet(model_in.unet)
    model.load_state_dict(model_in.state)
    payload = weights_payload(0, model_in.unet, model_in.diffusion, EMA(model), model, [])
    extra = {"converted_from": str(path), "flags": flags, "variance": model_in.variance}
    save_checkpoint({**payload, **extra}, out)
    script = parse_flags(flags).script
    typer.echo(
        f"{out}: {model.num_parameters():,} parameters from {path}, "
        f"{_describe(model_in.diffusion)}, {model_in.variance} variance."
    )
    ignored = {k: v for k, v in script.items() if k not in TRAIN_PARAMS}
    if ignored:
        typer.echo(f"Not carried over (its sampling and housekeeping flags): "
                   f"{', '.join(f'--{k} {v}' for k, v in ignored.items())}")  # fmt: skip
    lines = matching_params(model_in) + [
        f"{TRAIN_PARAMS[k]}: {v}" for k, v in script.items() if k in TRAIN_PARAMS
    ]
    typer.echo(
        "sample, evaluate, frontier and nll read the network and its diffusion from this file; "
        "for params that agree with it (the MLflow run records them; train.* and ema.* from "
        "its training flags, to train it as they did), set:\n"
        + "\n".join(f"  {line}" for line in lines)
    )


# Its training script's flags that are params of ours (the values mean the same)
TRAIN_PARAMS = {
    "lr": "train.lr", "batch_size": "train.batch_size", "weight_decay": "train.weight_decay",
    "schedule_sampler": "train.timestep_sampler", "ema_rate": "ema.decay",
}  # fmt: skip


def matching_params(model_in) -> list[str]:
    """The params.yaml values of an imported model, one ``key: value`` line each."""
    unet, diffusion = model_in.unet, model_in.diffusion
    values = {
        "model": {**unet.model_dump(mode="json"), "conditional": unet.num_classes is not None},
        "diffusion": diffusion.model_dump(mode="json"),
    }
    lines = [f"image_size: {unet.image_size}", f"schedule: {diffusion.schedule}"]
    for section, params in (("model", ModelParams), ("diffusion", DiffusionParams)):
        lines += [f"{section}.{k}: {_yaml(values[section][k])}" for k in params.model_fields]
    lines.append(f"sample.variance: {model_in.variance}")
    return lines


def _yaml(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(list(value)) if isinstance(value, (list, tuple)) else str(value)


def export_improved_diffusion(weights: Path, which: str, path: Path) -> None:
    """Our weights file -> an improved-diffusion ``.pt``; prints the flags that build it."""
    net = load_sampling_model(weights, which)
    config = net.model.config
    variance = net.variance or ("learned" if config.learn_sigma else "posterior")
    flags = write_improved_diffusion(
        path, config, net.diffusion.config, variance, net.model.state_dict()
    )
    typer.echo(f"{path}: {which} weights of {weights} in improved-diffusion's layout; its "
               f"scripts load it with --model_path {path} {flags}")  # fmt: skip


def convert_stage(
    sources: dict[str, Path | None], out: Path | None, flags: str | None, weights: Path, which
) -> None:
    """The ``convert`` command: exactly one of --from-diffusers, --to-diffusers,
    --from-improved-diffusion, --to-improved-diffusion (``sources``, by option name)."""
    with stage_errors():
        given = {name: path for name, path in sources.items() if path is not None}
        if len(given) != 1:
            raise ConversionError(
                "give exactly one of --from-diffusers DIR, --to-diffusers DIR, "
                "--from-improved-diffusion FILE or --to-improved-diffusion FILE"
            )
        ((name, path),) = given.items()
        if name.startswith("from") and out is None:
            raise ConversionError(
                f"--{name} needs --out FILE: the weights file to write "
                "(models/ema.pt makes sample, evaluate and frontier use it)"
            )
        if name == "from-improved-diffusion" and flags is None:
            raise ConversionError(
                "--from-improved-diffusion needs --flags: the checkpoint holds no config; pass "
                "the flags improved-diffusion's README gives with it, e.g. --flags \"--image_size "
                "32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3 "
                '--diffusion_steps 4000 --noise_schedule cosine"'
            )
        if name == "from-diffusers":
            import_diffusers(path, out)
        elif name == "to-diffusers":
            export_diffusers(weights, which, path)
        elif name == "from-improved-diffusion":
            import_improved_diffusion(path, flags, out)
        else:
            export_improved_diffusion(weights, which, path)


def _describe(d: DiffusionConfig) -> str:
    return f"{d.schedule} schedule, T = {d.timesteps}, {d.prediction} prediction"
