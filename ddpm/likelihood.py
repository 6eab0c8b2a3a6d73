"""The variational bound on the negative log-likelihood, in bits per dimension.

Ho et al. 2020, eq. 5: -log p(x0) <= L = L_T + sum_{t>1} L_{t-1} + L_0, with
- L_T = KL(q(x_T | x0) || N(0, I)), the prior term;
- L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)), two Gaussians (eq. 6-7);
- L_0 = -log p(x0 | x1), a Gaussian discretised to the 256 pixel values (eq. 13): data in
  [-1, 1], bins of width 2/255, the first and last bins open to -inf and +inf.

Every term is averaged over dimensions and divided by ln 2 (bits per dimension). The definition
and edge cases are improved-diffusion's ``calc_bpd_loop`` (Nichol & Dhariwal 2021): one noise
draw per image and step, the posterior's log-variance clipped at the first step (its variance
there, 0, is replaced by the second step's), and with the variance beta its first entry is also
that beta-tilde. The normal CDF is exact here (``torch.special.ndtr``) where improved-diffusion
uses a tanh approximation.

``stride`` k > 1 bounds the likelihood of the strided chain over the kept steps 0, k, 2k, ..
(improved-diffusion's respacing): its betas are recomputed from alpha-bar on the kept steps, so
it is a valid bound of a shorter Markov chain, looser than the full one and k times cheaper.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from ddpm.config import Variance
from ddpm.diffusion import GaussianDiffusion, posterior_coefficients
from ddpm.gaussians import LN2, clipped_log, learned_log_variance, mean_flat, normal_kl, vb_bits
from ddpm.noise import Generators, randn


class Chain(NamedTuple):
    """The (strided) forward chain the bound runs on, float64 tables indexed by kept step."""

    steps: list[int]  # the kept timesteps of the diffusion: 0, k, 2k, ..
    abar: torch.Tensor  # alpha-bar at each kept step
    coef_x0: torch.Tensor  # the posterior mean's coefficients (Ho et al. 2020, eq. 7)
    coef_xt: torch.Tensor
    log_variance: dict[str, torch.Tensor]  # posterior (clipped) and beta: log sigma^2
    log_beta: torch.Tensor  # log beta, unclipped: the upper end of a learned variance


def strided_chain(diffusion: GaussianDiffusion, stride: int = 1) -> Chain:
    """The chain over timesteps 0, stride, 2 stride, .. < T, with beta_i = 1 - abar_i /
    abar_{i-1} recomputed on it (abar_{-1} = 1); stride 1 is the diffusion itself."""
    if not 1 <= stride <= diffusion.num_timesteps - 1:
        raise ValueError(
            f"stride={stride}: choose 1 (the exact bound) to {diffusion.num_timesteps - 1}"
        )
    steps = list(range(0, diffusion.num_timesteps, stride))
    abar = diffusion.alphas_cumprod64[steps]
    abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    betas = 1 - abar / abar_prev
    post = posterior_coefficients(abar, abar_prev)  # beta-tilde is 0 at the first step
    large = torch.cat([post.variance[1:2], betas[1:]])
    return Chain(
        steps=steps,
        abar=abar,
        coef_x0=post.coef_x0,
        coef_xt=post.coef_xt,
        log_variance={"posterior": clipped_log(post.variance), "beta": large.log()},
        log_beta=betas.log(),
    )


class Bound(NamedTuple):
    """The bound of each image, in bits per dimension, and its parts."""

    total: torch.Tensor  # (B,): prior + the sum of terms
    terms: torch.Tensor  # (B, n): per kept step, ascending; terms[:, 0] is the decoder's
    prior: torch.Tensor  # (B,)

    @property
    def decoder(self) -> torch.Tensor:
        """(B,): -log p(x0 | x1) in bits per dimension."""
        return self.terms[:, 0]


def prior_bpd(chain: Chain, x0: torch.Tensor) -> torch.Tensor:
    """KL(q(x_T | x0) || N(0, I)) in bits per dimension, x_T at the chain's last step. (B,)"""
    abar, x0 = float(chain.abar[-1]), x0.double()  # float64: the KL is tiny, its terms not
    mean, logvar = math.sqrt(abar) * x0, torch.full_like(x0, math.log1p(-abar))
    return mean_flat(normal_kl(mean, logvar, torch.zeros_like(x0), torch.zeros_like(x0))) / LN2


def step_bpd(
    chain: Chain,
    i: int,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    x0_pred: torch.Tensor,
    variance: Variance,
    v: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_{i-1} of kept step i in bits per dimension, given the model's x0 prediction at x_t
    (and, for a learned variance, its output v): the Gaussian KL from the true posterior for
    i >= 1, the decoder's NLL for i = 0. (B,)"""
    low = float(chain.log_variance["posterior"][i])
    if variance == "learned":
        if v is None:
            raise ValueError("variance='learned' needs a model with learned variances")
        model_logvar = learned_log_variance(v, low, float(chain.log_beta[i]))
    else:
        model_logvar = torch.full_like(x0, float(chain.log_variance[variance][i]))
    cx0, cxt = float(chain.coef_x0[i]), float(chain.coef_xt[i])
    return vb_bits(x0, x_t, x0_pred, cx0, cxt, low, model_logvar, first=i == 0)


@torch.no_grad()
def variational_bound(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    *,
    stride: int = 1,
    variance: Variance = "posterior",
    clip_x0: bool = True,
    y: torch.Tensor | None = None,
    generator: Generators = None,
    on_step: Callable[[], None] | None = None,
) -> Bound:
    """The bound on -log p(x0) of each image of x0 (B, C, H, W) in [-1, 1], in bits/dim.

    One network evaluation per kept step and image (``on_step`` is called after each), from
    the last step down; each step draws its own noise for x_t ~ q(x_t | x0) from ``generator``
    (one per image gives every image the same bound whatever its batch). The predicted x0 is
    clamped to [-1, 1] with ``clip_x0``, as the samplers do.
    """
    chain = strided_chain(diffusion, stride)
    x0 = x0.float()
    terms = torch.zeros(x0.shape[0], len(chain.steps), dtype=torch.float64, device=x0.device)
    for i in reversed(range(len(chain.steps))):
        t = torch.full((x0.shape[0],), chain.steps[i], device=x0.device, dtype=torch.long)
        x_t = diffusion.q_sample(x0, t, randn(tuple(x0.shape), generator, x0.device))
        out = model(x_t, t) if y is None else model(x_t, t, y)
        out, v = diffusion.split_output(out.float(), x0.shape[1])
        x0_pred, _ = diffusion.split_prediction(out, x_t, t, clip_x0=clip_x0)
        terms[:, i] = step_bpd(chain, i, x0, x_t, x0_pred, variance, v).double()
        if on_step is not None:
            on_step()
    prior = prior_bpd(chain, x0).double()
    return Bound(total=terms.sum(dim=1) + prior, terms=terms, prior=prior)
