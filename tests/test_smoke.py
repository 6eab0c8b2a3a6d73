"""The smoke pipeline end to end: the real dvc.yaml stages, tiny and offline, read back.

This file's copy of the session's smoke project (tests/smoke_project.py) changes in turn: its
results as built, a second and a third experiment through ``dvc exp run -S`` compared against
their noise, a queued sweep on two workers logging to a real ``mlflow server``, the registry
and the model served from it, FID during training, the explore notebook, a run and an
experiment shared through a DVC remote and a git remote. tests/test_smoke_experiments.py
runs the other experiments on a copy of its own.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from notebook_run import EXAMPLES, cell, execute, mime_types, stdout
from PIL import Image
from runs import run_contents
from servers import TrackingServer, invoke, model_server
from smoke_project import dvc, dvc_env, git, mlflow_runs, publish

from ddpm.checkpoint import load_checkpoint
from pipeline.projection import Layout, curve_rows
from pipeline.track import track_stage

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator[TrackingServer]:
    """One ``mlflow server`` for the session (the tests below stop and start it)."""
    server = TrackingServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


def test_smoke_pipeline_writes_finite_metrics(smoke):
    train = json.loads((smoke / "metrics" / "train.json").read_text())
    assert train["steps"] == 150 and math.isfinite(train["final_val_loss"])
    assert train["final_val_loss"] < 0.5  # the untrained, zero-output net scores about 1.0
    assert (smoke / "dvc.lock").is_file()
    evaluation = json.loads((smoke / "metrics" / "eval.json").read_text())
    for key in ("fid", "isc_mean", "isc_std", "kid_mean", "kid_std"):
        assert math.isfinite(evaluation[key]), (key, evaluation)
    assert evaluation["num_images"] == 50 and evaluation["sampler"] == "ddim"
    assert "NOT real" in json.dumps(evaluation)  # untrained Inception weights are labelled
    assert len(list((smoke / "samples" / "images").glob("*.png"))) == 50
    nll = json.loads((smoke / "metrics" / "nll.json").read_text())  # bits/dim of 20 val images
    assert (nll["split"], nll["num_images"], nll["stride"]) == ("val", 20, 10)
    assert 0 < nll["bpd"] < 20 and nll["bpd_stderr"] > 0, nll
    terms = (smoke / "metrics" / "nll_terms.tsv").read_text().splitlines()
    assert terms[0] == "t\tbpd" and [row.split("\t")[0] for row in terms[1:3]] == ["0", "10"]
    assert len(terms) == 1 + 200 // 10


def test_smoke_pipeline_logs_one_mlflow_run_with_params_metrics_and_artifacts(smoke):
    client, runs = mlflow_runs(smoke)
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["dataset"] == "synthetic" and run.data.params["schedule"] == "linear"
    assert run.data.metrics["train/steps"] == 150
    assert math.isfinite(run.data.metrics["eval/fid"])
    assert math.isfinite(run.data.metrics["nll/bpd"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"weights", "previews", "curves"} <= artifacts, artifacts
    assert run.data.tags["stage.train"] == run.data.tags["stage.evaluate"] == "done"
    assert run.data.tags["stage.nll"] == "done"


def test_smoke_frontier_scores_two_samplers_at_two_step_counts_and_heun(smoke):
    tree = json.loads((smoke / "metrics" / "frontier.json").read_text())
    assert {name: sorted(points, key=int) for name, points in tree["series"].items()} == {
        "ddim": ["5", "10"], "dpm-solver": ["5", "10"], "heun": ["3"],
    }  # fmt: skip
    for name, points in tree["series"].items():
        for steps, point in points.items():
            nfe = 2 * int(steps) - 1 if name == "heun" else int(steps)  # heun: 2 a step, 1 last
            assert point["nfe"] == nfe and math.isfinite(point["fid"]), point
    rows = (smoke / "metrics" / "frontier.tsv").read_text().splitlines()
    assert len(rows) == 6 and rows[0].startswith("series\tsteps\tnfe\tfid")
    assert (smoke / "frontier" / "fid_vs_nfe.png").is_file()
    # dvc plots renders the TSV with the frontier template: FID against log NFE, by sampler
    shown = json.loads(dvc(smoke, "plots", "show", "--json", "metrics/frontier.tsv").stdout)
    (plot,) = shown["data"]["metrics/frontier.tsv"]
    spec = plot["content"]
    assert spec["encoding"]["x"]["scale"]["type"] == "log"
    assert spec["encoding"]["color"]["field"] == "series"
    values = spec["data"]["values"]
    assert {v["series"] for v in values} == {"ddim", "dpm-solver", "heun"} and len(values) == 5
    _, runs = mlflow_runs(smoke)
    assert math.isfinite(runs[0].data.metrics["frontier/ddim/fid"])


def test_smoke_edit_inpaints_holding_the_known_region(smoke):
    edit = json.loads((smoke / "metrics" / "edit.json").read_text())
    assert (edit["mode"], edit["split"], edit["num_images"]) == ("inpaint", "val", 4)
    assert edit["results"]["mse_known"] < 1e-12 < edit["results"]["mse_unknown"], edit
    assert edit["nfe_per_image"] > edit["settings"]["steps"]  # RePaint's jumps back cost NFE
    assert (smoke / "edits" / "grid.png").is_file()
    assert len(list((smoke / "edits" / "images").glob("*.png"))) == 4
    assert len(list((smoke / "edits" / "masks").glob("*.png"))) == 4
    client, runs = mlflow_runs(smoke)
    run = runs[0]
    assert (
        run.data.metrics["edit/inpaint/mse_known"] < 1e-12 and run.data.tags["stage.edit"] == "done"
    )
    assert "edits" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_unchanged_pipeline_reruns_nothing(smoke):
    out = dvc(smoke, "status").stdout
    assert "Data and pipelines are up to date" in out, out


# three seed ranges of 10 images (KID's subsets of 10 allow no fewer): the experiments from
# here on are scored so, and the cosine one is compared with ddim-10 against their noise
REPEATS = ("-S", "sample.num_images=10", "-S", "evaluate.repeats=3")


def three_ranges(smoke: Path) -> dict:
    """eval.json of three ranges of 10 images: each range's numbers, their mean, std, min."""
    evaluation = json.loads((smoke / "metrics" / "eval.json").read_text())
    ranges = evaluation["ranges"]
    assert [r["image_indices"] for r in ranges] == ["0-9", "10-19", "20-29"], ranges
    assert evaluation["repeats"] == 3 and evaluation["num_images"] == 10
    for key in ("fid", "kid_mean", "isc_mean"):
        values = [r[key] for r in ranges]
        assert len(set(values)) == 3, (key, values)  # disjoint images, three numbers
        assert evaluation[key] == pytest.approx(statistics.mean(values), rel=1e-12)
        assert evaluation[f"{key}_std"] == pytest.approx(statistics.stdev(values), rel=1e-9)
        assert evaluation[f"{key}_min"] == min(values)
    return evaluation


