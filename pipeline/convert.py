"""``pipeline convert``: weights in and out of the diffusers folder layout.

``--from-diffusers DIR --out FILE`` turns a published ``UNet2DModel`` (google/ddpm-cifar10-32,
the DDPM paper's CIFAR-10 model, for one) into our weights file, so ``sample``, ``evaluate``
and ``frontier`` run on it; ``--to-diffusers DIR`` writes our trained weights as a folder that
diffusers' ``UNet2DModel.from_pretrained(DIR, subfolder="unet")`` and
``DDPMPipeline.from_pretrained(DIR)`` load. Both are exact (:mod:`ddpm.diffusers_format`).
"""

from __future__ import annotations

from pathlib import Path

import typer

from ddpm.checkpoint import load_sampling_model, save_checkpoint, weights_payload
from ddpm.config import DiffusionConfig
from ddpm.diffusers_format import ConversionError, read_diffusers, write_diffusers
from ddpm.ema import EMA
from ddpm.unet import UNet
from pipeline.errors import stage_errors


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


def convert_stage(
    from_diffusers: Path | None, to_diffusers: Path | None, out: Path | None, weights: Path, which
) -> None:
    """The ``convert`` command: exactly one direction."""
    with stage_errors():
        if (from_diffusers is None) == (to_diffusers is None):
            raise ConversionError("give exactly one of --from-diffusers DIR or --to-diffusers DIR")
        if from_diffusers is not None:
            if out is None:
                raise ConversionError(
                    "--from-diffusers needs --out FILE: the weights file to write "
                    "(models/ema.pt makes sample, evaluate and frontier use it)"
                )
            import_diffusers(from_diffusers, out)
        else:
            export_diffusers(weights, which, to_diffusers)


def _describe(d: DiffusionConfig) -> str:
    return f"{d.schedule} schedule, T = {d.timesteps}, {d.prediction} prediction"
