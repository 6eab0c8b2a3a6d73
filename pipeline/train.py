"""``pipeline train``: train the UNet on the prepared split, tracked in MLflow.

Outputs: ``models/checkpoints/<key>/`` (``last.pt``, ``best.pt``, the live loss curves and
preview grids; DVC ``persist: true`` so a killed ``dvc repro`` resumes), ``models/ema.pt``
(the final EMA weights with their config), ``metrics/train.json`` and the curves in
``metrics/``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
import typer

from ddpm.checkpoint import load_checkpoint, save_checkpoint
from ddpm.config import UNetConfig
from ddpm.data.prepared import PreparedSplit, load_prepared
from ddpm.ema import EMA
from ddpm.train import Dataset, Hooks, TrainResult, train
from pipeline.errors import stage_errors
from pipeline.outputs import atomic_write_bytes, grid, save_png, write_json
from pipeline.runtime import distributed
from pipeline.settings import Machine, Params, load_params
from pipeline.tracking import Tracker

CURVES = {
    "train_curve.tsv": ["step", "loss", "lr", "grad_norm", "images_per_second"],
    "val_curve.tsv": ["step", "val_loss"],
}


class Curves:
    """Step curves as TSV files with a ``step`` column (DVC plots, ``x: step``).

    They live in the persistent checkpoint folder and are cut back to the resumed step, so a
    resumed run never repeats rows; the stage copies them to ``metrics/`` when it ends.
    """

    def __init__(self, folder: Path, resume_step: int) -> None:
        self.folder = folder
        for name, columns in CURVES.items():
            path = folder / name
            rows = path.read_text().splitlines()[1:] if path.exists() else []
            kept = [r for r in rows if int(r.split("\t")[0]) <= resume_step]
            atomic_write_bytes(path, "\n".join(["\t".join(columns), *kept, ""]).encode())

    def append(self, step: int, metrics: dict[str, float]) -> None:
        for name, columns in CURVES.items():
            if all(c in metrics for c in columns[1:]):
                with open(self.folder / name, "a") as f:
                    f.write("\t".join([str(step)] + [f"{metrics[c]:.6g}" for c in columns[1:]]))
                    f.write("\n")

    def publish(self, metrics_dir: Path) -> list[Path]:
        out = []
        for name in CURVES:
            out.append(metrics_dir / name)
            atomic_write_bytes(out[-1], (self.folder / name).read_bytes())
        return out


# Knobs that may change while a run resumes: how long, and how often to report. Any other
# change (model, diffusion, lr, batch, EMA, seed, data) is another run, in another folder.
RESUMABLE = {
    "steps", "val_every", "val_timesteps", "val_images", "checkpoint_every", "sample_every",
    "sample_images", "sample_steps", "compile", "early_stopping_patience",
    "early_stopping_min_delta",
}  # fmt: skip


def run_key(p: Params, unet: UNetConfig, data_sha256: str) -> str:
    """The checkpoint folder's name: a hash of everything that defines the training run.

    A rerun of the same experiment (after a kill, or with more steps) finds its checkpoints
    and resumes; ``dvc exp run -S schedule=cosine`` gets a fresh folder instead of a refusal.
    """
    identity = {
        "unet": unet.model_dump(mode="json"),
        "diffusion": p.diffusion_config().model_dump(mode="json"),
        "ema": p.ema.model_dump(mode="json"),
        "train": p.train.model_dump(mode="json", exclude=RESUMABLE),
        "seed": p.seed,
        "data": data_sha256,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def raw_weights(checkpoints: Path) -> dict[str, torch.Tensor]:
    """The live (non-EMA) weights of the run's last checkpoint, for ``sample.weights: raw``."""
    return load_checkpoint(checkpoints / "last.pt")["model"]


def _last_step(checkpoints: Path) -> int:
    last = checkpoints / "last.pt"
    if not last.exists():
        return 0
    return int(torch.load(last, map_location="cpu", weights_only=True)["step"])