def test_a_sampling_param_reruns_only_sample_and_evaluate(smoke):
    done = dvc(smoke, "exp", "run", "-n", "ddim-10", "-S", "sample.steps=10", *REPEATS)
    assert "Running stage 'sample'" in done.stdout and "Running stage 'evaluate'" in done.stdout
    assert "Running stage 'train'" not in done.stdout, done.stdout
    assert "Running stage 'frontier'" not in done.stdout  # it reads neither key
    assert "evaluate: 3 seed ranges of 10 images (evaluate.repeats)" in done.stdout
    assert three_ranges(smoke)["steps"] == 10
    _, runs = mlflow_runs(smoke)
    run = {r.info.run_name: r for r in runs}["ddim-10"]
    # DVC skipped train, yet the run opened by sample carries every param of the experiment
    assert run.data.params["sample.steps"] == "10" and run.data.params["train.steps"] == "150"


def test_a_cosine_experiment_is_told_from_ddim_10_against_their_noise_and_tracked(smoke):
    """`dvc exp run -S schedule=cosine` on ddim-10's settings: every stage after prepare runs,
    the difference of the two FIDs is printed beside the noise of their three seed ranges,
    and the MLflow run, named after the experiment, holds the whole record: dataset inputs,
    artifacts, every stage's metrics."""
    done = dvc(smoke, "exp", "run", "-n", "cosine-smoke", "-S", "schedule=cosine")
    assert "Running stage 'train'" in done.stdout and "Running stage 'prepare'" not in done.stdout
    cosine = three_ranges(smoke)  # ddim-10's settings but the schedule: compared against noise
    shown = experiment_metrics(smoke)
    linear = shown["ddim-10"]
    assert shown["cosine-smoke"]["fid"] == pytest.approx(cosine["fid"])
    assert linear["fid_std"] > 0 and "ranges" not in linear  # dvc exp show: numbers only
    print(f"\nsmoke figures (untrained Inception: not real FID), {against_noise(linear, cosine)}")
    client, runs = mlflow_runs(smoke, "cosine-smoke")
    (run,) = runs
    assert run.info.status == "FINISHED" and run.data.tags["dvc_exp_name"] == "cosine-smoke"
    assert run.data.params["schedule"] == "cosine" and run.data.metrics["train/steps"] == 150
    for key in ("eval/fid", "frontier/ddim/fid", "nll/bpd", "train/ema_decay"):
        assert math.isfinite(run.data.metrics[key]), key
    datasets = {d.dataset.name for d in run.inputs.dataset_inputs}
    assert {"synthetic-train", "synthetic-val"} == datasets, datasets
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"curves", "frontier", "metrics", "previews", "weights"} <= artifacts, artifacts


