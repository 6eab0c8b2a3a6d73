"""The variational bound's terms against closed forms, and the bound of a perfect denoiser."""

from __future__ import annotations

import math

import pytest
import torch
from smooth import Smooth
from torch.distributions import Normal, kl_divergence

from ddpm.config import DiffusionConfig
from ddpm.diffusion import GaussianDiffusion, posterior_coefficients
from ddpm.gaussians import discretized_gaussian_log_likelihood, normal_kl
from ddpm.generation import image_generators
from ddpm.likelihood import strided_chain, variational_bound

DIFFUSION = GaussianDiffusion(DiffusionConfig(schedule="linear", timesteps=50))
VALUES = torch.arange(256, dtype=torch.float32) / 127.5 - 1  # the 256 pixel values on [-1, 1]


def phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_the_gaussian_kl_is_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = (torch.randn(100, generator=g) for _ in range(4))
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-5, atol=1e-6)
    assert float(normal_kl(m1, lv1, m1, lv1).abs().max()) < 1e-6


@pytest.mark.parametrize(("mean", "log_scale"), [(0.0, -3.0), (0.37, -1.0), (-0.99, -5.0),
                                                 (0.2, 1.5), (2.0, -2.0)])  # fmt: skip
def test_the_decoder_gives_the_256_values_probabilities_that_sum_to_one(mean, log_scale):
    log_p = discretized_gaussian_log_likelihood(
        torch.arange(256, dtype=torch.float64) / 127.5 - 1,  # (float32 values leave gaps)
        torch.tensor(mean, dtype=torch.float64),
        torch.tensor(log_scale, dtype=torch.float64),
    )
    assert float(log_p.exp().sum()) == pytest.approx(1.0, abs=1e-9)
    # the inner bin nearest the mean and the two open ones, from the CDF
    s, k = math.exp(log_scale), min(max(round((mean + 1) * 127.5), 1), 254)
    x = k / 127.5 - 1
    inner = phi((x + 1 / 255 - mean) / s) - phi((x - 1 / 255 - mean) / s)
    assert float(log_p[k].exp()) == pytest.approx(inner, rel=1e-6, abs=1e-12)
    assert float(log_p[0].exp()) == pytest.approx(phi((-1 + 1 / 255 - mean) / s), rel=1e-6)
    assert float(log_p[-1].exp()) == pytest.approx(1 - phi((1 - 1 / 255 - mean) / s), rel=1e-6)


@pytest.mark.parametrize("stride", [1, 7])
def test_the_chain_is_the_posterior_of_its_kept_steps(stride):
    chain = strided_chain(DIFFUSION, stride)
    assert chain.steps == list(range(0, 50, stride))
    abar = DIFFUSION.alphas_cumprod64
    for i in range(1, len(chain.steps)):
        post = posterior_coefficients(abar[chain.steps[i]], abar[chain.steps[i - 1]])
        assert float(chain.coef_x0[i]) == pytest.approx(float(post.coef_x0), rel=1e-12)
        assert float(chain.coef_xt[i]) == pytest.approx(float(post.coef_xt), rel=1e-12)
        assert math.exp(chain.log_variance["posterior"][i]) == pytest.approx(float(post.variance))
        beta = 1 - float(abar[chain.steps[i]] / abar[chain.steps[i - 1]])
        assert math.exp(chain.log_variance["beta"][i]) == pytest.approx(beta, rel=1e-12)
    # the first step's variance, 0 for the posterior, is clipped to the second's; beta too
    first = chain.log_variance["posterior"][1]
    assert chain.log_variance["posterior"][0] == first == chain.log_variance["beta"][0]
    assert (float(chain.coef_x0[0]), float(chain.coef_xt[0])) == (1.0, 0.0)


@pytest.mark.parametrize("stride", [0, 50])
def test_a_stride_outside_the_chain_is_refused(stride):
    with pytest.raises(ValueError, match="stride"):
        strided_chain(DIFFUSION, stride)


class PerfectDenoiser(torch.nn.Module):
    """Knows the one image of its data set: outputs the exact eps of x_t."""

    def __init__(self, image: torch.Tensor) -> None:
        super().__init__()
        self.image = image

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = DIFFUSION.alphas_cumprod64[t].float().view(-1, 1, 1, 1)
        return (x_t - abar.sqrt() * self.image) / (1 - abar).sqrt()


def test_the_bound_of_a_perfect_denoiser_is_its_prior_and_decoder_terms():
    """Every KL term vanishes when the model knows x0; what is left is the prior's KL and the
    decoder's NLL, both in closed form (a Gaussian around x0 itself, std sqrt(beta-tilde_1))."""
    g = torch.Generator().manual_seed(1)
    image = VALUES[torch.randint(0, 256, (1, 3, 4, 4), generator=g)]
    image[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])  # both open bins too
    bound = variational_bound(PerfectDenoiser(image), DIFFUSION, image.expand(2, -1, -1, -1),
                              generator=torch.Generator().manual_seed(2))  # fmt: skip
    assert float(bound.terms[:, 1:].abs().max()) < 1e-5
    abar_T = float(DIFFUSION.alphas_cumprod64[-1])
    prior = 0.5 * (abar_T * image.double() ** 2 + (1 - abar_T) - 1 - math.log(1 - abar_T))
    assert bound.prior.tolist() == pytest.approx([float(prior.mean()) / math.log(2)] * 2)
    s = math.sqrt(math.exp(float(strided_chain(DIFFUSION).log_variance["posterior"][1])))
    half = 1 / 255 / s  # each bin, around the mean itself, is +-half in standard deviations
    p = [1 - phi(-half) if x > 0.999 else phi(half) if x < -0.999 else phi(half) - phi(-half)
         for x in image.flatten().tolist()]  # fmt: skip
    decoder = -sum(math.log(q) for q in p) / len(p) / math.log(2)
    assert bound.decoder.tolist() == pytest.approx([decoder] * 2, rel=1e-4)
    torch.testing.assert_close(bound.total, bound.prior + bound.decoder, rtol=1e-5, atol=1e-5)


def test_an_image_has_the_same_bound_in_any_batch_and_a_stride_costs_a_kth():
    x0 = VALUES[torch.randint(0, 256, (4, 3, 4, 4), generator=torch.Generator().manual_seed(3))]
    calls = []
    whole = variational_bound(Smooth(50), DIFFUSION, x0, stride=5, variance="beta",
                              generator=image_generators(0, range(4)),
                              on_step=lambda: calls.append(1))  # fmt: skip
    assert len(calls) == 10 and whole.terms.shape == (4, 10)
    last = variational_bound(Smooth(50), DIFFUSION, x0[3:], stride=5, variance="beta",
                             generator=image_generators(0, [3]))  # fmt: skip
    torch.testing.assert_close(last.total, whole.total[3:])
    assert bool(torch.isfinite(whole.total).all()) and bool((whole.total > 0).all())
    posterior = variational_bound(Smooth(50), DIFFUSION, x0, stride=5,
                                  generator=image_generators(0, range(4)))  # fmt: skip
    assert not torch.allclose(posterior.total, whole.total)  # the variance matters
