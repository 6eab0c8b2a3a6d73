"""The evaluate stage through its CLI, with a locally built Inception weights file.

Random Inception weights give no real FID, but the same maths: a set against itself scores ~0
and a clearly different set more, which is what these tests check (besides the cache, the
labels and the errors). Inception runs at ~0.1 s an image on a CPU, so the sets are small.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image
from stages import enter_project, prepare_split, project_params
from typer.testing import CliRunner

from ddpm.data.prepared import load_prepared
from pipeline import evaluate as evaluate_module
from pipeline import fidelity
from pipeline.cli import app
from pipeline.render import aligned_batches
from pipeline.sample import read_pngs

runner = CliRunner()

PARAMS = project_params(
    {
        "dataset": "synthetic",
        "image_size": 16,
        "seed": 0,
        "data": {"num_images": 16, "val_fraction": 0.25},  # train 12, val 4
        "diffusion": {"timesteps": 20},
        "sample": {"steps": 4, "num_images": 12, "batch_size": 12, "gif_images": 2},
        "evaluate": {"kid_subset_size": 8, "kid_subsets": 10, "isc_splits": 2, "batch_size": 12},
    }
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepare_split(tmp_path_factory.mktemp("prepared"), PARAMS)


@pytest.fixture
def project(tmp_path, prepared, inception_weights, monkeypatch) -> Path:
    """Prepared data and params in the cwd; Inception weights from the environment."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached downloads
    return enter_project(tmp_path, prepared, PARAMS, monkeypatch, inception_weights)


def write_samples(folder: Path, images: torch.Tensor) -> None:
    """A samples folder as the sample stage writes it, from uint8 (N, H, W, 3) images."""
    (folder / "images").mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image.numpy()).save(folder / "images" / f"{i:06d}.png")
    manifest = {"num_images": len(images), "sampler": "ddim", "steps": 4, "image_size": 16}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def run_evaluate(*args: str) -> str:
    result = runner.invoke(app, ["evaluate", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_fid_of_a_set_against_itself_is_zero_and_of_generated_samples_larger(
    project, tiny_checkpoint, inception_weights, monkeypatch
):
    reference = load_prepared(project / "data" / "prepared", "train").images
    write_samples(project / "samples", reference)
    output = run_evaluate()
    assert "computing its features" in output
    same = json.loads((project / "metrics" / "eval.json").read_text())
    assert abs(same["fid"]) < 1e-3  # KID's subsets are drawn apart from each side: not 0
    assert same["isc_mean"] > 0 and same["isc_std"] >= 0
    assert same["num_images"] == 12 and same["reference_images"] == 12
    assert (same["sampler"], same["steps"], same["reference_split"]) == ("ddim", 4, "train")
    assert same["feature_extractor"] == "inception-v3-compat"
    assert same["weights"] == str(inception_weights) and same["label"].startswith("NOT real")
    cache = sorted((project / "data" / "fidelity_cache").iterdir())
    assert cache and all("-train-local" in p.name for p in cache)
    mtimes = [p.stat().st_mtime_ns for p in cache]

    # The tiny random model's samples look nothing like the data; the reference is cached.
    tiny_checkpoint(project / "models" / "ema.pt")
    assert runner.invoke(app, ["sample"]).exit_code == 0
    output = run_evaluate()
    assert "reusing 3 cached files" in output
    assert [p.stat().st_mtime_ns for p in cache] == mtimes
    assert sorted((project / "data" / "fidelity_cache").iterdir()) == cache
    other = json.loads((project / "metrics" / "eval.json").read_text())
    assert other["fid"] > 100 * max(abs(same["fid"]), 1e-3) and other["fid"] > 1.0
    assert other["kid_mean"] > 10 * abs(same["kid_mean"])

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id])
    assert run.data.tags["stage.evaluate"] == "done" and run.data.tags["stage.sample"] == "done"
    assert run.data.metrics["eval/fid"] == pytest.approx(other["fid"])
    assert run.data.metrics["eval/num_images"] == 12 and "eval/isc_mean" in run.data.metrics
    assert [m.value for m in client.get_metric_history(run.info.run_id, "eval/fid")] == [
        pytest.approx(same["fid"]),
        pytest.approx(other["fid"]),
    ]
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics", "samples"} <= logged

    # the protocol the papers state, with the numbers and as the run's params
    import torch_fidelity

    from ddpm.files import file_sha256

    protocol = other["protocol"]
    split_sha = json.loads((project / "data" / "prepared" / "manifest.json").read_text())
    assert protocol == {
        "torch_fidelity": torch_fidelity.__version__,
        "feature_extractors": {"inception-v3-compat": file_sha256(inception_weights)},
        "resize": protocol["resize"],
        "images": "uint8 PNG files (samples/images), decoded by torch-fidelity",
        "reference_split": "train",
        "reference_sha256": split_sha["splits"]["train"]["images_sha256"],
        "reference_images": 12,
        "seeds": {"sample_seed": 0, "image_indices": "0-11", "kid_subsets_seed": 0},
    }
    assert "legacy_tensorflow" in protocol["resize"] and "TF-exact" in protocol["resize"]
    params = run.data.params
    assert params["eval.protocol.torch_fidelity"] == torch_fidelity.__version__
    assert params["eval.protocol.reference_images"] == "12"
    assert params["eval.protocol.feature_extractors.inception-v3-compat"] == file_sha256(
        inception_weights
    )
    # one range: its own numbers; the std is not measured (null in eval.json, not in the run)
    assert other["repeats"] == 1 and other["fid_std"] is None and other["fid_min"] == other["fid"]
    assert [r["image_indices"] for r in other["ranges"]] == ["0-11"]
    assert "eval/fid_std" not in run.data.metrics and run.data.metrics["eval/fid_min"] > 1.0

    three_ranges_as_the_sample_stage_samples_them(project, other, tiny_checkpoint, monkeypatch)


