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

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ddpm.config import (
    AttentionType,
    DiffusionConfig,
    DownsamplePadding,
    EMAConfig,
    LossType,
    Prediction,
    SamplerConfig,
    SamplerName,
    ScheduleName,
    Spacing,
    TrainConfig,
    UNetConfig,
    Variance,
)
from ddpm.data.sources import NATIVE_SIZES
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


class ModelParams(Section):
    """The UNet (:class:`ddpm.config.UNetConfig`); ``image_size`` is top-level and the classes
    come from the prepared data."""

    base_channels: int = Field(ge=1, description="Channels of the first level.")
    channel_mults: list[int] = Field(min_length=1, description="Per level.")
    num_res_blocks: int = Field(ge=1, description="Residual blocks per level.")
    attention_resolutions: list[int] = Field(description="Feature-map sizes with attention.")
    attention_type: AttentionType
    num_heads: int = Field(ge=1)
    dropout: float = Field(ge=0.0, lt=1.0)
    num_groups: int = Field(ge=1)
    norm_eps: float = Field(gt=0.0, description="GroupNorm epsilon (the paper: 1e-6).")
    downsample_padding: DownsamplePadding = Field(
        description="asymmetric (the paper) or symmetric."
    )
    time_freq_shift: float = Field(ge=0.0, description="Timestep embedding shift (the paper: 1).")
    conditional: bool = Field(description="Class-conditional (labels from the data set).")


class DiffusionParams(Section):
    """The forward process and objective; ``schedule`` is top-level."""

    timesteps: int = Field(ge=2)
    prediction: Prediction
    loss: LossType
    min_snr_gamma: float | None = Field(gt=0.0)


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

    reference_split: Literal["train", "val"] = Field(
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
    feature_extractor_weights: str = Field(
        description="Local Inception weights file; empty: torch-fidelity's download "
        "(env DDPM_INCEPTION_WEIGHTS overrides)."
    )
    prc_weights: str = Field(
        description="Local VGG16 weights for prc; empty: download (env DDPM_VGG16_WEIGHTS)."
    )


class FrontierPoint(Section):
    """One point of the frontier: a sampler and its steps; the keys it leaves out (null) come
    from the ``sample`` section, so the frontier varies exactly what its points name."""

    sampler: SamplerName
    steps: int = Field(ge=1, description="Sampling steps, at most diffusion.timesteps.")
    spacing: Spacing | None = None
    eta: float | None = Field(None, ge=0.0, le=1.0)
    variance: Variance | None = None
    clip_x0: bool | None = None
    guidance_scale: float | None = Field(None, ge=0.0)

    @property
    def series(self) -> str:
        """The line this point belongs to: the sampler, and the spacing when the point sets one."""
        return self.sampler if self.spacing is None else f"{self.sampler}:{self.spacing}"

    def sampler_config(self, sample: SampleParams) -> SamplerConfig:
        """This point's settings, the rest from ``sample`` (reading only those: sample.steps
        is not the frontier's, which dvc.yaml's params and tests/pipeline/test_stage_params.py
        hold to)."""
        named = self.model_dump(exclude_none=True)
        inherited = sample.model_dump(include=set(SamplerConfig.model_fields) - set(named))
        return SamplerConfig(**inherited, **named)


class FrontierParams(Section):
    """Section ``frontier``: FID/KID/IS at each point of a grid of samplers and step counts,
    from the same initial noises."""

    num_images: int = Field(ge=2, description="Images per point (FID wants 10,000).")
    batch_size: int = Field(ge=1, description="Images per forward pass.")
    grid_images: int = Field(ge=1, description="Images per point in frontier/grid.png.")
    points: list[FrontierPoint] = Field(min_length=1, description="sampler + steps each.")


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
    data: DataParams
    model: ModelParams
    diffusion: DiffusionParams
    train: TrainConfig
    ema: EMAConfig
    sample: SampleParams
    evaluate: EvaluateParams
    frontier: FrontierParams
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
        try:  # the UNet's own geometry checks
            self.unet_config(num_classes=1 if self.model.conditional else None)
        except ValidationError as exc:
            problems += [f"model: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()]
        if problems:
            raise ValueError("\n".join(problems))
        return self

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
        s, e, n, T = self.sample, self.evaluate, self.sample.num_images, self.diffusion.timesteps
        problems = []
        if s.steps > T:
            problems.append(
                f"sample.steps={s.steps} is more than diffusion.timesteps={T}; choose "
                f"sample.steps <= {T}"
            )
        if s.classes is not None and (not s.classes or min(s.classes) < 0):
            problems.append(f"sample.classes must be null or class indices >= 0; got {s.classes}")
        if not (e.fid or e.isc or e.kid or e.prc):
            problems.append("every evaluate metric is off; turn on fid, isc, kid or prc")
        if n < 2:
            problems.append(f"sample.num_images={n}: evaluation needs at least 2 images")
        if e.kid and e.kid_subset_size > n:
            problems.append(
                f"evaluate.kid_subset_size={e.kid_subset_size} is more than sample.num_images="
                f"{n}; KID draws subsets of that size from the samples: lower it"
            )
        if e.isc and e.isc_splits > n:
            problems.append(f"evaluate.isc_splits={e.isc_splits} > sample.num_images={n}")
        if e.prc and n <= PRC_NEIGHBORHOOD:
            problems.append(f"evaluate.prc needs more than {PRC_NEIGHBORHOOD} images; got {n}")
        return problems + self._frontier_problems()

    def _frontier_problems(self) -> list[str]:
        f, e, T = self.frontier, self.evaluate, self.diffusion.timesteps
        problems = [
            f"frontier.points[{i}].steps={p.steps} is more than diffusion.timesteps={T}"
            for i, p in enumerate(f.points)
            if p.steps > T
        ]
        keys = [(p.series, p.steps) for p in f.points]
        if len(set(keys)) < len(keys):
            problems.append(f"frontier.points repeat a sampler and steps: {keys}")
        if e.kid and e.kid_subset_size > f.num_images:
            problems.append(
                f"evaluate.kid_subset_size={e.kid_subset_size} is more than frontier.num_images="
                f"{f.num_images}; lower one or raise the other"
            )
        if e.isc and e.isc_splits > f.num_images:
            problems.append(f"evaluate.isc_splits={e.isc_splits} > frontier.num_images")
        return problems


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


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate params.yaml.

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
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(
            f"{path} is invalid:\n{exc}\nThese values are in {path} itself (`dvc exp run -S` "
            f"writes there, so every later stage fails on them too): correct them in {path}, "
            f"or restore the committed file with `git checkout {path}`."
        ) from exc
