"""``pipeline evaluate``: FID, IS and KID (precision/recall too) of the samples, by torch-fidelity.

The samples are ``samples/images/*.png`` (torch-fidelity reads the folder); the reference, its
cached features and the feature extractors' weights are :mod:`pipeline.fidelity`'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
import typer

from ddpm.data.errors import DataError
from ddpm.data.prepared import PreparedSplit, load_prepared
from pipeline.errors import Problems, stage_errors
from pipeline.fidelity import (
    Extraction,
    UInt8Images,
    fidelity,
    label,
    plan,
    protocol,
    reference_cache_name,
)
from pipeline.outputs import write_json
from pipeline.projection import Layout, evaluate_record, project
from pipeline.settings import EvaluateParams, Machine, Params, load_params
from pipeline.tracking import Tracker


class Samples(NamedTuple):
    folder: Path
    count: int
    manifest: dict[str, Any]


def read_samples(root: Path) -> Samples:
    """The sample stage's output: its images folder, the number of PNGs and its manifest."""
    manifest_path, folder = root / "manifest.json", root / "images"
    if not manifest_path.is_file() or not folder.is_dir():
        raise DataError(f"{root} holds no samples (no manifest.json); run `pipeline sample`")
    manifest = json.loads(manifest_path.read_text())
    count = sum(1 for _ in folder.glob("*.png"))
    if count != manifest["num_images"]:
        raise DataError(
            f"{folder} has {count} PNGs, but the sample stage wrote {manifest['num_images']}; "
            "sample again"
        )
    return Samples(folder, count, manifest)


def check_inputs(
    e: EvaluateParams, samples: Path, data: Path, machine: Machine, inception: str
) -> tuple[Samples, PreparedSplit, list[Extraction]]:
    """Every input of the stage, and everything torch-fidelity would fail on or silently get
    wrong, checked before any work, every problem reported: the samples, the reference split
    and the feature extractors' weights."""
    problems = Problems("evaluate")
    found = problems.load(read_samples, samples)
    split = problems.load(load_prepared, data, e.reference_split)
    extractions = problems.load(plan, e, machine, inception)
    if found is not None and split is not None:
        reference = split.images
        n = found.count
        problems.add(e.size_problems(n, f"the {n} samples", len(reference)), params=False)
        size = found.manifest["image_size"]
        if tuple(reference.shape[1:3]) != (size, size):
            problems.add([
                f"the samples are {size}x{size} but the {e.reference_split} images are "
                f"{reference.shape[1]}x{reference.shape[2]}; FID compares equal resolutions"
            ], params=False)  # fmt: skip
    problems.check()
    return found, split, extractions


def evaluate_stage(params: Path, data: Path, samples: Path, metrics: Path) -> None:
    """The evaluate stage (``pipeline evaluate --help``): torch-fidelity on the samples. The
    MLflow run is open from the start, so a failure anywhere marks it FAILED."""
    with stage_errors():
        p = load_params(params)
        with Tracker(p.model_dump(mode="json"), "evaluate") as tracker:
            summary = evaluate(p, data, samples)
            write_json(metrics / "eval.json", summary)
            project(tracker, evaluate_record(Layout(data=data, samples=samples, metrics=metrics)))
            typer.echo(json.dumps(summary, indent=2))


def evaluate(p: Params, data: Path, samples: Path) -> dict[str, Any]:
    """Score the samples folder against the reference split: eval.json's contents."""
    e, machine = p.evaluate, Machine()
    if machine.num_threads:
        torch.set_num_threads(machine.num_threads)
    found, split, extractions = check_inputs(e, samples, data, machine, p.inception_weights)
    sha = split.manifest["splits"][e.reference_split]["images_sha256"]
    results: dict[str, float] = {}
    for x in extractions:
        name = reference_cache_name(sha, e.reference_split, x.weights)
        results |= fidelity(
            str(found.folder), UInt8Images(split.images), name, x, e, p.seed,
            machine.fidelity_cache,
        )  # fmt: skip
    summary = {
        **results,
        "num_images": found.count,
        "reference_split": e.reference_split,
        "reference_images": len(split.images),
        "sampler": found.manifest["sampler"],
        "steps": found.manifest["steps"],
        "feature_extractor": "+".join(x.source.extractor for x in extractions),
        "weights": _weights_name(extractions),
        "label": label(extractions, found.count),
    }
    reference = (e.reference_split, sha, len(split.images))
    summary["protocol"] = protocol(extractions, IMAGES, reference, seeds(found, p.seed))
    return summary


IMAGES = "uint8 PNG files (samples/images), decoded by torch-fidelity"


def seeds(found: Samples, seed: int) -> dict[str, Any]:
    """The seeds behind the numbers: the samples' (image i from (seed, i)) and the metrics'."""
    return {"sample_seed": found.manifest.get("seed"), "image_indices": f"0-{found.count - 1}",
            "kid_subsets_seed": seed}  # fmt: skip


def _weights_name(extractions: list[Extraction]) -> str:
    """The word official, or the local weights files: no one should take these for real."""
    local = [str(x.weights.path) for x in extractions if not x.weights.official]
    return ", ".join(local) if local else "official"
