"""Figures of the diffusion process, drawn with PIL: arrays in, uint8 (H, W, 3) images out.

:func:`schedule_figure` plots beta_t, abar_t and the log-SNR log(abar_t / (1 - abar_t)) over t;
:func:`forward_process_figure` shows real images noised by q(x_t | x0) at a few t.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ddpm.diffusion import GaussianDiffusion
from ddpm.pixels import to_uint8

_FONT_SIZE = 13
_PANEL = (320, 230)  # width, height of one plot panel
_MARGIN = {"left": 62, "right": 14, "top": 30, "bottom": 36}
_INK, _GRID, _LINE, _MARK = (20, 20, 20), (225, 225, 225), (31, 119, 180), (214, 39, 40)


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=_FONT_SIZE)


def _plot_panel(values: torch.Tensor, title: str, marks: Sequence[int] = ()) -> Image.Image:
    """One line plot of ``values`` (T,) over t = 0 .. T-1, with 3 ticks per axis."""
    width, height = _PANEL
    img = Image.new("RGB", _PANEL, "white")
    draw, font = ImageDraw.Draw(img), _font()
    left, top = _MARGIN["left"], _MARGIN["top"]
    right, bottom = width - _MARGIN["right"], height - _MARGIN["bottom"]
    v = values.double()
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1e-12:  # a flat curve still gets a visible axis
        lo, hi = lo - 1.0, hi + 1.0
    last = max(len(v) - 1, 1)

    def xy(t: float, value: float) -> tuple[float, float]:
        return (
            left + (right - left) * t / last,
            bottom - (bottom - top) * (value - lo) / (hi - lo),
        )

    for frac in (0.0, 0.5, 1.0):  # y grid and ticks
        value = lo + frac * (hi - lo)
        _, y = xy(0, value)
        draw.line([(left, y), (right, y)], fill=_GRID)
        label = f"{value:.3g}"
        draw.text((left - 6, y), label, fill=_INK, font=font, anchor="rm")
    for t in (0, last // 2, last):  # x ticks
        x, _ = xy(t, lo)
        draw.line([(x, bottom), (x, bottom + 4)], fill=_INK)
        draw.text((x, bottom + 6), str(t), fill=_INK, font=font, anchor="ma")
    draw.rectangle([left, top, right, bottom], outline=_INK)
    draw.line([xy(t, float(value)) for t, value in enumerate(v)], fill=_LINE, width=2)
    for t in marks:
        x, y = xy(t, float(v[t]))
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=_MARK)
    draw.text((width / 2, 8), title, fill=_INK, font=font, anchor="ma")
    draw.text((width / 2, height - 4), "t", fill=_INK, font=font, anchor="md")
    return img


def schedule_figure(
    diffusion: GaussianDiffusion, timesteps: Sequence[int] | torch.Tensor = ()
) -> torch.Tensor:
    """beta_t, abar_t and log-SNR over t side by side: uint8 (H, W, 3).

    Args:
        timesteps: the steps a sampler visits, marked on the log-SNR curve.
    """
    abar = diffusion.alphas_cumprod64
    betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
    marks = [int(t) for t in timesteps]
    panels = [
        _plot_panel(betas, f"beta_t ({diffusion.config.schedule})"),
        _plot_panel(abar, "alpha-bar_t"),
        _plot_panel(torch.log(abar / (1 - abar)), "log-SNR = log(abar / (1 - abar))", marks),
    ]
    figure = Image.new("RGB", (_PANEL[0] * len(panels), _PANEL[1]), "white")
    for i, panel in enumerate(panels):
        figure.paste(panel, (i * _PANEL[0], 0))
    return torch.from_numpy(_as_array(figure))


@torch.no_grad()
def forward_process_figure(
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    timesteps: Sequence[int],
    generator: torch.Generator | None = None,
    scale: int = 2,
    pad: int = 2,
) -> torch.Tensor:
    """Rows of real images, clean and then noised by q(x_t | x0) at each of ``timesteps``.

    Args:
        x0: (N, C, H, W) images in [-1, 1], one row each.
        timesteps: the noised columns, labelled ``t=...`` (0-based: t=0 is one step of noise).
        generator: the noise, the same in every column of a row.
        scale: nearest-neighbour upscaling, so that 32-pixel images are visible.

    Returns:
        uint8 (H, W, 3): a header of labels over N rows of 1 + len(timesteps) cells.
    """
    n, _, h, w = x0.shape
    device = diffusion.betas.device
    noise = torch.randn(x0.shape, generator=generator).to(device)
    x0 = x0.float().to(device)
    columns = [x0]
    for t in timesteps:
        columns.append(diffusion.q_sample(x0, torch.full((n,), int(t), device=device), noise))
    stacked = torch.stack(columns, dim=1)  # (N, K + 1, C, H, W)
    cells = to_uint8(stacked.flatten(0, 1)).unflatten(0, stacked.shape[:2])  # (N, K + 1, H, W, C)
    labels = ["x0", *(f"t={int(t)}" for t in timesteps)]
    cell_w, cell_h, header = w * scale, h * scale, _FONT_SIZE + 8
    size = (len(labels) * (cell_w + pad) + pad, header + n * (cell_h + pad) + pad)
    figure = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(figure), _font()
    for k, label in enumerate(labels):
        left = pad + k * (cell_w + pad)
        draw.text((left + cell_w / 2, 4), label, fill=_INK, font=font, anchor="ma")
        for i in range(n):
            cell = Image.fromarray(cells[i, k].numpy().squeeze()).convert("RGB")
            cell = cell.resize((cell_w, cell_h), Image.Resampling.NEAREST)
            figure.paste(cell, (left, header + pad + i * (cell_h + pad)))
    return torch.from_numpy(_as_array(figure))


def _as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
