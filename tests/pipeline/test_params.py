"""params.yaml: complete, valid, and every bad value stopped with its key named."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from ddpm.config import (
    DiffusionConfig,
    EMAConfig,
    SamplerConfig,
    SamplerName,
    ScheduleName,
    Spacing,
    TrainConfig,
    UNetConfig,
)
from ddpm.sampling.spacing import SPACINGS
from ddpm.sampling.table import SAMPLERS
from ddpm.schedules import SCHEDULES
from pipeline.cli import app
from pipeline.settings import FrontierPoint, Params, ParamsError, load_params

ROOT = Path(__file__).resolve().parents[2]


def keys_of(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys |= keys_of(annotation, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def keys_in(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for name, value in tree.items():
        if isinstance(value, dict):
            keys |= keys_in(value, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def test_params_yaml_has_every_key_so_dvc_exp_run_s_can_set_it():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert keys_in(raw) == keys_of(Params)
    assert "&" not in (ROOT / "params.yaml").read_text()  # no anchors: -S edits only one copy


def test_default_params_describe_the_ddpm_cifar10_experiment():
    params = load_params(ROOT / "params.yaml")
    assert params.dataset == "cifar10-cars" and params.image_size == 32
    assert params.schedule == "linear" and params.diffusion.timesteps == 1000
    assert params.unet_config().base_channels == 128
    assert isinstance(params.train.lr, float)


def write(tmp_path: Path, **overrides) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ({"schedule": "cosin"}, ["schedule", "'linear', 'cosine', 'sigmoid' or 'dns'"]),
        ({"train__lr": -1.0}, ["train.lr", "greater than 0"]),
        ({"dataset": "mnist"}, ["dataset", "'cifar10-cars'"]),
        ({"diffusion__prediction": "noise"}, ["diffusion.prediction", "'eps', 'x0' or 'v'"]),
        ({"model__attention_resolutions": [3]}, ["attention_resolutions [3] are never reached"]),
        ({"train__batchsize": 64}, ["train.batchsize", "Extra inputs are not permitted"]),
        ({"image_size": 64}, ["image_size=64 is more than dataset=cifar10-cars has"]),
        ({"diffusion__loss": "hybrid"}, ["diffusion.loss=hybrid", "model.learn_sigma: true"]),
        ({"model__learn_sigma": True}, ["never trains the variances", "diffusion.loss: hybrid"]),
        ({"sample__variance": "learned"}, ["sample.variance=learned needs a model with learned"]),
        ({"nll__variance": "learned"}, ["nll.variance=learned needs model.learn_sigma: true"]),
        ({"nll__stride": 1000}, ["nll.stride=1000 is more than T - 1 = 999"]),
        ({"evaluate__repeats": 0}, ["evaluate.repeats=0 scores no images: set it to 1"]),
    ],
)
def test_a_bad_value_is_refused_naming_the_key(tmp_path, override, words):
    with pytest.raises(ParamsError) as info:
        load_params(write(tmp_path, **override))
    for word in words:
        assert word in str(info.value)
    # `dvc exp run -S schedule=cosin` leaves the typo in params.yaml: the way back is named
    assert f"`git checkout {tmp_path / 'params.yaml'}`" in str(info.value)


@pytest.mark.parametrize("schedule", ["cosine", "dns"])
def test_an_override_reaches_the_code(tmp_path, schedule):
    params = load_params(write(tmp_path, schedule=schedule, diffusion__timesteps=500))
    config = params.diffusion_config()
    assert (config.schedule, config.timesteps) == (schedule, 500)


def test_a_missing_params_file_is_named(tmp_path):
    with pytest.raises(ParamsError, match="no such params file"):
        load_params(tmp_path / "nope.yaml")


def test_a_missing_key_is_refused_naming_it(tmp_path):
    """params.yaml is the one source: no default may stand in for a key it lacks."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    del raw["train"]["steps"], raw["sample"]["eta"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"missing keys \['train.steps', 'sample.eta'\]"):
        load_params(path)


@pytest.mark.parametrize(
    ("section", "library"),
    [
        (Params.model_fields["model"].annotation, UNetConfig),
        (Params.model_fields["diffusion"].annotation, DiffusionConfig),
        (Params.model_fields["train"].annotation, TrainConfig),
        (Params.model_fields["ema"].annotation, EMAConfig),
        (Params.model_fields["sample"].annotation, SamplerConfig),
        (FrontierPoint, SamplerConfig),
    ],
)
def test_each_section_is_checked_by_the_library_fields_themselves(section, library):
    """Every setting's type, bounds and description are written once, where ddpm.config
    declares it: a params section restating them could drift (ModelParams once allowed what
    UNetConfig refused)."""
    for name, field in section.model_fields.items():
        if name in library.model_fields:
            mine = library.model_fields[name]
            assert field.metadata == mine.metadata, name
            assert field.description == mine.description, name
            assert field.annotation in (mine.annotation, mine.annotation | None), name


