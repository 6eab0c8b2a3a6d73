"""What an MLflow run holds, key by key, for comparing two runs (importable as ``runs``)."""

from __future__ import annotations

from typing import Any

from mlflow.tracking import MlflowClient


def artifact_paths(client: MlflowClient, run_id: str, folder: str | None = None) -> list[str]:
    out = []
    for entry in client.list_artifacts(run_id, folder):
        out += artifact_paths(client, run_id, entry.path) if entry.is_dir else [entry.path]
    return sorted(out)


def run_contents(client: MlflowClient, run_id: str) -> dict[str, Any]:
    """Params; every metric's history as sorted (step, value) pairs; the dataset inputs with
    their digests and contexts; the artifact paths; the logged models with their identity
    tag; the registered versions with their tags."""
    run = client.get_run(run_id)
    history = {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
               for key in run.data.metrics}  # fmt: skip
    inputs = sorted(
        (d.dataset.name, d.dataset.digest, d.dataset.source, tuple(sorted(t.value for t in d.tags)))
        for d in run.inputs.dataset_inputs
    )
    models = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    return {
        "params": run.data.params,
        "metrics": history,
        "inputs": inputs,
        "artifacts": artifact_paths(client, run_id),
        "models": sorted((m.name, m.tags.get("model_sha256")) for m in models),
        "registered": sorted((v.name, tuple(sorted(v.tags.items()))) for v in versions),
    }
