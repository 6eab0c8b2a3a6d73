"""The edit stage through its CLI, in each mode: the files, edit.json and the MLflow run read
back; the results equal the library's with the same seeds (inpaint), sample's images
(sdedit at strength 1), and a reconstruction that improves with steps; bad input refused
before any work."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image
from stages import TINY_PROJECT, enter_project, merge, prepare_split
from typer.testing import CliRunner

from ddpm.checkpoint import load_sampling_model
from ddpm.config import SamplerConfig
from ddpm.data.prepared import load_prepared
from ddpm.generation import image_generators
from ddpm.pixels import to_float, to_uint8
from ddpm.sampling.edits import inpaint, make_masks, reconstruct
from ddpm.seeds import mix
from pipeline.cli import app

runner = CliRunner()

# the tiny project (40 synthetic 16-pixel images, val 10, T = 20)
PARAMS = merge(TINY_PROJECT, {
    "sample": {"num_images": 4, "batch_size": 4},
    "edit": {"mode": "inpaint", "split": "val", "num_images": 4, "batch_size": 4, "steps": 8,
             "jump_length": 2, "resample": 2, "mask": "box", "mask_fraction": 0.3,
             "strength": 1.0},
})  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepare_split(tmp_path_factory.mktemp("prepared"), PARAMS)


@pytest.fixture
def project(tmp_path, prepared, inception_weights, tiny_checkpoint, monkeypatch) -> Path:
    tiny_checkpoint(tmp_path / "models" / "ema.pt")
    return enter_project(tmp_path, prepared, PARAMS, monkeypatch, inception_weights)


def set_params(**sections) -> None:
    params = yaml.safe_load(Path("params.yaml").read_text())
    for name, values in sections.items():
        params[name] = {**params[name], **values} if isinstance(values, dict) else values
    Path("params.yaml").write_text(yaml.safe_dump(params))


def pngs(folder: Path) -> torch.Tensor:
    files = sorted(folder.glob("*.png"))
    return torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]))


def only_run(project: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id])
    return client, run


def test_inpaint_writes_results_masks_grid_and_the_run_as_the_library_does(project):
    result = runner.invoke(app, ["edit"])
    assert result.exit_code == 0, result.output
    assert "edit: inpaint of 4 val images x" in result.output
    summary = json.loads((project / "metrics" / "edit.json").read_text())
    assert (summary["mode"], summary["split"], summary["num_images"]) == ("inpaint", "val", 4)
    assert summary["results"]["mse_known"] < 1e-12 < summary["results"]["mse_unknown"]
    assert summary["nfe_per_image"] > 8 and summary["sampler"]["sampler"] == "ddpm"
    images, masks = pngs(project / "edits" / "images"), pngs(project / "edits" / "masks")
    assert images.shape == masks.shape == (4, 16, 16, 3)
    assert (project / "edits" / "grid.png").is_file()

    # the library's RePaint with the stage's seeds: the same images
    net = load_sampling_model(project / "models" / "ema.pt")
    val = load_prepared(project / "data" / "prepared", "val")
    x0 = to_float(torch.as_tensor(np.asarray(val.images[:4]))).permute(0, 3, 1, 2)
    mask = make_masks("box", 0.3, 16, image_generators(mix(0, 1), range(4)))
    fields = {k: v for k, v in PARAMS["sample"].items() if k in SamplerConfig.model_fields}
    config = SamplerConfig(**{**fields, "sampler": "ddpm", "steps": 8})
    with torch.no_grad():
        expected = inpaint(net.model, net.diffusion, x0, mask, config, jump_length=2,
                           resample=2, generator=image_generators(0, range(4)))  # fmt: skip
    assert torch.equal(images, to_uint8(expected))
    assert torch.equal(masks[..., 0] == 255, mask[:, 0])
    known = mask[:, 0]
    assert torch.equal(images[known], to_uint8(x0)[known])  # the known region, as it was

    client, run = only_run(project)
    assert run.data.metrics["edit/inpaint/mse_known"] < 1e-12
    assert run.data.metrics["edit/inpaint/nfe_per_image"] == summary["nfe_per_image"]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "edits")} == {
        "edits/grid.png", "edits/edit.json"
    }  # fmt: skip
    assert run.data.tags["stage.edit"] == "done"


def test_sdedit_at_strength_one_makes_the_sample_stages_images(project):
    set_params(edit={"mode": "sdedit", "strength": 1.0})
    assert runner.invoke(app, ["sample"]).exit_code == 0
    result = runner.invoke(app, ["edit"])
    assert result.exit_code == 0, result.output
    assert torch.equal(pngs(project / "edits" / "images"), pngs(project / "samples" / "images"))
    summary = json.loads((project / "metrics" / "edit.json").read_text())
    assert math.isfinite(summary["results"]["kid_mean"])
    assert {"mse_to_input", "kid_mean", "kid_std"} <= set(summary["results"])
    set_params(edit={"strength": 0.3})  # little noise: closer to the input
    assert runner.invoke(app, ["edit"]).exit_code == 0
    near = json.loads((project / "metrics" / "edit.json").read_text())
    assert near["results"]["mse_to_input"] < summary["results"]["mse_to_input"]


def test_reconstruct_writes_the_librarys_reconstruction_and_its_psnr(project):
    """The round trip's PSNR rising with the steps needs a model that denoises: the library's
    tests (an exact denoiser) and the smoke project's (a trained one) check it."""
    set_params(edit={"mode": "reconstruct", "steps": 5})
    result = runner.invoke(app, ["edit"])
    assert result.exit_code == 0, result.output
    summary = json.loads((project / "metrics" / "edit.json").read_text())
    net = load_sampling_model(project / "models" / "ema.pt")
    val = load_prepared(project / "data" / "prepared", "val")
    x0 = to_float(torch.as_tensor(np.asarray(val.images[:4]))).permute(0, 3, 1, 2)
    with torch.no_grad():
        _, expected = reconstruct(net.model, net.diffusion, x0, 5, spacing="trailing")
    assert torch.equal(pngs(project / "edits" / "images"), to_uint8(expected))
    mse = ((expected.clamp(-1, 1) - x0) ** 2).flatten(1).mean(dim=1) / 4  # on [0, 1]
    psnr = float((10 * torch.log10(1 / mse)).mean())
    assert summary["results"]["psnr"] == pytest.approx(psnr, rel=1e-4)
    assert summary["nfe_per_image"] == 10 and summary["sampler"]["sampler"] == "ddim"


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        ({"mask_fraction": 1.0}, "edit.mask_fraction"),
        ({"mask_fraction": 0.0}, "edit.mask_fraction"),
        ({"strength": 0.0}, "edit.strength"),
        ({"strength": 1.5}, "edit.strength"),
        ({"resample": 0}, "edit.resample"),
        ({"jump_length": 9}, "edit.jump_length=9 is more than edit.steps=8"),
    ],
)
def test_bad_settings_are_params_errors_naming_the_key(project, edit, words):
    set_params(edit=edit)
    result = runner.invoke(app, ["edit"])
    assert result.exit_code == 2 and words in result.output, result.output
    assert not (project / "metrics" / "edit.json").exists()


def test_a_strength_too_small_for_the_chain_is_refused_before_any_work(project):
    set_params(edit={"mode": "sdedit", "strength": 0.01})  # T = 20: round(0.2) - 1 < 0
    result = runner.invoke(app, ["edit"])
    assert result.exit_code == 2 and "edit.strength" in result.output, result.output
    assert "Traceback" not in result.output and not (project / "edits").exists()


def test_more_steps_than_the_models_chain_is_refused_naming_both(project):
    set_params(edit={"mode": "reconstruct", "steps": 30})
    result = runner.invoke(app, ["edit"])
    assert result.exit_code == 2 and "edit.steps=30 is more than the model's T=20" in result.output


def test_guidance_without_classes_and_a_missing_split_are_refused_before_any_work(project):
    set_params(edit={"split": "test"}, sample={"guidance_scale": 3.0})  # params: first
    result = runner.invoke(app, ["edit"])
    assert result.exit_code == 2 and "sample.guidance_scale" in result.output, result.output
    set_params(edit={"split": "test"}, sample={"guidance_scale": 1.0})
    result = runner.invoke(app, ["edit"])
    assert result.exit_code == 1 and "set edit.split: val" in result.output, result.output
    assert not (project / "edits").exists()
