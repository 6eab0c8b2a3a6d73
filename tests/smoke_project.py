"""The smoke project the smoke tests share (importable as ``smoke_project``).

scripts/smoke.py builds it once per test session, whichever pytest-xdist worker asks first
(the others wait on a file lock), into the session's shared temporary folder. Each test file
then works on a copy of its own (tests/conftest.py's module-scoped ``smoke`` and
``as_built``): the files change one copy in turn, and the two files run side by side on two
workers. A copy's MLflow store names its own artifact folder (MLflow writes absolute paths
into the database).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]


def dvc_env(tracking: str | None = None) -> dict[str, str]:
    """The venv first on PATH; MLflow at ``tracking`` (the project's SQLite store if None)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("MLFLOW_TRACKING_URI", None)
    if tracking is not None:
        env["MLFLOW_TRACKING_URI"] = tracking
    # one thread per stage, as scripts/smoke.py built the project: the same thread count
    # makes the same float sums, so a stage that reruns writes the same files (a sample stage
    # rerun writes the same images, and DVC restores evaluate); and two workers share 2 cores
    env.update(DDPM_NUM_THREADS="1", OMP_NUM_THREADS="1")
    return env


def dvc(project: Path, *args: str, tracking: str | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=project, env=dvc_env(tracking),
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"git {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def publish(project: Path, where: Path) -> tuple[Path, Path]:
    """The team's two remotes, in ``where``: a local-folder DVC remote ``store`` (the default,
    in .dvc/config) and a bare git repository ``origin``; the project's workspace, committed,
    pushed to both. Returns the DVC remote's folder and origin's."""
    remote, origin = where / "dvc-remote", where / "origin.git"
    dvc(project, "remote", "add", "-f", "-d", "store", str(remote))
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "a run, and the team's DVC remote")
    dvc(project, "push")
    git(where, "init", "-q", "--bare", "-b", "main", str(origin))
    git(project, "remote", "add", "origin", str(origin))
    git(project, "push", "-q", "origin", "HEAD:main")
    return remote, origin


def mlflow_runs(project: Path, name_prefix: str = "", tracking: str | None = None):
    client = MlflowClient(tracking_uri=tracking or f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ddpm")
    runs = client.search_runs([experiment.experiment_id])
    return client, [r for r in runs if r.info.run_name.startswith(name_prefix)]


def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's temporary folder that every xdist worker sees (each has one below it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke project as scripts/smoke.py leaves it, built once for the session."""
    root = shared_root(tmp_path_factory)
    project, done = root / "smoke-built" / "project", root / "smoke-built" / "done"
    with FileLock(str(root / "smoke-built.lock")):
        if not done.is_file():
            shutil.rmtree(project.parent, ignore_errors=True)
            subprocess.run(
                [sys.executable, str(ROOT / "scripts" / "smoke.py"), "--dest", str(project)],
                check=True, timeout=1200,
            )  # fmt: skip
            done.touch()
    return project


def copy_project(source: Path, dest: Path, mlflow: bool = True) -> Path:
    """A copy of a project (git, DVC cache and all) that DVC and MLflow treat as its own;
    without the MLflow store if ``mlflow`` is False."""
    skip = () if mlflow else ("mlflow.db", "mlruns")
    shutil.copytree(source, dest, symlinks=True, ignore=shutil.ignore_patterns(*skip))
    if mlflow:
        relocate_mlflow_store(dest / "mlflow.db", str(source), str(dest))
    return dest


def relocate_mlflow_store(db: Path, old: str, new: str) -> None:
    """Every text cell naming ``old`` (artifact locations, run and model URIs) names ``new``."""
    with sqlite3.connect(db) as connection:
        tables = [row[0] for row in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")]  # fmt: skip
        for table in tables:
            for column in connection.execute(f'PRAGMA table_info("{table}")').fetchall():
                name, kind = column[1], (column[2] or "").upper()
                if any(k in kind for k in ("CHAR", "TEXT", "CLOB")):
                    connection.execute(
                        f'UPDATE "{table}" SET "{name}" = replace("{name}", ?, ?) '
                        f'WHERE instr("{name}", ?) > 0', (old, new, old),
                    )  # fmt: skip
    connection.close()
