"""``pipeline train``: train the UNet on the prepared split, tracked in MLflow.

Outputs: ``models/checkpoints/<key>/`` (``last.pt``, ``best.pt``, the live loss curves and
preview grids; not a DVC output, so DVC never deletes it and a killed ``dvc repro`` resumes,
while the stage itself stays restorable from DVC's run cache), ``models/ema.pt``
(the final EMA weights with their config), ``metrics/train.json`` and the curves in
``metrics/`` (``fid_curve.tsv``: FID and KID during training, ``train.fid``, by
:mod:`pipeline.quality`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
import typer

from ddpm.checkpoint import save_checkpoint, weights_payload
from ddpm.config import UNetConfig
from ddpm.data.prepared import PreparedSplit, load_prepared
from ddpm.diffusion import GaussianDiffusion
from ddpm.files import atomic_write_bytes, replace_dir
from ddpm.pixels import grid
from ddpm.train import Dataset, Hooks, Trained, TrainResult, train
from pipeline.errors import Problems, stage_errors
from pipeline.fidelity import Extraction
from pipeline.outputs import save_png, write_json
from pipeline.projection import CURVES, Layout, format_curve_row, project, train_record
from pipeline.quality import TrainFid, fid_extraction, fid_problems
from pipeline.runtime import checkpoint_root, distributed
from pipeline.settings import Machine, Params, load_params
from pipeline.tracking import Tracker

CPU_HINT_STEPS = 1000  # longer runs on the CPU get a word about their cost and `make smoke`


class Curves:
    """Step curves as TSV files with a ``step`` column (DVC plots, ``x: step``).

    They live in the persistent checkpoint folder and are cut back to the resumed step, so a
    resumed run never repeats rows; the stage copies them to ``metrics/`` when it ends.
    """

    def __init__(self, folder: Path, resume_step: int) -> None:
        self.folder = folder
        for name, columns in CURVES.items():
            path = folder / name
            lines = path.read_text().splitlines() if path.exists() else []
            old = lines[0].split("\t") if lines else columns  # an older file may lack a column
            kept = []
            for line in lines[1:]:
                cells = dict(zip(old, line.split("\t"), strict=True))
                if int(cells["step"]) <= resume_step:
                    kept.append("\t".join(cells.get(c, "nan") for c in columns))
            atomic_write_bytes(path, "\n".join(["\t".join(columns), *kept, ""]).encode())

    def append(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Append the rows ``metrics`` completes; returns their values as written."""
        written = {}
        for name, columns in CURVES.items():
            if all(c in metrics for c in columns[1:]):  # a row is whole, or not written
                row = format_curve_row(columns, step, metrics)
                with open(self.folder / name, "a") as f:
                    f.write(row + "\n")
                written |= dict(zip(columns[1:], map(float, row.split("\t")[1:]), strict=True))
        return written

    def publish(self, metrics_dir: Path) -> None:
        for name in CURVES:
            atomic_write_bytes(metrics_dir / name, (self.folder / name).read_bytes())


# Knobs that may change while a run resumes: how long, and how often to report. Any other
# change (model, diffusion, lr, batch, EMA, seed, data) is another run, in another folder.
RESUMABLE = {
    "steps", "val_every", "val_timesteps", "val_images", "checkpoint_every", "sample_every",
    "sample_images", "sample_steps", "compile", "early_stopping_patience",
    "early_stopping_min_delta", "data_budget", "fid",
}  # fmt: skip