def experiment_metrics(project: Path) -> dict[str, dict]:
    """eval.json of each named experiment, as ``dvc exp show`` has it."""
    out = {}
    for commit in json.loads(dvc(project, "exp", "show", "--json").stdout):
        for exp in commit.get("experiments") or []:
            for rev in exp["revs"]:
                out[rev["name"]] = rev["data"]["metrics"]["metrics/eval.json"]["data"]
    return out


def against_noise(a: dict, b: dict) -> str:
    """The README's test of two experiments: their FID difference against the noise of a
    difference, sqrt(fid_std_a^2 + fid_std_b^2): beyond twice it they differ, within once
    it they do not, in between it takes more ranges or images to tell."""
    difference, noise = b["fid"] - a["fid"], math.hypot(a["fid_std"], b["fid_std"])
    ratio = abs(difference) / noise
    verdict = "differ" if ratio > 2 else "same" if ratio < 1 else "undecided: run more ranges"
    return (
        f"FID over 3 ranges of 10 images, mean (std): linear {a['fid']:.2f} ({a['fid_std']:.2f}),"
        f" cosine {b['fid']:.2f} ({b['fid_std']:.2f}); difference {difference:+.2f}, noise "
        f"sqrt({a['fid_std']:.2f}^2 + {b['fid_std']:.2f}^2) = {noise:.2f}: {ratio:.2f} x the "
        f"noise, {verdict}"
    )


def queued_experiments(project: Path) -> dict[str, str]:
    """The experiments of ``dvc exp show`` whose names DVC made up: name -> schedule."""
    swept = {}
    for commit in json.loads(dvc(project, "exp", "show", "--json").stdout):
        for exp in commit.get("experiments") or []:
            for rev in exp["revs"]:
                if rev["name"] not in ("cosine-smoke", "ddim-10"):
                    swept[rev["name"]] = rev["data"]["params"]["params.yaml"]["data"]["schedule"]
    return swept


def wait_for_queue(project: Path) -> str:
    """`dvc queue status` once no task is queued or running (the workers' own pace)."""
    deadline = time.monotonic() + 1200
    while True:
        status = dvc(project, "queue", "status").stdout
        tasks = status.split("Worker status")[0]
        if "Running" not in tasks and "Queued" not in tasks:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(2)


