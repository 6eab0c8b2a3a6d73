"""Exponential moving average of a model's weights, kept in a separate module.

Parameters are averaged; buffers (running statistics, fixed tables) are copied, since
averaging them is meaningless and once gave black images (lucidrains #136). The live model is
never overwritten: sample from ``ema.module``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ddpm.config import EMAConfig


def ema_decay(num_updates: int, decay: float, warmup: bool = True) -> float:
    """The decay used for update number ``num_updates`` (0-based).

    With warm-up, (1 + n) / (10 + n) as in TensorFlow's ExponentialMovingAverage: the first
    updates follow the live weights closely, so early EMA samples are not noise.
    """
    if not warmup:
        return decay
    return min(decay, (1 + num_updates) / (10 + num_updates))


class EMA(nn.Module):
    """``module`` is a frozen copy of the model whose parameters track an EMA of the live ones."""

    def __init__(self, model: nn.Module, config: EMAConfig | None = None) -> None:
        super().__init__()
        self.config = config or EMAConfig()
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @property
    def current_decay(self) -> float:
        """The decay the next update will use."""
        return ema_decay(int(self.num_updates), self.config.decay, self.config.warmup)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> float | None:
        """Average ``model`` in if ``step`` is a multiple of ``update_every``.

        Returns:
            the decay used, or None when this step is skipped.
        """
        if step % self.config.update_every:
            return None
        decay = self.current_decay
        ema_params = list(self.module.parameters())
        live_params = [p.detach() for p in model.parameters()]
        assert len(ema_params) == len(live_params)
        # ema <- decay * ema + (1 - decay) * live, all tensors in one fused call
        torch._foreach_lerp_(ema_params, live_params, 1.0 - decay)
        for ema_b, live_b in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_b.copy_(live_b)
        self.num_updates += 1
        return decay
