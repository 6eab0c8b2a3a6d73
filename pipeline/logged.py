"""What each stage's results put in MLflow, read from the files the stage writes.

The stages log through these functions, and ``track`` logs through them again from the same
files when a stage's metrics are missing from the experiment's run (DVC restored the stage
from its run cache), so a restored stage and a run one leave the same metrics behind. Names
are relative to the stage's group (``train/``, ``eval/``, ``frontier/``): see
:class:`pipeline.tracking.Tracker`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

Steps = list[tuple[int | None, dict[str, float]]]  # (step or None, metrics) in logging order

EVAL_NOT_LOGGED = {"reference_images", "steps"}  # numbers in eval.json that are not results
FRONTIER_NOT_LOGGED = {"nfe", "images_per_second"}  # nfe is the step


def train_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """metrics/train.json -> the run's summary metrics of training."""
    return {
        "steps": float(summary["steps"]),
        "best_val_loss": float(summary["best_val_loss"]),
        "wall_time_s": float(summary["wall_time_s"]),
        "mean_images_per_second": float(summary["images_per_second"]),
        "effective_batch_size": float(summary["effective_batch_size"]),
    }


def eval_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """metrics/eval.json -> the scores (fid, kid_mean, isc_mean, ...) and num_images."""
    return {
        key: float(value)
        for key, value in summary.items()
        if isinstance(value, int | float)
        and not isinstance(value, bool)
        and key not in EVAL_NOT_LOGGED
    }


def frontier_metrics(tree: dict[str, Any]) -> Steps:
    """metrics/frontier.json -> per point, at step NFE: ``<sampler>/fid``, ``.../seconds``, ..."""
    out: Steps = []
    for series, points in tree["series"].items():
        for point in points.values():
            values = {
                f"{series}/{key}": float(value)
                for key, value in point.items()
                if key not in FRONTIER_NOT_LOGGED
            }
            out.append((int(point["nfe"]), values))
    return out


def curve_metrics(path: Path) -> Steps:
    """A step curve (TSV with a ``step`` column, as the train stage writes) -> its rows."""
    lines = path.read_text().splitlines()
    if not lines:
        return []
    columns = lines[0].split("\t")
    out: Steps = []
    for line in lines[1:]:
        step, *cells = line.split("\t")
        out.append((int(step), {c: float(v) for c, v in zip(columns[1:], cells, strict=True)}))
    return out
