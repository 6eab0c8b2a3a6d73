"""``pipeline edit``: what the trained model does to held-out images.

The first ``edit.num_images`` images of ``edit.split``, edited by ``edit.mode``
(:mod:`ddpm.sampling.edits`):

- ``inpaint``: RePaint (Lugmayr et al. 2022, Algorithm 1): the unknown region of a seeded mask
  (``edit.mask``, ``edit.mask_fraction``) filled in by ancestral steps over ``edit.steps``,
  the known region put back noised to every step, with RePaint's jumps back
  (``edit.jump_length``, ``edit.resample``). Reports the error on the known region (tiny:
  it is put back) and on the unknown one against the original.
- ``sdedit``: SDEdit (Meng et al. 2022): the image noised to t0 = strength T, then the sample
  section's sampler from there. Reports the distance to the input and KID against the
  reference split (the evaluate stage's cached features).
- ``reconstruct``: DDIM inversion (Song et al. 2020, sec. 4.3) up to x_T over ``edit.steps``,
  then DDIM back. Reports PSNR and MSE: how closely the model and sampler follow the ODE.

Image i draws its noise (and its mask) from generators seeded by (seed, i), so a result does
not depend on its batch. Writes, in one atomic folder::

    edits/grid.png            rows: input | mask or noised input | result
    edits/images/000000.png   each result
    edits/masks/000000.png    inpaint: each mask (white: known)

and ``metrics/edit.json``: the mode, the settings, NFE per image, seconds and the numbers.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import typer

from ddpm.checkpoint import SamplingModel, load_sampling_model
from ddpm.config import SamplerConfig
from ddpm.data.errors import DataError
from ddpm.data.prepared import PreparedSplit, load_prepared, read_manifest
from ddpm.figures import labelled_rows
from ddpm.files import replace_dir
from ddpm.generation import image_generators
from ddpm.pixels import to_float, to_uint8
from ddpm.progress import Progress
from ddpm.sampling.api import model_problems
from ddpm.sampling.edits import (
    inpaint,
    inpaint_nfe,
    make_masks,
    reconstruct,
    reconstruct_nfe,
    sdedit,
    sdedit_nfe,
    sdedit_timestep,
)
from ddpm.seeds import mix
from pipeline.errors import Problems, stage_errors
from pipeline.fidelity import (
    INCEPTION,
    Extraction,
    UInt8Images,
    fidelity,
    reference_cache_name,
    resolve_inception,
)
from pipeline.outputs import save_png, write_json
from pipeline.projection import Layout, edit_record, project
from pipeline.runtime import pick_device
from pipeline.settings import EditParams, Machine, Params, load_params, prefixed
from pipeline.tracking import Tracker

GRID_IMAGES = 8  # images shown in edits/grid.png
MIDDLE = {"inpaint": "masked input", "sdedit": "noised input", "reconstruct": "inverted x_T"}
MASK_STREAM = 1  # the masks' seeds: mix(seed, 1), apart from the noise's


def edit_stage(params: Path, models: Path, data: Path, out: Path, metrics: Path) -> None:
    """The edit stage (``pipeline edit --help``). The MLflow run is open from the start, so a
    failure anywhere marks it FAILED."""
    with stage_errors():
        p = load_params(params)
        machine = Machine()
        if machine.num_threads:
            torch.set_num_threads(machine.num_threads)
        with Tracker(p.model_dump(mode="json"), "edit") as tracker:
            device = pick_device(machine)
            net, split, extraction = check_inputs(p, models / "ema.pt", data, machine, device)
            d, nfe = p.edit, cost(p, net)
            typer.echo(f"edit: {d.mode} of {d.num_images} {d.split} images x {nfe:,} network "
                       f"evaluations = {d.num_images * nfe:,}")  # fmt: skip
            tmp = out.with_name(f".{out.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                summary = run(p, net, split, data, extraction, device, tmp)
                summary["nfe_per_image"] = nfe
                replace_dir(tmp, out)
                write_json(metrics / "edit.json", summary)
                project(tracker, edit_record(Layout(data=data, metrics=metrics, edits=out)))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            numbers = ", ".join(f"{k} {v:.4g}" for k, v in summary["results"].items())
            typer.echo(f"{out}: {d.num_images} {d.mode} results ({numbers})")


def sampler_of(p: Params) -> SamplerConfig:
    """The sampler settings the mode runs with: the sample section's (sdedit), its ancestral
    step over edit.steps (inpaint: RePaint's), or DDIM over edit.steps (reconstruct)."""
    s, d = p.sample.sampler_config(), p.edit
    if d.mode == "inpaint":
        return s.model_copy(update={"sampler": "ddpm", "steps": d.steps})
    if d.mode == "reconstruct":
        return s.model_copy(update={"sampler": "ddim", "steps": d.steps, "eta": 0.0})
    return s


def cost(p: Params, net: SamplingModel) -> int:
    """Network evaluations per image, RePaint's jumps included, doubled by guidance (as the
    frontier counts NFE)."""
    d, guided = p.edit, p.sample.guidance_scale != 1.0
    if d.mode == "inpaint":
        nfe = inpaint_nfe(d.steps, d.jump_length, d.resample)
    elif d.mode == "sdedit":
        nfe = sdedit_nfe(p.sample.sampler_config(), net.diffusion, d.strength)
    else:
        nfe = reconstruct_nfe(d.steps)
    return nfe * (2 if guided and d.mode != "reconstruct" else 1)


def check_inputs(
    p: Params, weights: Path, data: Path, machine: Machine, device: torch.device
) -> tuple[SamplingModel, PreparedSplit, Extraction | None]:
    """Every input of the stage, checked before any work, every problem reported: the
    weights, the split, the settings against both, and (sdedit) the Inception weights."""
    d, problems = p.edit, Problems("edit")
    net = problems.load(load_sampling_model, weights, p.sample.weights, device)
    split = problems.load(_split, data, d.split)
    extraction = None
    if d.mode == "sdedit":  # KID against the reference, with the evaluate stage's features
        resolved = problems.load(resolve_inception, machine, p.inception_weights)
        extraction = None if resolved is None else Extraction(INCEPTION, resolved, {"kid": True})
        if d.num_images < 2:
            problems.add([f"edit.num_images={d.num_images}: KID of the SDEdit results needs at "
                          "least 2"])  # fmt: skip
    if net is not None:
        problems.add(prefixed("sample.", model_problems(sampler_of(p), net.model, net.diffusion)))
        T = net.diffusion.num_timesteps
        if d.mode != "sdedit" and d.steps > T:
            problems.add([f"edit.steps={d.steps} is more than the model's T={T}"])
        if d.mode == "sdedit":
            try:
                sdedit_timestep(d.strength, T)
            except ValueError as exc:
                problems.add([f"edit.strength: {exc}"])
    if split is not None and len(split.images) < d.num_images:
        problems.add([f"edit.num_images={d.num_images} but the {d.split} split has "
                      f"{len(split.images)} images; choose at most that"])  # fmt: skip
    if split is not None and net is not None:
        size = net.model.config.image_size
        if tuple(split.images.shape[1:3]) != (size, size):
            problems.add([f"the {d.split} images are {split.images.shape[1]}x"
                          f"{split.images.shape[2]} but the model makes {size}x{size}"],
                         params=False)  # fmt: skip
    problems.check()
    return net, split, extraction


def _split(data: Path, name: str) -> PreparedSplit:
    """The split to edit, memory-mapped; a missing test split names the way out."""
    if name not in read_manifest(data)["splits"]:
        raise DataError(
            f"{data} has no {name} split (only CIFAR-10 has test files); set edit.split: val"
        )
    return load_prepared(data, name, mmap=True)


def run(
    p: Params,
    net: SamplingModel,
    split: PreparedSplit,
    data: Path,
    extraction: Extraction | None,
    device: torch.device,
    folder: Path,
) -> dict[str, Any]:
    """Edit every image into ``folder`` (images, masks, the grid); edit.json's contents."""
    d, config = p.edit, sampler_of(p)
    conditional = net.model.config.num_classes is not None
    inputs, middles, results, masks = [], [], [], []
    start_time = time.perf_counter()
    with Progress(d.num_images, "edit", "img") as bar:
        for first in range(0, d.num_images, d.batch_size):
            batch = range(first, min(first + d.batch_size, d.num_images))
            x0 = to_float(torch.from_numpy(np.array(split.images[batch.start : batch.stop])))
            x0 = x0.permute(0, 3, 1, 2).to(device)
            y = split.labels[batch.start : batch.stop].to(device) if conditional else None
            middle, result, mask = edit_batch(p, net, config, x0, y, batch, device)
            inputs.append(x0.cpu())
            middles.append(middle.cpu())
            results.append(result.cpu())
            if mask is not None:
                masks.append(mask.cpu())
            bar.update(len(batch))
    seconds = time.perf_counter() - start_time
    x0, middle, result = torch.cat(inputs), torch.cat(middles), torch.cat(results)
    mask = torch.cat(masks) if masks else None
    write_pictures(folder, d, x0, middle, result, mask)
    numbers = measures(p, x0, result, mask, data, extraction)
    return {
        "mode": d.mode,
        "split": d.split,
        "num_images": d.num_images,
        "settings": d.model_dump(mode="json"),
        "sampler": config.read_settings(),  # what its sampler reads (the table's row)
        "seconds": round(seconds, 3),
        "results": numbers,
    }


def edit_batch(
    p: Params,
    net: SamplingModel,
    config: SamplerConfig,
    x0: torch.Tensor,
    y: torch.Tensor | None,
    batch: range,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(the middle picture, the result, the mask or None) of one batch."""
    d, model, diffusion = p.edit, net.model, net.diffusion
    generators = image_generators(p.seed, batch)
    with torch.no_grad():
        if d.mode == "inpaint":
            size = net.model.config.image_size
            mask_generators = image_generators(mix(p.seed, MASK_STREAM), batch)
            mask = make_masks(d.mask, d.mask_fraction, size, mask_generators).to(device)
            jumps = {"jump_length": d.jump_length, "resample": d.resample}
            result = inpaint(model, diffusion, x0, mask, config, **jumps, y=y,
                             generator=generators, device=device)  # fmt: skip
            return torch.where(mask, x0, torch.zeros_like(x0)), result, mask
        if d.mode == "sdedit":
            noised, result = sdedit(model, diffusion, x0, d.strength, config, y=y,
                                    generator=generators, device=device)  # fmt: skip
            return noised, result, None
        x_T, result = reconstruct(model, diffusion, x0, d.steps, spacing=config.spacing, y=y,
                                  device=device)  # fmt: skip
        return x_T, result, None


def write_pictures(
    folder: Path,
    d: EditParams,
    x0: torch.Tensor,
    middle: torch.Tensor,
    result: torch.Tensor,
    mask: torch.Tensor | None,
) -> None:
    """edits/images, edits/masks and the grid: input | middle | result rows."""
    for i, image in enumerate(to_uint8(result)):
        save_png(folder / "images" / f"{i:06d}.png", image)
    if mask is not None:
        white = mask.expand(-1, 3, -1, -1).float() * 2 - 1
        for i, image in enumerate(to_uint8(white)):
            save_png(folder / "masks" / f"{i:06d}.png", image)
    k = min(GRID_IMAGES, len(x0))
    rows = [("input", to_uint8(x0[:k])), (MIDDLE[d.mode], to_uint8(middle[:k])),
            (f"{d.mode} result", to_uint8(result[:k]))]  # fmt: skip
    save_png(folder / "grid.png", labelled_rows(rows))


def measures(
    p: Params,
    x0: torch.Tensor,
    result: torch.Tensor,
    mask: torch.Tensor | None,
    data: Path,
    extraction: Extraction | None,
) -> dict[str, float]:
    """The mode's numbers, on the images as they are written ([-1, 1], clamped: a result
    past it is a saturated pixel; PSNR on [0, 1], the usual scale)."""
    error = (result.double().clamp(-1, 1) - x0.double()) ** 2
    if p.edit.mode == "inpaint":
        known = mask.expand_as(error)
        return {"mse_known": float(error[known].mean()), "mse_unknown": float(error[~known].mean())}
    if p.edit.mode == "reconstruct":
        per_image = error.flatten(1).mean(dim=1) / 4  # on [0, 1]
        psnr = (10 * torch.log10(1 / per_image.clamp(min=1e-12))).mean()
        return {"psnr": float(psnr), "mse": float(error.mean())}
    return {"mse_to_input": float(error.mean()), **kid(p, result, data, extraction)}


def kid(p: Params, result: torch.Tensor, data: Path, extraction: Extraction) -> dict[str, float]:
    """KID of the SDEdit results against the evaluate stage's reference split (its cached
    features), subsets as large as the results allow."""
    e, machine = p.evaluate, Machine()
    reference = load_prepared(data, e.reference_split)
    sha = reference.manifest["splits"][e.reference_split]["images_sha256"]
    name = reference_cache_name(sha, e.reference_split, extraction.weights)
    images = UInt8Images(to_uint8(result))
    subset = min(e.kid_subset_size, len(result), len(reference.images))
    scores = fidelity(images, UInt8Images(reference.images), name, extraction, e, p.seed,
                      machine.fidelity_cache, verbose=False, kid_subset_size=subset)  # fmt: skip
    return {k: v for k, v in scores.items() if k.startswith("kid")}