def test_missing_weights_on_an_offline_machine_name_both_ways(project, monkeypatch, dead_url):
    write_samples(project / "samples", load_prepared(Path("data/prepared")).images)
    monkeypatch.setenv("DDPM_INCEPTION_WEIGHTS", str(project / "nowhere.pth"))
    result = runner.invoke(app, ["evaluate"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "nowhere.pth: no such file (set by DDPM_INCEPTION_WEIGHTS or" in result.output

    # Neither a file nor a download: the error names the env var, the param and the URL.
    monkeypatch.delenv("DDPM_INCEPTION_WEIGHTS")
    url = dead_url.rsplit("/", 1)[0] + "/" + fidelity.INCEPTION.filename
    monkeypatch.setattr(fidelity, "INCEPTION", fidelity.INCEPTION._replace(url=url))
    result = runner.invoke(app, ["evaluate"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = " ".join(result.output.split())
    assert f"could not be downloaded from {url}" in message
    assert "DDPM_INCEPTION_WEIGHTS=/path/to/weights-inception-2015-12-05-6726825d.pth" in message
    assert "inception_weights" in message
    # The experiment's MLflow run says the stage failed, rather than a false FINISHED
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["stage.evaluate"] == "failed"
    assert not (project / "metrics").exists() and not (project / "data/fidelity_cache").exists()


@pytest.mark.parametrize(
    ("evaluate_params", "samples", "message", "code"),
    [
        ({"reference_split": "val"}, 12, "kid_subset_size=8 is more than the 12 samples or the", 1),
        ({}, 1, "images: the metrics need at least 2 images on each side", 1),
        ({}, 0, "holds no samples (no manifest.json); run `pipeline sample`", 1),
        ({"kid_subset_size": 30}, 12, "evaluate.kid_subset_size=30 is more than sample.num_im", 2),
        ({"fid": False, "isc": False, "kid": False}, 12, "every evaluate metric is off", 2),
        ({"repeats": 0}, 12, "evaluate.repeats=0 scores no images: set it to 1 (the samples", 2),
    ],
)
def test_bad_inputs_are_refused_before_any_work(project, evaluate_params, samples, message, code):
    """A bad params.yaml exits 2 (as in every stage), bad data 1; neither starts any work."""
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["evaluate"].update(evaluate_params)
    Path("params.yaml").write_text(yaml.safe_dump(params))
    if samples:
        write_samples(project / "samples", load_prepared(Path("data/prepared")).images[:samples])
    result = runner.invoke(app, ["evaluate"])
    assert result.exit_code == code, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (project / "data" / "fidelity_cache").exists()


def test_every_problem_with_the_inputs_is_reported_at_once(project, monkeypatch):
    """One sample and no Inception weights file: the stage lists each problem on a line of
    its own before any work, rather than stopping at the first."""
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["inception_weights"] = "no/such/inception.pth"
    monkeypatch.delenv("DDPM_INCEPTION_WEIGHTS", raising=False)
    Path("params.yaml").write_text(yaml.safe_dump(params))
    write_samples(project / "samples", load_prepared(Path("data/prepared")).images[:1])
    result = runner.invoke(app, ["evaluate"])
    assert result.exit_code == 1, result.output
    listed = result.output.split("the evaluate stage cannot start, 4 problems:\n")[1]
    lines = listed.splitlines()
    assert len(lines) == 4 and all(line.startswith("  - ") for line in lines), listed
    for words, line in zip(WORDS, lines, strict=True):
        assert words in line, (words, line)
    assert not (project / "data" / "fidelity_cache").exists()


WORDS = [
    "no/such/inception.pth",
    "1 samples or the 12 reference images: the metrics need at least 2 images on each side",
    "evaluate.kid_subset_size=8 is more than the 1 samples",
    "evaluate.isc_splits=2 is more than the 1 samples",
]


def test_precision_recall_runs_vgg16_with_its_own_weights_and_cache_name(project, monkeypatch):
    """The call torch-fidelity gets, without running VGG16 (a 528 MB network)."""
    vgg = project / "vgg16-local.pth"
    vgg.write_bytes(b"not read here")
    monkeypatch.setenv("DDPM_VGG16_WEIGHTS", str(vgg))
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["evaluate"].update({"prc": True, "isc": False, "kid": False})
    Path("params.yaml").write_text(yaml.safe_dump(params))
    write_samples(project / "samples", load_prepared(Path("data/prepared")).images)
    calls = []

    def fake(**kwargs):
        calls.append(kwargs)
        if kwargs.get("prc"):
            return {"precision": 0.5, "recall": 0.25, "f_score": 1 / 3}
        return {"frechet_inception_distance": 12.5}

    monkeypatch.setattr(torch_fidelity, "calculate_metrics", fake)
    run_evaluate()
    (inception, vgg16) = calls
    assert inception["feature_extractor"] == "inception-v3-compat" and inception["fid"]
    assert vgg16["feature_extractor"] == "vgg16" and vgg16["prc"]
    assert vgg16["feature_extractor_weights_path"] == str(vgg)
    assert inception["input2_cache_name"] != vgg16["input2_cache_name"]
    dataset = inception["input2"]
    assert dataset[0].dtype == torch.uint8 and dataset[0].shape == (3, 16, 16)
    assert inception["input1"] == str(Path("samples/images")) and not inception["verbose"]
    summary = json.loads(Path("metrics/eval.json").read_text())
    assert summary["precision"] == 0.5 and summary["recall"] == 0.25 and summary["fid"] == 12.5
    assert summary["feature_extractor"] == "inception-v3-compat+vgg16"
    assert str(vgg) in summary["weights"] and str(vgg) in summary["label"]
    assert np.isclose(summary["f_score"], 1 / 3)


def set_params(**sections: dict) -> None:
    params = yaml.safe_load(Path("params.yaml").read_text())
    for name, values in sections.items():
        params[name].update(values)
    Path("params.yaml").write_text(yaml.safe_dump(params))


SCORES = ("fid", "kid_mean", "kid_std", "isc_mean", "isc_std")


def three_ranges_as_the_sample_stage_samples_them(
    project: Path, single: dict, tiny_checkpoint, monkeypatch
) -> None:
    """evaluate.repeats: 3 on the 12 samples ``single`` scored: range 0 is the samples folder,
    scored as before; ranges 1 and 2 are images 12-23 and 24-35, pixel for pixel the PNGs the
    sample stage writes with num_images 36; the top level holds their mean, std and minimum;
    then other weights than the samples', or a manifest without them, are refused."""
    handed = []

    def spy(images, *args, **kwargs):
        handed.append(images)
        return fidelity.fidelity(images, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "fidelity", spy)
    set_params(evaluate={"repeats": 3})
    output = " ".join(run_evaluate().split())
    assert (
        "evaluate: 3 seed ranges of 12 images (evaluate.repeats): images 0-11 are samples/, "
        "images 12-35 are sampled here (ddim, 4 network evaluations an image: 96)" in output
    )
    summary = json.loads(Path("metrics/eval.json").read_text())
    ranges = summary["ranges"]
    assert [(r["range"], r["image_indices"]) for r in ranges] == [(0, "0-11"), (1, "12-23"),
                                                                  (2, "24-35")]  # fmt: skip
    assert {k: ranges[0][k] for k in SCORES} == {k: single[k] for k in SCORES}
    for key in ("fid", "kid_mean", "isc_mean"):
        values = [r[key] for r in ranges]
        mean = sum(values) / 3
        std = (sum((v - mean) ** 2 for v in values) / 2) ** 0.5  # the sample std, n - 1
        assert summary[key] == pytest.approx(mean, rel=1e-12)
        assert summary[f"{key}_std"] == pytest.approx(std, rel=1e-9) and std > 0
        assert summary[f"{key}_min"] == min(values)
    assert summary["repeats"] == 3 and summary["num_images"] == 12
    assert summary["protocol"]["seeds"]["image_indices"] == "0-11, 12-23, 24-35"
    images = summary["protocol"]["images"]
    assert "; ranges 1-2: uint8 tensors sampled by evaluate from models" in images

    # the run holds the spread, and each range with the range as its step
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id])
    (run,) = [r for r in runs if r.data.params["evaluate.repeats"] == "3"]
    assert run.data.metrics["eval/fid"] == pytest.approx(summary["fid"])
    assert run.data.metrics["eval/fid_std"] == pytest.approx(summary["fid_std"])
    assert run.data.metrics["eval/isc_mean_min"] == pytest.approx(summary["isc_mean_min"])
    history = client.get_metric_history(run.info.run_id, "eval/ranges/fid")
    assert sorted((m.step, m.value) for m in history) == [
        (j, pytest.approx(r["fid"])) for j, r in enumerate(ranges)
    ]

    # the images handed over: the folder, then the PNGs the sample stage writes for 12-35
    set_params(sample={"num_images": 36})
    assert runner.invoke(app, ["sample"]).exit_code == 0
    assert handed[0] == str(Path("samples/images"))
    assert torch.equal(handed[1].images, read_pngs(Path("samples/images"), range(12, 24)))
    assert torch.equal(handed[2].images, read_pngs(Path("samples/images"), range(24, 36)))

    # other weights than the samples', or a manifest that does not say: refused before any work
    written = Path("metrics/eval.json").stat().st_mtime_ns
    tiny_checkpoint(project / "models" / "ema.pt", note="retrained")
    result = runner.invoke(app, ["evaluate"])
    assert result.exit_code == 1 and "is not the file the samples were drawn from" in result.output
    assert "run `pipeline sample` again" in result.output and "reference" not in result.output
    manifest = json.loads(Path("samples/manifest.json").read_text())
    del manifest["checkpoint_sha256"]
    Path("samples/manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["evaluate"])
    assert result.exit_code == 1 and "does not record ['checkpoint_sha256']" in result.output
    assert Path("metrics/eval.json").stat().st_mtime_ns == written


def test_a_range_is_cut_into_the_sample_stages_batches():
    assert aligned_batches(range(0, 7), 2) == [range(0, 2), range(2, 4), range(4, 6), range(6, 7)]
    assert aligned_batches(range(12, 24), 8) == [range(12, 16), range(16, 24)]
    assert aligned_batches(range(8, 16), 4) == [range(8, 12), range(12, 16)]
    assert aligned_batches(range(5, 6), 4) == [range(5, 6)]
