"""The smoke pipeline end to end: the real dvc.yaml stages, tiny and offline, read back.

One smoke project is built per test session (scripts/smoke.py into a temporary folder) and
every test reads its results: metrics, the MLflow run, a second experiment through
``dvc exp run -S``, and ``dvc push`` / ``dvc pull`` through a local remote.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from runs import run_contents

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("MLFLOW_TRACKING_URI", None)
    # one thread per stage, as scripts/smoke.py built the project: the same thread count
    # makes the same float sums, so a stage that reruns writes the same files (a sample stage
    # rerun writes the same images, and DVC restores evaluate); and two workers share 2 cores
    env.update(DDPM_NUM_THREADS="1", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True,
        text=True, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="session")
def smoke(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("smoke") / "project"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "smoke.py"), "--dest", str(dest)],
        check=True, timeout=1200,
    )  # fmt: skip
    # as every stage ran, before any test changes it; without the MLflow store
    untracked = shutil.ignore_patterns("mlflow.db", "mlruns")
    shutil.copytree(dest, dest.parent / "as-built", symlinks=True, ignore=untracked)
    return dest


def mlflow_runs(project: Path, name_prefix: str = ""):
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ddpm")
    runs = client.search_runs([experiment.experiment_id])
    return client, [r for r in runs if r.info.run_name.startswith(name_prefix)]


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


def test_a_run_whose_stages_dvc_restored_holds_what_the_run_whose_stages_ran_holds(smoke):
    """The smoke project as built, without dvc.lock and with a fresh MLflow store: DVC restores
    every stage it can from its run cache, track projects their records, and the new run
    holds what the first one does, key by key (params, metric histories, dataset inputs,
    artifacts, the model, the registered version)."""
    copy = smoke.parent / "as-built"
    (copy / "dvc.lock").unlink()
    done = dvc(copy, "repro")
    for stage in ("prepare", "train", "evaluate", "frontier", "nll", "edit"):
        assert f"Running stage '{stage}'" not in done.stdout, done.stdout
    assert "Running stage 'track'" in done.stdout
    (ran,), (restored,) = mlflow_runs(smoke, name_prefix="repro-")[1], mlflow_runs(copy)[1]
    assert ran.info.run_name == restored.info.run_name
    first = run_contents(mlflow_runs(smoke)[0], ran.info.run_id)
    second = run_contents(mlflow_runs(copy)[0], restored.info.run_id)
    # sample ran again (its folder is not DVC-cached, so not restorable): a new timing
    for timing in ("sample/images_per_second", "sample/wall_time_s"):
        assert first["metrics"].pop(timing) and second["metrics"].pop(timing)
    for key in first:
        assert second[key] == first[key], key
    assert restored.data.tags["stage.train"] == "restored" == restored.data.tags["stage.frontier"]
    assert first["registered"] and first["models"] and "train/ema_decay" in first["metrics"]


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


# three seed ranges of 25 images (KID's subsets of 25 allow no fewer): the experiments from
# here on are scored so, and the cosine one is compared with ddim-10 against their noise
REPEATS = ("-S", "sample.num_images=25", "-S", "evaluate.repeats=3")


def three_ranges(smoke: Path) -> dict:
    """eval.json of three ranges of 25 images: each range's numbers, their mean, std, min."""
    evaluation = json.loads((smoke / "metrics" / "eval.json").read_text())
    ranges = evaluation["ranges"]
    assert [r["image_indices"] for r in ranges] == ["0-24", "25-49", "50-74"], ranges
    assert evaluation["repeats"] == 3 and evaluation["num_images"] == 25
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
    assert "evaluate: 3 seed ranges of 25 images (evaluate.repeats)" in done.stdout
    assert three_ranges(smoke)["steps"] == 10
    _, runs = mlflow_runs(smoke)
    run = {r.info.run_name: r for r in runs}["ddim-10"]
    # DVC skipped train, yet the run opened by sample carries every param of the experiment
    assert run.data.params["sample.steps"] == "10" and run.data.params["train.steps"] == "150"


