import pytest
import torch

from ddpm.config import DiffusionConfig
from ddpm.diffusion import GaussianDiffusion, posterior_coefficients


def make(**kw) -> GaussianDiffusion:
    return GaussianDiffusion(DiffusionConfig(timesteps=kw.pop("timesteps", 100), **kw))


@pytest.mark.parametrize("t", [0, 30, 99])
def test_q_sample_has_the_closed_form_mean_and_variance(t):
    diffusion = make(schedule="cosine")
    gen = torch.Generator().manual_seed(0)
    x0 = torch.tensor([-0.8, 0.0, 0.5]).reshape(1, 3, 1, 1).expand(50_000, 3, 1, 1)
    tt = torch.full((x0.shape[0],), t)
    x_t = diffusion.q_sample(x0, tt, torch.randn(x0.shape, generator=gen))
    abar = diffusion.alphas_cumprod64[t].item()
    torch.testing.assert_close(x_t.mean(0), abar**0.5 * x0[0], atol=0.015, rtol=0)
    torch.testing.assert_close(
        x_t.var(0), torch.full_like(x0[0], 1 - abar), atol=0.015 * (1 - abar) + 1e-4, rtol=0
    )


def test_posterior_equals_bayes_rule_on_gaussians():
    """q(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0): a product of two Gaussians."""
    diffusion = make(schedule="linear", timesteps=50)
    betas = diffusion.betas.double()
    abar = diffusion.alphas_cumprod64
    t = torch.arange(1, 50)
    x0, x_t = torch.linspace(-1, 1, 49).double(), torch.linspace(2, -2, 49).double()
    alpha, abar_prev = 1 - betas[t], abar[t - 1]
    precision = 1 / (1 - abar_prev) + alpha / betas[t]
    mean = (abar_prev.sqrt() / (1 - abar_prev) * x0 + alpha.sqrt() / betas[t] * x_t) / precision
    got = posterior_coefficients(abar[t], abar_prev)
    torch.testing.assert_close(got.coef_x0 * x0 + got.coef_xt * x_t, mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.variance, 1 / precision, rtol=1e-6, atol=0)


def test_posterior_to_the_clean_data_returns_x0():
    """From t = 0 to the data (abar_{-1} = 1): mean x0, no variance."""
    abar_0 = make().alphas_cumprod64[0]
    got = posterior_coefficients(abar_0, torch.tensor(1.0, dtype=torch.float64))
    assert (float(got.coef_x0), float(got.coef_xt), float(got.variance)) == (1.0, 0.0, 0.0)


def test_eps_x0_v_conversions_round_trip():
    diffusion = make(timesteps=1000)
    gen = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(16, 3, 8, 8, generator=gen), torch.randn(16, 3, 8, 8, generator=gen)
    t = torch.linspace(0, 900, 16).long()
    x_t = diffusion.q_sample(x0, t, eps)
    v = diffusion.predict_v(x0, t, eps)
    torch.testing.assert_close(diffusion.predict_x0_from_eps(x_t, t, eps), x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(diffusion.predict_eps_from_x0(x_t, t, x0), eps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(diffusion.predict_x0_from_v(x_t, t, v), x0, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_split_prediction_inverts_the_training_target(prediction):
    diffusion = make(prediction=prediction, timesteps=1000)
    gen = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(8, 3, 4, 4, generator=gen), torch.randn(8, 3, 4, 4, generator=gen)
    t = torch.linspace(0, 800, 8).long()
    x_t = diffusion.q_sample(x0, t, eps)
    got_x0, got_eps = diffusion.split_prediction(diffusion.target(x0, t, eps), x_t, t)
    torch.testing.assert_close(got_x0, x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(got_eps, eps, atol=2e-4, rtol=1e-4)


def test_clip_x0_keeps_eps_consistent_with_x_t():
    diffusion = make()
    x_t, t = torch.randn(4, 1, 2, 2) * 3, torch.full((4,), 5)
    x0, eps = diffusion.split_prediction(torch.randn(4, 1, 2, 2) * 5, x_t, t, clip_x0=True)
    assert x0.abs().max() <= 1
    torch.testing.assert_close(diffusion.q_sample(x0, t, eps), x_t, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("prediction", "factor"), [("x0", 0), ("eps", 1), ("v", 2)])
def test_min_snr_weights_give_min_snr_gamma_on_the_x0_scale(prediction, factor):
    """An eps loss is snr times an x0 loss, a v loss (snr + 1) times: weights undo that."""
    gamma = 5.0
    diffusion = make(prediction=prediction, min_snr_gamma=gamma, timesteps=1000)
    t = torch.arange(0, 1000, 37)
    snr = diffusion.snr[t]
    scale = [torch.ones_like(snr), snr, snr + 1][factor]
    torch.testing.assert_close(diffusion.loss_weight(t) * scale, snr.clamp(max=gamma))
    assert bool((make(prediction=prediction).loss_weight(t) == 1).all())


class Offset(torch.nn.Module):
    """A 'network' whose output is the true target plus a constant, for exact loss values."""

    def __init__(self, diffusion, x0, noise, offset):
        super().__init__()
        self.diffusion, self.x0, self.noise, self.offset = diffusion, x0, noise, offset

    def forward(self, x_t, t):
        return self.diffusion.target(self.x0, t, self.noise) + self.offset


@pytest.mark.parametrize(("loss", "expected"), [("l2", 0.25), ("l1", 0.5)])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_training_loss_measures_distance_to_the_target(loss, expected, prediction):
    diffusion = make(loss=loss, prediction=prediction)
    x0, noise = torch.rand(3, 3, 4, 4) * 2 - 1, torch.randn(3, 3, 4, 4)
    t = torch.tensor([0, 50, 99])
    model = Offset(diffusion, x0, noise, -0.5)
    terms = diffusion.training_losses(model, x0, t, noise)
    assert set(terms) == {"mse", "loss"} and terms["loss"].shape == (3,)
    torch.testing.assert_close(terms["loss"], torch.full((3,), expected))
    assert terms["mse"] is terms["loss"]


def test_sample_timesteps_is_uniform_and_seeded():
    diffusion = make(timesteps=10)
    t1 = diffusion.sample_timesteps(20_000, "cpu", torch.Generator().manual_seed(3))
    t2 = diffusion.sample_timesteps(20_000, "cpu", torch.Generator().manual_seed(3))
    assert torch.equal(t1, t2)
    counts = torch.bincount(t1, minlength=10).float()
    assert counts.shape == (10,) and bool((counts - 2000).abs().max() < 200)