def test_a_sweep_on_two_queue_workers_logs_to_a_tracking_server_what_the_file_store_holds(
    smoke, server
):
    """The sweep users queue (`dvc exp run --queue -S schedule=linear,cosine`) on ddim-10's
    settings, run by `dvc queue start -j 2` against a real `mlflow server`: two experiments
    write to it at once. DVC restores every stage it can from its run cache (sample is not
    cached: it reruns, so its timings differ), and each run holds, key by key, what the file
    store's run of the same params holds, ddim-10's and cosine-smoke's, whose stages ran
    (params, metric histories, dataset inputs, artifacts, the model, its registered version)."""
    dvc(smoke, "exp", "run", "--queue", "-S", "schedule=linear,cosine")
    dvc(smoke, "queue", "start", "-j", "2", tracking=server.uri)
    status = wait_for_queue(smoke)
    dvc(smoke, "queue", "stop")
    assert status.count("Success") == 2 and "Failed" not in status, status
    swept = queued_experiments(smoke)
    assert sorted(swept.values()) == ["cosine", "linear"], swept
    client, runs = mlflow_runs(smoke, tracking=server.uri)
    file_client, file_runs = mlflow_runs(smoke)
    by_name = {r.info.run_name: r for r in runs}
    twins = {"linear": "ddim-10", "cosine": "cosine-smoke"}
    file_by_name = {r.info.run_name: r for r in file_runs}
    for name, schedule in swept.items():
        run = by_name[name]
        assert run.info.status == "FINISHED", run.info
        for stage in ("train", "evaluate", "frontier"):
            assert run.data.tags[f"stage.{stage}"] == "restored", (name, stage, run.data.tags)
        ours = run_contents(client, run.info.run_id)
        theirs = run_contents(file_client, file_by_name[twins[schedule]].info.run_id)
        for timing in ("sample/images_per_second", "sample/wall_time_s"):
            assert ours["metrics"].pop(timing) and theirs["metrics"].pop(timing)
        for key in theirs:
            assert ours[key] == theirs[key], (name, key)
        assert ours["registered"] and ours["models"] and "train/ema_decay" in ours["metrics"]


def test_the_servers_registry_over_rest_loads_and_serves_the_model(smoke, server, tmp_path):
    """The versions the queued runs registered, read over the REST API with their FID tags;
    the cosine one (the workspace's model) through the server by `mlflow.pyfunc.load_model`
    and `mlflow models serve`: both make the images the sample stage wrote."""
    query = urllib.parse.urlencode({"filter": "name = 'ddpm-smoke'"})
    url = f"{server.uri}/api/2.0/mlflow/model-versions/search?{query}"
    with urllib.request.urlopen(url, timeout=30) as response:
        versions = json.loads(response.read())["model_versions"]
    _, runs = mlflow_runs(smoke, tracking=server.uri)
    by_id = {r.info.run_id: r for r in runs}
    assert sorted(int(v["version"]) for v in versions) == [1, 2], versions
    schedules = {}
    for version in versions:
        run, tags = by_id[version["run_id"]], {t["key"]: t["value"] for t in version["tags"]}
        assert float(tags["fid"]) == run.data.metrics["eval/fid"], (tags, run.data.metrics)
        assert "NOT real" in tags["label"] and len(tags["model_sha256"]) == 64
        schedules[run.data.params["schedule"]] = version["version"]
    model_uri = f"models:/ddpm-smoke/{schedules['cosine']}"
    images = smoke / "samples" / "images"
    written = np.stack([np.asarray(Image.open(images / f"{i:06d}.png")) for i in range(2)])
    previous, threads = mlflow.get_tracking_uri(), torch.get_num_threads()
    mlflow.set_tracking_uri(server.uri)
    torch.set_num_threads(1)  # as the sample stage ran: the same float sums
    try:
        model = mlflow.pyfunc.load_model(model_uri)
        assert np.array_equal(model.predict(pd.DataFrame({"num_images": [2]})), written)
    finally:
        mlflow.set_tracking_uri(previous)
        torch.set_num_threads(threads)
    with model_server(model_uri, dvc_env(server.uri), tmp_path) as url:
        served = invoke(url, [{"num_images": 2}])
    assert np.array_equal(np.asarray(served["predictions"], dtype=np.uint8), written)


