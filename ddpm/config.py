"""Typed configuration: the model, the diffusion process, training, EMA and sampling.

These are the objects ``params.yaml`` is validated into (``pipeline.settings`` nests them) and
the objects a checkpoint stores, so a model can always be rebuilt from its own checkpoint.
Every check runs when the object is built, before any tensor is made. The defaults are the
DDPM paper's CIFAR-10 experiment as params.yaml states it (a test holds them equal), for
library use; the pipeline itself requires every key in params.yaml and uses none of them.
This module imports pydantic only, so the command line can validate params without torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ddpm.sampling.table import SAMPLERS

ScheduleName = Literal["linear", "cosine", "sigmoid", "dns"]
Prediction = Literal["eps", "x0", "v"]
LossType = Literal["l2", "l1", "hybrid", "vlb"]
AttentionType = Literal["softmax", "linear"]
DownsamplePadding = Literal["asymmetric", "symmetric"]
SamplerName = Literal[tuple(SAMPLERS)]  # the table's rows: ddpm, ddim, dpm-solver, unipc, heun
BH = Literal["bh1", "bh2"]
Spacing = Literal["leading", "linspace", "trailing", "quadratic", "logsnr", "karras"]
Variance = Literal["posterior", "beta", "learned"]
TimestepSampler = Literal["uniform", "loss-second-moment"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UNetConfig(_Frozen):
    """Architecture of :class:`ddpm.unet.UNet`.

    The defaults are the DDPM paper's CIFAR-10 network (Ho et al. 2020, appendix B):
    35.7M parameters.
    """

    image_size: int = Field(32, ge=4, description="Height and width of the images, in pixels.")
    in_channels: int = Field(3, ge=1, description="Channels of the images (3 for RGB).")
    base_channels: int = Field(128, ge=1, description="Channels of the first level.")
    channel_mults: tuple[int, ...] = Field(
        (1, 2, 2, 2), min_length=1, description="Channel multiplier of each resolution level."
    )
    num_res_blocks: int = Field(2, ge=1, description="Residual blocks per level.")
    attention_resolutions: tuple[int, ...] = Field(
        (16,), description="Feature-map sizes (pixels) at which self-attention is applied."
    )
    attention_type: AttentionType = Field(
        "softmax", description="'softmax' (scaled dot-product) or 'linear' (Katharopoulos 2020)."
    )
    num_heads: int = Field(1, ge=1, description="Attention heads.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout in the residual blocks.")
    num_groups: int = Field(32, ge=1, description="GroupNorm groups.")
    norm_eps: float = Field(
        1e-6, gt=0.0, description="GroupNorm epsilon: 1e-6 in the paper's code, 1e-5 in torch's."
    )
    downsample_padding: DownsamplePadding = Field(
        "asymmetric",
        description="Stride-2 downsampling conv: pad only right and bottom by one (the paper's "
        "TF code; diffusers' downsample_padding=0) or one on every side (improved-diffusion).",
    )
    time_freq_shift: float = Field(
        1.0,
        ge=0.0,
        description="Timestep embedding frequencies 10000^(-i / (half - shift)): the paper's code "
        "uses 1 (diffusers' freq_shift), Transformer-style encodings 0.",
    )
    flip_sin_to_cos: bool = Field(
        False,
        description="Timestep embedding as [cos, sin] (improved-diffusion, diffusers' "
        "flip_sin_to_cos) rather than the paper's [sin, cos].",
    )
    time_scale: float = Field(
        1.0,
        gt=0.0,
        description="The network embeds t * time_scale: 1 for the paper; improved-diffusion's "
        "rescale_timesteps is 1000 / T, the timesteps of any T on the scale of 1000.",
    )
    num_classes: int | None = Field(
        None, ge=1, description="Classes for conditioning; None for an unconditional model."
    )
    null_class: bool = Field(
        True,
        description="With num_classes: one more label, num_classes, the null class that "
        "classifier-free guidance trains by label dropout and samples as the unconditional model; "
        "false for models trained without one (improved-diffusion's), which always need a label.",
    )
    scale_shift_norm: bool = Field(
        False,
        description="Residual blocks condition on the timestep by scale and shift after their "
        "second norm, norm(h) (1 + scale) + shift (improved-diffusion, diffusers' scale_shift); "
        "false: by adding the embedding before it (the DDPM paper).",
    )
    learn_sigma: bool = Field(
        False,
        description="Learned variances (Nichol & Dhariwal 2021): twice the output channels, the "
        "second half interpolating log beta-tilde_t and log beta_t; train with loss hybrid.",
    )

    @property
    def out_channels(self) -> int:
        """The network's output channels: the image's, twice with learned variances."""
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map size at each level, from the input down."""
        return tuple(self.image_size // 2**i for i in range(len(self.channel_mults)))

    @model_validator(mode="after")
    def _check_geometry(self) -> UNetConfig:
        depth = len(self.channel_mults) - 1
        if self.image_size % 2**depth:
            raise ValueError(
                f"channel_mults={list(self.channel_mults)} has {depth} downsamplings, so "
                f"image_size must be divisible by {2**depth}; got image_size={self.image_size}. "
                "Use fewer levels or another image size."
            )
        if any(m < 1 for m in self.channel_mults):
            raise ValueError(f"channel_mults must be positive; got {list(self.channel_mults)}")
        unreachable = sorted(set(self.attention_resolutions) - set(self.resolutions))
        if unreachable:
            raise ValueError(
                f"attention_resolutions {unreachable} are never reached; the feature maps are "
                f"{list(self.resolutions)} pixels for image_size={self.image_size} and "
                f"channel_mults={list(self.channel_mults)}"
            )
        for width in {self.base_channels * m for m in self.channel_mults}:
            if width % self.num_groups:
                raise ValueError(
                    f"num_groups={self.num_groups} does not divide {width} channels "
                    f"(base_channels={self.base_channels} x channel_mults); choose a divisor"
                )
            if width % self.num_heads:
                raise ValueError(
                    f"num_heads={self.num_heads} does not divide {width} channels; choose a divisor"
                )
        return self


class DiffusionConfig(_Frozen):
    """The forward process and the training objective."""

    schedule: ScheduleName = Field("linear", description="Noise schedule of beta_t.")
    timesteps: int = Field(1000, ge=2, description="Number of diffusion steps T.")
    prediction: Prediction = Field("eps", description="What the network predicts: eps, x0 or v.")
    loss: LossType = Field(
        "l2",
        description="l2 or l1: the distance between prediction and target (L_simple); hybrid: "
        "l2 + hybrid_lambda L_vlb, the bound training only the learned variances (Nichol & "
        "Dhariwal 2021); vlb: the bound alone.",
    )
    hybrid_lambda: float = Field(
        0.001,
        gt=0.0,
        description="The weight of L_vlb (T times one step's bound term) in the hybrid loss: "
        "0.001 in Nichol & Dhariwal 2021; improved-diffusion without rescale_learned_sigmas "
        "weights the step's term 1, that is 1 / T.",
    )
    min_snr_gamma: float | None = Field(
        None, gt=0.0, description="Min-SNR-gamma loss weighting (Hang et al. 2023); None: off."
    )


class FidConfig(_Frozen):
    """FID and KID during training: the EMA weights sampled with fixed seeds every ``every``
    steps (and at the last step), scored by the caller's scorer (``train(..., scorer=)``)."""

    every: int = Field(
        0, ge=0, description="Steps between evaluations, and one at the last step; 0: off."
    )
    num_images: int = Field(
        1000, ge=2, description="Images sampled at each evaluation, image i from (seed, i)."
    )
    sampler: SamplerName = Field("ddim", description="The sampler of these images.")
    steps: int = Field(50, ge=1, description="Its steps (its other settings: the defaults).")
    batch_size: int = Field(256, ge=1, description="Images per forward pass, per process.")
    reference_split: Literal["train", "val"] = Field(
        "train", description="The prepared split the images are scored against."
    )

    def sampler_config(self) -> SamplerConfig:
        return SamplerConfig(sampler=self.sampler, steps=self.steps)


BestBy = Literal["val_loss", "fid"]


class TrainConfig(_Frozen):
    """The optimisation: what ``ddpm.train.train`` needs beyond the model and the diffusion."""

    steps: int = Field(100_000, ge=1, description="Optimizer steps to train for.")
    batch_size: int = Field(128, ge=1, description="Images per step (per process under DDP).")
    lr: float = Field(2.0e-4, gt=0.0, description="AdamW learning rate after warm-up.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decoupled weight decay.")
    warmup_steps: int = Field(5000, ge=0, description="Linear learning-rate warm-up steps.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="After warm-up: constant, or cosine decay to 0 at `steps`."
    )
    grad_clip: float | None = Field(1.0, gt=0.0, description="Max gradient norm; None: off.")
    hflip: bool = Field(True, description="Random horizontal flips.")
    label_dropout: float = Field(
        0.1, ge=0.0, le=1.0, description="Conditional models: P(label -> null class) for CFG."
    )
    timestep_sampler: TimestepSampler = Field(
        "uniform",
        description="How training draws t: uniform, or loss-second-moment, t drawn by the root "
        "mean square of its last 10 losses and weighted back to an unbiased loss (Nichol & "
        "Dhariwal 2021, sec. 3.3: for diffusion.loss vlb, whose terms differ by orders).",
    )
    val_every: int = Field(5000, ge=1, description="Validation loss every N steps.")
    val_timesteps: int = Field(10, ge=1, description="Fixed timesteps the validation loss uses.")
    val_images: int = Field(750, ge=1, description="Validation images used, at most.")
    checkpoint_every: int = Field(5000, ge=1, description="Write the `last` checkpoint every N.")
    sample_every: int = Field(10_000, ge=1, description="Preview grid from the EMA every N.")
    sample_images: int = Field(64, ge=1, description="Images in each preview grid.")
    sample_steps: int = Field(25, ge=1, description="DDIM steps of the preview grids.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many validations without improvement."
    )
    early_stopping_min_delta: float = Field(0.0, ge=0.0, description="Improvement that counts.")
    fid: FidConfig = Field(default_factory=FidConfig, description="FID during training.")
    best_by: BestBy = Field(
        "val_loss",
        description="What best.pt and early stopping follow: the validation loss (every "
        "val_every steps) or the FID (every fid.every steps; needs fid.every > 0).",
    )
    bf16: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU).")
    compile: bool = Field(False, description="torch.compile the model.")
    channels_last: bool = Field(True, description="channels_last memory format.")
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms.")
    data_budget: float | Literal["auto"] = Field(
        "auto",
        description="GiB of training images held on the device; more are streamed from disk. "
        "auto: a quarter of the free device memory (host RAM on a CPU); 0: always stream.",
    )

    @field_validator("data_budget")
    @classmethod
    def _check_budget(cls, value: float | str) -> float | str:
        if value != "auto" and not value >= 0:
            raise ValueError(f"data_budget must be 'auto' or a number of GiB >= 0; got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_betas(self) -> TrainConfig:
        if not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"adam_betas must lie in [0, 1); got {list(self.adam_betas)}")
        if self.best_by == "fid" and self.fid.every == 0:
            raise ValueError(
                "best_by: fid needs FID during training: set fid.every to a number of steps "
                "(e.g. the val_every), or best_by: val_loss"
            )
        return self


