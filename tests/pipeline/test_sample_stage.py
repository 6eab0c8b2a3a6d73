"""The sample stage through its CLI: images, grid, GIF, figures, determinism, torchrun, errors."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image
from stages import prepare_split, project_params
from typer.testing import CliRunner

from ddpm.checkpoint import load_checkpoint, save_checkpoint
from pipeline.cli import app

runner = CliRunner()

PARAMS = project_params(
    {
        "dataset": "synthetic",
        "image_size": 16,
        "seed": 0,
        "data": {"num_images": 30},
        "diffusion": {"timesteps": 20},
        "sample": {
            "sampler": "ddim",
            "steps": 4,
            "num_images": 7,
            "batch_size": 2,
            "grid_images": 4,
            "gif_images": 3,
            "gif_frames": 3,
            "interpolation_steps": 4,
        },
        "evaluate": {"kid_subset_size": 4, "isc_splits": 2},
    }
)
STEPS = {"ddpm": 20, "ddim": 4, "dpm-solver": 4}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepare_split(tmp_path_factory.mktemp("prepared"), PARAMS)


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One SQLite store for the module: creating its schema takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def project(tmp_path, prepared, tiny_checkpoint, tracking_uri, monkeypatch) -> Path:
    """Prepared data, params and a tiny models/ema.pt in the cwd."""
    shutil.copytree(prepared, tmp_path / "data" / "prepared")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    tiny_checkpoint(tmp_path / "models" / "ema.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    return tmp_path


def set_params(project: Path, **sample) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["sample"].update(sample)
    (project / "params.yaml").write_text(yaml.safe_dump(params))


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "images").glob("*.png"))}


def sample(*args: str) -> str:
    result = runner.invoke(app, ["sample", *args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("sampler", list(STEPS))
def test_each_sampler_writes_images_grid_gif_and_figures(project, sampler):
    set_params(project, sampler=sampler, steps=STEPS[sampler])
    sample()
    out = project / "samples"
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == [f"{i:06d}.png" for i in range(7)]
    for name in names:
        with Image.open(out / "images" / name) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (16, 16))
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (2 * 18 + 2, 2 * 18 + 2)  # 4 images, 2 pixels of padding
    with Image.open(out / "denoising.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames == 3
    with Image.open(out / "interpolation.png") as row:
        assert row.size == (4 * 18 + 2, 18 + 2)
    for figure in ("schedule.png", "forward_process.png"):
        with Image.open(out / "figures" / figure) as image:
            assert image.width > 200 and image.height > 100
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sampler"] == sampler and manifest["steps"] == STEPS[sampler]
    assert manifest["num_images"] == 7 and manifest["image_size"] == 16
    assert manifest["checkpoint_step"] == 7 and manifest["labels"] is None
    assert not (project / ".samples.tmp").exists()


def test_the_run_logs_the_figures_to_mlflow(project, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the project's own store: this run alone
    sample()
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id])
    assert run.data.tags["stage.sample"] == "done" and run.data.params["sample.steps"] == "4"
    assert run.data.metrics["sample/images_per_second"] > 0
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert {"samples/grid.png", "samples/denoising.gif", "samples/figures"} <= logged
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "samples/figures")}
    assert figures == {"samples/figures/schedule.png", "samples/figures/forward_process.png"}


def test_a_seed_gives_the_same_images_and_changed_params_change_them(project):
    sample()
    first = pngs(project / "samples")
    sample()
    assert pngs(project / "samples") == first
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["seed"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    sample("--out", "other-seed")
    other = pngs(project / "other-seed")
    assert other.keys() == first.keys() and all(other[k] != first[k] for k in first)
    params["seed"] = 0
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    set_params(project, steps=3)  # what `dvc exp run -S sample.steps=3` does
    sample("--out", "three-steps")
    assert pngs(project / "three-steps") != first


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_write_the_images_one_process_writes(project):
    sample()  # one process, one thread (the fixture), like each torchrun process below
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDPM_DEVICE": "cpu"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), "-m", "pipeline.cli", "sample", "--out", "two",
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (done.stdout + done.stderr).count("two/images: 7 images") == 1  # rank 0 only
    assert pngs(project / "two") == pngs(project / "samples")
    assert (project / "two" / "grid.png").read_bytes() == (
        project / "samples/grid.png"
    ).read_bytes()


def test_a_conditional_model_samples_the_chosen_classes(project, tiny_checkpoint):
    tiny_checkpoint(project / "models" / "ema.pt", num_classes=3)
    set_params(project, classes=[2, 0], guidance_scale=2.0)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"]["conditional"] = True  # as the project that trained it says
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    sample()
    manifest = json.loads((project / "samples" / "manifest.json").read_text())
    assert manifest["labels"] == [2, 0, 2, 0, 2, 0, 2]
    assert manifest["class_names"] == ["c0", "c1", "c2"]


@pytest.mark.parametrize(
    ("change", "message", "code"),
    [
        ({"delete": True}, "models/ema.pt: no such checkpoint; train first", 1),
        ({"weights": "raw"}, "models/ema.pt holds no raw weights", 1),
        ({"classes": [1]}, "sample.classes: classes [1] were given, but the model is uncond", 2),
        ({"guidance_scale": 3.0}, "needs a class-conditional model", 2),
        ({"steps": 21}, "sample.steps=21 is more than T=20", 2),
        ({"sampler": "euler"}, "sample.sampler", 2),
        ({"nan": True}, "produced NaN or inf values for images [0, 1]", 1),
        ({"eta": 1.3}, "sample.eta", 2),
    ],
)
def test_bad_checkpoints_and_params_exit_with_one_clear_line(project, change, message, code):
    """Params that do not fit exit 2 (as in every stage), a bad checkpoint 1."""
    if change.pop("delete", False):
        (project / "models" / "ema.pt").unlink()
    if change.pop("nan", False):
        ckpt = load_checkpoint(project / "models" / "ema.pt")
        ckpt["ema"]["module.conv_out.bias"][:] = float("nan")
        save_checkpoint(ckpt, project / "models" / "ema.pt")
    set_params(project, **change)
    result = runner.invoke(app, ["sample"])
    assert result.exit_code == code, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (project / "samples").exists() and not (project / ".samples.tmp").exists()


class Payload:
    """Any class: a pickle of one names it as a global to import, which weights_only refuses."""


@pytest.mark.parametrize(
    ("content", "reason"),
    [("garbage", "Unsupported operand 103"),
     ("class", f"Unsupported global: GLOBAL {__name__}.Payload")],
)  # fmt: skip
def test_weights_that_are_not_a_checkpoint_are_one_line_naming_the_file(project, content, reason):
    """The unpickler's reason, without torch's advice to load with ``weights_only=False``."""
    weights = project / "models" / "ema.pt"
    if content == "garbage":
        weights.write_bytes(b"garbage")
    else:
        torch.save({"ema": Payload()}, weights)
    result = runner.invoke(app, ["sample"])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if " INFO mlflow." not in line]
    assert lines == [  # MLflow's own log lines aside (a new store's first run)
        "error: models/ema.pt is not a readable checkpoint, one this project can read safely "
        f"({reason}). Delete it to start fresh, or restore it from the DVC cache"
    ]
    assert not (project / "samples").exists()


def test_non_finite_samples_from_finite_weights_blame_the_sampler_settings(project, monkeypatch):
    """NaN images from weights that are all finite come from the sampler: the error names its
    settings, not the weights (it used to say the weights were broken)."""
    import pipeline.render
    from ddpm.errors import NonFiniteSamplesError

    def diverges(*args, **kwargs):
        raise NonFiniteSamplesError("the ddim-5 sampler produced NaN or inf values for images [0]")

    monkeypatch.setattr(pipeline.render, "generate", diverges)  # the images' batches
    result = runner.invoke(app, ["sample"])
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "the ema weights are finite, so the sampler settings diverge (sampler=" in text, text
    assert "eta=" in text and "Traceback" not in result.output


def test_every_problem_with_the_inputs_is_reported_at_once(project):
    """No prepared data, and classes for an unconditional model: both named, one line each."""
    shutil.rmtree(project / "data" / "prepared")
    set_params(project, classes=[1])
    result = runner.invoke(app, ["sample"])
    assert result.exit_code == 1, result.output
    listed = result.output.split("the sample stage cannot start, 2 problems:\n")[1]
    data, classes = listed.splitlines()
    assert data.startswith("  - ") and "data/prepared" in data, listed
    assert classes == "  - sample.classes: classes [1] were given, but the model is unconditional"
    assert not (project / "samples").exists()
