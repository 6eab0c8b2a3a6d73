"""The refactor's fixed points: every sampler x spacing x (guided, unguided), and the settings
each sampler reads, on two tiny random networks at fixed seeds (importable as
``sampler_cases``, beside ``tiny``).

``tests/data/sampler_images.pt`` holds the images the samplers made
before ``ddpm/samplers.py`` became the ``ddpm/sampling`` package (recorded by
``python tests/sampler_cases.py`` at commit 4a589d2); ``tests/ddpm/test_sampling_golden.py``
holds the package to them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny import tiny_unet

from ddpm.config import DiffusionConfig, UNetConfig
from ddpm.diffusion import GaussianDiffusion
from ddpm.unet import UNet

GOLDEN = Path(__file__).parent / "data" / "sampler_images.pt"
DIFFUSION = GaussianDiffusion(DiffusionConfig(schedule="linear", timesteps=50))
SEED, INDICES = 7, [0, 3]
CLASSES = [1, 0]  # image 0 gets class 1, image 3 class 3 % 2 = 0
SPACINGS = ("leading", "linspace", "trailing", "quadratic", "logsnr")
SAMPLER_NAMES = ("ddpm", "ddim", "dpm-solver", "unipc")
# settings beyond each sampler's defaults: its own knobs at other values
EXTRAS = (
    {"sampler": "ddim", "eta": 1.0},
    {"sampler": "ddim", "eta": 0.5, "clip_x0": False},
    {"sampler": "ddpm", "variance": "beta"},
    {"sampler": "dpm-solver", "order": 1},
    {"sampler": "dpm-solver", "order": 3},
    {"sampler": "dpm-solver", "order": 3, "lower_order_final": False},
    {"sampler": "unipc", "order": 3, "bh": "bh1"},
    {"sampler": "unipc", "order": 1},
    {"sampler": "unipc", "order": 3, "lower_order_final": False},
)


def configs(learned: bool) -> dict[str, dict]:
    """name -> SamplerConfig fields: the conditional network's cases (learned False) or the
    learned-variance network's."""
    if learned:
        return {
            f"learned/{s}": {"sampler": s, "steps": 8, "variance": "learned"} for s in SAMPLER_NAMES
        }
    cases = {}
    for sampler in SAMPLER_NAMES:
        for spacing in SPACINGS:
            for scale in (1.0, 3.0):
                name = f"{sampler}/{spacing}/{scale}"
                cases[name] = {"sampler": sampler, "steps": 8, "spacing": spacing,
                               "guidance_scale": scale}  # fmt: skip
    for i, extra in enumerate(EXTRAS):
        for scale in (1.0, 3.0):
            cases[f"extra{i}/{scale}"] = {"steps": 8, "guidance_scale": scale, **extra}
    return cases


def networks() -> dict[str, UNetConfig]:
    return {
        "conditional": tiny_unet(image_size=8, attention_resolutions=(4,), num_classes=2),
        "learned": tiny_unet(image_size=8, attention_resolutions=(4,), learn_sigma=True),
    }


class Network(torch.nn.Module):
    """A UNet whose every weight is random (no zero layer), so every part of it matters, its
    eps added to the exact one for data N(0, I), sqrt(1 - abar_t) x_t: the predicted x0 then
    stays near [-1, 1] rather than saturating the clipping at every step."""

    def __init__(self, config: UNetConfig, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.unet = UNet(config).eval()
        with torch.no_grad():
            for p in self.unet.parameters():
                p.copy_(torch.randn_like(p) * 0.05)
        self.config, self.null_class = config, self.unet.null_class

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        out = self.unet(x, t, y)
        abar = DIFFUSION.alphas_cumprod64[t].float().view(-1, 1, 1, 1)
        eps = (1 - abar).sqrt() * x + 0.3 * out[:, : x.shape[1]]
        return torch.cat([eps, out[:, x.shape[1] :]], dim=1)


if __name__ == "__main__":  # records the images with the code of the day
    from ddpm.config import SamplerConfig
    from ddpm.generation import generate

    torch.set_num_threads(1)  # as the tests run (tests/conftest.py): the same float rounding
    out = {"images": {}}
    for seed, (kind, config) in enumerate(networks().items()):
        net = Network(config, seed)
        classes = CLASSES if kind == "conditional" else None
        for name, fields in configs(kind == "learned").items():
            with torch.no_grad():
                x = generate(
                    net, DIFFUSION, INDICES, SEED, SamplerConfig(**fields), classes=classes
                )
            out["images"][name] = x
    torch.save(out, GOLDEN)
    print(f"{GOLDEN}: {len(out['images'])} cases")
