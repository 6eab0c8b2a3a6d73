"""The tiny UNet the tests train and sample with (importable as ``tiny``: pytest puts this
folder on ``sys.path`` for its conftest). One place, so the tests' model changes in one line."""

from __future__ import annotations

from ddpm.config import UNetConfig


def tiny_unet(**overrides: object) -> UNetConfig:
    """A 16-pixel, two-level UNet with attention at 8 px: thousands of parameters, not millions."""
    base = {
        "image_size": 16,
        "base_channels": 16,
        "channel_mults": (1, 2),
        "num_res_blocks": 1,
        "attention_resolutions": (8,),
        "num_groups": 8,
        "dropout": 0.0,
    }
    return UNetConfig(**(base | overrides))
