"""MLflow as its users expect it: the UI opens on the runs table of this project's experiment,
and the trained model is a registered pyfunc that generates images."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from stages import enter_project, prepare_split, project_params
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.tracking import Tracker, ui_url


def test_make_ui_prints_the_runs_table_of_the_experiment_not_the_genai_pages(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    with Tracker({"seed": 0}, "train") as tracker:
        assert tracker.run_id is not None
    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name("ddpm")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert ui_url() == (
        f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs"
        "?workflowType=machine_learning"
    )


def test_tracking_switched_off_opens_no_run_and_writes_no_store(tmp_path, monkeypatch):
    """DDPM_TRACKING=false: a machine without MLflow (the GPU check's) runs every stage."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DDPM_TRACKING", "false")
    with Tracker({"seed": 0}, "train") as tracker:
        tracker.log_metrics({"loss": 1.0})
        assert tracker.run_id is None and not tracker.enabled
    assert not (tmp_path / "mlflow.db").exists()


PARAMS = project_params(
    {
        "dataset": "synthetic",
        "image_size": 16,
        "data": {"num_images": 40, "val_fraction": 0.25},
        "model": {"base_channels": 16, "channel_mults": [1, 2], "num_res_blocks": 1,
                  "attention_resolutions": [8], "num_groups": 8},
        "diffusion": {"timesteps": 20},
        "train": {"steps": 4, "batch_size": 4, "warmup_steps": 1, "val_every": 4,
                  "checkpoint_every": 4, "sample_every": 4, "sample_images": 2,
                  "sample_steps": 2, "val_images": 4, "val_timesteps": 2},
        "sample": {"steps": 3, "num_images": 6, "batch_size": 6, "grid_images": 4,
                   "gif_images": 2, "gif_frames": 2, "interpolation": False},
        "evaluate": {"reference_split": "val", "kid_subset_size": 4, "isc_splits": 2,
                     "batch_size": 16},
        "registry": {"enabled": True, "model_name": "tiny-ddpm"},
    }
)  # fmt: skip


def test_the_trained_model_is_a_registered_pyfunc_that_generates_the_sample_stages_images(
    tmp_path, inception_weights, monkeypatch
):
    prepared = prepare_split(tmp_path / "prep", PARAMS)
    enter_project(tmp_path, prepared, PARAMS, monkeypatch, inception_weights)
    for stage in ("train", "sample", "evaluate", "track"):
        result = CliRunner().invoke(app, [stage])
        assert result.exit_code == 0, result.output
    assert "registered models:/tiny-ddpm/1" in result.output  # track registers
    assert "logged 0 metric values the run lacked" in result.output  # every stage ran
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    version = MlflowClient(tracking_uri=uri).get_model_version("tiny-ddpm", "1")
    fid = json.loads(Path("metrics/eval.json").read_text())["fid"]
    assert float(version.tags["fid"]) == pytest.approx(fid)
    model = mlflow.pyfunc.load_model("models:/tiny-ddpm/1")
    request = pd.DataFrame({"num_images": [3], "sampler": ["ddim"], "steps": [3], "seed": [0]})
    images = model.predict(request)
    assert images.dtype == np.uint8 and images.shape == (3, 16, 16, 3)
    written = np.stack([np.asarray(Image.open(f"samples/images/{i:06d}.png")) for i in range(3)])
    assert np.abs(images.astype(int) - written.astype(int)).max() <= 1  # sample's images 0-2


def test_track_completes_a_run_whose_stages_dvc_restored_from_its_run_cache(
    tmp_path, inception_weights, monkeypatch
):
    points = [{"sampler": "ddim", "steps": 2}, {"sampler": "ddim", "steps": 3}]
    params = {**PARAMS, "frontier": {**PARAMS["frontier"], "num_images": 6, "batch_size": 6,
                                     "grid_images": 2, "points": points}}  # fmt: skip
    prepared = prepare_split(tmp_path / "prep", params)
    enter_project(tmp_path, prepared, params, monkeypatch, inception_weights)
    monkeypatch.setenv("DVC_EXP_NAME", "ran")
    for stage in ("train", "sample", "evaluate", "frontier"):
        result = CliRunner().invoke(app, [stage])
        assert result.exit_code == 0, result.output
    # A second experiment whose stages DVC restores: the same files, no stage runs but track.
    monkeypatch.setenv("DVC_EXP_NAME", "restored")
    result = CliRunner().invoke(app, ["track"])
    assert result.exit_code == 0, result.output
    assert "logged the model from models/ema.pt" in result.output
    assert "registered models:/tiny-ddpm/1" in result.output
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ddpm")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    ran, restored = runs["ran"], runs["restored"]
    lacking = set(ran.data.metrics) - set(restored.data.metrics)
    assert lacking <= {"train/ema_decay", "sample/images_per_second"}, lacking  # not on disk
    for name in ("train/steps", "train/best_val_loss", "eval/fid", "eval/kid_mean"):
        assert restored.data.metrics[name] == pytest.approx(ran.data.metrics[name], rel=1e-5)
    history = [m.step for m in client.get_metric_history(restored.info.run_id, "train/loss")]
    assert history == [m.step for m in client.get_metric_history(ran.info.run_id, "train/loss")]
    frontier = client.get_metric_history(restored.info.run_id, "frontier/ddim/fid")
    assert sorted(m.step for m in frontier) == [2, 3]  # NFE as the step, as frontier logs it
    assert restored.info.status == "FINISHED" and restored.data.tags["stage.track"] == "done"
    version = client.get_model_version("tiny-ddpm", "1")
    assert version.run_id == restored.info.run_id and "fid" in version.tags
    again = CliRunner().invoke(app, ["track"])
    assert "logged 0 metric values the run lacked (none)" in again.output
    assert "logged the model" not in again.output and "registered" not in again.output
