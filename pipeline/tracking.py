"""MLflow at the edge: one run per experiment, shared by all its stages, never fatal.

The run is found by its ``run_key`` tag: the DVC experiment name (``DVC_EXP_NAME``, set by
``dvc exp run``) or, under plain ``dvc repro``, the git commit plus a hash of params.yaml. The
stage that opens a run logs the whole flattened params.yaml, so a run opened by a later stage
(when DVC skipped the earlier ones) still carries every param. The store defaults to
``sqlite:///mlflow.db`` in the project root; ``MLFLOW_TRACKING_URI`` points elsewhere.
If tracking fails, the stage goes on and says so once.

Metrics are named once, grouped by stage (``train/loss``, ``train/val_loss``, ``sample/...``,
``eval/fid``), so the MLflow UI's charts group them and two experiments compare side by side.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.settings import Machine

EXPERIMENT = os.environ.get("MLFLOW_EXPERIMENT_NAME", "ddpm")
# MLflow 3 opens an experiment of unknown kind on its GenAI pages; this kind opens the runs table.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
BATCH = 1000  # metrics per log_batch call (the REST API's limit)
METRIC_GROUPS = {"evaluate": "eval"}  # stage -> metric prefix, where it is not the stage name


def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or Path.cwd())


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{(project_root() / 'mlflow.db').resolve()}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 1e-4}} -> {"train.lr": "0.0001"}; lists as JSON."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return flat


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_key(params: dict[str, Any]) -> str:
    exp = os.environ.get("DVC_EXP_NAME")
    if exp:
        return exp
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    return f"{git_commit()[:8]}-{digest}"


class Tracker:
    """Context manager around the experiment's MLflow run for one stage.

    Every method is a no-op after the first failure (or when ``enabled`` is False, as on
    ranks other than 0), so tracking can never lose a training run; ``failed`` says that a
    call failed, so the run lacks part of what the stage logs. ``required``: the failure is
    the stage's (``track``, which exists to make the run whole), said as an error.
    """

    def __init__(
        self, params: dict[str, Any], stage: str, enabled: bool = True, required: bool = False
    ) -> None:
        self.params, self.stage, self.required = params, stage, required
        self.enabled = enabled and Machine().tracking  # DDPM_TRACKING=false: MLflow unused
        self.run_id: str | None = None
        self.failed = False
        self._mlflow = None

    def _fail(self, what: str, exc: Exception) -> None:
        reason = f"{what} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        if self.required:  # the track stage, whose one job is the run
            print(f"error: the experiment's MLflow run is not complete ({reason}). Tracking "
                  f"URI: {tracking_uri()}. Every stage's results are saved: `dvc repro` "
                  "completes the run from them once it answers.", file=sys.stderr)  # fmt: skip
        else:
            print(f"warning: MLflow tracking is off for this stage ({reason}); the stage goes "
                  f"on. Tracking URI: {tracking_uri()}", file=sys.stderr)  # fmt: skip
        self.enabled, self.failed = False, True

    def __enter__(self) -> Tracker:
        if not self.enabled:
            return self
        # Fail fast when a remote server is down, instead of minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        try:
            import mlflow

            self._mlflow = mlflow
            mlflow.set_tracking_uri(tracking_uri())
            experiment = mlflow.set_experiment(EXPERIMENT)
            if EXPERIMENT_KIND[0] not in experiment.tags:
                mlflow.set_experiment_tag(*EXPERIMENT_KIND)
            key = run_key(self.params)
            found = mlflow.search_runs(
                [experiment.experiment_id],
                filter_string=f"tags.run_key = '{key}'",
                output_format="list",
                max_results=1,
            )
            if found:
                mlflow.start_run(run_id=found[0].info.run_id)
            else:
                name = os.environ.get("DVC_EXP_NAME") or f"repro-{key}"
                mlflow.start_run(run_name=name)
                mlflow.set_tags(
                    {
                        "run_key": key,
                        "git_commit": git_commit(),
                        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
                        "dvc_exp_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
                    }
                )
                mlflow.log_params(flatten(self.params))
            self.run_id = mlflow.active_run().info.run_id
            mlflow.set_tag(f"stage.{self.stage}", "started")
        except Exception as exc:
            self._fail("opening the run", exc)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.enabled and self._mlflow is not None:
            try:
                self._mlflow.set_tag(f"stage.{self.stage}", "failed" if exc_type else "done")
                self._mlflow.end_run("FAILED" if exc_type else "FINISHED")
            except Exception as err:
                self._fail("closing the run", err)

    def log_metrics(
        self, metrics: dict[str, float], step: int | None = None, group: str | None = None
    ) -> None:
        """Log ``metrics`` as ``<group>/<name>``; the group is the stage's unless given."""
        if self.enabled:
            group = group or METRIC_GROUPS.get(self.stage, self.stage)
            try:
                self._mlflow.log_metrics({f"{group}/{k}": v for k, v in metrics.items()}, step)
            except Exception as exc:
                self._fail("logging metrics", exc)

    def held_steps(self, names: set[str], group: str | None = None) -> dict[str, set[int]]:
        """The steps the run holds of each metric ``<group>/<name>``, by name (none when
        tracking is off or fails)."""
        if not self.enabled:
            return {}
        group = group or METRIC_GROUPS.get(self.stage, self.stage)
        try:
            client = self._mlflow.MlflowClient()
            history = {n: client.get_metric_history(self.run_id, f"{group}/{n}") for n in names}
            return {n: {m.step for m in rows} for n, rows in history.items() if rows}
        except Exception as exc:
            self._fail("reading the run's metrics", exc)
            return {}

    def log_params(self, params: dict[str, str]) -> None:
        """Log params the run does not hold yet (a param's value cannot change in MLflow)."""
        if self.enabled and params:
            try:
                held = self._mlflow.get_run(self.run_id).data.params
                new = {k: v for k, v in params.items() if k not in held}
                if new:
                    self._mlflow.log_params(new)
            except Exception as exc:
                self._fail("logging params", exc)

    def tags(self) -> dict[str, str] | None:
        """The run's tags (None when tracking is off)."""
        if not self.enabled:
            return None
        try:
            return dict(self._mlflow.get_run(self.run_id).data.tags)
        except Exception as exc:
            self._fail("reading the run", exc)
            return None

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            try:
                self._mlflow.set_tags(tags)
            except Exception as exc:
                self._fail("setting tags", exc)

    def log_series(self, series: dict[str, list[tuple[int, float]]]) -> int:
        """Log the (step, value) rows of each named metric that the run does not hold yet;
        returns how many it logged."""
        if not self.enabled:
            return 0
        try:
            from mlflow.entities import Metric

            client, now = self._mlflow.MlflowClient(), int(time.time() * 1000)
            rows = []
            for name, points in series.items():
                held = {(m.step, m.value) for m in client.get_metric_history(self.run_id, name)}
                rows += [Metric(name, v, now, s) for s, v in points if (s, v) not in held]
            for start in range(0, len(rows), BATCH):
                client.log_batch(self.run_id, metrics=rows[start : start + BATCH])
            return len(rows)
        except Exception as exc:
            self._fail("logging metrics", exc)
            return 0

    def logged_model(self, model_sha256: str) -> str | None:
        """The id of this run's pyfunc ``model`` tagged ``model_sha256``, if any."""
        if not self.enabled:
            return None
        try:
            where = (f"name = 'model' AND source_run_id = '{self.run_id}' "
                     f"AND tags.model_sha256 = '{model_sha256}'")  # fmt: skip
            found = self._mlflow.search_logged_models(filter_string=where, output_format="list")
            return found[0].model_id if found else None
        except Exception as exc:
            self._fail("looking for the model", exc)
            return None

    def registered(self, name: str, model_sha256: str) -> bool:
        """Whether a version of ``name`` holds this run's model tagged ``model_sha256``."""
        if not self.enabled:
            return False
        try:
            where = f"name = '{name}' AND run_id = '{self.run_id}'"
            versions = self._mlflow.MlflowClient().search_model_versions(where)
            return any(v.tags.get("model_sha256") == model_sha256 for v in versions)
        except Exception as exc:
            self._fail("looking up the registry", exc)
            return False

    def log_dataset(self, manifest: dict[str, Any], split: str, context: str) -> None:
        """A prepared split as the run's dataset input, so the UI's Dataset column names it:
        the data set and split, the split's sha256 as digest, the archive URL (or the folder,
        or the generator) as source, and a profile of the images."""
        if not self.enabled:
            return
        dataset = prepared_dataset(manifest, split)
        for attempt in range(2):
            try:
                self._mlflow.log_input(dataset, context=context)
                return
            except Exception as exc:
                # Two runs logging the same dataset at once (queue workers on one server)
                # both find it missing and both insert it: the second insert breaks the
                # experiment's unique (name, digest); by then it exists, and a retry links it
                raced = any(w in str(exc) for w in ("UNIQUE constraint", "duplicate key"))
                if attempt == 0 and raced:
                    time.sleep(0.5)
                    continue
                self._fail("logging the dataset", exc)
                return

    def log_model(self, log: Callable[..., Any], *args: Any) -> None:
        """The run's pyfunc ``model``, by ``log(*args)`` (:func:`pipeline.model.log_image_model`,
        passed in so that only the stages that log a model import it)."""
        if self.enabled:
            try:
                log(*args)
            except Exception as exc:
                self._fail("logging the model", exc)

    def register_model(self, name: str, model_id: str, tags: dict[str, str]) -> None:
        """Register the logged model ``model_id`` under ``name`` in the registry, with ``tags``."""
        if not self.enabled:
            return
        try:
            version = self._mlflow.register_model(f"models:/{model_id}", name, tags=tags)
            print(f"registered models:/{name}/{version.version} ({tags})")
        except Exception as exc:
            self._fail("registering the model", exc)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            try:
                self._mlflow.log_artifact(str(path), artifact_path=artifact_path)
            except Exception as exc:
                self._fail("logging an artifact", exc)


def prepared_dataset(manifest: dict[str, Any], split: str):
    """An MLflow dataset (metadata only) describing one split of a prepared folder."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    class PreparedSplit(MetaDataset):
        @property
        def profile(self) -> dict[str, Any]:
            return profile

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(profile)}

    entry, origin = manifest["splits"][split], manifest.get("source", {})
    source = HTTPDatasetSource(origin["url"]) if "url" in origin else CodeDatasetSource(origin)
    profile = {
        "num_images": entry["count"],
        "image_size": manifest["image_size"],
        "num_classes": manifest["num_classes"],
        "split": split,
    }
    name = f"{manifest['dataset']}-{split}"
    return PreparedSplit(source=source, name=name, digest=entry["images_sha256"][:16])


def ui_url(host: str = "127.0.0.1", port: int = 5000) -> str:
    """The runs table of this project's experiment in the MLflow UI (not the GenAI pages)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    where = f"experiments/{experiment.experiment_id}/runs" if experiment else "experiments"
    return f"http://{host}:{port}/#/{where}?workflowType=machine_learning"
