"""The SkyPilot task files (cloud/*.sky.yaml): SkyPilot's own parser reads them, and they hold
no credential and no path of this machine. Their ``run`` script is executed in
tests/test_smoke.py, on the smoke project."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import sky
import yaml

ROOT = Path(__file__).resolve().parents[1]
TASKS = sorted((ROOT / "cloud").glob("*.sky.yaml"))
CREDENTIAL_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)
CREDENTIAL_VALUE = re.compile(
    r"AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{20,}|glpat-|-----BEGIN|://[^/\s:@]+:[^/\s@]+@"
)
EVERY_MACHINE = {"/dev/null"}
ABSOLUTE = re.compile(r"(?<![\w.$}:/~-])/[\w.-]+(?:/[\w.-]+)*")


def test_both_task_files_are_there():
    assert [p.name for p in TASKS] == ["experiment.sky.yaml", "train.sky.yaml"]


@pytest.mark.parametrize("path", TASKS, ids=lambda p: p.name)
def test_skypilot_parses_the_task_file(path):
    task = sky.Task.from_yaml(str(path))
    assert task.run and task.setup and "make install" in task.setup
    assert set(task.storage_mounts) == {task.envs["DDPM_CHECKPOINT_DIR"]}  # the bucket
    assert task.envs["MLFLOW_TRACKING_URI"] == "" and task.envs["DVC_REMOTE_URL"] == ""


def test_the_train_task_runs_torchrun_from_skypilots_variables():
    run = sky.Task.from_yaml(str(ROOT / "cloud" / "train.sky.yaml")).run
    line = " ".join(run.split("torchrun", 1)[1].split("-m pipeline")[0].split())
    for flag, variable in [
        ("--nnodes", "SKYPILOT_NUM_NODES"), ("--node_rank", "SKYPILOT_NODE_RANK"),
        ("--nproc_per_node", "SKYPILOT_NUM_GPUS_PER_NODE"), ("--master_addr", "SKYPILOT_NODE_IPS"),
    ]:  # fmt: skip
        assert re.search(rf'{flag} "\$(\(echo "\$)?{variable}"', line), (flag, line)


def test_the_experiment_task_runs_one_dvc_experiment_and_pushes_it():
    run = sky.Task.from_yaml(str(ROOT / "cloud" / "experiment.sky.yaml")).run
    assert 'dvc exp run --pull -n "$name" $EXP_ARGS' in run
    assert 'dvc exp push --force "$GIT_REMOTE" "$name"' in run


@pytest.mark.parametrize("path", TASKS, ids=lambda p: p.name)
def test_a_task_file_names_no_credential_and_no_path_of_this_machine(path):
    text = path.read_text()
    assert problems(text) == [], problems(text)


def test_the_check_catches_a_credential_and_a_local_path():
    """The check above can fail: each planted mistake is caught."""
    base = (ROOT / "cloud" / "train.sky.yaml").read_text()
    planted = [
        base.replace("AWS_SECRET_ACCESS_KEY: null", "AWS_SECRET_ACCESS_KEY: abc123"),
        base.replace('MLFLOW_TRACKING_URI: ""', "MLFLOW_TRACKING_URI: http://u:pw@host:5000"),
        base.replace("RDZV_PORT:", "HF_TOKEN: hf_abc\n  RDZV_PORT:"),
        base.replace("workdir: .", f"workdir: {ROOT}"),
        base.replace("make install", f"make -C {Path.home()} install"),
    ]
    for text in planted:
        assert text != base and problems(text), text


def problems(text: str) -> list[str]:
    """What a task file must not hold: a secret with a value, an env whose name says it is a
    credential, a credential's shape, an address set in the file, or an absolute path other
    than the folders the task mounts on its own machines."""
    config = yaml.safe_load(text)
    found = [f"secret {k} has a value" for k, v in (config.get("secrets") or {}).items() if v]
    found += [
        f"env {k} looks like a credential" for k in config["envs"] if CREDENTIAL_NAME.search(k)
    ]
    found += [f"{k} is set in the file" for k in ("MLFLOW_TRACKING_URI", "DVC_REMOTE_URL")
              if config["envs"].get(k)]  # fmt: skip
    found += [f"credential-like {m}" for m in CREDENTIAL_VALUE.findall(text)]
    mounts = tuple(config.get("file_mounts") or {})
    local = (str(ROOT), str(Path.home()), os.sep + "tmp")
    for path in ABSOLUTE.findall(text):
        mounted = path in EVERY_MACHINE or path.startswith(mounts)
        if not mounted or path.startswith(local):
            found.append(f"absolute path {path}")
    return found
