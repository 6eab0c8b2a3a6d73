"""The solver tests' fixed network and chain (importable as ``smooth``, beside ``tiny``)."""

from __future__ import annotations

import torch

from ddpm.config import DiffusionConfig
from ddpm.diffusion import GaussianDiffusion

DIFFUSION = GaussianDiffusion(DiffusionConfig(schedule="linear", timesteps=1000))
SHAPE = (4, 3, 8, 8)


class Smooth(torch.nn.Module):
    """A fixed nonlinear eps(x, t) for a chain of ``timesteps``: enough curvature for the
    solvers' orders to differ."""

    def __init__(self, timesteps: int = 1000) -> None:
        super().__init__()
        self.timesteps = timesteps

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = (t.float() / self.timesteps).view(-1, 1, 1, 1)
        return 0.6 * x * torch.cos(3 * s) + 0.3 * torch.sin(2 * x + 5 * s) + 0.1 * s
