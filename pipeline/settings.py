"""params.yaml, validated: the one source of truth of an experiment.

``Params`` mirrors params.yaml section by section with ``extra="forbid"``, so a typo or a value
out of range stops the stage that reads it, naming the key. ``Machine`` holds what is about the
machine rather than the experiment, read from the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ddpm.config import (
    AttentionType,
    DiffusionConfig,
    LossType,
    Prediction,
    ScheduleName,
    TrainConfig,
    UNetConfig,
)
from ddpm.data.sources import NATIVE_SIZES
from ddpm.ema import EMAConfig
from ddpm.samplers import Spacing, Variance

PRC_NEIGHBORHOOD = 3  # torch-fidelity's k of the k-NN manifolds (Kynkaanniemi et al. 2019)
DatasetName = Literal["cifar10-cars", "cifar10", "tiny-imagenet", "imagefolder", "synthetic"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(Section):
    """Section ``data``: where the archive comes from and how the prepared split is made."""

    url: str = Field(
        "", description="Mirror URL of the archive; empty: the official URL of the dataset."
    )
    md5: str = Field(
        "",
        pattern=r"^([0-9a-fA-F]{32})?$",
        description="md5 of the archive; empty: the published checksum (right for a mirror).",
    )
    val_size: int = Field(
        750, ge=1, lt=5000, description="cifar10-cars: the 5,000 cars held out for validation."
    )
    val_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="imagefolder, synthetic: share held out for validation."
    )
    num_images: int = Field(2000, ge=2, description="synthetic: number of images generated.")
    bad_images: Literal["skip", "fail"] = Field(
        "skip", description="imagefolder: skip unreadable images (counted, named) or fail."
    )


class ModelParams(Section):
    """The UNet; ``image_size`` is top-level and the classes come from the prepared data."""

    base_channels: int = Field(128, ge=1, description="Channels of the first level.")
    channel_mults: list[int] = Field([1, 2, 2, 2], min_length=1, description="Per level.")
    num_res_blocks: int = Field(2, ge=1, description="Residual blocks per level.")
    attention_resolutions: list[int] = Field([16], description="Feature-map sizes with attention.")
    attention_type: AttentionType = "softmax"
    num_heads: int = Field(1, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    num_groups: int = Field(32, ge=1)
    conditional: bool = Field(False, description="Class-conditional (labels from the data set).")


class DiffusionParams(Section):
    """The forward process and objective; ``schedule`` is top-level."""

    timesteps: int = Field(1000, ge=2)
    prediction: Prediction = "eps"
    loss: LossType = "l2"
    min_snr_gamma: float | None = Field(None, gt=0.0)


class SampleParams(Section):
    """Section ``sample``: which sampler, how many images, and the figures made with them."""

    sampler: Literal["ddpm", "ddim", "dpm-solver"] = Field(
        "ddim", description="ddpm (ancestral), ddim (Song et al. 2020), dpm-solver (++ 2M)."
    )
    steps: int = Field(100, ge=1, description="Sampling steps, at most diffusion.timesteps.")
    eta: float = Field(0.0, ge=0.0, description="ddim: 0 deterministic, 1 like ddpm.")
    spacing: Spacing = Field("trailing", description="Which timesteps the steps visit.")
    variance: Variance = Field("posterior", description="ddpm: beta-tilde or beta.")
    clip_x0: bool = Field(True, description="Clamp the predicted x0 to [-1, 1] at every step.")
    num_images: int = Field(10_000, ge=1, description="Images written (FID wants 10,000+).")
    batch_size: int = Field(256, ge=1, description="Images per forward pass, per process.")
    weights: Literal["ema", "raw"] = Field("ema", description="EMA or the raw trained weights.")
    guidance_scale: float = Field(
        1.0, ge=0.0, description="Conditional models: classifier-free guidance; 1: none."
    )
    classes: list[int] | None = Field(
        None, description="Conditional models: labels used in turn; None: all, balanced."
    )
    grid_images: int = Field(64, ge=1, description="Images in grid.png (the first ones).")
    gif_images: int = Field(16, ge=1, description="Images whose denoising denoising.gif shows.")
    gif_frames: int = Field(40, ge=2, description="Frames of the GIF, at most.")
    interpolation: bool = Field(True, description="Also write interpolation.png (slerp).")
    interpolation_steps: int = Field(10, ge=3, description="Images along the interpolation.")

    @model_validator(mode="after")
    def _check(self) -> SampleParams:
        if self.classes is not None and (not self.classes or min(self.classes) < 0):
            raise ValueError(
                f"sample.classes must be null or class indices >= 0; got {self.classes}"
            )
        return self


class EvaluateParams(Section):
    """Section ``evaluate``: torch-fidelity metrics of the samples against a prepared split."""

    reference_split: Literal["train", "val"] = Field(
        "train", description="The prepared split the samples are compared with."
    )
    fid: bool = Field(True, description="Frechet Inception Distance.")
    isc: bool = Field(True, description="Inception Score.")
    kid: bool = Field(True, description="Kernel Inception Distance.")
    prc: bool = Field(False, description="Precision and recall (VGG16 features).")
    kid_subset_size: int = Field(1000, ge=2, description="KID: images per subset.")
    kid_subsets: int = Field(100, ge=1, description="KID: number of subsets.")
    isc_splits: int = Field(10, ge=1, description="Inception Score: number of splits.")
    batch_size: int = Field(64, ge=1, description="Images per feature-extractor pass.")
    feature_extractor_weights: str = Field(
        "",
        description="Local Inception weights file; empty: torch-fidelity's download "
        "(env DDPM_INCEPTION_WEIGHTS overrides).",
    )
    prc_weights: str = Field(
        "", description="Local VGG16 weights for prc; empty: download (env DDPM_VGG16_WEIGHTS)."
    )


class Params(Section):
    """The whole of params.yaml. Top-level keys are the ones users override most."""

    dataset: DatasetName = "cifar10-cars"
    image_folder: str = Field("", description="Folder of images for dataset=imagefolder.")
    image_size: int = Field(32, ge=4, description="Training resolution in pixels.")
    schedule: ScheduleName = "linear"
    seed: int = Field(0, ge=0)
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    diffusion: DiffusionParams = DiffusionParams()
    train: TrainConfig = TrainConfig()
    ema: EMAConfig = EMAConfig()
    sample: SampleParams = SampleParams()
    evaluate: EvaluateParams = EvaluateParams()

    def unet_config(self, num_classes: int | None = None) -> UNetConfig:
        """The UNet for this experiment; ``num_classes`` from the data when conditional."""
        fields = self.model.model_dump(exclude={"conditional"})
        return UNetConfig(image_size=self.image_size, num_classes=num_classes, **fields)

    def diffusion_config(self) -> DiffusionConfig:
        return DiffusionConfig(schedule=self.schedule, **self.diffusion.model_dump())

    @model_validator(mode="after")
    def _check_data(self) -> Params:
        """Data checks across keys, so a bad combination fails before any stage works."""
        if self.dataset == "imagefolder" and not self.image_folder.strip():
            raise ValueError("dataset=imagefolder needs image_folder: the folder of your images")
        native = NATIVE_SIZES.get(self.dataset)
        if native is not None and self.image_size > native:
            raise ValueError(
                f"image_size={self.image_size} is more than dataset={self.dataset} has: its "
                f"images are {native}x{native}, and upscaling adds no detail; choose "
                f"image_size <= {native} (smaller sizes are downscaled) or another dataset"
            )
        self.unet_config(num_classes=1 if self.model.conditional else None)  # geometry checks
        return self

    def check_sampling(self) -> None:
        """Checks across the sample, evaluate and diffusion sections.

        Run by the sample and evaluate stages before any work, rather than as a validator, so
        that the stages before them do not depend on how the samples will be made.

        Raises:
            ParamsError: naming each key to change.
        """
        s, e, n = self.sample, self.evaluate, self.sample.num_images
        problems = []
        if s.steps > self.diffusion.timesteps:
            problems.append(
                f"sample.steps={s.steps} is more than diffusion.timesteps="
                f"{self.diffusion.timesteps}; choose sample.steps <= {self.diffusion.timesteps}"
            )
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
        if problems:
            raise ParamsError("params.yaml: " + "\n".join(problems))


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


class ParamsError(ValueError):
    """params.yaml is missing, not YAML, or fails validation."""


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
        raise ParamsError(f"{path} is invalid:\n{exc}") from exc