class EMAConfig(_Frozen):
    """The exponential moving average of the weights that :class:`ddpm.ema.EMA` keeps."""

    decay: float = Field(0.9999, ge=0.0, lt=1.0, description="Final EMA decay.")
    warmup: bool = Field(
        True, description="Ramp the decay up as min(decay, (1 + n) / (10 + n)) over updates n."
    )
    update_every: int = Field(1, ge=1, description="Update the average every k training steps.")


class SamplerConfig(_Frozen):
    """One sampler and its settings: what :func:`ddpm.sampling.api.sample` runs.

    Which sampler reads which setting is :data:`ddpm.sampling.table.SAMPLERS`'s to say (and
    nowhere else): a sampler ignores the others, and :meth:`ignored` names those set to
    another value than their default.
    """

    sampler: SamplerName = Field(
        "ddim",
        description="ddpm (ancestral), ddim (Song et al. 2020), dpm-solver (DPM-Solver++, Lu et "
        "al. 2022b), unipc (UniPC, Zhao et al. 2023: a multistep predictor and corrector), heun "
        "(Karras et al. 2022: second order, two network evaluations a step).",
    )
    steps: int = Field(100, ge=1, description="Timesteps visited per image, at most T.")
    # eta > 1 makes sigma^2 exceed 1 - abar_prev at some steps: sqrt of a negative, NaN images.
    eta: float = Field(0.0, ge=0.0, le=1.0, description="0 deterministic, 1 like ddpm.")
    spacing: Spacing = Field(
        "trailing",
        description="Which timesteps the steps visit: leading, linspace, trailing; quadratic "
        "(the DDIM paper's CIFAR-10 steps), logsnr (uniform in log-SNR, DPM-Solver's) or karras "
        "(EDM's sigmas, rho 7), which visit a repeated timestep once, so they may take fewer "
        "network evaluations than steps.",
    )
    variance: Variance = Field(
        "posterior",
        description="beta-tilde (posterior), beta, or the model's learned variance (learned: "
        "models with learn_sigma).",
    )
    order: Literal[1, 2, 3] = Field(
        2,
        description="The multistep order. dpm-solver: 1 is DDIM, 2 DPM-Solver++(2M), 3 its "
        "third-order form (its authors' choice for unconditional models, Lu et al. 2022b). "
        "unipc: UniP's order (1 is DDIM), UniC adds one.",
    )
    lower_order_final: bool = Field(
        True,
        description="dpm-solver: under 15 steps, the step before the last is at most second "
        "order; unipc: at any number of steps, step i of n at most of order n - i (diffusers' "
        "lower_order_final; the last step, to sigma = 0, is always first order).",
    )
    bh: BH = Field(
        "bh2",
        description="UniPC's B(h), bh1 = h or bh2 = e^h - 1 (Zhao et al. 2023, sec. 3.3; "
        "diffusers' default and its advice: bh1 for unconditional models under 10 steps).",
    )
    corrector: bool = Field(
        True,
        description="UniPC's corrector UniC after every step but the last (no extra network "
        "evaluation); false: the predictor UniP alone (diffusers' disable_corrector).",
    )
    clip_x0: bool = Field(True, description="Clamp the predicted x0 to [-1, 1] at every step.")
    guidance_scale: float = Field(
        1.0, ge=0.0, description="Conditional models: classifier-free guidance; 1: none."
    )

    @property
    def label(self) -> str:
        """A short name for tables and logs, e.g. ``ddim-50``."""
        return f"{self.sampler}-{self.steps}"

    @property
    def reads(self) -> tuple[str, ...]:
        """The settings this sampler reads (its row of the table)."""
        return SAMPLERS[self.sampler].settings

    def read_settings(self) -> dict[str, object]:
        """The settings this sampler reads, with their values: what decides its images."""
        return {name: getattr(self, name) for name in ("sampler", *self.reads)}

    def ignored(self, names: set[str] | None = None) -> list[str]:
        """The settings among ``names`` (default: all) set to another value than their default
        that this sampler does not read, one line each: a warning, not an error (a frontier
        point inherits the sample section's settings, whatever its sampler)."""
        fields = type(self).model_fields
        lines = []
        for name in SamplerConfig.model_fields:
            if names is not None and name not in names:
                continue
            value = getattr(self, name)
            if name not in ("sampler", *self.reads) and value != fields[name].default:
                readers = ", ".join(n for n, row in SAMPLERS.items() if name in row.reads)
                lines.append(f"{self.sampler} ignores {name}={value} (read by {readers})")
        return lines

    def problems(
        self,
        num_timesteps: int,
        conditional: bool,
        learns_sigma: bool = False,
        null_class: bool = True,
    ) -> list[str]:
        """What a model with ``num_timesteps`` steps, ``conditional`` or not, with learned
        variances or not, with a null class or not (guidance needs one), cannot do with these
        settings, one line each (the fields are named bare; callers prefix their section).
        The one place these limits are written: params.yaml is checked with them against its
        own diffusion, the sample and frontier stages and the pyfunc against the checkpoint.
        """
        problems = []
        if self.steps > num_timesteps:
            problems.append(
                f"steps={self.steps} is more than T={num_timesteps}, the model's diffusion "
                f"steps; choose steps <= {num_timesteps}"
            )
        if self.guidance_scale != 1.0 and not conditional:
            problems.append(
                f"guidance_scale={self.guidance_scale} needs a class-conditional model; this one "
                "is unconditional: set it to 1.0"
            )
        if self.guidance_scale != 1.0 and conditional and not null_class:
            problems.append(
                f"guidance_scale={self.guidance_scale} needs a null class, which this model was "
                "trained without (improved-diffusion's class-conditional models): set it to 1.0"
            )
        if self.variance == "learned" and not learns_sigma:
            problems.append(
                "variance=learned needs a model with learned variances (model.learn_sigma: "
                "true); this one has fixed ones: choose posterior or beta"
            )
        return problems