def test_a_cosine_experiment_then_a_queued_sweep_over_both_schedules_restores_and_tracks(smoke):
    """The sweep users run (`dvc exp run --queue -S schedule=linear,cosine`, one worker) after
    one run of each schedule: DVC restores every stage it can from its run cache, and each
    MLflow run, named after its experiment, still holds the whole record, the restored
    stages' included (track projects them): dataset input, artifacts, every metric."""
    done = dvc(smoke, "exp", "run", "-n", "cosine-smoke", "-S", "schedule=cosine")
    assert "Running stage 'train'" in done.stdout and "Running stage 'prepare'" not in done.stdout
    cosine = three_ranges(smoke)  # ddim-10's settings but the schedule: compared against noise
    shown = experiment_metrics(smoke)
    linear = shown["ddim-10"]
    assert shown["cosine-smoke"]["fid"] == pytest.approx(cosine["fid"])
    assert linear["fid_std"] > 0 and "ranges" not in linear  # dvc exp show: numbers only
    print(f"\nsmoke figures (untrained Inception: not real FID), {against_noise(linear, cosine)}")
    dvc(smoke, "exp", "run", "--queue", "-S", "schedule=linear,cosine")
    done = dvc(smoke, "exp", "run", "--run-all", "-j", "1")
    for stage in ("train", "evaluate", "frontier"):  # sample is not cached: it reruns
        assert f"Running stage '{stage}'" not in done.stdout, done.stdout
    status = dvc(smoke, "queue", "status").stdout
    assert status.count("Success") == 2 and "Failed" not in status, status
    client, runs = mlflow_runs(smoke)
    by_name = {r.info.run_name: r for r in runs}
    swept = queued_experiments(smoke)
    assert sorted(swept.values()) == ["cosine", "linear"], swept
    for name, schedule in [*swept.items(), ("cosine-smoke", "cosine")]:
        run = by_name[name]
        assert run.info.status == "FINISHED", (name, run.info.status)
        assert run.data.params["schedule"] == schedule and run.data.metrics["train/steps"] == 150
        for key in ("eval/fid", "frontier/ddim/fid", "train/ema_decay"):
            assert math.isfinite(run.data.metrics[key]), (name, key)
        datasets = {d.dataset.name for d in run.inputs.dataset_inputs}
        assert {"synthetic-train", "synthetic-val"} == datasets, (name, datasets)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"curves", "frontier", "metrics", "previews", "weights"} <= artifacts, artifacts
    assert by_name["cosine-smoke"].data.tags["dvc_exp_name"] == "cosine-smoke"
    for name in swept:
        assert by_name[name].data.tags["stage.train"] == "restored"


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
        f"FID over 3 ranges of 25 images, mean (std): linear {a['fid']:.2f} ({a['fid_std']:.2f}),"
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


@pytest.mark.parametrize(
    ("mode", "keys"), [("sdedit", ("mse_to_input", "kid_mean")), ("reconstruct", ("psnr", "mse"))]
)
def test_each_edit_mode_runs_end_to_end_without_training(smoke, mode, keys):
    """`dvc exp run -S edit.mode=...`: only edit (and track) run; the record is in the run."""
    # the linear model (restored from the run cache): earlier tests left the workspace cosine,
    # whose last abar is about 0, where DDIM inversion is ill-conditioned (6 dB at any steps)
    linear = ("-S", "schedule=linear")
    done = dvc(smoke, "exp", "run", "-n", f"edit-{mode}", "-S", f"edit.mode={mode}", *linear)
    assert "Running stage 'edit'" in done.stdout, done.stdout
    for stage in ("train", "frontier", "nll"):  # sample is not cached: it may rerun
        assert f"Running stage '{stage}'" not in done.stdout, done.stdout
    edit = json.loads((smoke / "metrics" / "edit.json").read_text())
    assert edit["mode"] == mode and all(math.isfinite(edit["results"][k]) for k in keys), edit
    assert (smoke / "edits" / "grid.png").is_file()
    _, runs = mlflow_runs(smoke, name_prefix=f"edit-{mode}")
    (run,) = runs
    assert run.data.tags["stage.edit"] == "done" and run.info.status == "FINISHED"
    for key in keys:
        assert math.isfinite(run.data.metrics[f"edit/{mode}/{key}"]), key
    if mode == "reconstruct":  # on the trained model the round trip sharpens with the steps
        dvc(smoke, "exp", "run", "-n", "edit-reconstruct-50", "-S", "edit.mode=reconstruct",
            "-S", "edit.steps=50", *linear)  # fmt: skip
        finer = json.loads((smoke / "metrics" / "edit.json").read_text())["results"]
        assert finer["psnr"] > edit["results"]["psnr"] + 5, (finer, edit["results"])


def test_outputs_round_trip_through_a_local_dvc_remote(smoke, tmp_path):
    dvc(smoke, "remote", "add", "-f", "-d", "local", str(tmp_path / "remote"))
    dvc(smoke, "push")
    weights = (smoke / "models" / "ema.pt").read_bytes()
    shutil.rmtree(smoke / ".dvc" / "cache")
    (smoke / "models" / "ema.pt").unlink()
    shutil.rmtree(smoke / "data" / "prepared")
    dvc(smoke, "pull")
    assert (smoke / "models" / "ema.pt").read_bytes() == weights
    assert (smoke / "data" / "prepared" / "manifest.json").is_file()
