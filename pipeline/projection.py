"""The experiment's MLflow run as a projection of the files DVC tracks.

Each stage's record in the run (its summary metrics, its dataset inputs, its artifacts, the
model) is read from that stage's output files by this module, and nothing else writes it.
A stage projects its own record when it ends; ``track``, the last stage, projects every
stage whose record the run lacks, which are the stages DVC restored from its run cache
instead of running them. So a restored stage and a run one leave the same run behind.

The one exception is ``train``'s step curves, which it logs live (people watch a long run in
the UI): it logs each row as the curve file holds it, and the projection adds only the rows
the run lacks. The tag ``record.<stage>`` holds a digest of the record a run got, so a
record is projected once; ``stage.<stage>`` is ``done`` when the stage ran under this run and
``restored`` when only its files came (DVC's run cache).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddpm.config import SamplerConfig
from ddpm.files import file_sha256

if TYPE_CHECKING:
    from pipeline.tracking import Tracker

Series = dict[str, list[tuple[int, float]]]  # metric name (with its group) -> (step, value)

CURVES = {  # the train stage's step curves: file -> columns
    "train_curve.tsv": ["step", "loss", "lr", "grad_norm", "images_per_second", "ema_decay"],
    "val_curve.tsv": ["step", "val_loss"],
    # the loss's terms: L_simple, and the loss in each quarter of the timestep range
    "loss_terms.tsv": ["step", "mse", "loss_q0", "loss_q1", "loss_q2", "loss_q3"],
    "vb_curve.tsv": ["step", "vb"],  # the bound's term (hybrid, vlb); empty for l2 and l1
    "fid_curve.tsv": ["step", "fid", "kid_mean"],  # train.fid; empty when it is off
}
TRAIN_SUMMARY = {  # train.json key -> metric name
    "steps": "steps",
    "best_val_loss": "best_val_loss",
    "wall_time_s": "wall_time_s",
    "images_per_second": "mean_images_per_second",
    "effective_batch_size": "effective_batch_size",
    "best_fid": "best_fid",  # with train.fid only
    "best_fid_step": "best_fid_step",
}
EVAL_NOT_LOGGED = {"reference_images", "steps"}  # numbers in eval.json that are not results
FRONTIER_NOT_LOGGED = {"nfe", "images_per_second"}  # nfe is the step
# the sample settings (samples/manifest.json) the pyfunc defaults to: the sampler's and these
MODEL_SETTINGS = (*SamplerConfig.model_fields, "weights", "classes", "bf16", "batch_size", "seed")
STAGES = ("train", "sample", "evaluate", "frontier", "nll", "edit")  # the stages with a record
NLL_LOGGED = ("bpd", "bpd_stderr", "prior_bpd", "decoder_bpd", "num_images")


@dataclass(frozen=True)
class Layout:
    """Where the stages' files are (the CLI's defaults, relative to the project root)."""

    data: Path = Path("data/prepared")
    models: Path = Path("models")
    samples: Path = Path("samples")
    frontier: Path = Path("frontier")
    metrics: Path = Path("metrics")
    edits: Path = Path("edits")


@dataclass(frozen=True)
class Model:
    """The run's pyfunc: a weights file, and the sample settings it defaults to."""

    weights: Path
    settings: dict[str, Any]

    def sha256(self) -> str:
        """The model's identity (its ``model_sha256`` tag): weights and settings."""
        settings = json.dumps(self.settings, sort_keys=True)
        return hashlib.sha256(f"{file_sha256(self.weights)}:{settings}".encode()).hexdigest()


@dataclass(frozen=True)
class Record:
    """What one stage's files put in the experiment's run."""

    stage: str
    metrics: Series
    # (data/prepared's manifest, split, context) of each dataset input
    datasets: list[tuple[dict[str, Any], str, str]] = field(default_factory=list)
    artifacts: list[tuple[Path, str]] = field(default_factory=list)  # file, artifact folder
    model: Model | None = None  # logged as the run's pyfunc ``model``
    params: dict[str, str] = field(default_factory=dict)  # run params: what a number means

    def digest(self) -> str:
        """A hash of everything the record logs (files by content)."""
        h = hashlib.sha256(
            json.dumps([self.stage, self.metrics, self.params], sort_keys=True).encode()
        )
        for manifest, split, context in self.datasets:
            h.update(f"{split}:{context}:{manifest['splits'][split]['images_sha256']}".encode())
        for path, folder in self.artifacts:
            h.update(f"{folder}/{path.name}:{file_sha256(path)}".encode())
        if self.model is not None:
            h.update(f"model:{self.model.sha256()}".encode())
        return h.hexdigest()[:16]


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _manifest(layout: Layout) -> dict[str, Any]:
    return _json(layout.data / "manifest.json")


