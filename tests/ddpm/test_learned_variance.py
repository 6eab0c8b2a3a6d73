"""Learned variances and the hybrid objective (Nichol & Dhariwal 2021) against formulas written
out here from the paper, on fixed tensors: the loss, its stop-gradient, the ancestral step and
the bound."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from ddpm.config import DiffusionConfig, UNetConfig
from ddpm.diffusion import GaussianDiffusion
from ddpm.generation import image_generators
from ddpm.likelihood import variational_bound
from ddpm.sampling.ancestral import ddpm_step
from ddpm.unet import UNet

T = 50
SHAPE = (3, 3, 4, 4)


def diffusion(loss: str = "hybrid") -> GaussianDiffusion:
    return GaussianDiffusion(DiffusionConfig(schedule="linear", timesteps=T, loss=loss))


class Fixed(torch.nn.Module):
    """Outputs a fixed eps half and a fixed v half whatever its input (parameters, so that
    the gradients of each half can be read)."""

    def __init__(self, eps: torch.Tensor, v: torch.Tensor) -> None:
        super().__init__()
        self.eps, self.v = torch.nn.Parameter(eps.clone()), torch.nn.Parameter(v.clone())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.eps, self.v], dim=1)


def by_hand(x0, noise, t, eps, v) -> tuple[torch.Tensor, torch.Tensor]:
    """(mse, vb in bits/dim) per example, in float64 from the betas: Ho et al. eq. 4-7 and 13,
    Nichol & Dhariwal eq. 15 with frac = (v + 1) / 2 and beta-tilde_0 clipped to beta-tilde_1."""
    betas = torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    x0, noise, eps, v = (a.double() for a in (x0, noise, eps, v))
    mse, vb = [], []
    for b, step in enumerate(t.tolist()):
        a, prev = abar[step], (abar[step - 1] if step > 0 else torch.tensor(1.0).double())
        x_t = a.sqrt() * x0[b] + (1 - a).sqrt() * noise[b]
        x0_hat = (x_t - (1 - a).sqrt() * eps[b]) / a.sqrt()
        c0, ct = (
            prev.sqrt() * betas[step] / (1 - a),
            (1 - betas[step]).sqrt() * (1 - prev) / (1 - a),
        )
        tilde = [betas[s] * (1 - abar[s - 1]) / (1 - abar[s]) for s in range(1, T)]
        log_tilde = math.log(tilde[0]) if step == 0 else math.log(tilde[step - 1])
        frac = (v[b] + 1) / 2
        log_var = frac * math.log(betas[step]) + (1 - frac) * log_tilde
        mean = c0 * x0_hat + ct * x_t
        if step == 0:
            std = (0.5 * log_var).exp()
            p = Normal(mean, std)
            upper, lower = p.cdf(x0[b] + 1 / 255), p.cdf(x0[b] - 1 / 255)
            prob = torch.where(x0[b] < -0.999, upper,
                               torch.where(x0[b] > 0.999, 1 - lower, upper - lower))  # fmt: skip
            vb.append(float(-prob.log().mean()) / math.log(2))
        else:
            true = Normal(c0 * x0[b] + ct * x_t, math.sqrt(tilde[step - 1]))
            model = Normal(mean, (0.5 * log_var).exp())
            vb.append(float(torch.distributions.kl_divergence(true, model).mean()) / math.log(2))
        mse.append(float((eps[b] - noise[b]).pow(2).mean()))
    return torch.tensor(mse, dtype=torch.float64), torch.tensor(vb, dtype=torch.float64)


def fixed_tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = (torch.randint(0, 256, SHAPE, generator=g) / 127.5 - 1).float()
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])  # the open bins
    noise, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    v = torch.rand(SHAPE, generator=g) * 2 - 1
    return x0, noise, eps, v


@pytest.mark.parametrize("loss", ["hybrid", "vlb"])
def test_the_hybrid_and_vlb_losses_are_the_papers(loss):
    x0, noise, eps, v = fixed_tensors()
    t = torch.tensor([0, 7, T - 1])
    terms = diffusion(loss).training_losses(Fixed(eps, v), x0, t, noise)
    mse, vb = by_hand(x0, noise, t, eps, v)
    torch.testing.assert_close(terms["mse"].double(), mse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["vb"].double(), vb, rtol=1e-4, atol=1e-5)
    expected = mse + 0.001 * T * vb if loss == "hybrid" else T * vb
    torch.testing.assert_close(terms["loss"].double(), expected, rtol=1e-4, atol=1e-5)


def test_hybrid_lambda_weights_the_bound_term():
    """improved-diffusion without rescale_learned_sigmas adds the step's term with weight 1:
    hybrid_lambda = 1 / T."""
    x0, noise, eps, v = fixed_tensors()
    t = torch.tensor([0, 7, T - 1])
    config = DiffusionConfig(schedule="linear", timesteps=T, loss="hybrid", hybrid_lambda=1 / T)
    terms = GaussianDiffusion(config).training_losses(Fixed(eps, v), x0, t, noise)
    mse, vb = by_hand(x0, noise, t, eps, v)
    torch.testing.assert_close(terms["loss"].double(), mse + vb, rtol=1e-4, atol=1e-5)


def test_the_hybrid_bound_trains_only_the_variance_and_vlb_trains_both():
    x0, noise, eps, v = fixed_tensors(1)
    t = torch.tensor([3, 20, 40])
    for loss, eps_gets_vb in (("hybrid", False), ("vlb", True)):
        model = Fixed(eps, v)
        diffusion(loss).training_losses(model, x0, t, noise)["vb"].sum().backward()
        assert float(model.v.grad.abs().sum()) > 0
        assert (float(model.eps.grad.abs().sum()) > 0) is eps_gets_vb, loss


@pytest.mark.parametrize(("t", "t_prev"), [(30, 29), (40, 20)])  # a plain and a respaced step
def test_the_learned_step_spans_beta_tilde_to_beta_between_its_two_steps(t, t_prev):
    d = diffusion()
    x0, x_t, noise, _ = fixed_tensors(2)
    fixed = {k: ddpm_step(d, x_t, x0, t, t_prev, noise, k) for k in ("posterior", "beta")}
    ones = torch.ones(SHAPE)
    learned = {k: ddpm_step(d, x_t, x0, t, t_prev, noise, "learned", s * ones)
               for k, s in (("posterior", -1.0), ("beta", 1.0))}  # fmt: skip
    for k in fixed:
        torch.testing.assert_close(learned[k], fixed[k], rtol=1e-5, atol=1e-6)
    abar = d.alphas_cumprod64
    beta = 1 - float(abar[t] / abar[t_prev])
    tilde = beta * float((1 - abar[t_prev]) / (1 - abar[t]))
    middle = ddpm_step(d, x_t, x0, t, t_prev, noise, "learned", torch.zeros(SHAPE))
    # v = 0: the geometric mean of the two variances, so the std is (beta beta-tilde)^(1/4)
    expected = ((beta * tilde) ** 0.25 - tilde**0.5) * noise
    torch.testing.assert_close(middle - fixed["posterior"], expected, rtol=1e-4, atol=1e-5)


class NoSigma(torch.nn.Module):
    def __init__(self, eps: torch.Tensor) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.eps


def test_the_bound_with_learned_variances_at_the_ends_is_the_fixed_ones():
    d = diffusion()
    x0, _, eps, _ = fixed_tensors(3)

    def bound(variance: str, v: float):
        model = Fixed(eps, torch.full(SHAPE, v))
        with torch.no_grad():
            return variational_bound(model, d, x0, stride=4, variance=variance,
                                     generator=image_generators(0, range(3)))  # fmt: skip

    low, high = bound("learned", -1.0), bound("learned", 1.0)
    torch.testing.assert_close(low.total, bound("posterior", 0.0).total)
    # beta's first variance is clipped to beta-tilde_1; a learned one's upper end is beta_0
    torch.testing.assert_close(high.terms[:, 1:], bound("beta", 0.0).terms[:, 1:])
    with pytest.raises(ValueError, match="learned variances"):
        variational_bound(NoSigma(eps), d, x0, variance="learned")


def test_a_unet_with_learned_variances_outputs_twice_the_channels():
    config = UNetConfig(image_size=8, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                        attention_resolutions=(4,), num_groups=8, learn_sigma=True)  # fmt: skip
    out = UNet(config)(torch.randn(2, 3, 8, 8), torch.tensor([1, 5]))
    assert out.shape == (2, 6, 8, 8) and config.out_channels == 6


def test_a_tiny_unet_trained_with_hybrid_learns_a_variance_that_tightens_its_bound(tmp_path):
    """Sixteen 8x8 images, 150 steps of the hybrid objective: the learned variance sits between
    beta-tilde and beta (neither fixed choice) and the same weights' bound is lower with it
    than with either fixed variance (measured: 5.9 against 6.3 for beta and 7.5 for beta-tilde,
    bits/dim; frac = 0.62 at every t)."""
    from tiny import tiny_unet

    from ddpm.config import EMAConfig, TrainConfig
    from ddpm.data.synthetic import make_synthetic
    from ddpm.pixels import to_float
    from ddpm.train import Dataset, Hooks, train

    unet = tiny_unet(image_size=8, base_channels=16, attention_resolutions=(4,), learn_sigma=True)
    config = DiffusionConfig(timesteps=100, loss="hybrid")
    images = torch.from_numpy(make_synthetic(16, 8, seed=1).images)
    steps = TrainConfig(steps=150, batch_size=32, lr=2e-3, warmup_steps=20, hflip=False,
                        val_every=150, val_timesteps=4, checkpoint_every=150,
                        sample_every=10**6)  # fmt: skip
    _, ema, _ = train(unet, config, steps, EMAConfig(decay=0.99), Dataset(images),
                      Dataset(images), checkpoint_dir=tmp_path, progress=False,
                      hooks=Hooks(log=lambda m: None))  # fmt: skip
    d, x0 = GaussianDiffusion(config), to_float(images.permute(0, 3, 1, 2))
    bounds = {
        variance: float(variational_bound(ema.module, d, x0, variance=variance, stride=2,
                                          generator=image_generators(0, range(16))).total.mean())
        for variance in ("learned", "posterior", "beta")
    }  # fmt: skip
    assert bounds["learned"] < min(bounds["posterior"], bounds["beta"]) - 0.1, bounds
    with torch.no_grad():
        t = torch.tensor([1, 10, 50, 90] * 4)
        x_t = d.q_sample(x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)))
        _, v = d.split_output(ema.module(x_t, t), 3)
    frac = float(((v + 1) / 2).mean())  # 0: beta-tilde, 1: beta
    assert 0.15 < frac < 0.85, frac


def test_guidance_mixes_the_eps_half_and_keeps_the_conditional_variance():
    """out = u + s (c - u) on the first C channels; v is the conditional pass's."""
    from ddpm.sampling.denoiser import network_output

    class Labelled(torch.nn.Module):
        null_class = 9

        def forward(self, x, t, y):  # eps half: the label; v half: 10 times it
            lab = y.float().view(-1, 1, 1, 1).expand(-1, 3, *x.shape[2:])
            return torch.cat([lab, 10 * lab], dim=1)

    x, tt, y = torch.zeros(2, 3, 4, 4), torch.tensor([5, 5]), torch.tensor([1, 2])
    out = network_output(Labelled(), x, tt, y, guidance_scale=3.0)
    expected_eps = 9 + 3.0 * (y.float() - 9)  # u = the null class 9, c = the label
    assert out.shape == (2, 6, 4, 4)
    torch.testing.assert_close(out[:, :3], expected_eps.view(-1, 1, 1, 1).expand(-1, 3, 4, 4))
    torch.testing.assert_close(out[:, 3:], 10 * y.float().view(-1, 1, 1, 1).expand(-1, 3, 4, 4))
