"""MLflow as its users expect it: the UI opens on the runs table of this project's experiment,
and the trained model is a registered pyfunc that generates images."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from runs import run_contents
from stages import TINY_PROJECT, enter_project, prepare_split
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.projection import Model, Record, project
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
        # nothing is logged, so nothing is there: no model, no registered version, no tags
        assert tracker.logged_model("0" * 64) is None and not tracker.registered("m", "0" * 64)
        assert tracker.tags() is None and tracker.log_series({"train/loss": [(1, 1.0)]}) == 0
    assert not (tmp_path / "mlflow.db").exists()


PARAMS = TINY_PROJECT


def test_track_fails_saying_once_that_the_server_is_unreachable(tmp_path, monkeypatch):
    """A real port with nothing listening: track, whose one job is the run, says so once and
    exits 1, so DVC does not record it as done and the next `dvc repro` runs it again."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (tmp_path / "params.yaml").write_text(json.dumps(PARAMS))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    result = CliRunner().invoke(app, ["track"])
    assert result.exit_code == 1, result.output
    assert result.output.count("MLflow run is not complete") == 1, result.output
    assert f"Tracking URI: http://127.0.0.1:{port}" in result.output
    assert "`dvc repro` completes the run" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "mlflow.db").exists()


def run_stages(*stages: str) -> str:
    for stage in stages:
        result = CliRunner().invoke(app, [stage])
        assert result.exit_code == 0, result.output
    return result.output


def test_the_trained_model_is_a_registered_pyfunc_that_generates_the_sample_stages_images(
    tmp_path, inception_weights, monkeypatch
):
    prepared = prepare_split(tmp_path / "prep", PARAMS)
    enter_project(tmp_path, prepared, PARAMS, monkeypatch, inception_weights)
    output = run_stages("train", "sample", "evaluate", "track")
    assert "registered models:/tiny-ddpm/1" in output  # track registers
    assert "record of no stage (3 of 3 already in it)" in output  # every stage ran
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    version = MlflowClient(tracking_uri=uri).get_model_version("tiny-ddpm", "1")
    fid = json.loads(Path("metrics/eval.json").read_text())["fid"]
    assert float(version.tags["fid"]) == pytest.approx(fid)
    model = mlflow.pyfunc.load_model("models:/tiny-ddpm/1")
    # Every row is answered, in order; what a row leaves out is the experiment's sample setting
    images = model.predict(pd.DataFrame({"num_images": [2, 3]}))
    assert images.dtype == np.uint8 and images.shape == (5, 16, 16, 3)
    written = np.stack([np.asarray(Image.open(f"samples/images/{i:06d}.png")) for i in range(3)])
    assert np.array_equal(images[:2], written[:2]) and np.array_equal(images[2:], written)
    other = model.predict(pd.DataFrame({"num_images": [2], "seed": [1], "sampler": ["ddpm"]}))
    assert other.shape == (2, 16, 16, 3) and not np.array_equal(other, written[:2])
    unipc = {"num_images": [1], "sampler": ["unipc"], "steps": [5]}
    assert model.predict(pd.DataFrame({**unipc, "order": [3], "bh": ["bh1"]})).shape[0] == 1
    for column, value in (("order", 4), ("bh", "bh3")):  # the columns reach the sampler's check
        with pytest.raises(Exception, match=column):
            model.predict(pd.DataFrame({**unipc, column: [value]}))
    with pytest.raises(Exception, match="at least one image"):
        model.predict(pd.DataFrame({"num_images": [0]}))
    with pytest.raises(Exception, match=r"guidance_scale=3\.0 needs a class-conditional model"):
        model.predict(pd.DataFrame({"num_images": [1], "guidance_scale": [3.0]}))
    served = serve_and_post("models:/tiny-ddpm/1", uri, {"dataframe_records": [{"num_images": 2}]})
    assert np.array_equal(np.asarray(served["predictions"], dtype=np.uint8), written[:2])


