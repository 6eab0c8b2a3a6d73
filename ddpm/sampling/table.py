"""The samplers and the settings each reads: the one place that says which is which.

``ddpm.config.SamplerConfig`` validates and warns with it, the sample stage's error names a
sampler's settings from it, the frontier names its lines from it, the pyfunc takes its
request columns from it, and a test holds the README's table to it. The steppers themselves
are joined to the rows in :mod:`ddpm.sampling.api`. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

COMMON = ("steps", "spacing", "clip_x0", "guidance_scale")
"""The settings every sampler reads: the driver's and the denoiser's."""


@dataclass(frozen=True)
class Row:
    """One sampler: its own settings (beyond :data:`COMMON`), how many network evaluations a
    step costs, and what it is."""

    reads: tuple[str, ...]
    summary: str
    source: str
    evaluations_per_step: int = 1  # heun: 2, except its last step (an Euler step to sigma = 0)

    @property
    def settings(self) -> tuple[str, ...]:
        """Every setting this sampler reads."""
        return COMMON + self.reads

    def nfe(self, visited: int) -> int:
        """Network evaluations per image over ``visited`` timesteps (unguided)."""
        return self.evaluations_per_step * visited - (self.evaluations_per_step - 1)


SAMPLERS: dict[str, Row] = {
    "ddpm": Row(
        ("variance",),
        "ancestral sampling, stochastic; respaced over `steps` when fewer than T",
        "Ho et al. 2020, Algorithm 2; learned variance: Nichol & Dhariwal 2021, eq. 15",
    ),
    "ddim": Row(
        ("eta",),
        "DDIM: deterministic at eta 0, DDPM-like at 1",
        "Song et al. 2020, eq. 12 and 16",
    ),
    "dpm-solver": Row(
        ("order", "lower_order_final"),
        "DPM-Solver++ multistep ODE solver in the data prediction, order 1 (DDIM) to 3",
        "Lu et al. 2022b, Algorithm 2 and appendix B",
    ),
    "unipc": Row(
        ("order", "lower_order_final", "bh", "corrector"),
        "UniP multistep predictor with the UniC corrector (one order more, no extra NFE)",
        "Zhao et al. 2023, sec. 3",
    ),
    "heun": Row(
        (),
        "Heun's second-order ODE solver in sigma space (EDM), an Euler step to sigma = 0 last",
        "Karras et al. 2022, Algorithm 1",
        evaluations_per_step=2,
    ),
}


def series_part(setting: str, value: object) -> str:
    """How a frontier line names a sampler setting it sets: ``dpm-solver-3``, ``unipc-bh1``,
    ``ddim-eta0.5``, ``unipc-corrector=False``."""
    if setting in ("order", "bh"):
        return f"-{value}"
    if isinstance(value, bool):
        return f"-{setting}={value}"
    return f"-{setting}{value}"
