"""The frontier stage through its CLI: every point scored from the same noises, the outputs read
back (JSON, the TSV plot, the figures, the MLflow run), bad points refused before any work."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image
from stages import enter_project, prepare_split, project_params
from typer.testing import CliRunner

from ddpm.checkpoint import load_sampling_model
from ddpm.progress import Progress
from pipeline.cli import app
from pipeline.frontier import plan_points, render_point
from pipeline.settings import load_params

runner = CliRunner()

PARAMS = project_params(
    {
        "dataset": "synthetic",
        "image_size": 16,
        "data": {"num_images": 40, "val_fraction": 0.25},  # train 30, val 10
        "diffusion": {"timesteps": 20},
        "sample": {"steps": 4, "num_images": 12, "batch_size": 6, "grid_images": 4,
                   "gif_images": 2, "gif_frames": 2, "interpolation": False},
        "evaluate": {"reference_split": "val", "kid_subset_size": 6, "kid_subsets": 5,
                     "isc_splits": 2, "batch_size": 16},
        "frontier": {
            "num_images": 12,
            "batch_size": 6,
            "grid_images": 3,
            "points": [
                {"sampler": "ddim", "steps": 2},
                {"sampler": "ddim", "steps": 4},
                {"sampler": "dpm-solver", "steps": 2},
                {"sampler": "ddim", "steps": 4, "spacing": "quadratic"},
                {"sampler": "unipc", "steps": 4, "order": 3},
            ],
        },
    }
)  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepare_split(tmp_path_factory.mktemp("prepared"), PARAMS)


@pytest.fixture
def project(tmp_path, prepared, inception_weights, tiny_checkpoint, monkeypatch) -> Path:
    tiny_checkpoint(tmp_path / "models" / "ema.pt")
    return enter_project(tmp_path, prepared, PARAMS, monkeypatch, inception_weights)


def test_the_frontier_scores_every_point_and_writes_what_a_person_reads(project):
    result = runner.invoke(app, ["frontier"])
    assert result.exit_code == 0, result.output
    tree = json.loads((project / "metrics" / "frontier.json").read_text())
    assert tree["num_images"] == 12 and "NOT real" in tree["label"]
    series = tree["series"]
    assert {k: sorted(v, key=int) for k, v in series.items()} == {
        "ddim": ["2", "4"], "dpm-solver": ["2"], "ddim:quadratic": ["4"], "unipc-3": ["4"],
    }  # fmt: skip
    # NFE: one network evaluation per visited timestep; quadratic at T = 20 visits [16, 7, 1, 0]
    assert [series["ddim"]["2"]["nfe"], series["ddim"]["4"]["nfe"]] == [2, 4]
    assert series["ddim:quadratic"]["4"]["nfe"] == 4
    for point in (p for s in series.values() for p in s.values()):
        assert all(math.isfinite(point[k]) for k in ("fid", "kid_mean", "isc_mean", "seconds"))
    # The DVC plot: one row per point, x = nfe, y = fid, the series to draw a line per sampler
    rows = (project / "metrics" / "frontier.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["series", "steps", "nfe", "fid", "kid_mean", "isc_mean",
                                   "seconds"]  # fmt: skip
    assert [r.split("\t")[:3] for r in rows[1:]] == [
        ["ddim", "2", "2"], ["ddim", "4", "4"], ["dpm-solver", "2", "2"],
        ["ddim:quadratic", "4", "4"], ["unipc-3", "4", "4"],
    ]  # fmt: skip
    with Image.open(project / "frontier" / "grid.png") as grid:  # 5 rows of 3 images at 2x
        assert grid.height == 5 * (32 + 2) + 2
    with Image.open(project / "frontier" / "fid_vs_nfe.png") as figure:
        assert figure.size == (520, 360) and len(set(figure.getdata())) > 10
    assert "ddim:quadratic" in result.output and "NFE" in result.output  # the closing table
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id])
    history = client.get_metric_history(run.info.run_id, "frontier/ddim/fid")
    assert [m.step for m in history] == [2, 4]  # the MLflow chart of a series is its frontier
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "frontier")}
    assert "frontier/fid_vs_nfe.png" in artifacts and "frontier/frontier.tsv" in artifacts
    # evaluate reuses the reference features the frontier computed and cached
    assert runner.invoke(app, ["sample"]).exit_code == 0
    evaluated = runner.invoke(app, ["evaluate"])
    assert evaluated.exit_code == 0 and "reusing" in evaluated.output, evaluated.output


def test_image_i_starts_from_the_noise_sample_gives_it_at_every_point(project):
    """The frontier's DDIM-4 images are the sample stage's, pixel for pixel: image i's noise
    comes from its own seed, the same at every point, so points differ only by the sampler."""
    assert runner.invoke(app, ["sample"]).exit_code == 0
    p = load_params(Path("params.yaml"))
    net = load_sampling_model(Path("models/ema.pt"))
    points = {(pt.series, pt.config.steps): pt for pt in plan_points(p, net)[0]}
    with Progress(None, "test", enabled=False) as bar:
        point, device = points[("ddim", 4)], torch.device("cpu")
        images, _ = render_point(net, point, p.frontier, p.seed, p.sample.classes, device, bar)
    written = [np.asarray(Image.open(f"samples/images/{i:06d}.png")) for i in range(12)]
    assert torch.equal(images, torch.from_numpy(np.stack(written)))


@pytest.mark.parametrize(
    ("points", "words"),
    [
        ([{"sampler": "ddim", "steps": 50}], "frontier.points[0].steps=50 is more than"),
        ([{"sampler": "ddim", "steps": 4, "guidance_scale": 2.0}], "needs a class-conditional"),
        ([{"sampler": "ddim", "steps": 4}, {"sampler": "ddim", "steps": 4}], "repeat a sampler"),
    ],
)
def test_bad_points_are_refused_before_any_work(project, points, words):
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["frontier"]["points"] = points
    Path("params.yaml").write_text(yaml.safe_dump(params))
    result = runner.invoke(app, ["frontier"])
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split()) and not (project / "frontier").exists()


def test_every_problem_with_the_inputs_is_reported_at_once(project):
    """No weights and no prepared data: both named, one line each, before any work."""
    (project / "models" / "ema.pt").unlink()
    shutil.rmtree(project / "data" / "prepared")
    result = runner.invoke(app, ["frontier"])
    assert result.exit_code == 1, result.output
    listed = result.output.split("the frontier stage cannot start, 2 problems:\n")[1]
    weights, data = listed.splitlines()
    assert weights.startswith("  - ") and "models/ema.pt" in weights, listed
    assert data.startswith("  - ") and "data/prepared" in data, listed
    assert not (project / "frontier").exists() and not (project / "metrics").exists()