def curve_rows(path: Path) -> Series:
    """A step curve (TSV with a ``step`` column) -> ``train/<column>`` -> its rows."""
    lines = path.read_text().splitlines()
    out: Series = {}
    if not lines:
        return out
    columns = lines[0].split("\t")[1:]
    for line in lines[1:]:
        step, *cells = line.split("\t")
        for column, cell in zip(columns, cells, strict=True):
            out.setdefault(f"train/{column}", []).append((int(step), float(cell)))
    return out


def format_curve_row(columns: list[str], step: int, values: dict[str, float]) -> str:
    """One TSV row, the numbers to 6 significant digits (the values MLflow gets too)."""
    return "\t".join([str(step)] + [f"{values[c]:.6g}" for c in columns[1:]])


def train_record(layout: Layout) -> Record:
    """metrics/train.json, the curves, models/ema.pt and the preview grids."""
    summary = _json(layout.metrics / "train.json")
    metrics: Series = {f"train/{name}": [(0, float(summary[key]))]
                       for key, name in TRAIN_SUMMARY.items() if key in summary}  # fmt: skip
    curves = [layout.metrics / name for name in CURVES]
    for path in curves:
        metrics |= curve_rows(path)
    previews = sorted((layout.models / "previews").glob("*.png"))
    return Record(
        "train", metrics, [(_manifest(layout), "train", "training")],
        [(layout.models / "ema.pt", "weights"), *((p, "curves") for p in curves),
         *((p, "previews") for p in previews)],
    )  # fmt: skip


def sample_record(layout: Layout) -> Record:
    """metrics/sample.json, the pictures of samples/ (not the images themselves), and the
    model: models/ema.pt, defaulting to the settings of samples/manifest.json."""
    summary = _json(layout.metrics / "sample.json")
    settings = _json(layout.samples / "manifest.json")
    metrics = {f"sample/{k}": [(0, float(v))] for k, v in sorted(summary.items())}
    pictures = sorted(
        p for p in layout.samples.rglob("*")
        if p.is_file() and p.relative_to(layout.samples).parts[0] != "images"
    )  # fmt: skip
    folders = [str(Path("samples", p.relative_to(layout.samples)).parent) for p in pictures]
    model = Model(layout.models / "ema.pt", model_settings(settings))
    return Record("sample", metrics, [], list(zip(pictures, folders, strict=True)), model)


def model_settings(manifest: dict[str, Any]) -> dict[str, Any]:
    """The sample settings a pyfunc defaults to, from samples/manifest.json."""
    return {k: manifest[k] for k in MODEL_SETTINGS}


