"""``pipeline nll``: the variational bound of held-out images in bits per dimension.

The papers' third number beside FID and IS (Ho et al. 2020, Table 1: <= 3.75 on CIFAR-10's
test set). :func:`ddpm.likelihood.variational_bound` of the first ``nll.num_images`` images of
``nll.split``, from the weights the sample stage uses (``sample.weights``), its x0 clipping
(``sample.clip_x0``) and, unless ``nll.variance`` names one, the DDPM sampler's variance
(``sample.variance``). Image i draws its noise from a generator seeded by (seed, i), so its
bound does not depend on the batch it is in. Writes::

    metrics/nll.json          bits/dim, its standard error over images, the prior and decoder
                              terms, the split and the settings
    metrics/nll_terms.tsv     the bits/dim each timestep contributes (a DVC plot)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import typer

from ddpm.checkpoint import SamplingModel, load_sampling_model
from ddpm.data.errors import DataError
from ddpm.data.prepared import PreparedSplit, load_prepared, read_manifest
from ddpm.files import atomic_write_bytes
from ddpm.generation import image_generators
from ddpm.likelihood import strided_chain, variational_bound
from ddpm.pixels import to_float
from ddpm.progress import Progress
from pipeline.errors import Problems, stage_errors
from pipeline.outputs import write_json
from pipeline.projection import Layout, nll_record, project
from pipeline.runtime import pick_device
from pipeline.settings import Machine, Params, load_params
from pipeline.tracking import Tracker

TERMS_COLUMNS = ("t", "bpd")


def nll_stage(params: Path, models: Path, data: Path, metrics: Path) -> None:
    """The nll stage (``pipeline nll --help``). The MLflow run is open from the start, so a
    failure anywhere marks it FAILED."""
    with stage_errors():
        p = load_params(params)
        machine = Machine()
        if machine.num_threads:
            torch.set_num_threads(machine.num_threads)
        with Tracker(p.model_dump(mode="json"), "nll") as tracker:
            device = pick_device(machine)
            net, split = check_inputs(p, models / "ema.pt", data, device)
            summary, terms = likelihood(p, net, split, device)
            write_terms(metrics / "nll_terms.tsv", terms)
            write_json(metrics / "nll.json", summary)
            project(tracker, nll_record(Layout(data=data, models=models, metrics=metrics)))
            typer.echo(
                f"{summary['bpd']:.4f} +- {summary['bpd_stderr']:.4f} bits/dim on "
                f"{summary['num_images']} {summary['split']} images ({summary['variance']} "
                f"variance, stride {summary['stride']})"
            )


def check_inputs(
    p: Params, weights: Path, data: Path, device: torch.device
) -> tuple[SamplingModel, PreparedSplit]:
    """Every input of the stage, checked before any work, every problem reported: the
    weights, the split, and the settings against both."""
    n = p.nll
    problems = Problems("nll")
    net = problems.load(load_sampling_model, weights, p.sample.weights, device)
    split = problems.load(_split, data, n.split)
    if net is not None:
        T = net.diffusion.num_timesteps
        if n.stride > T - 1:
            problems.add([f"nll.stride={n.stride} is more than the model's T - 1 = {T - 1}; "
                          f"choose 1 (the exact bound) to {T - 1}"])  # fmt: skip
    if net is not None and n.variance == "learned" and not net.model.config.learn_sigma:
        problems.add(["nll.variance=learned, but this model has fixed variances (trained "
                      "without model.learn_sigma); choose posterior or beta"])  # fmt: skip
    if split is not None and min(n.num_images or len(split.images), len(split.images)) < 2:
        problems.add([f"the {n.split} split has {len(split.images)} images; the bound's "
                      "standard error needs at least 2"], params=False)  # fmt: skip
    if split is not None and net is not None:
        size = net.model.config.image_size
        if tuple(split.images.shape[1:3]) != (size, size):
            problems.add([
                f"the {n.split} images are {split.images.shape[1]}x{split.images.shape[2]} but "
                f"the model makes {size}x{size}; prepare the data at image_size={size}"
            ], params=False)  # fmt: skip
    problems.check()
    return net, split


def _split(data: Path, name: str) -> PreparedSplit:
    """The split to score, memory-mapped; a missing test split names the way out."""
    if name == "test" and "test" not in read_manifest(data)["splits"]:
        raise DataError(
            f"{data} has no test split: this data set has no test files (only CIFAR-10 has "
            "them); set nll.split: val"
        )
    return load_prepared(data, name, mmap=True)


def likelihood(
    p: Params, net: SamplingModel, split: PreparedSplit, device: torch.device
) -> tuple[dict[str, Any], list[tuple[int, float]]]:
    """The bound of the first nll.num_images images: nll.json's contents, and the per-step
    terms (t, bits/dim averaged over images)."""
    n, s = p.nll, p.sample
    count = len(split.images) if n.num_images is None else min(n.num_images, len(split.images))
    learned = net.model.config.learn_sigma
    variance = n.variance or ("learned" if learned else s.variance)
    chain = strided_chain(net.diffusion, n.stride)
    conditional = net.model.config.num_classes is not None
    typer.echo(
        f"nll: {count} {n.split} images x {len(chain.steps)} steps (T = "
        f"{net.diffusion.num_timesteps}, stride {n.stride}) = {count * len(chain.steps):,} "
        "network evaluations"
    )
    totals, priors, terms = [], [], torch.zeros(len(chain.steps), dtype=torch.float64)
    with Progress(count * len(chain.steps), "nll", "eval") as bar:
        for start in range(0, count, n.batch_size):
            batch = range(start, min(start + n.batch_size, count))
            x0 = to_float(torch.from_numpy(np.array(split.images[batch.start : batch.stop])))
            x0 = x0.permute(0, 3, 1, 2).to(device)
            y = split.labels[batch.start : batch.stop].to(device) if conditional else None
            bound = variational_bound(
                net.model, net.diffusion, x0, stride=n.stride, variance=variance,
                clip_x0=s.clip_x0, y=y, generator=image_generators(p.seed, batch),
                on_step=lambda b=len(batch): bar.update(b),
            )  # fmt: skip
            totals.append(bound.total.cpu())
            priors.append(bound.prior.cpu())
            terms += bound.terms.sum(dim=0).cpu()
            bar.set_postfix(bpd=f"{float(torch.cat(totals).mean()):.4f}")
    mean_terms = terms / count
    summary = summarise(p, count, variance, torch.cat(totals), torch.cat(priors), mean_terms)
    return summary, [(t, float(v)) for t, v in zip(chain.steps, mean_terms, strict=True)]


def summarise(
    p: Params,
    count: int,
    variance: str,
    totals: torch.Tensor,
    priors: torch.Tensor,
    mean_terms: torch.Tensor,
) -> dict[str, Any]:
    """nll.json: the bound's mean and standard error over images, and its parts."""
    return {
        "bpd": float(totals.mean()),
        "bpd_stderr": float(totals.std()) / math.sqrt(count),  # count >= 2: checked
        "prior_bpd": float(priors.mean()),
        "decoder_bpd": float(mean_terms[0]),
        "num_images": count,
        "split": p.nll.split,
        "stride": p.nll.stride,
        "variance": variance,
        "clip_x0": p.sample.clip_x0,
        "weights": p.sample.weights,
        "bound": "exact" if p.nll.stride == 1 else f"strided chain, every {p.nll.stride}th step",
    }


def write_terms(path: Path, terms: list[tuple[int, float]]) -> None:
    """metrics/nll_terms.tsv: t and the bits/dim its term adds (t = 0: the decoder)."""
    lines = ["\t".join(TERMS_COLUMNS)] + [f"{t}\t{bpd:.6g}" for t, bpd in terms]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
