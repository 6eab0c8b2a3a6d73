"""What on the smoke project needs none of tests/test_smoke.py's experiments: a run whose
stages DVC restored from its run cache, the edit stage's other modes, and the SkyPilot
training task's run script. They run on a copy of their own of the session's smoke project
(tests/smoke_project.py), beside test_smoke.py, on the other pytest-xdist worker.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sky
import yaml
from mlflow.tracking import MlflowClient
from runs import run_contents
from servers import free_port
from smoke_project import dvc, git, mlflow_runs, publish

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_a_run_whose_stages_dvc_restored_holds_what_the_run_whose_stages_ran_holds(smoke, as_built):
    """The smoke project as built, without dvc.lock and with a fresh MLflow store: DVC restores
    every stage it can from its run cache, track projects their records, and the new run
    holds what the first one does, key by key (params, metric histories, dataset inputs,
    artifacts, the model, the registered version)."""
    copy = as_built
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


@pytest.mark.parametrize(
    ("mode", "keys"), [("sdedit", ("mse_to_input", "kid_mean")), ("reconstruct", ("psnr", "mse"))]
)
def test_each_edit_mode_runs_end_to_end_without_training(smoke, mode, keys):
    """`dvc exp run -S edit.mode=...`: only edit (and track) run; the record is in the run."""
    # the linear model, whatever the workspace holds: cosine's last abar is about 0, where
    # DDIM inversion is ill-conditioned (6 dB at any steps)
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
    # that the round trip sharpens with the steps: tests/ddpm/test_edits.py, on a known chain


def test_the_train_task_files_run_script_trains_with_torchrun_and_pushes_the_experiment(
    smoke, tmp_path
):
    """cloud/train.sky.yaml's run, as SkyPilot runs it on node 0 of one node with two
    processes (gloo on the CPU), in a fresh clone of the project pushed to a DVC remote and a
    git remote: it pulls the prepared data, trains, pushes the weights to the DVC remote and
    the experiment to git, and logs to the MLflow store named in MLFLOW_TRACKING_URI."""
    remote, origin = publish(smoke, tmp_path)
    node = tmp_path / "node0"
    git(tmp_path, "clone", "-q", str(origin), str(node))
    (node / ".venv").symlink_to(Path(sys.executable).parents[1])  # what the task's setup builds
    params = yaml.safe_load((node / "params.yaml").read_text())
    params["train"].update(steps=30, val_every=15, checkpoint_every=15, sample_every=30)
    (node / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    task = sky.Task.from_yaml(str(ROOT / "cloud" / "train.sky.yaml"))
    port = free_port()
    store = tmp_path / "server.db"
    env = {**os.environ, **task.envs, "EXP_NAME": "sky-local", "DVC_REMOTE_URL": str(remote),
           "MLFLOW_TRACKING_URI": f"sqlite:///{store}", "RDZV_PORT": str(port),
           "DDPM_CHECKPOINT_DIR": str(tmp_path / "bucket"), "SKYPILOT_NUM_NODES": "1",
           "SKYPILOT_NODE_RANK": "0", "SKYPILOT_NUM_GPUS_PER_NODE": "2",
           "SKYPILOT_NODE_IPS": "127.0.0.1", "DDPM_DEVICE": "cpu", "DDPM_NUM_THREADS": "1",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    done = subprocess.run(["bash", "-c", task.run], cwd=node, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert log.count("starting fresh") == 1  # one job of two processes; rank 0 speaks
    summary = json.loads((node / "metrics" / "train.json").read_text())
    assert (summary["steps"], summary["effective_batch_size"]) == (30, 2 * 16), summary
    (checkpoint,) = (tmp_path / "bucket").glob("*/last.pt")
    assert summary["checkpoints"] == str(checkpoint.parent)
    md5 = hashlib.md5((node / "models" / "ema.pt").read_bytes()).hexdigest()
    assert (remote / "files" / "md5" / md5[:2] / md5[2:]).is_file()
    assert "refs/exps/" in git(node, "ls-remote", str(origin)) and "sky-local" in git(
        node, "ls-remote", origin
    )
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id])
    assert run.info.run_name == "sky-local" and run.data.metrics["train/steps"] == 30