def evaluate_record(layout: Layout) -> Record:
    """metrics/eval.json: the scores (fid, kid_mean, isc_mean, ...: the ranges' mean), their
    spread (fid_std, fid_min, ...; a null std, from one range, is not logged), num_images and
    repeats, and each seed range's scores as ``eval/ranges/<score>`` with the range as step."""
    path = layout.metrics / "eval.json"
    summary = _json(path)
    metrics: Series = {
        f"eval/{key}": [(0, float(value))]
        for key, value in sorted(summary.items())
        if _number(value) and key not in EVAL_NOT_LOGGED
    }  # fmt: skip
    for entry in summary.get("ranges", []):
        for key, value in sorted(entry.items()):
            if _number(value) and key != "range":
                metrics.setdefault(f"eval/ranges/{key}", []).append((entry["range"], float(value)))
    dataset = (_manifest(layout), summary["reference_split"], "evaluation")
    # the protocol the numbers were measured under, as the run's eval.protocol.* params
    params = flatten(summary.get("protocol", {}), "eval.protocol.")
    return Record("evaluate", metrics, [dataset], [(path, "metrics")], params=params)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def flatten(tree: dict[str, Any], prefix: str) -> dict[str, str]:
    """Nested settings as MLflow params: dotted keys, values as text."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def frontier_record(layout: Layout) -> Record:
    """metrics/frontier.json, per point at step NFE: ``frontier/<sampler>/fid``, ..."""
    path = layout.metrics / "frontier.json"
    tree = _json(path)
    metrics: Series = {}
    for series, points in sorted(tree["series"].items()):
        for point in points.values():
            for key, value in point.items():
                if key not in FRONTIER_NOT_LOGGED:
                    metrics.setdefault(f"frontier/{series}/{key}", []).append(
                        (int(point["nfe"]), float(value))
                    )
    files = [path, layout.metrics / "frontier.tsv", *sorted(layout.frontier.iterdir())]
    dataset = (_manifest(layout), tree["reference_split"], "evaluation")
    return Record("frontier", metrics, [dataset], [(p, "frontier") for p in files])


def nll_record(layout: Layout) -> Record:
    """metrics/nll.json (``nll/bpd``, ...) and metrics/nll_terms.tsv (``nll/term_bpd`` with
    the timestep as the step: the UI charts where the bits go)."""
    path, terms = layout.metrics / "nll.json", layout.metrics / "nll_terms.tsv"
    summary = _json(path)
    metrics: Series = {f"nll/{key}": [(0, float(summary[key]))] for key in NLL_LOGGED}
    rows = [line.split("\t") for line in terms.read_text().splitlines()[1:]]
    metrics["nll/term_bpd"] = [(int(t), float(bpd)) for t, bpd in rows]
    dataset = (_manifest(layout), summary["split"], "evaluation")
    return Record("nll", metrics, [dataset], [(path, "nll"), (terms, "nll")])


def edit_record(layout: Layout) -> Record:
    """metrics/edit.json (``edit/<mode>/psnr``, ``edit/<mode>/mse_known``, ...,
    ``edit/<mode>/nfe_per_image``, ``edit/<mode>/seconds``), edits/grid.png and the file."""
    path = layout.metrics / "edit.json"
    summary = _json(path)
    mode = summary["mode"]
    numbers = {**summary["results"], "nfe_per_image": summary["nfe_per_image"],
               "seconds": summary["seconds"]}  # fmt: skip
    metrics: Series = {f"edit/{mode}/{k}": [(0, float(v))] for k, v in sorted(numbers.items())}
    dataset = (_manifest(layout), summary["split"], "evaluation")
    files = [layout.edits / "grid.png", path]
    return Record("edit", metrics, [dataset], [(f, "edits") for f in files])


RECORDS = {
    "train": (train_record, "train.json"),
    "sample": (sample_record, "sample.json"),
    "evaluate": (evaluate_record, "eval.json"),
    "frontier": (frontier_record, "frontier.json"),
    "nll": (nll_record, "nll.json"),
    "edit": (edit_record, "edit.json"),
}


def record(stage: str, layout: Layout) -> Record | None:
    """The stage's record, or None when its files are not there (the stage never ran)."""
    read, marker = RECORDS[stage]
    return read(layout) if (layout.metrics / marker).is_file() else None


def project(tracker: Tracker, rec: Record, log_model: Callable[..., Any] | None = None) -> bool:
    """Put ``rec`` in the tracker's run unless the run has it already; True if it logged.

    Metric rows the run holds (same name, step and value) are not logged twice, so the
    train stage's live curve rows stay single. A record with a model needs ``log_model``
    (:func:`pipeline.model.log_image_model`).
    """
    if not tracker.enabled:
        return False
    digest = rec.digest()
    run_tags = tracker.tags()
    if run_tags is None or run_tags.get(f"record.{rec.stage}") == digest:
        return False
    tracker.log_series(rec.metrics)
    tracker.log_params(rec.params)
    for manifest, split, context in rec.datasets:
        tracker.log_dataset(manifest, split, context)
    for path, folder in rec.artifacts:
        tracker.log_artifact(path, folder)
    if rec.model is not None:
        assert log_model is not None, f"the {rec.stage} record has a model: pass log_model"
        sha = rec.model.sha256()
        if tracker.logged_model(sha) is None:
            model_tags = {"model_sha256": sha}
            tracker.log_model(log_model, rec.model.weights, rec.model.settings, model_tags)
    # "started": the stage ran under this run, its files say it ended, its own end was not
    # logged (the server went down while it ran)
    stage = f"stage.{rec.stage}"
    done = {None: "restored", "started": "done"}.get(run_tags.get(stage), run_tags.get(stage))
    tracker.set_tags({f"record.{rec.stage}": digest, stage: done})
    return tracker.enabled


SCORE_TAGS = ("fid", "kid_mean", "isc_mean", "label")  # eval.json entries a version carries


def register(tracker: Tracker, name: str, layout: Layout) -> None:
    """Register the run's model (the sample stage's record) under ``name``, once per model,
    with the evaluation's scores and the model's sha256 as the version's tags."""
    rec = record("sample", layout)
    if rec is None or rec.model is None or not tracker.enabled:
        return
    sha = rec.model.sha256()
    model_id = tracker.logged_model(sha)
    if model_id is None or tracker.registered(name, sha):
        return
    scores = layout.metrics / "eval.json"
    summary = _json(scores) if scores.is_file() else {}
    tags = {k: str(summary[k]) for k in SCORE_TAGS if k in summary}
    tracker.register_model(name, model_id, {**tags, "model_sha256": sha})