def test_the_server_going_down_while_train_runs_loses_nothing(as_built, server, monkeypatch):
    """A copy of the project as built resumes its 150 steps to 160 (a checkpoint, so a live
    curve row, every 2 steps) under `dvc repro train`, against the server. Once a live row
    reached the server, the server is killed (dvc and train held still meanwhile, so train has
    calls left): train says so once and writes whole files. The server comes back; `dvc
    repro -s track` completes the run from the files (only track: the other stages would
    rerun on the new model), and it holds, key by key, what the file store's run of those
    files holds, each metric step once."""
    copy = as_built
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["train"].update(steps=160, checkpoint_every=2)
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    client = MlflowClient(tracking_uri=server.uri)
    log = copy.parent / "server-down.log"
    with open(log, "w") as out:
        repro = subprocess.Popen(
            [sys.executable, "-m", "dvc", "repro", "train"], cwd=copy, env=dvc_env(server.uri),
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    run_id = None
    while run_id is None:
        assert repro.poll() is None, log.read_text()
        runs = client.search_runs(
            [client.get_experiment_by_name("ddpm").experiment_id], "params.`train.steps` = '160'"
        )
        rows = client.get_metric_history(runs[0].info.run_id, "train/loss") if runs else []
        run_id = runs[0].info.run_id if any(m.step > 150 for m in rows) else None
        time.sleep(0.1)
    os.killpg(repro.pid, signal.SIGSTOP)
    try:
        assert "record.train" not in client.get_run(run_id).data.tags  # train's end is to come
        server.stop()
    finally:
        os.killpg(repro.pid, signal.SIGCONT)
    assert repro.wait(timeout=1200) == 0, log.read_text()
    output = log.read_text()
    assert output.count("MLflow tracking is off") == 1, output
    assert json.loads((copy / "metrics" / "train.json").read_text())["steps"] == 160
    curve = (copy / "metrics" / "train_curve.tsv").read_text().splitlines()[1:]
    steps = [int(row.split("\t")[0]) for row in curve]
    assert steps == sorted(set(steps)) and steps[-5:] == [152, 154, 156, 158, 160], steps
    server.start()
    dvc(copy, "repro", "-s", "track", tracking=server.uri)
    # the file store's run of the same files: the track stage in this process
    monkeypatch.chdir(copy)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{copy / 'files.db'}")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    track_stage(Path("params.yaml"), Layout())
    file_client, (file_run,) = mlflow_runs(copy, tracking=f"sqlite:///{copy / 'files.db'}")
    ours, theirs = run_contents(client, run_id), run_contents(file_client, file_run.info.run_id)
    for key in theirs:
        assert ours[key] == theirs[key], key
    for name, rows in ours["metrics"].items():
        assert len({step for step, _ in rows}) == len(rows), name  # each step once
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["stage.train"] == "done"
    assert run.data.tags["stage.sample"] == "restored" and ours["registered"]


def test_fid_during_training_writes_its_curve_the_run_and_picks_best_pt_by_it(smoke):
    """The issue's check: `dvc exp run -S train.fid.every=50 -S train.best_by=fid` (another
    checkpoint folder: best.pt means something else). The weights are the baseline's to the
    bit (the evaluations draw from their own generators), so DVC reruns no later stage."""
    done = dvc(smoke, "exp", "run", "-n", "fid-smoke", "-S", "train.fid.every=50",
               "-S", "train.best_by=fid")  # fmt: skip
    assert "Running stage 'train'" in done.stdout, done.stdout
    assert "Running stage 'sample'" not in done.stdout  # the same models/ema.pt
    rows = curve_rows(smoke / "metrics" / "fid_curve.tsv")
    assert [s for s, _ in rows["train/fid"]] == [50, 100, 150]
    summary = json.loads((smoke / "metrics" / "train.json").read_text())
    fid, step = min((v, s) for s, v in rows["train/fid"])
    assert summary["best_by"] == "fid" and summary["best_fid_step"] == summary["best_step"] == step
    best = Path(summary["checkpoints"]) / "best.pt"
    assert load_checkpoint(best if best.is_absolute() else smoke / best)["step"] == step
    client, runs = mlflow_runs(smoke, "fid-smoke")
    (run,) = runs
    history = client.get_metric_history(run.info.run_id, "train/fid")
    assert sorted((m.step, round(m.value, 4)) for m in history) == [
        (s, round(v, 4)) for s, v in rows["train/fid"]]  # fmt: skip
    assert run.data.metrics["train/best_fid"] == pytest.approx(fid, rel=1e-5)


def test_the_explore_notebook_runs_on_the_project_after_its_experiments(smoke, tmp_path):
    """examples/explore.ipynb top to bottom, opened from the project's examples/ folder as an
    editor opens it, after the experiments above: the registered model's grid, the curves and
    the frontier from the DVC files, the runs table, two experiments compared, the GIF. A copy
    of its model cell with MODEL = "weights" runs last: the models/ema.pt path."""
    nb = nbformat.read(EXAMPLES / "explore.ipynb", as_version=4)
    weights = nbformat.from_dict(cell(nb, "model"))
    assert 'MODEL = "registry"' in weights.source
    weights.source = weights.source.replace('MODEL = "registry"', 'MODEL = "weights"')
    weights.id = "model-weights"
    nb.cells.append(weights)
    nbformat.write(nb, tmp_path / "explore.ipynb")
    done = execute(tmp_path / "explore.ipynb", cwd=smoke / "examples")
    assert f"project {smoke}" in stdout(cell(done, "project"))
    assert "models:/ddpm-smoke/" in stdout(cell(done, "model"))
    assert "models/ema.pt (ema weights, 150 steps)" in stdout(cell(done, "model-weights"))
    for name in ("model", "model-weights", "loss", "frontier", "compare"):
        assert "image/png" in mime_types(cell(done, name)), name
    if (smoke / "metrics" / "fid_curve.tsv").is_file():
        assert "image/png" in mime_types(cell(done, "fid"))
    else:
        assert "dvc exp run -S train.fid.every=" in stdout(cell(done, "fid"))
    (table,) = [o.data for o in cell(done, "runs").outputs if "text/html" in o.get("data", {})]
    _, runs = mlflow_runs(smoke)
    assert sum(r.info.run_name in table["text/html"] for r in runs) >= 2, table["text/plain"]
    (gif,) = [o.data["image/gif"] for o in cell(done, "gif").outputs if "data" in o]
    assert base64.b64decode(gif) == (smoke / "samples" / "denoising.gif").read_bytes()


def changed_paths(status: dict) -> set[str]:
    """The paths ``dvc status --json`` reports, whatever the stage and the kind of change."""
    return {path for entries in status.values() for entry in entries if isinstance(entry, dict)
            for change in entry.values() for path in change}  # fmt: skip


def test_teammates_get_a_run_and_an_experiment_through_the_dvc_and_git_remotes(smoke, tmp_path):
    """The issue's two paths, with a local-folder DVC remote and a bare git remote. A fresh
    clone pulls the last run: only the uncached samples/ is missing, and `dvc repro` reruns
    nothing DVC caches. Another clone pulls an experiment and applies it: its weights and
    metrics, listed by `dvc exp show`."""
    remote, origin = publish(smoke, tmp_path)

    first = tmp_path / "first"
    git(tmp_path, "clone", "-q", str(origin), str(first))
    dvc(first, "pull")
    for path in ("models/ema.pt", "metrics/eval.json", "data/prepared/manifest.json"):
        assert (first / path).read_bytes() == (smoke / path).read_bytes(), path
    missing = changed_paths(json.loads(dvc(first, "status", "--json").stdout))
    assert missing and all(path.startswith("samples") for path in missing), missing
    ran = set(re.findall(r"Running stage '([\w-]+)'", dvc(first, "repro").stdout))
    assert ran <= {"sample", "track"}, ran  # sample: samples/ is cache: false, by design
    assert "Data and pipelines are up to date" in dvc(first, "status").stdout

    # DVC takes the remote from the experiment's own commit, which predates it: both sides
    # name it in .dvc/config.local (where credentials go too), or no output travels
    dvc(smoke, "remote", "add", "--local", "-f", "-d", "store", str(remote))
    dvc(smoke, "exp", "push", "origin", "cosine-smoke")
    second = tmp_path / "second"
    git(tmp_path, "clone", "-q", str(origin), str(second))
    dvc(second, "remote", "add", "--local", "-d", "store", str(remote))
    dvc(second, "exp", "pull", "origin", "cosine-smoke")
    dvc(second, "exp", "apply", "cosine-smoke")
    lock = yaml.safe_load((second / "dvc.lock").read_text())
    (out,) = [o for o in lock["stages"]["train"]["outs"] if o["path"] == "models/ema.pt"]
    weights = (second / "models" / "ema.pt").read_bytes()
    assert hashlib.md5(weights).hexdigest() == out["md5"]  # the experiment's, not HEAD's
    assert yaml.safe_load((second / "params.yaml").read_text())["schedule"] == "cosine"
    assert json.loads((second / "metrics" / "train.json").read_text())["steps"] == 150
    assert math.isfinite(json.loads((second / "metrics" / "eval.json").read_text())["fid"])
    # its baseline is the commit before the clone's HEAD: listed with every commit's
    assert "cosine-smoke" in dvc(second, "exp", "show", "--all-commits", "--json").stdout
