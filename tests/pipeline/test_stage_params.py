"""dvc.yaml's params tell the truth: every setting a stage reads is one of its params, so
changing it reruns the stage (``tests/test_dag.py`` does the same for the code deps).

Each stage runs on a tiny project with every read of a params.yaml setting recorded: an
attribute read of a section's field, or a field a section's ``model_dump`` hands out (the
whole-file dump the tracker logs as the run's params excepted). A read that no entry of the
stage's ``params`` covers would leave DVC calling a stale result fresh; a key listed on its own
that the stage never reads would rerun it for nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml
from stages import TINY_PROJECT, enter_project, merge, prepare_split
from typer.testing import CliRunner

import pipeline.download
import pipeline.edit
import pipeline.evaluate
import pipeline.frontier
import pipeline.nll
import pipeline.prepare
import pipeline.sample
import pipeline.track
import pipeline.train
from pipeline.cli import app
from pipeline.settings import Params

ROOT = Path(__file__).resolve().parents[2]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
MODULES = {"download": pipeline.download, "prepare": pipeline.prepare, "train": pipeline.train,
           "sample": pipeline.sample, "evaluate": pipeline.evaluate,
           "frontier": pipeline.frontier, "nll": pipeline.nll, "edit": pipeline.edit,
           "track": pipeline.track}  # fmt: skip

PARAMS = merge(TINY_PROJECT, {
    "frontier": {"num_images": 6, "batch_size": 6, "grid_images": 2},
    # FID during training on: what it reads must be train's params too (and nothing of
    # evaluate's or sample's, whose changes must not retrain)
    "train": {"fid": {"every": 4, "num_images": 4, "steps": 2, "reference_split": "val"}},
})  # fmt: skip


class Reads:
    """The dotted names of the settings read while ``watch`` is on."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.prefix: dict[int, str] = {}  # id of a loaded section -> its dotted name
        self.root: int | None = None

    def forget(self) -> None:
        """Before a load: the checks params.yaml gets as a whole are no stage's reads (and
        the last load's ids may be reused by now)."""
        self.prefix, self.root = {}, None

    def loaded(self, params: Params) -> Params:
        """Note where each section of freshly loaded params sits (the points too)."""
        self.root = id(params)
        for name in type(params).model_fields:
            value = object.__getattribute__(params, name)
            if isinstance(value, pydantic.BaseModel):
                self.prefix[id(value)] = name
                for field in type(value).model_fields:
                    inner = object.__getattribute__(value, field)
                    for item in inner if isinstance(inner, list) else [inner]:
                        if isinstance(item, pydantic.BaseModel):
                            self.prefix[id(item)] = f"{name}.{field}"
        return params

    def where(self, model: Any) -> str | None:
        return "" if id(model) == self.root else self.prefix.get(id(model))

    def read(self, model: Any, field: str) -> None:
        where = self.where(model)
        value = object.__getattribute__(model, field)
        if where is not None and not isinstance(value, pydantic.BaseModel):
            self.names.add(f"{where}.{field}".lstrip("."))

    def dumped(self, model: Any, include: Any, exclude: Any) -> None:
        where = self.where(model)

        if where is None or where == "":  # the whole file: the run's logged params
            return
        fields = set(include) if include else set(type(model).model_fields)
        for field in fields - set(exclude or ()):
            self.names.add(f"{where}.{field}")


@pytest.fixture
def reads(monkeypatch) -> Reads:
    watch = Reads()
    getattribute, dump = pydantic.BaseModel.__getattribute__, pydantic.BaseModel.model_dump

    def recording_getattribute(self, name):
        if name in type(self).__pydantic_fields__ and not name.startswith("_"):
            watch.read(self, name)
        return getattribute(self, name)

    def recording_dump(self, *args, include=None, exclude=None, **kwargs):
        watch.dumped(self, include, exclude)
        return dump(self, *args, include=include, exclude=exclude, **kwargs)

    monkeypatch.setattr(pydantic.BaseModel, "__getattribute__", recording_getattribute)
    monkeypatch.setattr(pydantic.BaseModel, "model_dump", recording_dump)

    def watched(load):
        def load_params(path):
            watch.forget()
            return watch.loaded(load(path))

        return load_params

    for module in MODULES.values():
        monkeypatch.setattr(module, "load_params", watched(module.load_params))
    return watch


def covered(name: str, declared: list[str]) -> bool:
    return any(name == d or name.startswith(f"{d}.") for d in declared)


def declared_params(stage: str) -> list[str]:
    out = []
    for entry in STAGES[stage].get("params", []):
        if isinstance(entry, dict):  # {"params.yaml": None}: every key of the file
            return [""]
        out.append(entry)
    return out


def test_every_setting_a_stage_reads_is_one_of_its_params_in_dvc_yaml(
    tmp_path, inception_weights, monkeypatch, reads
):
    # the Inception weights through params.yaml, as users name them (not the environment's
    # override, which would hide the read)
    params = {**PARAMS, "inception_weights": str(inception_weights)}
    prepared = prepare_split(tmp_path / "prep", params)
    enter_project(tmp_path, prepared, params, monkeypatch)
    monkeypatch.delenv("DDPM_INCEPTION_WEIGHTS", raising=False)
    read_by: dict[str, set[str]] = {}
    for stage in STAGES:
        reads.names = set()
        args = [stage] + (["--out-dir", "prepared-again"] if stage == "prepare" else [])
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, (stage, result.output)
        read_by[stage] = set(reads.names)
    for stage, names in read_by.items():
        declared = declared_params(stage)
        undeclared = sorted(n for n in names if declared != [""] and not covered(n, declared))
        assert not undeclared, f"{stage} reads {undeclared}: add them to its params in dvc.yaml"
        # a key listed one by one (not a whole section) is there because the stage reads it
        unread = [d for d in declared if "." in d and not any(covered(n, [d]) for n in names)]
        assert not unread, f"{stage} never reads {unread}: remove them from its params"
    # the recorder sees what it should: the frontier's inherited sample keys, train's sections
    assert {"sample.eta", "sample.spacing", "sample.bf16", "frontier.points"} <= read_by["frontier"]
    assert "sample.steps" not in read_by["frontier"]  # each point names its own steps
    assert {"train.lr", "ema.decay", "model.base_channels", "schedule"} <= read_by["train"]
    assert not any(n.startswith(("sample.", "evaluate.")) for n in read_by["train"])
    assert {"train.fid.every", "train.fid.num_images", "inception_weights"} <= read_by["train"]
    assert {"nll.stride", "sample.clip_x0", "sample.variance"} <= read_by["nll"]
    assert {"edit.strength", "sample.sampler", "evaluate.kid_subsets"} <= read_by["edit"]