def checkpoint_key(p: Params, unet: UNetConfig, data_sha256: str) -> str:
    """The checkpoint folder's name: a hash of everything that defines the training run.

    A rerun of the same experiment (after a kill, or with more steps) finds its checkpoints
    and resumes; ``dvc exp run -S schedule=cosine`` gets a fresh folder instead of a refusal.
    Under ``lr_schedule: cosine`` the learning-rate curve depends on ``steps``, so there the
    length is part of the key: 200k steps is another run than 100k, not its continuation.
    """
    resumable = RESUMABLE - {"steps"} if p.train.lr_schedule == "cosine" else RESUMABLE
    identity = {
        "unet": unet.model_dump(mode="json"),
        "diffusion": p.diffusion_config().model_dump(mode="json"),
        "ema": p.ema.model_dump(mode="json"),
        "train": p.train.model_dump(mode="json", exclude=resumable),
        "seed": p.seed,
        "data": data_sha256,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


class Report:
    """The loop's hooks on rank 0: curves, previews and MLflow, in the checkpoint folder."""

    def __init__(self, folder: Path, tracker: Tracker) -> None:
        self.folder, self.tracker, self.curves = folder, tracker, None
        self.held: dict[str, set[int]] = {}

    def hooks(self) -> Hooks:
        return Hooks(on_start=self.start, on_metrics=self.metrics, on_samples=self.samples)

    def start(self, step: int) -> None:
        self.curves = Curves(self.folder, step)
        # a resumed run's run already holds the steps logged before the kill, past the
        # checkpoint too: those are not logged twice
        columns = {c for names in CURVES.values() for c in names[1:]}
        self.held = self.tracker.held_steps(columns)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        """Live curves: MLflow gets each row as the curve file holds it (see projection)."""
        written = self.curves.append(step, values)
        new = {k: v for k, v in written.items() if step not in self.held.get(k, ())}
        self.tracker.log_metrics(new, step)

    def samples(self, step: int, images: torch.Tensor) -> None:
        path = self.folder / "previews" / f"step_{step:07d}.png"
        save_png(path, grid(images))
        self.tracker.log_artifact(path, "previews")


def train_stage(
    params: Path, data: Path, models: Path, metrics: Path, fresh: bool, resume_from: Path | None
) -> None:
    """The train stage (``pipeline train --help``): the loop of :func:`ddpm.train.train` on the
    prepared split, checkpoints in this configuration's folder, outputs when it ends."""
    with stage_errors():
        p, machine = load_params(params), Machine()
        with (
            distributed(machine) as (dist, device),
            Tracker(p.model_dump(mode="json"), "train", enabled=dist.is_main) as tracker,
        ):
            splits, extraction = check_inputs(p, data, machine)
            num_classes = splits[0].manifest["num_classes"] if p.model.conditional else None
            unet_config = p.unet_config(num_classes)
            sha = splits[0].manifest["splits"]["train"]["images_sha256"]
            root = checkpoint_root(machine, models, check=dist.is_main)
            checkpoints = root / checkpoint_key(p, unet_config, sha)
            if fresh and dist.is_main:
                shutil.rmtree(checkpoints, ignore_errors=True)
            if dist.is_main and device.type == "cpu" and p.train.steps > CPU_HINT_STEPS:
                typer.echo(f"no GPU: {p.train.steps:,} training steps run on the CPU; the cost "
                           "line below says how long. `make smoke` runs the whole pipeline "
                           "offline on a tiny model in a few minutes.", err=True)  # fmt: skip
            tracker.log_dataset(splits[0].manifest, "train", "training")
            report = Report(checkpoints, tracker)
            scorer = None
            if extraction is not None:
                reference = splits[("train", "val").index(p.train.fid.reference_split)]
                scorer = TrainFid(
                    p.train.fid, p.seed, GaussianDiffusion(p.diffusion_config()), reference,
                    extraction, dist, device, machine.fidelity_cache,
                )  # fmt: skip
            trained = train(
                unet_config, p.diffusion_config(), p.train, p.ema,
                *(Dataset(s.images, s.labels if num_classes else None) for s in splits),
                checkpoint_dir=checkpoints, resume_from=resume_from, seed=p.seed,
                device=device, resume=not fresh, hooks=report.hooks(), dist=dist, scorer=scorer,
            )  # fmt: skip
            if dist.is_main:
                effective_batch = p.train.batch_size * dist.world_size
                layout = Layout(data=data, models=models, metrics=metrics)
                publish(trained, p, splits[0], layout, effective_batch, report)


def check_inputs(
    p: Params, data: Path, machine: Machine
) -> tuple[tuple[PreparedSplit, PreparedSplit], Extraction | None]:
    """The prepared train and val splits against the settings, and with ``train.fid`` the
    Inception weights and the reference split, checked before any work, every problem
    reported (a checkpoint to resume is checked by the loop, against the configs)."""
    problems = Problems("train")
    fid = p.train.fid
    extraction = problems.load(fid_extraction, machine, p.inception_weights) if fid.every else None
    splits = [problems.load(load_prepared, data, name, mmap=True) for name in ("train", "val")]
    for name, split in zip(("train", "val"), splits, strict=True):
        if split is None:
            continue
        shape, size = tuple(split.images.shape[1:3]), p.image_size
        if shape != (size, size):
            problems.add([f"the prepared {name} images are {shape[0]}x{shape[1]}, not image_size="
                          f"{size}: prepare the data again (dvc repro prepares it first)"],
                         params=False)  # fmt: skip
        if p.model.conditional and not split.manifest["num_classes"]:
            problems.add([f"model.conditional is true but the prepared {name} split has no "
                          "labels: set it to false or use a labelled dataset"])  # fmt: skip
    reference = splits[("train", "val").index(fid.reference_split)]
    if fid.every and reference is not None:
        problems.add(fid_problems(fid, reference))
    problems.check()
    return (splits[0], splits[1]), extraction


def publish(
    trained: Trained,
    p: Params,
    split: PreparedSplit,
    layout: Layout,
    effective_batch: int,
    report: Report,
) -> None:
    """models/ema.pt, the preview grids, metrics/train.json and the curves; then the run's
    record of them."""
    models, metrics = layout.models, layout.metrics
    weights = models / "ema.pt"
    unet = trained.model.config
    payload = weights_payload(
        trained.result.step, unet, p.diffusion_config(), trained.ema, trained.model,
        split.manifest["class_names"],
    )  # fmt: skip
    save_checkpoint(payload, weights)
    publish_previews(report.folder / "previews", models / "previews")
    report.curves.publish(metrics)
    write_json(metrics / "train.json", _summary(trained.result, effective_batch, report.folder))
    project(report.tracker, train_record(layout))


def publish_previews(source: Path, dest: Path) -> None:
    """The checkpoint folder's preview grids as models/previews, replaced as a whole."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in sorted(source.glob("*.png")) if source.is_dir() else []:
        shutil.copy2(path, tmp / path.name)
    replace_dir(tmp, dest)


def _summary(result: TrainResult, effective_batch: int, checkpoints: Path) -> dict:
    """metrics/train.json (the best FID and its step with ``train.fid``)."""
    fid = {} if result.best_fid_step is None else {
        "best_fid": result.best_fid, "best_fid_step": result.best_fid_step}  # fmt: skip
    return {
        "steps": result.step,
        "best_by": result.best_by,
        "best_step": result.best_step,
        **fid,
        "best_val_loss": result.best_val_loss,
        "final_val_loss": result.final_val_loss,
        "wall_time_s": round(result.wall_time_s, 2),
        "images_per_second": round(result.images_per_second, 2),
        "effective_batch_size": effective_batch,
        "stopped_early": result.stopped_early,
        "resumed_from_step": result.resumed_from_step,
        "checkpoints": str(checkpoints),
    }
