"""``pipeline frontier``: quality against sampling cost, for a grid of samplers and step counts.

Every point samples ``frontier.num_images`` images from the EMA weights, image i from the same
per-image noise as at every other point (and as in ``sample``), so two points differ only by
their sampler and steps. The images stay in memory as uint8 tensors and go to torch-fidelity
directly; the reference features are the cached ones ``evaluate`` uses.

NFE, the cost axis, is the number of network evaluations per image
(:func:`ddpm.sampling.api.nfe`): one per visited timestep (DDPM, DDIM, DPM-Solver++ and UniPC
alike), two a step but the last for Heun, and twice that with classifier-free guidance, which
evaluates the conditional and the unconditional model (as the literature counts it, even
though we batch the two into one forward pass).

Outputs::

    metrics/frontier.json   series -> steps -> {nfe, fid, kid_mean, kid_std, isc_mean, ...}
    metrics/frontier.tsv    one row per point: the DVC plot (FID against NFE, a line per series)
    frontier/fid_vs_nfe.png the same as a figure, NFE on a log axis
    frontier/grid.png       the first images of every point, one row each: what fewer steps cost
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import NamedTuple

import torch
import typer

from ddpm.checkpoint import SamplingModel, load_sampling_model
from ddpm.config import SamplerConfig
from ddpm.data.prepared import PreparedSplit, load_prepared
from ddpm.figures import frontier_figure, labelled_rows
from ddpm.files import atomic_write_bytes, replace_dir
from ddpm.generation import generate
from ddpm.pixels import to_uint8
from ddpm.progress import Progress
from ddpm.sampling.api import model_problems, nfe
from pipeline.errors import Problems, stage_errors
from pipeline.fidelity import Extraction, UInt8Images, fidelity, label, plan, reference_cache_name
from pipeline.outputs import save_png, write_json
from pipeline.projection import Layout, frontier_record, project
from pipeline.runtime import pick_device
from pipeline.settings import FrontierParams, Machine, Params, load_params, prefixed
from pipeline.tracking import Tracker

COLUMNS = ["series", "steps", "nfe", "fid", "kid_mean", "isc_mean", "seconds"]


class Point(NamedTuple):
    series: str
    config: SamplerConfig
    nfe: int


class Scored(NamedTuple):
    point: Point
    scores: dict[str, float]
    seconds: float  # sampling only: the cost the frontier is about
    first: torch.Tensor  # uint8 (grid_images, H, W, 3)


def plan_points(p: Params, net: SamplingModel) -> tuple[list[Point], list[str]]:
    """The frontier's points with their honest NFE, and what the model cannot honour."""
    diffusion, points, problems = net.diffusion, [], []
    for i, entry in enumerate(p.frontier.points):
        config = entry.sampler_config(p.sample)
        wrong = model_problems(config, net.model, diffusion)
        problems += prefixed(f"frontier.points[{i}].", wrong)
        if not wrong:
            points.append(Point(entry.series, config, nfe(config, diffusion)))
    return points, problems


def render_point(
    net: SamplingModel,
    point: Point,
    f: FrontierParams,
    seed: int,
    classes: list[int] | None,
    device: torch.device,
    bar: Progress,
    bf16: bool = False,
) -> tuple[torch.Tensor, float]:
    """All the point's images, uint8 (N, H, W, 3), and the seconds their sampling took
    (``bf16``: the network under bf16 autocast, ``sample.bf16``)."""
    images, start = [], time.perf_counter()
    for first in range(0, f.num_images, f.batch_size):
        batch = range(first, min(first + f.batch_size, f.num_images))
        x = generate(net.model, net.diffusion, batch, seed, point.config, classes=classes,
                     device=device, bf16=bf16)  # fmt: skip
        images.append(to_uint8(x))
        bar.update(len(batch) * point.nfe)
    return torch.cat(images), time.perf_counter() - start


def score_points(
    net: SamplingModel,
    points: list[Point],
    p: Params,
    split: PreparedSplit,
    extraction: Extraction,
    device: torch.device,
) -> list[Scored]:
    """Sample and score every point; one progress bar (scoring an image counts as one NFE)."""
    e, n = p.evaluate, p.frontier.num_images
    sha = split.manifest["splits"][e.reference_split]["images_sha256"]
    name = reference_cache_name(sha, e.reference_split, extraction.weights)
    reference, cache = UInt8Images(split.images), Machine().fidelity_cache
    out = []
    with Progress(sum(n * (pt.nfe + 1) for pt in points), "frontier", "NFE") as bar:
        for point in points:
            images, seconds = render_point(
                net, point, p.frontier, p.seed, p.sample.classes, device, bar, p.sample.bf16
            )
            scores = fidelity(UInt8Images(images), reference, name, extraction, e, p.seed, cache,
                              verbose=False)  # fmt: skip
            bar.update(n)
            out.append(Scored(point, scores, seconds, images[: p.frontier.grid_images]))
    return out


