"""The two conversions between pixels and the model's range, and image grids.

Pixels are uint8 in [0, 255], channels last (B, H, W, C) as stored and written; the model sees
float (B, C, H, W) in [-1, 1]. Every stage converts through these functions, so FID never meets
an off-by-one rounding or a different clamp (the cause of many "FID does not match" reports).
"""

from __future__ import annotations

import math

import torch

from ddpm.errors import NonFiniteSamplesError


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) in [0, 255] -> float (B, C, H, W) in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] to pixels: (B, C, H, W) -> uint8 (B, H, W, C) on the CPU.

    Values outside [-1, 1] are clamped; 255 * (x + 1) / 2 is rounded to the nearest integer.

    Raises:
        NonFiniteSamplesError: some value is NaN or infinite.
    """
    assert x.ndim == 4, x.shape
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteSamplesError("images with NaN or inf values cannot be converted to pixels")
    pixels = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu()


def grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> torch.Tensor:
    """uint8 (B, H, W, C) -> one uint8 (rows*(H+pad)+pad, cols*(W+pad)+pad, C) image."""
    b, h, w, c = images.shape
    cols = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    canvas = torch.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=torch.uint8)
    for i in range(b):
        r, k = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        canvas[top : top + h, left : left + w] = images[i]
    return canvas
