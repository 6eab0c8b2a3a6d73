"""This process's place in a torch.distributed job, as the training loop and samplers see it.

Setting the job up (torchrun's environment, NCCL or gloo) is the caller's business; the library
only needs the rank, the number of processes, how to wrap a model for gradient averaging and
how to gather a tensor from every process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Distributed:
    """Rank 0 of 1 when there is no process group."""

    rank: int = 0
    world_size: int = 1
    wrap: Callable[[nn.Module], nn.Module] = field(default=lambda m: m)
    # every process's tensor (same shape on each), concatenated along dim 0 in rank order
    gather: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda x: x)

    @property
    def is_main(self) -> bool:
        return self.rank == 0