def train_command(
    params: Path = typer.Option(Path("params.yaml"), help="The experiment's params file."),
    data: Path = typer.Option(Path("data/prepared"), help="Prepared data folder."),
    models: Path = typer.Option(Path("models"), help="Where checkpoints and weights go."),
    metrics: Path = typer.Option(Path("metrics"), help="Where train.json and the curve go."),
    fresh: bool = typer.Option(
        False, "--fresh", help="Discard this configuration's checkpoints and start over."
    ),
    resume_from: Path | None = typer.Option(
        None, help="Resume from this checkpoint (it must match the model params)."
    ),
) -> None:
    """Train the UNet, resuming from this configuration's last checkpoint when there is one.

    Checkpoints go to models/checkpoints/<key>/, where the key hashes the model, diffusion,
    optimisation, EMA, seed and data: rerunning the same experiment resumes, changing one of
    those starts a new run in its own folder.
    """
    with stage_errors():
        p = load_params(params)
        train_split, val_split = load_prepared(data, "train"), load_prepared(data, "val")
        num_classes = train_split.manifest["num_classes"] if p.model.conditional else None
        unet_config = p.unet_config(num_classes)
        key = run_key(p, unet_config, train_split.manifest["splits"]["train"]["images_sha256"])
        checkpoints = models / "checkpoints" / key
        with distributed(Machine()) as (dist, device):
            if fresh and dist.is_main:
                shutil.rmtree(checkpoints, ignore_errors=True)
            curves = Curves(checkpoints, _last_step(checkpoints)) if dist.is_main else None
            with Tracker(p.model_dump(mode="json"), "train", enabled=dist.is_main) as tracker:

                def on_metrics(step: int, values: dict[str, float]) -> None:
                    curves.append(step, values)
                    tracker.log_metrics(values, step)

                def on_samples(step: int, images: torch.Tensor) -> None:
                    path = checkpoints / "previews" / f"step_{step:07d}.png"
                    save_png(path, grid(images))
                    tracker.log_artifact(path, "previews")

                result, ema = train(
                    unet_config,
                    p.diffusion_config(),
                    p.train,
                    p.ema,
                    Dataset(train_split.images, train_split.labels if num_classes else None),
                    Dataset(val_split.images, val_split.labels if num_classes else None),
                    checkpoint_dir=checkpoints,
                    resume_from=resume_from,
                    seed=p.seed,
                    device=device,
                    resume=not fresh,
                    hooks=Hooks(on_metrics=on_metrics, on_samples=on_samples),
                    dist=dist,
                )
                if not dist.is_main:
                    return
                weights = models / "ema.pt"
                save_checkpoint(
                    _weights_payload(result.step, unet_config, p, ema, checkpoints, train_split),
                    weights,
                )
                summary = _summary(result, p.train.batch_size * dist.world_size, checkpoints)
                write_json(metrics / "train.json", summary)
                curve_files = curves.publish(metrics)
                tracker.log_metrics(
                    {f"final_{k}": float(v) for k, v in summary.items() if not isinstance(v, str)}
                )
                tracker.log_artifact(weights, "weights")
                for path in curve_files:
                    tracker.log_artifact(path, "curves")


def _weights_payload(
    step: int,
    unet_config: UNetConfig,
    p: Params,
    ema: EMA,
    checkpoints: Path,
    split: PreparedSplit,
) -> dict:
    """models/ema.pt: the EMA and raw weights with the configs that sampling needs."""
    return {
        "step": step,
        "config": {
            "unet": unet_config.model_dump(mode="json"),
            "diffusion": p.diffusion_config().model_dump(mode="json"),
        },
        "ema": ema.state_dict(),
        "model": raw_weights(checkpoints),
        "class_names": split.manifest["class_names"],
    }


def _summary(result: TrainResult, effective_batch: int, checkpoints: Path) -> dict:
    """metrics/train.json."""
    return {
        "steps": result.step,
        "best_val_loss": result.best_val_loss,
        "final_val_loss": result.final_val_loss,
        "wall_time_s": round(result.wall_time_s, 2),
        "images_per_second": round(result.images_per_second, 2),
        "effective_batch_size": effective_batch,
        "stopped_early": result.stopped_early,
        "resumed_from_step": result.resumed_from_step,
        "checkpoints": str(checkpoints),
    }
