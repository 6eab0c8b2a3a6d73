"""``pipeline track``: the experiment's MLflow run made whole, after every other stage.

DVC restores a stage from its run cache instead of running it when its code, inputs and params
match an earlier run (a sweep over sampling params restores ``train``), and a restored stage
logs nothing. ``track`` runs last, whenever a param or a result changed (it depends on all of
params.yaml and has no outputs, so DVC never restores it), and projects into the run the
record of each stage it lacks (see :mod:`pipeline.projection`): the same metrics, dataset
inputs, artifacts and model the stage would have logged had it run. With
``registry.enabled`` it registers the model, the evaluation's scores as tags. When MLflow
fails (the server is down), the stage fails, so that the next ``dvc repro`` runs it again.
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.errors import ERROR_EXIT, stage_errors
from pipeline.model import log_image_model
from pipeline.projection import STAGES, Layout, project, record, register
from pipeline.settings import load_params
from pipeline.tracking import Tracker


def track_stage(params: Path, layout: Layout) -> None:
    """The track stage (``pipeline track --help``). It fails when MLflow does (a server that
    does not answer): DVC then reruns it on the next ``dvc repro``, which completes the run,
    where a success would have recorded the incomplete run as done."""
    with stage_errors():
        p = load_params(params)
        with Tracker(p.model_dump(mode="json"), "track", required=True) as tracker:
            if tracker.enabled:
                complete(tracker, layout, p.registry.model_name if p.registry.enabled else None)
            elif not tracker.failed:
                typer.echo("tracking is off: nothing to complete")
        if tracker.failed:
            raise typer.Exit(ERROR_EXIT)


def complete(tracker: Tracker, layout: Layout, model_name: str | None) -> None:
    """Project every stage's record the run lacks; register the model under ``model_name``."""
    records = [r for r in (record(stage, layout) for stage in STAGES) if r is not None]
    added = [r.stage for r in records if project(tracker, r, log_image_model)]
    held = len(records) - len(added)
    typer.echo(f"added to the run the record of {', '.join(added) or 'no stage'} "
               f"({held} of {len(records)} already in it)")  # fmt: skip
    if model_name is not None:
        register(tracker, model_name, layout)
