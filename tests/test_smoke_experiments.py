"""Experiments on the smoke project that need none of tests/test_smoke.py's: a run whose
stages DVC restored from its run cache, and the edit stage's other modes. They run on a copy
of their own of the session's smoke project (tests/smoke_project.py), beside test_smoke.py on
the other pytest-xdist worker.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from runs import run_contents
from smoke_project import built, copy_project, dvc, mlflow_runs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def smoke(tmp_path_factory) -> Path:
    """This file's copy of the session's smoke project, as every stage ran."""
    return copy_project(built(tmp_path_factory), tmp_path_factory.mktemp("smoke") / "project")


@pytest.fixture(scope="session")
def as_built(tmp_path_factory) -> Path:
    """Another copy, without the MLflow store: a teammate's checkout of the same commit."""
    dest = tmp_path_factory.mktemp("as-built") / "project"
    return copy_project(built(tmp_path_factory), dest, mlflow=False)


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