def test_every_problem_of_a_params_file_is_listed_at_once(tmp_path):
    """Steps beyond T for sample and a frontier point, and guidance without classes: one
    line each, named by their place in params.yaml, in one error."""
    points = [{"sampler": "ddim", "steps": 2000}, {"sampler": "ddim", "steps": 10}]
    path = write(tmp_path, sample__steps=1500, sample__guidance_scale=2.0, frontier__points=points)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert "sample.steps=1500 is more than T=1000, the model's diffusion steps" in message
    assert "sample.guidance_scale=2.0 needs a class-conditional model" in message
    assert "frontier.points[0].steps=2000 is more than T=1000" in message
    # the point inherits the sample's guidance, so it is named too
    assert "frontier.points[1].guidance_scale=2.0 needs a class-conditional model" in message


def test_the_library_defaults_are_the_params_yaml_values():
    """ddpm's configs default to the experiment params.yaml states, so the two cannot tell
    different stories (the pipeline itself never uses a default: see the test above)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    model = {k: v for k, v in raw["model"].items() if k != "conditional"}
    unet = UNetConfig().model_dump(mode="json")
    assert unet == {
        **model,
        "image_size": raw["image_size"],
        "in_channels": 3,
        "num_classes": None,
        "null_class": True,
    }
    diffusion = {**raw["diffusion"], "schedule": raw["schedule"]}
    assert DiffusionConfig().model_dump(mode="json") == diffusion
    # but one: the library has no FID scorer of its own (the pipeline passes one), so its
    # training measures no FID unless asked, where the default experiment does
    train = TrainConfig().model_dump(mode="json")
    assert train["fid"].pop("every") == 0 and raw["train"]["fid"].pop("every") > 0
    assert train == raw["train"]
    assert EMAConfig().model_dump(mode="json") == raw["ema"]
    sampler = SamplerConfig().model_dump(mode="json")
    assert sampler == {k: raw["sample"][k] for k in sampler}


def test_every_choice_list_is_its_registry():
    """A name the settings accept is a name the code can run, and the other way round."""
    assert set(get_args(ScheduleName)) == set(SCHEDULES)
    assert set(get_args(SamplerName)) == set(SAMPLERS)
    assert set(get_args(Spacing)) == set(SPACINGS)


@pytest.mark.parametrize("stage", ["download", "prepare", "train", "sample", "evaluate"])
def test_a_bad_params_file_exits_2_in_every_stage(tmp_path, stage):
    path = write(tmp_path, train__lr=-1.0)
    result = CliRunner().invoke(app, [stage, "--params", str(path)])
    assert result.exit_code == 2, result.output
    assert "train.lr" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("schedule, same", [("constant", True), ("cosine", False)])
def test_more_steps_resume_the_same_run_unless_the_lr_curve_depends_on_them(schedule, same):
    """Under a cosine schedule a 200k run is not the continuation of a 100k one: the curve
    decays over ``steps``, so the length names another checkpoint folder."""
    from pipeline.train import checkpoint_key

    p = load_params(ROOT / "params.yaml")
    p = p.model_copy(update={"train": p.train.model_copy(update={"lr_schedule": schedule})})
    longer = p.model_copy(update={"train": p.train.model_copy(update={"steps": 200_000})})
    keys = [checkpoint_key(q, q.unet_config(), "sha") for q in (p, longer)]
    assert (keys[0] == keys[1]) is same


def test_third_order_dpm_solver_and_unipc_points_are_lines_of_their_own():
    """The default frontier draws DPM-Solver++ of third order and UniPC at 10 and 20 steps,
    named dpm-solver-3 and unipc in the figure and the metrics; order 2 and bh2, the defaults,
    keep the plain name, other choices name themselves."""
    points = load_params(ROOT / "params.yaml").frontier.points
    series = {(p.series, p.steps) for p in points}
    assert {("dpm-solver-3", 10), ("dpm-solver-3", 20), ("dpm-solver", 10)} <= series
    assert {("unipc", 10), ("unipc", 20)} <= series
    explicit = FrontierPoint(sampler="dpm-solver", steps=10, order=2, spacing="logsnr")
    assert explicit.series == "dpm-solver:logsnr"
    assert FrontierPoint(sampler="unipc", steps=10, order=3, bh="bh1").series == "unipc-3-bh1"
    assert FrontierPoint(sampler="unipc", steps=10, bh="bh2").series == "unipc"