def serve_and_post(model_uri: str, tracking_uri: str, request: dict) -> dict:
    """``mlflow models serve`` on 127.0.0.1, one POST to /invocations, the server stopped."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bin_dir = str(Path(sys.executable).parent)  # the venv's, where mlflow finds uvicorn
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    command = ["mlflow", "models", "serve", "-m", model_uri,
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    log = tempfile.TemporaryFile()  # noqa: SIM115  (not a pipe: a chatty server would fill it and stall)
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                log.seek(0)
                raise AssertionError(f"the model server stopped:\n{log.read().decode()}")
            try:
                urllib.request.urlopen(f"{base}/ping", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "the model server did not answer /ping"
                time.sleep(1)
        post = urllib.request.Request(
            f"{base}/invocations", json.dumps(request).encode(),
            {"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(post, timeout=120) as response:
            return json.loads(response.read())
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_a_run_whose_stages_dvc_restored_holds_what_a_run_whose_stages_ran_holds(
    tmp_path, inception_weights, monkeypatch
):
    """Two experiments of the same params: in one every stage runs; in the other DVC restores
    them, so only track runs, on the same files. The two runs hold the same, key by key."""
    points = [{"sampler": "ddim", "steps": 2}, {"sampler": "ddim", "steps": 3}]
    params = {**PARAMS, "frontier": {**PARAMS["frontier"], "num_images": 6, "batch_size": 6,
                                     "grid_images": 2, "points": points}}  # fmt: skip
    prepared = prepare_split(tmp_path / "prep", params)
    enter_project(tmp_path, prepared, params, monkeypatch, inception_weights)
    monkeypatch.setenv("DVC_EXP_NAME", "ran")
    output = run_stages("train", "sample", "evaluate", "frontier", "track")
    assert "record of no stage (4 of 4 already in it)" in output, output
    monkeypatch.setenv("DVC_EXP_NAME", "restored")
    output = run_stages("track")
    assert "record of train, sample, evaluate, frontier (0 of 4 already in it)" in output
    assert "registered models:/tiny-ddpm/2" in output, output
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ddpm")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    ran, restored = (run_contents(client, runs[name].info.run_id) for name in ("ran", "restored"))
    for key in ran:
        assert restored[key] == ran[key], key
    assert len(ran["metrics"]["train/loss"]) == 1 and "train/ema_decay" in ran["metrics"]
    assert ran["metrics"]["frontier/ddim/fid"][0][0] == 2  # NFE as the step
    assert {"weights/ema.pt", "samples/grid.png", "metrics/eval.json"} <= set(ran["artifacts"])
    assert sorted(c for _, _, _, c in ran["inputs"]) == [("evaluation",), ("training",)]
    assert len(ran["models"]) == 1 and len(ran["registered"]) == 1
    tags = runs["restored"].data.tags
    assert tags["stage.train"] == "restored" and tags["stage.track"] == "done"
    assert runs["ran"].data.tags["stage.train"] == "done"
    again = run_stages("track")  # nothing twice: no metric row, model or version
    assert "record of no stage" in again and "registered" not in again
    assert run_contents(client, runs["restored"].info.run_id) == restored


def test_a_stage_that_ran_keeps_its_tag_done_through_a_model_log(tmp_path, monkeypatch):
    """Projecting a record that logs a model: ``stage.<name>`` stays ``done`` for a stage that
    ran under the run, and is ``restored`` only for one the run has no tag of."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    weights = tmp_path / "ema.pt"
    weights.write_bytes(b"weights")
    logged = []
    with Tracker({"seed": 0}, "track") as tracker:
        tracker.set_tags({"stage.sample": "done"})
        for stage, seed in (("sample", 0), ("nll", 1)):
            rec = Record(stage, {f"{stage}/x": [(0, 1.0)]}, model=Model(weights, {"seed": seed}))
            assert project(tracker, rec, lambda *args: logged.append(args))
        tags = tracker.tags()
    assert [settings for _, settings, _ in logged] == [{"seed": 0}, {"seed": 1}]  # both logged
    assert tags["stage.sample"] == "done" and tags["stage.nll"] == "restored"
    assert tags["record.sample"] and tags["record.nll"]
