"""End to end through the library: the training loop memorises four images, and DDIM finds them.

The model predicts x0 rather than the default eps. Trained for a few hundred steps on eps, a
tiny UNet generalises between the images instead of memorising them: its x0 estimate
(x_t - sqrt(1 - abar) eps) / sqrt(abar) magnifies small eps errors at low SNR, and DDIM samples
end up between images (measured: rms distances up to about 0.3 after 1,000 steps). Predicting x0
memorises the images within a few hundred steps.

The x0 loss cannot fall tenfold from the untrained model's, because at high noise no model can
tell the images apart: its floor is the loss of the Bayes-optimal denoiser E[x0 | x_t], which
has a closed form for four images. So the test checks that the loss above that floor falls
tenfold.
"""

import torch
from tiny import tiny_unet

from ddpm.config import DiffusionConfig, EMAConfig, TrainConfig
from ddpm.data.synthetic import make_synthetic
from ddpm.diffusion import GaussianDiffusion
from ddpm.generation import image_generators
from ddpm.likelihood import variational_bound
from ddpm.pixels import to_float
from ddpm.sampling.api import ddim_sample, dpm_solver_sample, unipc_sample
from ddpm.train import Dataset, Hooks, train, validation_loss
from ddpm.unet import UNet

UNET = tiny_unet(image_size=8, base_channels=32, attention_resolutions=(4,))
DIFFUSION = DiffusionConfig(timesteps=100, prediction="x0")
TRAIN = TrainConfig(
    steps=800,  # worst sample 0.055 from its image (the gap is 0.62); at 500, 0.18 to 0.30
    batch_size=32,
    lr=3e-3,
    warmup_steps=25,
    lr_schedule="cosine",
    hflip=False,  # memorise the four images themselves, not their mirror images too
    val_every=800,
    val_timesteps=20,
    checkpoint_every=800,
    sample_every=10_000,
)


def distinct_images(count: int) -> torch.Tensor:
    """``count`` synthetic 8x8 images (uint8, N H W C), far apart: farthest-point picks of 64."""
    pool = torch.from_numpy(make_synthetic(64, UNET.image_size, seed=1).images)
    flat = to_float(pool).flatten(1)
    dist = torch.cdist(flat, flat)
    picks = [0]
    while len(picks) < count:
        picks.append(int(dist[picks].min(0).values.argmax()))
    return pool[picks]


class BayesDenoiser(torch.nn.Module):
    """The x0 prediction with the least possible loss when the data are exactly ``images``:
    E[x0 | x_t] = sum_i softmax_i(-|x_t - sqrt(abar_t) x_i|^2 / (2 (1 - abar_t))) x_i."""

    def __init__(self, images: torch.Tensor, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.images, self.abar = images.double(), alphas_cumprod.double()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.abar[t].view(-1, 1)
        sq = x_t.double().flatten(1)[:, None] - abar.sqrt()[:, None] * self.images.flatten(1)
        weights = (-sq.pow(2).sum(-1) / (2 * (1 - abar))).softmax(dim=1)
        return (weights @ self.images.flatten(1)).view_as(x_t).float()


def rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Root mean square pixel distance between every row of a and every row of b (in [-1, 1])."""
    return torch.cdist(a.flatten(1), b.flatten(1)) / a[0].numel() ** 0.5


def test_a_tiny_unet_memorises_four_images_and_ddim_samples_land_on_them(tmp_path):
    images = distinct_images(4)
    train_x = to_float(images.permute(0, 3, 1, 2))
    diffusion = GaussianDiffusion(DIFFUSION)
    fixed = Dataset(images.permute(0, 3, 1, 2))

    def loss(model: torch.nn.Module) -> float:  # fixed timesteps and noise: comparable values
        return validation_loss(model, diffusion, fixed, num_timesteps=20, batch_size=4)

    untrained = loss(UNet(UNET))  # zero output: the mean of x0^2
    best = loss(BayesDenoiser(train_x, diffusion.alphas_cumprod))
    assert 0 < best < untrained / 3, (best, untrained)
    result, ema, _ = train(
        UNET,
        DIFFUSION,
        TRAIN,
        EMAConfig(decay=0.99),
        Dataset(images),
        Dataset(images),
        checkpoint_dir=tmp_path,
        progress=False,
        hooks=Hooks(log=lambda m: None),
    )
    trained = loss(ema.module)
    assert result.step == TRAIN.steps
    # The loss above the least achievable one falls at least tenfold.
    assert abs(trained - best) < (untrained - best) / 10, (untrained, trained, best)

    shape, between = (16, *train_x.shape[1:]), rms(train_x, train_x)
    closest = between[between > 0].min()  # the two nearest training images are this far apart
    with torch.no_grad():
        ddim = ddim_sample(ema.module, diffusion, shape, steps=20,
                           generator=torch.Generator().manual_seed(1))  # fmt: skip
        dpm3 = dpm_solver_sample(ema.module, diffusion, shape, steps=10, order=3,
                                 generator=torch.Generator().manual_seed(1))  # fmt: skip
        unipc = unipc_sample(ema.module, diffusion, shape, steps=10, order=3,
                             generator=torch.Generator().manual_seed(1))  # fmt: skip
    # DDIM at 20 steps, DPM-Solver++ and UniPC of third order at 10
    for samples in (ddim, dpm3, unipc):
        nearest = rms(samples, train_x).min(dim=1)
        # Every sample is unambiguously one training image (nearer it than half the smallest
        # gap between two of them), the typical one within 0.1 (5% of the range), and the
        # samples find most of the images rather than collapsing onto one.
        assert (nearest.values < closest / 2).all(), (nearest.values, closest)
        assert nearest.values.median() < 0.1, nearest.values
        assert len(set(nearest.indices.tolist())) >= 3, nearest.indices

    # The variational bound on its images: far below the untrained network's, near the Bayes
    # denoiser's (the same noise for all three: one generator per image)
    def bpd(model: torch.nn.Module) -> float:
        bound = variational_bound(
            model, diffusion, train_x, generator=image_generators(0, range(4))
        )
        return float(bound.total.mean())

    bounds = [
        bpd(m) for m in (UNet(UNET), ema.module, BayesDenoiser(train_x, diffusion.alphas_cumprod))
    ]
    assert bounds[2] < bounds[1] < bounds[0] / 10, bounds  # measured: 3.1 < 5.1 < 266 bits/dim
