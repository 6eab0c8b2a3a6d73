"""``pipeline track``: the experiment's MLflow run made whole, after every other stage.

DVC restores a stage from its run cache instead of running it when its code, inputs and params
match an earlier run (a sweep over sampling params restores ``train``), and a restored stage
logs nothing. ``track`` runs last, whenever a param or a result changed (it depends on all of
params.yaml and has no outputs, so DVC never restores it), and logs what the results hold and
the run lacks: each stage's metrics, the loss curves, and the model. With
``registry.enabled`` it registers the model, the evaluation's scores as tags. Metrics already
in the run are left alone, so after stages that all ran it adds nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import typer

from pipeline.errors import stage_errors
from pipeline.logged import Steps, curve_metrics, eval_metrics, frontier_metrics, train_metrics
from pipeline.settings import Params, load_params
from pipeline.tracking import METRIC_GROUPS, Tracker

SCORE_TAGS = ("fid", "kid_mean", "isc_mean")  # eval.json scores a registered version carries


def _one(summary: Callable[[dict], dict[str, float]]) -> Callable[[Path], Steps]:
    return lambda path: [(None, summary(json.loads(path.read_text())))]


# metrics file -> (stage, its metrics); the curves repeat the train stage's live metrics
SOURCES: dict[str, tuple[str, Callable[[Path], Steps]]] = {
    "train.json": ("train", _one(train_metrics)),
    "train_curve.tsv": ("train", curve_metrics),
    "val_curve.tsv": ("train", curve_metrics),
    "eval.json": ("evaluate", _one(eval_metrics)),
    "frontier.json": ("frontier", lambda path: frontier_metrics(json.loads(path.read_text()))),
}


def missing_metrics(metrics: Path, logged: set[str]) -> dict[str, Steps]:
    """Per stage group, the metrics of the files in ``metrics`` whose names the run lacks
    (every step of a metric, or none of them)."""
    out: dict[str, Steps] = {}
    for name, (stage, read) in SOURCES.items():
        path = metrics / name
        if not path.is_file():
            continue
        group = METRIC_GROUPS.get(stage, stage)
        for step, values in read(path):
            lacking = {k: v for k, v in values.items() if f"{group}/{k}" not in logged}
            if lacking:
                out.setdefault(group, []).append((step, lacking))
    return out


def track_stage(params: Path, models: Path, metrics: Path) -> None:
    """The track stage (``pipeline track --help``)."""
    with stage_errors():
        p = load_params(params)
        with Tracker(p.model_dump(mode="json"), "track") as tracker:
            logged = tracker.logged()
            if logged is None:
                typer.echo("tracking is off: nothing to complete")
                return
            added = missing_metrics(metrics, logged)
            for group, steps in added.items():
                for step, values in steps:
                    tracker.log_metrics(values, step, group=group)
            count = sum(len(values) for steps in added.values() for _, values in steps)
            typer.echo(f"logged {count} metric values the run lacked "
                       f"({', '.join(sorted(added)) or 'none'})")  # fmt: skip
            _model(p, tracker, models / "ema.pt", metrics / "eval.json")


def _model(p: Params, tracker: Tracker, weights: Path, scores: Path) -> None:
    """The run's pyfunc model when it lacks one, and its registration when asked for."""
    if weights.is_file() and not tracker.has_model():
        from ddpm.checkpoint import load_checkpoint

        tracker.log_model(load_checkpoint(weights))
        typer.echo(f"logged the model from {weights}")
    if p.registry.enabled and not tracker.registered(p.registry.model_name):
        summary = json.loads(scores.read_text()) if scores.is_file() else {}
        tags = {k: str(summary[k]) for k in SCORE_TAGS if k in summary}
        if "label" in summary:
            tags["label"] = summary["label"]
        tracker.register_model(p.registry.model_name, tags)
