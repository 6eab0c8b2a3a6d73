import pytest
import torch

from ddpm.config import DiffusionConfig
from ddpm.diffusion import GaussianDiffusion
from ddpm.figures import forward_process_figure, schedule_figure


@pytest.mark.parametrize("schedule", ["linear", "cosine", "sigmoid"])
def test_the_schedule_figure_is_three_panels_of_ink_on_white(schedule):
    diffusion = GaussianDiffusion(DiffusionConfig(schedule=schedule, timesteps=100))
    figure = schedule_figure(diffusion, timesteps=[99, 50, 0])
    assert figure.dtype == torch.uint8 and figure.ndim == 3 and figure.shape[2] == 3
    assert figure.shape[1] == 3 * 320 and figure.shape[0] == 230
    for panel in figure.split(320, dim=1):
        ink = (panel < 200).any(dim=2).float().mean()
        assert 0.01 < ink < 0.5  # axes, labels and a curve, not a blank or filled panel
    red = (figure[..., 0] > 180) & (figure[..., 1] < 80) & (figure[..., 2] < 80)
    assert red[:, 640:].any() and not red[:, :640].any()  # the sampled steps, on log-SNR only


def test_the_forward_process_strip_shows_x0_then_ever_noisier_images():
    diffusion = GaussianDiffusion(DiffusionConfig(timesteps=100))
    x0 = torch.zeros(2, 3, 8, 8)
    x0[1] = 1.0  # one grey, one white image
    figure = forward_process_figure(diffusion, x0, [0, 50, 99], torch.Generator().manual_seed(0))
    header, cell, pad = 13 + 8, 16, 2
    assert figure.shape == (header + 2 * (cell + pad) + pad, 4 * (cell + pad) + pad, 3)

    def cell_at(row: int, col: int) -> torch.Tensor:
        top, left = header + pad + row * (cell + pad), pad + col * (cell + pad)
        return figure[top : top + cell, left : left + cell].float()

    assert bool((cell_at(0, 0) == 128).all()) and bool((cell_at(1, 0) == 255).all())
    spread = [cell_at(0, k).std().item() for k in range(4)]
    assert spread[0] == 0 and spread[1] < spread[2] < spread[3]  # noise grows with t
