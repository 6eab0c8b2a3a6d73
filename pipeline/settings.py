"""params.yaml, validated: the one source of truth of an experiment.

``Params`` mirrors params.yaml section by section with ``extra="forbid"``, so a typo or a value
out of range stops the stage that reads it, naming the key. params.yaml is the one source of
every value: each key must be present (``dvc exp run -S`` cannot add a missing one), so no
default here or in ``ddpm.config`` can silently disagree with it. The checks that span
sections live in one validator, :meth:`Params._check`. ``Machine`` holds what is about the
machine rather than the experiment, read from the environment.

This module imports no torch: ``--help`` and a params typo answer at once.
"""

from __future__ import annotations

import sys
from collections.abc import Collection
from copy import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings, SettingsConfigDict

from ddpm.config import (
    DiffusionConfig,
    EMAConfig,
    SamplerConfig,
    SamplerName,
    ScheduleName,
    Spacing,
    TrainConfig,
    UNetConfig,
    Variance,
)
from ddpm.data.sources import NATIVE_SIZES
from ddpm.sampling.table import SAMPLERS, series_part
from pipeline.errors import ParamsError

PRC_NEIGHBORHOOD = 3  # torch-fidelity's k of the k-NN manifolds (Kynkaanniemi et al. 2019)
DatasetName = Literal["cifar10-cars", "cifar10", "tiny-imagenet", "imagefolder", "synthetic"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(Section):
    """Section ``data``: where the archive comes from and how the prepared split is made."""

    url: str = Field(description="Mirror URL of the archive; empty: the official URL.")
    md5: str = Field(
        pattern=r"^([0-9a-fA-F]{32})?$",
        description="md5 of the archive; empty: the published checksum (right for a mirror).",
    )
    val_size: int = Field(
        ge=1, lt=5000, description="cifar10-cars: the 5,000 cars held out for validation."
    )
    val_fraction: float = Field(
        ge=0.0, lt=1.0, description="imagefolder, synthetic: share held out for validation."
    )
    num_images: int = Field(ge=2, description="synthetic: number of images generated.")
    bad_images: Literal["skip", "fail"] = Field(
        description="imagefolder: skip unreadable images (counted, named) or fail."
    )


def section(
    name: str,
    library: type[BaseModel],
    doc: str,
    *,
    leave_out: Collection[str] = (),
    optional: Collection[str] = (),
    base: type[BaseModel] = Section,
    **extra: Any,
) -> Any:
    """A params.yaml section validated by the library's own fields: the types, bounds and
    descriptions written once, in :mod:`ddpm.config`. ``leave_out`` drops the fields the
    pipeline sets elsewhere; ``optional`` ones may be null (``None``: inherited from another
    section), and the others are required: params.yaml states every value, so no library
    default can silently disagree with it. ``extra`` adds the pipeline's own fields, as
    ``name=(annotation, Field(...))``."""
    fields: dict[str, Any] = {}
    for key, info in library.model_fields.items():
        if key in optional:
            fields[key] = (info.annotation | None, FieldInfo.merge_field_infos(info, default=None))
        elif key not in leave_out:
            fields[key] = (info.annotation, copy(info))
            fields[key][1].default = PydanticUndefined
    return create_model(name, __base__=base, __doc__=doc, __module__=__name__, **fields, **extra)


ModelParams = section(
    "ModelParams",
    UNetConfig,
    "Section ``model``: the UNet (:class:`ddpm.config.UNetConfig`); ``image_size`` is top-level "
    "and the classes come from the prepared data.",
    leave_out={"image_size", "in_channels", "num_classes", "null_class"},
    conditional=(bool, Field(description="Class-conditional (labels from the data set).")),
)
DiffusionParams = section(
    "DiffusionParams",
    DiffusionConfig,
    "Section ``diffusion``: the forward process and objective "
    "(:class:`ddpm.config.DiffusionConfig`); ``schedule`` is top-level.",
    leave_out={"schedule"},
)


class SampleParams(SamplerConfig):
    """Section ``sample``: the sampler (the fields of :class:`ddpm.config.SamplerConfig`), how
    many images, and the figures made with them."""

    num_images: int = Field(ge=1, description="Images written (FID wants 10,000+).")
    batch_size: int = Field(ge=1, description="Images per forward pass, per process.")
    weights: Literal["ema", "raw"] = Field(description="EMA or the raw trained weights.")
    classes: list[int] | None = Field(
        description="Conditional models: labels used in turn; None: all, balanced."
    )
    grid_images: int = Field(ge=1, description="Images in grid.png (the first ones).")
    gif_images: int = Field(ge=1, description="Images whose denoising denoising.gif shows.")
    gif_frames: int = Field(ge=2, description="Frames of the GIF, at most.")
    interpolation: bool = Field(description="Also write interpolation.png (slerp).")
    interpolation_steps: int = Field(ge=3, description="Images along the interpolation.")
    bf16: bool = Field(
        description="The network under bf16 autocast (sample and frontier): faster on a GPU; "
        "the images move a little from float32's (make bench measures how far)."
    )

    def sampler_config(self) -> SamplerConfig:
        """The sampler part, as the samplers take it."""
        return SamplerConfig(**self.model_dump(include=set(SamplerConfig.model_fields)))


class EvaluateParams(Section):
    """Section ``evaluate``: torch-fidelity metrics of the samples against a prepared split."""

    reference_split: Literal["train", "val", "test"] = Field(
        description="The prepared split the samples are compared with."
    )
    fid: bool = Field(description="Frechet Inception Distance.")
    isc: bool = Field(description="Inception Score.")
    kid: bool = Field(description="Kernel Inception Distance.")
    prc: bool = Field(description="Precision and recall (VGG16 features).")
    kid_subset_size: int = Field(ge=2, description="KID: images per subset.")
    kid_subsets: int = Field(ge=1, description="KID: number of subsets.")
    isc_splits: int = Field(ge=1, description="Inception Score: number of splits.")
    batch_size: int = Field(ge=1, description="Images per feature-extractor pass.")
    prc_weights: str = Field(
        description="Local VGG16 weights for prc; empty: download (env DDPM_VGG16_WEIGHTS)."
    )
    repeats: int = Field(
        description="Disjoint seed ranges of sample.num_images images scored (EDM's protocol: "
        "3); range 0 is samples/, the others are sampled by evaluate; eval.json gives each "
        "range, their mean, std and minimum."
    )

    @field_validator("repeats")
    @classmethod
    def _at_least_one(cls, repeats: int) -> int:
        if repeats < 1:
            raise ValueError(
                f"evaluate.repeats={repeats} scores no images: set it to 1 (the samples alone) "
                "or more (3 is EDM's protocol)"
            )
        return repeats

    def size_problems(
        self, samples: int, what: str, reference: int | None = None, prc: bool = True
    ) -> list[str]:
        """What the metrics cannot compute from ``samples`` images (``what`` names them, with
        their number) and, when known, ``reference`` real ones: the one place these limits
        are written (params.yaml is checked with them, evaluate and frontier again with the
        images they find)."""
        n = samples if reference is None else min(samples, reference)
        against = what if reference is None else f"{what} or the {reference} reference images"
        problems = []
        if n < 2:
            problems.append(f"{against}: the metrics need at least 2 images on each side")
        if self.kid and self.kid_subset_size > n:
            problems.append(
                f"evaluate.kid_subset_size={self.kid_subset_size} is more than {against}; KID "
                "draws subsets of that size: lower it"
            )
        if self.isc and self.isc_splits > samples:
            problems.append(f"evaluate.isc_splits={self.isc_splits} is more than {what}")
        if prc and self.prc and n <= PRC_NEIGHBORHOOD:
            problems.append(f"evaluate.prc needs more than {PRC_NEIGHBORHOOD} images; {against}")
        return problems


class _Point(Section):
    """What a frontier point does with its fields (:data:`FrontierPoint`)."""

    sampler: SamplerName
    steps: int
    spacing: Spacing | None

    @property
    def series(self) -> str:
        """The line this point belongs to: the sampler, then each of the sampler's own settings
        (its row of :data:`ddpm.sampling.table.SAMPLERS`) that the point sets to another value
        than the default (``dpm-solver-3``, ``unipc-bh1``), then the spacing when the point sets
        one (``ddim:quadratic``)."""
        named, defaults = self.model_dump(exclude_none=True), SamplerConfig.model_fields
        name = self.sampler + "".join(
            series_part(key, named[key])
            for key in SAMPLERS[self.sampler].reads
            if key in named and named[key] != defaults[key].default
        )
        return name if self.spacing is None else f"{name}:{self.spacing}"

    def sampler_config(self, sample: SampleParams) -> SamplerConfig:
        """This point's settings, the rest from ``sample`` (reading only those: sample.steps
        is not the frontier's, which dvc.yaml's params and tests/pipeline/test_stage_params.py
        hold to)."""
        named = self.model_dump(exclude_none=True)
        inherited = sample.model_dump(include=set(SamplerConfig.model_fields) - set(named))
        return SamplerConfig(**inherited, **named)


FrontierPoint = section(
    "FrontierPoint",
    SamplerConfig,
    "One point of the frontier: a sampler and its steps (:class:`ddpm.config.SamplerConfig`); "
    "the keys it leaves out (null) come from the ``sample`` section, so the frontier varies "
    "exactly what its points name.",
    optional=set(SamplerConfig.model_fields) - {"sampler", "steps"},
    base=_Point,
)


class FrontierParams(Section):
    """Section ``frontier``: FID/KID/IS at each point of a grid of samplers and step counts,
    from the same initial noises."""

    num_images: int = Field(ge=2, description="Images per point (FID wants 10,000).")
    batch_size: int = Field(ge=1, description="Images per forward pass.")
    grid_images: int = Field(ge=1, description="Images per point in frontier/grid.png.")
    points: list[FrontierPoint] = Field(min_length=1, description="sampler + steps each.")


class NLLParams(Section):
    """Section ``nll``: the variational bound of held-out images, in bits per dimension."""

    split: Literal["test", "val", "train"] = Field(
        description="The prepared split scored: test (held out, as the papers report; CIFAR-10 "
        "only), val, or train."
    )
    num_images: int | None = Field(
        ge=2, description="The first N images of the split; null: all of them."
    )
    batch_size: int = Field(ge=1, description="Images per forward pass.")
    stride: int = Field(
        ge=1,
        description="1: the exact bound over all T steps; k: the bound of the chain over steps "
        "0, k, 2k, .. (betas recomputed on them): valid, looser, k times cheaper.",
    )
    variance: Variance | None = Field(
        description="The reverse process's variance: posterior (beta-tilde), beta, or learned "
        "(models with learn_sigma); null: the model's own, learned where it learns them, else "
        "sample.variance (the DDPM sampler's)."
    )


class EditParams(Section):
    """Section ``edit``: what a trained model does to held-out images: inpainting (RePaint),
    SDEdit image-to-image, or DDIM inversion and reconstruction."""

    mode: Literal["inpaint", "sdedit", "reconstruct"] = Field(
        description="inpaint (RePaint, Lugmayr et al. 2022), sdedit (Meng et al. 2022) or "
        "reconstruct (DDIM inversion and back, Song et al. 2020, sec. 4.3)."
    )
    split: Literal["val", "test", "train"] = Field(
        description="The prepared split whose first images are edited (test: CIFAR-10 only)."
    )
    num_images: int = Field(ge=1, description="The first N images of the split.")
    batch_size: int = Field(ge=1, description="Images per forward pass.")
    steps: int = Field(
        ge=1,
        description="inpaint: the chain RePaint walks; reconstruct: the inversion's (and "
        "DDIM's back); sdedit uses sample.steps.",
    )
    jump_length: int = Field(ge=1, description="inpaint: RePaint's jump length j.")
    resample: int = Field(ge=1, description="inpaint: RePaint's resamplings r (1: none).")
    mask: Literal["box", "half", "lines", "random"] = Field(
        description="inpaint: the unknown region, seeded per image."
    )
    mask_fraction: float = Field(
        gt=0.0, lt=1.0, description="inpaint: the unknown share of the image (box, lines, random)."
    )
    strength: float = Field(
        gt=0.0, le=1.0, description="sdedit: the chain starts at t0 = strength T; 1: sampling."
    )


class RegistryParams(Section):
    """Section ``registry``: the MLflow model registry."""

    enabled: bool = Field(description="Register the trained model after evaluate.")
    model_name: str = Field(min_length=1, description="Its name in the registry.")


def missing_keys(model: type[BaseModel], raw: Any, prefix: str = "") -> list[str]:
    """The dotted keys of ``model`` absent from the mapping ``raw`` (nested sections too)."""
    if not isinstance(raw, dict):
        return []
    missing = []
    for name, field in model.model_fields.items():
        if name not in raw:
            missing.append(f"{prefix}{name}")
        elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            missing += missing_keys(field.annotation, raw[name], f"{prefix}{name}.")
    return missing


class Params(Section):
    """The whole of params.yaml. Top-level keys are the ones users override most."""

    dataset: DatasetName
    image_folder: str = Field(description="Folder of images for dataset=imagefolder.")
    image_size: int = Field(ge=4, description="Training resolution in pixels.")
    schedule: ScheduleName
    seed: int = Field(ge=0)
    inception_weights: str = Field(
        description="Local Inception weights file, for every FID (train, evaluate, frontier, "
        "edit); empty: torch-fidelity's download (env DDPM_INCEPTION_WEIGHTS overrides)."
    )
    data: DataParams
    model: ModelParams
    diffusion: DiffusionParams
    train: TrainConfig
    ema: EMAConfig
    sample: SampleParams
    evaluate: EvaluateParams
    frontier: FrontierParams
    nll: NLLParams
    edit: EditParams
    registry: RegistryParams

    def unet_config(self, num_classes: int | None = None) -> UNetConfig:
        """The UNet for this experiment; ``num_classes`` from the data when conditional."""
        fields = self.model.model_dump(exclude={"conditional"})
        return UNetConfig(image_size=self.image_size, num_classes=num_classes, **fields)

    def diffusion_config(self) -> DiffusionConfig:
        return DiffusionConfig(schedule=self.schedule, **self.diffusion.model_dump())

    @model_validator(mode="before")
    @classmethod
    def _every_key(cls, raw: Any) -> Any:
        missing = missing_keys(cls, raw)
        if missing:
            raise ValueError(
                f"missing keys {missing}: every key must be in params.yaml (it is the one source "
                "of the experiment's values, and `dvc exp run -S` cannot add a key); copy them "
                "from the project's params.yaml"
            )
        return raw

    @model_validator(mode="after")
    def _check(self) -> Params:
        """Every check that spans keys, so a bad combination fails before any stage works."""
        problems = self._data_problems() + self._sampling_problems()
        problems += self._objective_problems()
        T = self.diffusion.timesteps
        if self.nll.stride > T - 1:
            problems.append(
                f"nll.stride={self.nll.stride} is more than T - 1 = {T - 1} (diffusion.timesteps"
                f" - 1); choose 1 (the exact bound) to {T - 1}"
            )
        problems += self._edit_problems()
        if self.nll.variance == "learned" and not self.model.learn_sigma:
            problems.append(
                "nll.variance=learned needs model.learn_sigma: true; choose posterior or beta"
            )
        try:  # the UNet's own geometry checks
            self.unet_config(num_classes=1 if self.model.conditional else None)
        except ValidationError as exc:
            problems += [f"model: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()]
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _edit_problems(self) -> list[str]:
        """The edit settings among themselves (the sample section's checks cover the rest)."""
        d, problems = self.edit, []  # edit.steps against T: the stage, against the model's
        if d.mode == "inpaint" and d.jump_length > d.steps:
            problems.append(f"edit.jump_length={d.jump_length} is more than edit.steps="
                            f"{d.steps}; choose a jump within the chain")  # fmt: skip
        return problems

    def warnings(self) -> list[str]:
        """Settings that do nothing, one line each: a sampler setting the sampler does not
        read (the sample section's, and those a frontier point names itself; a point inherits
        the rest of the sample section, whatever its sampler)."""
        lines = prefixed("sample: ", self.sample.sampler_config().ignored())
        for i, point in enumerate(self.frontier.points):
            named = set(point.model_dump(exclude_none=True))
            config = point.sampler_config(self.sample)
            lines += prefixed(f"frontier.points[{i}]: ", config.ignored(named))
        return lines

    def _objective_problems(self) -> list[str]:
        """Learned variances and the loss that trains them go together."""
        loss, learned = self.diffusion.loss, self.model.learn_sigma
        if loss == "hybrid" and not learned:
            return [
                "diffusion.loss=hybrid trains learned variances: set model.learn_sigma: true "
                "(or loss l2 for fixed ones)"
            ]
        if learned and loss in ("l2", "l1"):
            return [
                f"model.learn_sigma: true with diffusion.loss={loss} never trains the variances "
                "(only the bound does): set diffusion.loss: hybrid (or vlb)"
            ]
        return []

    def _data_problems(self) -> list[str]:
        problems = []
        if self.dataset == "imagefolder" and not self.image_folder.strip():
            problems.append("dataset=imagefolder needs image_folder: the folder of your images")
        native = NATIVE_SIZES.get(self.dataset)
        if native is not None and self.image_size > native:
            problems.append(
                f"image_size={self.image_size} is more than dataset={self.dataset} has: its "
                f"images are {native}x{native}, and upscaling adds no detail; choose "
                f"image_size <= {native} (smaller sizes are downscaled) or another dataset"
            )
        return problems

    def _sampling_problems(self) -> list[str]:
        s, e, T = self.sample, self.evaluate, self.diffusion.timesteps
        learned = self.model.learn_sigma
        problems = prefixed("sample.", s.problems(T, self.model.conditional, learned))
        if s.classes is not None and (not s.classes or min(s.classes) < 0):
            problems.append(f"sample.classes must be null or class indices >= 0; got {s.classes}")
        if not (e.fid or e.isc or e.kid or e.prc):
            problems.append("every evaluate metric is off; turn on fid, isc, kid or prc")
        problems += e.size_problems(s.num_images, f"sample.num_images={s.num_images}")
        return problems + self._frontier_problems()

    def _frontier_problems(self) -> list[str]:
        f, T, conditional = self.frontier, self.diffusion.timesteps, self.model.conditional
        problems = []
        for i, point in enumerate(f.points):
            config = point.sampler_config(self.sample)
            wrong = config.problems(T, conditional, self.model.learn_sigma)
            problems += prefixed(f"frontier.points[{i}].", wrong)
        keys = [(p.series, p.steps) for p in f.points]
        if len(set(keys)) < len(keys):
            problems.append(f"frontier.points repeat a sampler and steps: {keys}")
        e = self.evaluate
        if not (e.fid or e.kid or e.isc):
            problems.append("the frontier scores FID, KID or IS: turn on evaluate.fid, kid or isc")
        return problems + e.size_problems(
            f.num_images, f"frontier.num_images={f.num_images}", prc=False
        )


def prefixed(prefix: str, problems: list[str]) -> list[str]:
    """Problems of a library config, named by their place in params.yaml."""
    return [prefix + problem for problem in problems]


class Machine(BaseSettings):
    """Facts about the machine, from environment variables (never from params.yaml)."""

    model_config = SettingsConfigDict(env_prefix="DDPM_", extra="ignore")

    device: str | None = Field(None, description="Force a device (cpu, cuda, mps).")
    num_threads: int | None = Field(None, ge=1, description="Torch CPU threads.")
    inception_weights: str | None = Field(
        None, description="Inception weights file for offline machines (over the param)."
    )
    vgg16_weights: str | None = Field(None, description="VGG16 weights file, for prc offline.")
    fidelity_cache: Path = Field(
        Path("data/fidelity_cache"), description="torch-fidelity's cache of reference features."
    )
    tracking: bool = Field(
        True, description="false: no MLflow at all (machines without it, e.g. the GPU check)."
    )
    checkpoint_dir: Path | None = Field(
        None,
        description="Training checkpoints here instead of models/checkpoints/: storage that "
        "outlives the machine (a mounted bucket), so a preempted run resumes from it.",
    )


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate params.yaml; print a warning line for each setting that does
    nothing (:meth:`Params.warnings`) to stderr.

    Raises:
        ParamsError: with the file name and every invalid key, before any work starts.
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(
            f"{path}: no such params file; run from the project root or pass --params"
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of keys at the top level")
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(
            f"{path} is invalid:\n{exc}\nThese values are in {path} itself (`dvc exp run -S` "
            f"writes there, so every later stage fails on them too): correct them in {path}, "
            f"or restore the committed file with `git checkout {path}`."
        ) from exc
    for line in params.warnings():
        print(f"{path}: warning: {line}", file=sys.stderr)
    return params
