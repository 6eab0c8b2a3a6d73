"""The download and prepare stages through the CLI, as DVC runs them."""

from __future__ import annotations

import functools
import typing
from pathlib import Path

import numpy as np
import pytest
import yaml
from stages import project_params
from typer.testing import CliRunner

import ddpm.data.download as downloads
from ddpm.data.prepared import load_prepared
from ddpm.data.sources import DATASETS
from pipeline.cli import app
from pipeline.settings import DatasetName

runner = CliRunner()


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage's downloads retry at once instead of after 1, 2, 4, 8 s."""
    monkeypatch.setattr(downloads, "download", functools.partial(downloads.download, backoff=0.0))


def write_params(tmp_path: Path, **params: object) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(project_params(params)))
    return path


def run(tmp_path: Path, stage: str, params: Path):
    args = [stage, "--params", str(params), "--raw-dir", str(tmp_path / "data" / "raw")]
    if stage == "prepare":
        args += ["--out-dir", str(tmp_path / "data" / "prepared")]
    return runner.invoke(app, args)


def test_the_params_datasets_are_the_library_datasets():
    assert set(typing.get_args(DatasetName)) == set(DATASETS)


def test_synthetic_has_nothing_to_download_and_prepares_offline(tmp_path):
    params = write_params(tmp_path, dataset="synthetic", image_size=16, data={"num_images": 100})
    result = run(tmp_path, "download", params)
    assert result.exit_code == 0, result.output
    assert "nothing to download" in result.output and (tmp_path / "data" / "raw").is_dir()
    result = run(tmp_path, "prepare", params)
    assert result.exit_code == 0, result.output
    assert "synthetic 16x16, 4 classes: train 90, val 10" in result.output
    train = load_prepared(tmp_path / "data" / "prepared", "train")
    assert train.images.shape == (90, 16, 16, 3)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["prepared", "raw"]


def test_cifar10_cars_downloads_from_a_mirror_and_prepares(tmp_path, serve, cifar10_archive):
    archive, md5 = cifar10_archive
    server = serve(archive.read_bytes(), name="cifar.tgz", cut_first=1)
    data = {"url": server.url, "md5": md5, "val_size": 5}
    params = write_params(tmp_path, dataset="cifar10-cars", seed=1, data=data)
    result = run(tmp_path, "download", params)
    assert result.exit_code == 0, result.output
    assert (
        tmp_path / "data" / "raw" / "cifar-10-python.tar.gz"
    ).read_bytes() == archive.read_bytes()
    assert len(server.ranges) == 2  # cut once, resumed once
    assert run(tmp_path, "download", params).exit_code == 0
    assert len(server.ranges) == 2  # valid archive present: no request at all
    result = run(tmp_path, "prepare", params)
    assert result.exit_code == 0, result.output
    assert "cifar10-cars 32x32, 1 classes: train 15, val 5, test 4" in result.output
    val = load_prepared(tmp_path / "data" / "prepared", "val")
    assert val.manifest["source"] == {"url": server.url, "archive": archive.name, "md5": md5}
    assert val.manifest["seed"] == 1 and val.manifest["class_names"] == ["automobile"]


def test_a_seed_override_changes_the_split(tmp_path, cifar10_archive):
    archive, md5 = cifar10_archive
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / archive.name).write_bytes(archive.read_bytes())  # placed by hand
    vals = []
    for seed in (0, 1):
        params = write_params(
            tmp_path, dataset="cifar10-cars", seed=seed, data={"md5": md5, "val_size": 5}
        )
        assert run(tmp_path, "prepare", params).exit_code == 0
        vals.append(load_prepared(tmp_path / "data" / "prepared", "val").images.numpy())
    assert not np.array_equal(*vals)


def test_tiny_imagenet_placed_by_hand_prepares_at_a_smaller_size(tmp_path, tiny_imagenet_archive):
    archive, md5 = tiny_imagenet_archive
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / archive.name).write_bytes(archive.read_bytes())
    params = write_params(tmp_path, dataset="tiny-imagenet", image_size=32, data={"md5": md5})
    result = run(tmp_path, "prepare", params)
    assert result.exit_code == 0, result.output
    assert "tiny-imagenet 32x32, 3 classes: train 12, val 6" in result.output


