"""How training draws its timesteps: uniformly, or by importance (Nichol & Dhariwal 2021, 3.3).

L_vlb is a sum of T terms of very different sizes, and drawing t uniformly gives its estimate
a large variance. improved-diffusion's ``loss-second-moment`` sampler draws t with
probability p_t proportional to sqrt(E[L_t^2]), estimated from the last ``HISTORY`` losses
seen at each t, and weighs each example by 1 / (T p_t), so the weighted loss is still an
unbiased estimate of the mean over t. Until every t has ``HISTORY`` losses it draws
uniformly; a share ``UNIFORM_SHARE`` of uniform probability stays mixed in, so no t is
starved.

The history is state: it goes into the training checkpoint (``state_dict``), and under DDP
every process records every process's losses (``gather``), so all ranks draw from the same
distribution and a resumed run takes the steps an unbroken one would have.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

HISTORY = 10  # losses kept per timestep
UNIFORM_SHARE = 0.001  # improved-diffusion's uniform_prob


class LossSecondMoment:
    """Importance sampling of t by the root mean square of its recent losses."""

    def __init__(
        self,
        num_timesteps: int,
        device: torch.device | str = "cpu",
        gather: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    ) -> None:
        self.num_timesteps, self.gather = num_timesteps, gather
        self.history = torch.zeros(num_timesteps, HISTORY, dtype=torch.float64, device=device)
        self.count = torch.zeros(num_timesteps, dtype=torch.long, device=device)
        self.warm = False  # every t has HISTORY losses (checked until true: one sync a step)

    def probabilities(self) -> torch.Tensor:
        """p_t (T,) float64: uniform until warm, then sqrt(mean L_t^2), normalised, with a
        ``UNIFORM_SHARE`` of the uniform distribution mixed in."""
        T = self.num_timesteps
        if not self.warm:
            self.warm = bool((self.count >= HISTORY).all())
        if not self.warm:
            return torch.full((T,), 1 / T, dtype=torch.float64, device=self.history.device)
        rms = self.history.pow(2).mean(dim=1).sqrt()
        return rms / rms.sum() * (1 - UNIFORM_SHARE) + UNIFORM_SHARE / T

    def sample(
        self, batch: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(t (B,) long, the importance weights 1 / (T p_t) (B,) float32)."""
        p = self.probabilities()
        t = torch.multinomial(p, batch, replacement=True, generator=generator)
        return t, (1 / (self.num_timesteps * p[t])).float()

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record the per-example ``losses`` (unweighted) at timesteps ``t``, every process's:
        each t keeps its last ``HISTORY`` (a ring per t; in a batch, later examples are newer)."""
        # one collective a step: (t, loss) pairs, t exact in float64
        pairs = self.gather(torch.stack([t.double(), losses.detach().double()], dim=1))
        t, losses = pairs[:, 0].long(), pairs[:, 1]
        order = torch.argsort(t, stable=True)  # equal t: batch order kept
        t, losses = t[order], losses[order]
        seen = torch.bincount(t, minlength=self.num_timesteps)
        first = torch.cumsum(seen, 0) - seen  # where each t's run starts in the sorted batch
        rank = torch.arange(len(t), device=t.device) - first[t]  # 0, 1, ... within a t
        keep = rank >= seen[t] - HISTORY  # more than HISTORY of one t: only the newest count
        slot = (self.count[t] + rank) % HISTORY
        self.history[t[keep], slot[keep]] = losses[keep]
        self.count += seen

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"history": self.history.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["history"].shape != self.history.shape:
            raise ValueError(
                f"a timestep history of shape {tuple(state['history'].shape)} for "
                f"{self.num_timesteps} timesteps"
            )
        self.history.copy_(state["history"])
        self.count.copy_(state["count"])
        self.warm = False