def summary(scored: list[Scored], num_images: int, trust: str, reference_split: str) -> dict:
    """metrics/frontier.json: series -> steps -> numbers."""
    tree: dict = {"num_images": num_images, "label": trust, "reference_split": reference_split,
                  "series": {}}  # fmt: skip
    for s in scored:
        tree["series"].setdefault(s.point.series, {})[str(s.point.config.steps)] = {
            "nfe": s.point.nfe,
            **{k: round(v, 6) for k, v in s.scores.items()},
            "seconds": round(s.seconds, 3),
            "images_per_second": round(num_images / s.seconds, 2),
        }
    return tree


def write_outputs(scored: list[Scored], tree: dict, out: Path, metrics: Path) -> None:
    """The JSON, the TSV plot and the figures (these into ``out`` as one atomic folder)."""
    write_json(metrics / "frontier.json", tree)
    rows = ["\t".join(COLUMNS)]
    for s in scored:
        values = {"series": s.point.series, "steps": s.point.config.steps, "nfe": s.point.nfe,
                  "seconds": round(s.seconds, 3), **s.scores}  # fmt: skip
        rows.append("\t".join(str(values.get(c, "nan")) for c in COLUMNS))
    atomic_write_bytes(metrics / "frontier.tsv", ("\n".join(rows) + "\n").encode())
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lines: dict[str, list[tuple[float, float]]] = {}
    metric = "fid" if "fid" in scored[0].scores else next(iter(scored[0].scores))
    for s in scored:
        lines.setdefault(s.point.series, []).append((s.point.nfe, s.scores[metric]))
    save_png(tmp / f"{metric}_vs_nfe.png", frontier_figure(lines, metric.upper()))
    grid = [(f"{s.point.series} {s.point.config.steps} ({s.point.nfe} NFE)", s.first)
            for s in scored]  # fmt: skip
    save_png(tmp / "grid.png", labelled_rows(grid))
    replace_dir(tmp, out)


def table(scored: list[Scored], num_images: int) -> str:
    """The points as a short text table, best FID last within each series."""
    head = f"{'series':<18}{'steps':>6}{'NFE':>6}{'FID':>9}{'KID':>9}{'IS':>7}{'img/s':>9}"
    lines = [head]
    for s in scored:
        v = s.scores
        lines.append(
            f"{s.point.series:<18}{s.point.config.steps:>6}{s.point.nfe:>6}"
            f"{v.get('fid', float('nan')):>9.2f}{v.get('kid_mean', float('nan')):>9.4f}"
            f"{v.get('isc_mean', float('nan')):>7.2f}{num_images / s.seconds:>9.1f}"
        )
    return "\n".join(lines)


def frontier_stage(params: Path, models: Path, data: Path, out: Path, metrics: Path) -> None:
    """The frontier stage (``pipeline frontier --help``); the MLflow run is open from the
    start, so a failure anywhere marks it FAILED."""
    with stage_errors():
        p = load_params(params)
        with Tracker(p.model_dump(mode="json"), "frontier") as tracker:
            scored, tree = frontier(p, models, data)
            write_outputs(scored, tree, out, metrics)
            project(tracker, frontier_record(Layout(data=data, frontier=out, metrics=metrics)))
        typer.echo(f"{tree['label']}\n{table(scored, p.frontier.num_images)}")


def frontier(p: Params, models: Path, data: Path) -> tuple[list[Scored], dict]:
    """Plan, sample and score every point: the points and frontier.json's tree."""
    machine = Machine()
    if machine.num_threads:
        torch.set_num_threads(machine.num_threads)
    device = pick_device(machine)
    net, points, split, extraction = check_inputs(p, models, data, machine, device)
    n = p.frontier.num_images
    scored = score_points(net, points, p, split, extraction, device)
    return scored, summary(scored, n, label([extraction], n), p.evaluate.reference_split)


def check_inputs(
    p: Params, models: Path, data: Path, machine: Machine, device: torch.device
) -> tuple[SamplingModel, list[Point], PreparedSplit, Extraction]:
    """Every input of the stage, checked before any sampling, every problem reported: the
    weights and the points against them, the reference split and the Inception weights."""
    e, problems = p.evaluate, Problems("frontier")
    net = problems.load(load_sampling_model, models / "ema.pt", p.sample.weights, device)
    split = problems.load(load_prepared, data, e.reference_split)
    extractions = problems.load(plan, e, machine, p.inception_weights, prc=False)
    points = []
    if net is not None:
        points, wrong = plan_points(p, net)
        problems.add(wrong)
    if split is not None:
        n, m = p.frontier.num_images, len(split.images)
        problems.add(e.size_problems(n, f"frontier.num_images={n}", m, prc=False), params=False)
    if net is not None and split is not None:
        size, shape = net.model.config.image_size, tuple(split.images.shape[1:3])
        if shape != (size, size):
            problems.add([f"the model makes {size}x{size} images but the {e.reference_split} "
                          f"images are {shape[0]}x{shape[1]}"], params=False)  # fmt: skip
    problems.check()
    return net, points, split, extractions[0]