def test_no_network_is_one_clear_message_with_url_path_md5_and_the_way_out(tmp_path, dead_url):
    params = write_params(tmp_path, dataset="cifar10", data={"url": dead_url})
    result = run(tmp_path, "download", params)
    assert result.exit_code == 1
    assert dead_url in result.output and "cifar-10-python.tar.gz" in result.output
    assert "c58f30108f718f92721af3b95e74349a" in result.output and "make smoke" in result.output
    assert "Traceback" not in result.output


def test_prepare_without_the_archive_says_to_download_first(tmp_path):
    result = run(tmp_path, "prepare", write_params(tmp_path, dataset="tiny-imagenet"))
    assert result.exit_code == 1
    assert (
        "tiny-imagenet-200.zip is missing" in result.output and "pipeline download" in result.output
    )


def test_a_corrupt_archive_is_named_before_extraction(tmp_path, cifar10_archive):
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "cifar-10-python.tar.gz").write_bytes(cifar10_archive[0].read_bytes()[:3000])
    params = write_params(tmp_path, dataset="cifar10", data={"md5": cifar10_archive[1]})
    result = run(tmp_path, "prepare", params)
    assert result.exit_code == 1
    assert (
        "cifar-10-python.tar.gz is corrupt, truncated" in result.output
        and "Delete it" in result.output
    )


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"dataset": "cifar100"}, "'cifar10-cars', 'cifar10', 'tiny-imagenet'"),
        ({"dataset": "imagefolder"}, "needs image_folder"),
        ({"dataset": "cifar10", "image_size": 64}, "image_size=64 is more than dataset=cifar10"),
        ({"dataset": "tiny-imagenet", "image_size": 96}, "image_size <= 64"),
        ({"data": {"bad_images": "ignore"}}, "'skip' or 'fail'"),
        ({"data": {"md5": "abc"}}, "data.md5"),
        ({"data": {"val_size": 5000}}, "data.val_size"),
        ({"data": {"valsize": 5}}, "data.valsize"),
    ],
)
def test_bad_params_fail_both_stages_before_any_work(tmp_path, params, message):
    for stage in ("download", "prepare"):
        result = run(tmp_path, stage, write_params(tmp_path, **params))
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "data").exists()


def test_a_missing_params_file_is_exit_code_2(tmp_path):
    result = run(tmp_path, "prepare", tmp_path / "nope.yaml")
    assert result.exit_code == 2 and "no such params file" in result.output


def make_folder(root: Path, broken: bool) -> Path:
    from PIL import Image

    for name, colour in [("cars", (200, 0, 0)), ("trucks", (0, 0, 200))]:
        (root / name).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (40, 30), colour).save(root / name / f"{i}.png")
    if broken:
        (root / "cars" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    return root


def test_an_image_folder_with_classes_and_a_broken_file_is_skipped_by_default(tmp_path):
    folder = make_folder(tmp_path / "photos", broken=True)
    params = write_params(tmp_path, dataset="imagefolder", image_folder=str(folder), image_size=16)
    result = run(tmp_path, "prepare", params)
    assert result.exit_code == 0, result.output
    assert "imagefolder 16x16, 2 classes: train 9, val 1" in result.output
    assert "skipped 1 unreadable images: cars/broken.jpg" in result.output
    manifest = load_prepared(tmp_path / "data" / "prepared").manifest
    assert manifest["class_names"] == ["cars", "trucks"] and manifest["skipped"] == [
        "cars/broken.jpg"
    ]


def test_an_image_folder_with_a_broken_file_fails_when_asked(tmp_path):
    folder = make_folder(tmp_path / "photos", broken=True)
    params = write_params(
        tmp_path, dataset="imagefolder", image_folder=str(folder), data={"bad_images": "fail"}
    )
    result = run(tmp_path, "prepare", params)
    assert result.exit_code == 1 and "cars/broken.jpg" in result.output
    assert not (tmp_path / "data" / "prepared").exists()


def test_an_empty_image_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    params = write_params(tmp_path, dataset="imagefolder", image_folder=str(tmp_path / "empty"))
    result = run(tmp_path, "prepare", params)
    assert result.exit_code == 1 and "holds no images" in result.output


def test_prepare_replaces_its_output_and_leaves_no_temporary_folders(tmp_path):
    for num_images in (20, 40):
        params = write_params(tmp_path, dataset="synthetic", data={"num_images": num_images})
        result = run(tmp_path, "prepare", params)
        assert result.exit_code == 0, result.output
    assert load_prepared(tmp_path / "data" / "prepared").manifest["num_images"] == 40
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["prepared"]
