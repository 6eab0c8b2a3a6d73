"""The nll stage through its CLI: the bound of the split's images, read back from nll.json, the
per-step TSV and the MLflow run, equal to the library's bound with the same settings; bad
input refused before any work."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from stages import TINY_PROJECT, enter_project, merge, prepare_split
from typer.testing import CliRunner

from ddpm.checkpoint import load_sampling_model
from ddpm.data.prepared import load_prepared
from ddpm.generation import image_generators
from ddpm.likelihood import variational_bound
from ddpm.pixels import to_float
from pipeline.cli import app

runner = CliRunner()

# the tiny project (40 synthetic 16-pixel images, val 10, T = 20), the DDPM sampler's beta and
# no clipping, which the bound must take from the sample settings
PARAMS = merge(TINY_PROJECT, {
    "sample": {"variance": "beta", "clip_x0": False},
    "nll": {"split": "val", "num_images": 6, "batch_size": 4, "stride": 3, "variance": None},
})  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepare_split(tmp_path_factory.mktemp("prepared"), PARAMS)


@pytest.fixture
def project(tmp_path, prepared, tiny_checkpoint, monkeypatch) -> Path:
    tiny_checkpoint(tmp_path / "models" / "ema.pt")
    return enter_project(tmp_path, prepared, PARAMS, monkeypatch)


def set_params(**sections) -> None:
    params = yaml.safe_load(Path("params.yaml").read_text())
    for name, values in sections.items():
        params[name] = {**params[name], **values} if isinstance(values, dict) else values
    Path("params.yaml").write_text(yaml.safe_dump(params))


def test_the_stage_writes_the_bound_its_terms_and_the_run(project):
    result = runner.invoke(app, ["nll"])
    assert result.exit_code == 0, result.output
    assert "6 val images x 7 steps" in result.output and "42 network evaluations" in result.output
    summary = json.loads((project / "metrics" / "nll.json").read_text())
    assert summary["split"] == "val" and summary["num_images"] == 6 and summary["stride"] == 3
    assert summary["variance"] == "beta" and summary["clip_x0"] is False  # from sample
    rows = [r.split("\t") for r in (project / "metrics" / "nll_terms.tsv").read_text().split("\n")]
    assert rows[0] == ["t", "bpd"] and rows[-1] == [""]
    ts, bpds = [int(r[0]) for r in rows[1:-1]], [float(r[1]) for r in rows[1:-1]]
    assert ts == [0, 3, 6, 9, 12, 15, 18]
    assert bpds[0] == pytest.approx(summary["decoder_bpd"], rel=1e-5)
    # the mean bound is the mean prior plus each step's mean term
    assert summary["bpd"] == pytest.approx(summary["prior_bpd"] + sum(bpds), rel=1e-5)
    assert summary["bpd_stderr"] > 0 and math.isfinite(summary["bpd"])

    # the library's bound of the same images, weights, variance, clipping and noises
    net = load_sampling_model(project / "models" / "ema.pt")
    val = load_prepared(project / "data" / "prepared", "val")
    x0 = to_float(torch.as_tensor(np.asarray(val.images[:6]))).permute(0, 3, 1, 2)
    bound = variational_bound(net.model, net.diffusion, x0, stride=3, variance="beta",
                              clip_x0=False, generator=image_generators(0, range(6)))  # fmt: skip
    assert summary["bpd"] == pytest.approx(float(bound.total.mean()), rel=1e-5)

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id])
    assert run.data.metrics["nll/bpd"] == pytest.approx(summary["bpd"])
    history = client.get_metric_history(run.info.run_id, "nll/term_bpd")
    assert sorted(m.step for m in history) == ts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "nll")} == {
        "nll/nll.json", "nll/nll_terms.tsv"
    }  # fmt: skip
    assert run.inputs.dataset_inputs[0].tags[0].value == "evaluation"


def test_the_named_variance_and_the_batch_size_change_only_what_they_should(project):
    assert runner.invoke(app, ["nll"]).exit_code == 0
    first = json.loads((project / "metrics" / "nll.json").read_text())
    set_params(nll={"batch_size": 5})  # an image's noise is its own: the same bound
    assert runner.invoke(app, ["nll"]).exit_code == 0
    rebatched = json.loads((project / "metrics" / "nll.json").read_text())
    assert rebatched["bpd"] == pytest.approx(first["bpd"], rel=1e-6)
    set_params(nll={"variance": "posterior"})
    assert runner.invoke(app, ["nll"]).exit_code == 0
    posterior = json.loads((project / "metrics" / "nll.json").read_text())
    assert posterior["variance"] == "posterior" and posterior["bpd"] != first["bpd"]


def test_a_missing_test_split_and_weights_are_refused_together_naming_the_fix(project):
    (project / "models" / "ema.pt").unlink()
    set_params(nll={"split": "test"})
    result = runner.invoke(app, ["nll"])
    assert result.exit_code == 1, result.output
    assert "the nll stage cannot start, 2 problems" in result.output
    assert "ema.pt" in result.output and "set nll.split: val" in result.output
    assert not (project / "metrics" / "nll.json").exists()


def test_a_stride_past_the_chain_is_a_params_error(project):
    set_params(nll={"stride": 20})
    result = runner.invoke(app, ["nll"])
    assert result.exit_code == 2 and "nll.stride=20 is more than T - 1 = 19" in result.output


def test_a_hybrid_model_with_learned_variances_trains_samples_and_reports_its_bound(
    tmp_path, monkeypatch
):
    """`dvc exp run -S diffusion.loss=hybrid -S model.learn_sigma=true`, stage by stage: the
    checkpoint holds the doubled output, the DDPM sampler and the bound use its variances."""
    params = merge(TINY_PROJECT, {
        "model": {"learn_sigma": True}, "diffusion": {"loss": "hybrid"},
        "sample": {"sampler": "ddpm", "variance": "learned", "steps": 4},
        "evaluate": {"fid": False, "kid": False, "isc": True},
        "nll": {"split": "val", "num_images": 4, "batch_size": 4, "stride": 5, "variance": None},
        "registry": {"enabled": False},
    })  # fmt: skip
    enter_project(tmp_path, prepare_split(tmp_path / "prep", params), params, monkeypatch)
    for stage in ("train", "sample", "nll"):
        result = runner.invoke(app, [stage])
        assert result.exit_code == 0, (stage, result.output)
    net = load_sampling_model(tmp_path / "models" / "ema.pt")
    assert net.model.config.learn_sigma and net.diffusion.config.loss == "hybrid"
    vb = (tmp_path / "metrics" / "vb_curve.tsv").read_text().splitlines()  # its bound's term
    assert vb[0] == "step\tvb" and vb[1:] and all(float(r.split("\t")[1]) > 0 for r in vb[1:])
    assert len(list((tmp_path / "samples" / "images").glob("*.png"))) == 6
    summary = json.loads((tmp_path / "metrics" / "nll.json").read_text())
    assert summary["variance"] == "learned" and math.isfinite(summary["bpd"])
    set_params(nll={"variance": "posterior"})  # the same weights with a fixed variance
    assert runner.invoke(app, ["nll"]).exit_code == 0
    fixed = json.loads((tmp_path / "metrics" / "nll.json").read_text())
    assert fixed["variance"] == "posterior" and fixed["bpd"] != summary["bpd"]
