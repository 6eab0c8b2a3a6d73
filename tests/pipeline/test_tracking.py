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
    for stage in ("train", "sample", "evaluate"):
        result = CliRunner().invoke(app, [stage])
        assert result.exit_code == 0, result.output
    assert "registered models:/tiny-ddpm/1" in result.output
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
