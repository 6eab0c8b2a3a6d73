"""``pipeline evaluate``: FID, IS and KID (precision/recall too) of the samples, by torch-fidelity.

The samples are ``samples/images/*.png`` (torch-fidelity reads the folder); the reference, its
cached features and the feature extractors' weights are :mod:`pipeline.fidelity`'s.

With ``evaluate.repeats: k`` the stage scores k disjoint seed ranges of N = ``num_images``
images each (EDM's protocol): range 0 is the samples folder, image i seeded by (seed, i);
range j >= 1 is images jN..(j+1)N-1, which this stage samples itself from the weights and the
settings ``samples/manifest.json`` records, through the sample stage's own code path
(:mod:`pipeline.render`), and scores in memory, never as PNGs. eval.json gives every range's
numbers and, at its top level, their mean, with the standard deviation and minimum of FID, KID
and IS: the noise two experiments' difference must exceed.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
import typer
from torch.utils.data import Dataset

from ddpm.checkpoint import SamplingModel, load_sampling_model
from ddpm.data.errors import DataError
from ddpm.data.prepared import PreparedSplit, load_prepared
from ddpm.files import file_sha256
from ddpm.progress import Progress
from ddpm.sampling.api import nfe
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
from pipeline.render import aligned_batches, rendered
from pipeline.runtime import pick_device
from pipeline.settings import EvaluateParams, Machine, Params, SampleParams, load_params
from pipeline.tracking import Tracker

SPREAD = ("fid", "kid_mean", "isc_mean")  # the numbers whose spread over the ranges is given


class Samples(NamedTuple):
    folder: Path
    count: int
    manifest: dict[str, Any]


class Source(NamedTuple):
    """What made the samples, to sample more ranges from: the weights and the settings."""

    net: SamplingModel
    settings: SampleParams
    seed: int
    weights: Path


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


def read_source(found: Samples, weights: Path, device: torch.device) -> Source:
    """The weights and sample settings behind the samples: the settings as the manifest
    records them (not params.yaml's, which may have changed since), the weights file checked
    against the sha256 it records.

    Raises:
        DataError: a manifest without them (an older sample stage's), or other weights.
        CheckpointError: the weights cannot be loaded.
    """
    m, path = found.manifest, found.folder.parent / "manifest.json"
    missing = [k for k in (*SampleParams.model_fields, "seed", "checkpoint_sha256") if k not in m]
    if missing:
        raise DataError(f"{path} does not record {missing}, which evaluate.repeats > 1 samples "
                        "more images with; run `pipeline sample` again")  # fmt: skip
    settings = SampleParams.model_validate({k: m[k] for k in SampleParams.model_fields})
    net = load_sampling_model(weights, settings.weights, device)
    digest = file_sha256(weights)
    if digest != m["checkpoint_sha256"]:
        raise DataError(
            f"{weights} (sha256 {digest[:12]}) is not the file the samples were drawn from "
            f"({m['checkpoint_sha256'][:12]}); run `pipeline sample` again, so that every range "
            "comes from the same weights"
        )
    return Source(net, settings, m["seed"], weights)


def check_inputs(
    e: EvaluateParams,
    weights: Path,
    samples: Path,
    data: Path,
    machine: Machine,
    inception: str,
) -> tuple[Samples, PreparedSplit, list[Extraction], Source | None]:
    """Every input of the stage, and everything torch-fidelity would fail on or silently get
    wrong, checked before any work, every problem reported: the samples, the reference split,
    the feature extractors' weights and, for more than one range, what made the samples."""
    problems = Problems("evaluate")
    found = problems.load(read_samples, samples)
    split = problems.load(load_prepared, data, e.reference_split)
    extractions = problems.load(plan, e, machine, inception)
    source = None
    if found is not None and e.repeats > 1:
        source = problems.load(read_source, found, weights, pick_device(machine))
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
    return found, split, extractions, source


def evaluate_stage(params: Path, models: Path, data: Path, samples: Path, metrics: Path) -> None:
    """The evaluate stage (``pipeline evaluate --help``): torch-fidelity on the samples. The
    MLflow run is open from the start, so a failure anywhere marks it FAILED."""
    with stage_errors():
        p = load_params(params)
        with Tracker(p.model_dump(mode="json"), "evaluate") as tracker:
            summary = evaluate(p, models / "ema.pt", data, samples)
            write_json(metrics / "eval.json", summary)
            project(tracker, evaluate_record(Layout(data=data, samples=samples, metrics=metrics)))
            typer.echo(json.dumps(summary, indent=2))


def evaluate(p: Params, weights: Path, data: Path, samples: Path) -> dict[str, Any]:
    """Score the samples folder (and the further seed ranges) against the reference split:
    eval.json's contents."""
    e, machine = p.evaluate, Machine()
    if machine.num_threads:
        torch.set_num_threads(machine.num_threads)
    found, split, extractions, source = check_inputs(
        e, weights, samples, data, machine, p.inception_weights
    )
    sha = split.manifest["splits"][e.reference_split]["images_sha256"]
    reference = UInt8Images(split.images)

    def score(images: str | Dataset, verbose: bool) -> dict[str, float]:
        results: dict[str, float] = {}
        for x in extractions:
            name = reference_cache_name(sha, e.reference_split, x.weights)
            results |= fidelity(images, reference, name, x, e, p.seed, machine.fidelity_cache,
                                verbose=verbose)  # fmt: skip
        return results

    n = found.count
    if source is not None:
        typer.echo(cost(source, n, e.repeats))
    scores = [score(str(found.folder), verbose=True)]
    if source is not None:
        scores += [score(UInt8Images(images), verbose=False)
                   for images in sample_ranges(source, n, e.repeats)]  # fmt: skip
    summary = {
        **aggregate(scores),
        "repeats": e.repeats,
        "ranges": [{"range": j, "image_indices": indices(j, n), **s} for j, s in enumerate(scores)],
        "num_images": n,
        "reference_split": e.reference_split,
        "reference_images": len(split.images),
        "sampler": found.manifest["sampler"],
        "steps": found.manifest["steps"],
        "feature_extractor": "+".join(x.source.extractor for x in extractions),
        "weights": _weights_name(extractions),
        "label": label(extractions, n),
    }
    images = IMAGES if source is None else f"{IMAGES}; {extra_images(source, e.repeats)}"
    spans = ", ".join(indices(j, n) for j in range(e.repeats))
    reference_id = (e.reference_split, sha, len(split.images))
    summary["protocol"] = protocol(extractions, images, reference_id, seeds(found, p.seed, spans))
    return summary


IMAGES = "uint8 PNG files (samples/images), decoded by torch-fidelity"


def extra_images(source: Source, repeats: int) -> str:
    """The protocol's words for ranges 1 and up."""
    ranges = "range 1" if repeats == 2 else f"ranges 1-{repeats - 1}"
    return (f"{ranges}: uint8 tensors sampled by evaluate from {source.weights} with the "
            "samples' settings, never written")  # fmt: skip


def indices(j: int, n: int) -> str:
    """The image indices of range ``j`` of ``n`` images, as ``first-last``."""
    return f"{j * n}-{(j + 1) * n - 1}"


def cost(source: Source, n: int, repeats: int) -> str:
    """What the further ranges cost, said before any work."""
    s = source.settings
    per_image = nfe(s.sampler_config(), source.net.diffusion)
    return (
        f"evaluate: {repeats} seed ranges of {n} images (evaluate.repeats): images 0-{n - 1} "
        f"are samples/, images {n}-{repeats * n - 1} are sampled here ({s.sampler}, "
        f"{per_image} network evaluations an image: {(repeats - 1) * n * per_image:,}), and "
        f"every range goes through the feature extractor ({repeats * n:,} images)"
    )


def sample_ranges(source: Source, n: int, repeats: int) -> Iterator[torch.Tensor]:
    """Ranges 1 .. repeats - 1 of ``n`` images each, uint8 (n, H, W, 3), one at a time (the
    caller scores each before the next is sampled), sampled as the sample stage samples them,
    with a progress bar each."""
    s, device = source.settings, next(source.net.model.parameters()).device
    for j in range(1, repeats):
        batches = aligned_batches(range(j * n, (j + 1) * n), s.batch_size)
        images = []
        with Progress(n, f"evaluate range {j}/{repeats - 1}", "img") as bar:
            for batch, pixels in rendered(source.net, s, source.seed, batches, device):
                images.append(pixels)
                bar.update(len(batch))
        yield torch.cat(images)


def aggregate(scores: list[dict[str, float]]) -> dict[str, float | None]:
    """Every metric's mean over the ranges (one range: its own numbers), and for FID, KID and
    IS the ranges' standard deviation (the sample one, n - 1; None from one range, where it is
    not measured) and minimum (EDM reports the minimum FID of three ranges)."""
    out: dict[str, float | None] = {k: statistics.fmean(s[k] for s in scores) for k in scores[0]}
    for key in SPREAD:
        if key in out:
            values = [s[key] for s in scores]
            out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
            out[f"{key}_min"] = min(values)
    return out


def seeds(found: Samples, seed: int, spans: str) -> dict[str, Any]:
    """The seeds behind the numbers: the samples' (image i from (seed, i)), the ranges' image
    indices and the metrics'."""
    return {"sample_seed": found.manifest.get("seed"), "image_indices": spans,
            "kid_subsets_seed": seed}  # fmt: skip


def _weights_name(extractions: list[Extraction]) -> str:
    """The word official, or the local weights files: no one should take these for real."""
    local = [str(x.weights.path) for x in extractions if not x.weights.official]
    return ", ".join(local) if local else "official"
