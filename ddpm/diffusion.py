"""The Gaussian diffusion maths, in one place, shared by training and every sampler.

Notation (Ho et al. 2020; Salimans & Ho 2022 for v):

=================  ==========================================================================
``x0``             clean data, scaled to [-1, 1]                                 (B, C, H, W)
``x_t``            noised data at step t: sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (B, C, H, W)
``t``              integer timesteps, 0-based: t = 0 is the first noising step   (B,)
``eps``            the standard normal noise of q_sample                         (B, C, H, W)
``v``              sqrt(abar_t) eps - sqrt(1 - abar_t) x0                        (B, C, H, W)
``betas``          beta_t, the variance of step t                                (T,)
``alphas_cumprod`` abar_t = prod_{s <= t} (1 - beta_s)                           (T,)
``snr``            abar_t / (1 - abar_t)                                         (T,)
=================  ==========================================================================

Tables are computed in float64 and stored as float32 buffers, read through :func:`extract`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ddpm.config import DiffusionConfig
from ddpm.gaussians import clipped_log, learned_log_variance, mean_flat, vb_bits
from ddpm.schedules import make_betas


def extract(table: torch.Tensor, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """table[t] reshaped to broadcast against a batch of ``shape``: (B,) -> (B, 1, ..., 1)."""
    assert t.ndim == 1 and t.shape[0] == shape[0], (t.shape, shape)
    return table.gather(0, t).reshape(-1, *([1] * (len(shape) - 1)))


class Posterior(NamedTuple):
    """q(x_{t_prev} | x_t, x0): mean = coef_x0 * x0 + coef_xt * x_t, and its variance."""

    coef_x0: torch.Tensor
    coef_xt: torch.Tensor
    variance: torch.Tensor


def posterior_coefficients(abar_t: torch.Tensor, abar_prev: torch.Tensor) -> Posterior:
    """Ho et al. 2020, eq. 6-7, between any two steps of the chain (respacing included).

    With alpha = abar_t / abar_prev and beta = 1 - alpha (the respaced beta of Nichol & Dhariwal
    2021, sec. 4; the plain beta_t when t_prev = t - 1):
    mean = sqrt(abar_prev) beta / (1 - abar_t) x0 + sqrt(alpha) (1 - abar_prev) / (1 - abar_t) x_t,
    variance = beta (1 - abar_prev) / (1 - abar_t).
    """
    alpha = abar_t / abar_prev
    beta = 1 - alpha
    return Posterior(
        coef_x0=abar_prev.sqrt() * beta / (1 - abar_t),
        coef_xt=alpha.sqrt() * (1 - abar_prev) / (1 - abar_t),
        variance=beta * (1 - abar_prev) / (1 - abar_t),
    )


class GaussianDiffusion(nn.Module):
    """Forward process, posterior, parameterisation conversions and the training loss.

    An ``nn.Module`` only so that its tables follow ``.to(device)``; it has no parameters.
    """

    def __init__(self, config: DiffusionConfig | None = None) -> None:
        super().__init__()
        self.config = config or DiffusionConfig()
        betas = make_betas(self.config.schedule, self.config.timesteps)  # float64 (T,)
        abar = torch.cumprod(1 - betas, dim=0)
        self.alphas_cumprod64 = abar  # a CPU float64 copy for the samplers' scalar lookups
        abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
        post = posterior_coefficients(abar, abar_prev)  # q(x_{t-1} | x_t, x0); variance 0 at t=0
        tables = {
            "betas": betas,
            "alphas_cumprod": abar,
            "sqrt_alphas_cumprod": abar.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - abar).sqrt(),
            "snr": abar / (1 - abar),
            "posterior_coef_x0": post.coef_x0,
            "posterior_coef_xt": post.coef_xt,
            # log beta-tilde with its 0 at t = 0 replaced by beta-tilde_1 (improved-diffusion's
            # clipping), and log beta: the two ends of a learned variance
            "posterior_log_variance": clipped_log(post.variance),
            "log_betas": betas.log(),
        }
        for name, table in tables.items():
            self.register_buffer(name, table.float(), persistent=False)

    @property
    def num_timesteps(self) -> int:
        return self.config.timesteps

    # Forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I) (Ho et al. eq. 4)."""
        assert x0.shape == noise.shape, (x0.shape, noise.shape)
        return (
            extract(self.sqrt_alphas_cumprod, t, x0.shape) * x0
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise
        )

    # Conversions between parameterisations
    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor):
        """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return (x_t - extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * eps) / extract(
            self.sqrt_alphas_cumprod, t, x_t.shape
        )

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor):
        """eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""
        return (x_t - extract(self.sqrt_alphas_cumprod, t, x_t.shape) * x0) / extract(
            self.sqrt_one_minus_alphas_cumprod, t, x_t.shape
        )

    def predict_v(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022, sec. 4)."""
        return (
            extract(self.sqrt_alphas_cumprod, t, x0.shape) * eps
            - extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * x0
        )

    def predict_x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor):
        """x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
        return (
            extract(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
            - extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v
        )

    def split_prediction(
        self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_x0: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) implied by the network output, whatever it predicts.

        With ``clip_x0`` the predicted x0 is clamped to [-1, 1] and eps recomputed from it, so
        both stay consistent with x_t.
        """
        kind = self.config.prediction
        if kind == "eps":
            eps, x0 = model_out, self.predict_x0_from_eps(x_t, t, model_out)
        elif kind == "x0":
            x0, eps = model_out, self.predict_eps_from_x0(x_t, t, model_out)
        else:
            x0 = self.predict_x0_from_v(x_t, t, model_out)
            eps = self.predict_eps_from_x0(x_t, t, x0)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = self.predict_eps_from_x0(x_t, t, x0)
        return x0, eps

    # Training objective
    def sample_timesteps(
        self, batch: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """t ~ Uniform{0, .., T-1}, shape (B,)."""
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=gen_device)
        return t.to(device)

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output for the configured prediction type."""
        kind = self.config.prediction
        if kind == "eps":
            return noise
        if kind == "x0":
            return x0
        return self.predict_v(x0, t, noise)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weights (Hang et al. 2023, eq. 9 and sec. 3.4), ones when off. (B,)"""
        gamma = self.config.min_snr_gamma
        if gamma is None:
            return torch.ones(t.shape, device=t.device)
        snr = self.snr[t]
        clipped = snr.clamp(max=gamma)
        # The weight min(snr, gamma) is defined for an x0 loss; eps and v losses equal the x0
        # loss times snr and snr + 1, so their weights divide by those factors.
        divisor = {"x0": torch.ones_like(snr), "eps": snr, "v": snr + 1}[self.config.prediction]
        return clipped / divisor

    # Learned variances (Nichol & Dhariwal 2021)
    @staticmethod
    def split_output(out: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the prediction, v or None): a network with learned variances outputs twice the
        image's ``channels``, its second half v in [-1, 1] (a tanh-free raw output, as in
        improved-diffusion)."""
        if out.shape[1] == 2 * channels:
            return out[:, :channels], out[:, channels:]
        return out, None

    def model_log_variance(self, t: torch.Tensor, v: torch.Tensor | None, shape) -> torch.Tensor:
        """log Sigma_theta(x_t, t): learned from v (:func:`ddpm.gaussians.learned_log_variance`),
        or, for a fixed-variance model, the clipped log beta-tilde."""
        low = extract(self.posterior_log_variance, t, shape)
        if v is None:
            return low.expand(shape)
        return learned_log_variance(v, low, extract(self.log_betas, t, shape))

    def vb_bits(
        self,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        x0_pred: torch.Tensor,
        log_variance: torch.Tensor,
    ) -> torch.Tensor:
        """The bound's term L_{t-1} of each example in bits per dimension (B,): the Gaussian KL
        from q(x_{t-1} | x_t, x0) to the model's N(mean(x0_pred), e^log_variance) where t > 0,
        the discretised decoder's -log p(x0 | x1) where t = 0 (Ho et al. 2020, eq. 5)."""
        shape = x0.shape
        return vb_bits(
            x0, x_t, x0_pred,
            extract(self.posterior_coef_x0, t, shape), extract(self.posterior_coef_xt, t, shape),
            extract(self.posterior_log_variance, t, shape), log_variance,
            first=t == 0,
        )  # fmt: skip

    def training_losses(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        y: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The per-example terms, each (B,): ``mse``, the weighted mean over pixels of
        |f(x_t, t) - target|^p (p = 1 for loss l1), ``vb``, the bound's term at t in bits/dim
        (hybrid and vlb only), and ``loss``, what training minimises:

        - l2, l1: mse (L_simple, Ho et al. 2020, eq. 14);
        - hybrid: mse + lambda T vb, lambda = ``hybrid_lambda`` (0.001), with the mean in vb
          detached so that the bound trains only the variance (Nichol & Dhariwal 2021, eq. 16);
        - vlb: T vb, an unbiased estimate of the whole bound L_vlb.
        """
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, t) if y is None else model(x_t, t, y)
        out, v = self.split_output(out.float(), x0.shape[1])
        target = self.target(x0, t, noise)
        if self.config.loss == "l1":
            per_pixel = F.l1_loss(out, target, reduction="none")
        else:
            per_pixel = F.mse_loss(out, target, reduction="none")
        terms = {"mse": mean_flat(per_pixel) * self.loss_weight(t)}
        if self.config.loss in ("l2", "l1"):
            return terms | {"loss": terms["mse"]}
        hybrid = self.config.loss == "hybrid"
        x0_pred, _ = self.split_prediction(out.detach() if hybrid else out, x_t, t)
        log_variance = self.model_log_variance(t, v, x0.shape)
        terms["vb"] = self.vb_bits(x0, x_t, t, x0_pred, log_variance)
        T = self.num_timesteps
        lam = self.config.hybrid_lambda
        loss = terms["mse"] + lam * T * terms["vb"] if hybrid else T * terms["vb"]
        return terms | {"loss": loss}
