"""The model wrapped once for sampling: guidance, the eps / x0 / v prediction turned into
(x0, eps), x0 clipping and the learned-variance half. Every stepper sees only this."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ddpm.diffusion import GaussianDiffusion


def network_output(
    model: nn.Module,
    x_t: torch.Tensor,
    tt: torch.Tensor,
    y: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """The network's float output at the timesteps ``tt`` (B,) for the batch x_t (B, C, H, W).

    Classifier-free guidance (Ho & Salimans 2022, eq. 6): out = u + s (c - u), with c the
    output for labels y and u for the null class, both from one batched forward pass. A model
    with learned variances (twice C channels) is guided on its first half; the variance half
    is the conditional one (as GLIDE does).
    """
    if y is None:
        return model(x_t, tt).float()
    if guidance_scale == 1.0:
        return model(x_t, tt, y).float()
    if model.null_class is None:
        raise ValueError(
            f"guidance_scale={guidance_scale} needs a null class, which this model was trained "
            "without (improved-diffusion's class-conditional models): use 1.0"
        )
    null = torch.full_like(y, model.null_class)
    both = model(torch.cat([x_t, x_t]), torch.cat([tt, tt]), torch.cat([y, null]))
    cond, uncond = both.float().chunk(2)
    channels = x_t.shape[1]
    guided = uncond[:, :channels] + guidance_scale * (cond[:, :channels] - uncond[:, :channels])
    if cond.shape[1] == channels:  # fixed variances: the guided output is the whole of it
        return guided
    return torch.cat([guided, cond[:, channels:]], dim=1)


class Prediction(NamedTuple):
    """What the denoiser says of x_t: x0 and eps (consistent with x_t, after any clipping),
    and v, the learned-variance half of the output (None for fixed variances)."""

    x0: torch.Tensor
    eps: torch.Tensor
    v: torch.Tensor | None


class Denoiser:
    """``denoiser(x_t, t)``: the :class:`Prediction` at the integer step ``t`` for the batch
    x_t (B, C, H, W), with guidance when labels and a scale are given."""

    def __init__(
        self,
        model: nn.Module,
        diffusion: GaussianDiffusion,
        y: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        clip_x0: bool = True,
    ) -> None:
        self.model, self.diffusion, self.y = model, diffusion, y
        self.guidance_scale, self.clip_x0 = guidance_scale, clip_x0

    def __call__(self, x_t: torch.Tensor, t: int) -> Prediction:
        tt = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        output = network_output(self.model, x_t, tt, self.y, self.guidance_scale)
        out, v = self.diffusion.split_output(output, x_t.shape[1])
        x0, eps = self.diffusion.split_prediction(out, x_t, tt, clip_x0=self.clip_x0)
        return Prediction(x0, eps, v)


def predict_with_variance(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    x_t: torch.Tensor,
    t: int,
    y: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    clip_x0: bool = True,
) -> Prediction:
    """(x0, eps, v) predicted at step ``t``: one call of a :class:`Denoiser`."""
    return Denoiser(model, diffusion, y, guidance_scale, clip_x0)(x_t, t)


def predict(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    x_t: torch.Tensor,
    t: int,
    y: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    clip_x0: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) predicted at step ``t`` for the whole batch x_t (B, C, H, W)."""
    x0, eps, _ = predict_with_variance(model, diffusion, x_t, t, y, guidance_scale, clip_x0)
    return x0, eps
