"""Figures of the diffusion process, drawn with PIL: arrays in, uint8 (H, W, 3) images out.

:func:`schedule_figure` plots beta_t, abar_t and the log-SNR log(abar_t / (1 - abar_t)) over t;
:func:`forward_process_figure` shows real images noised by q(x_t | x0) at a few t.
"""

from __future__ import annotations

import math
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


_SERIES = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
           (23, 190, 207), (227, 119, 194), (127, 127, 127)]  # fmt: skip


def frontier_figure(
    series: dict[str, list[tuple[float, float]]], y_label: str = "FID", size=(520, 360)
) -> torch.Tensor:
    """Quality against cost: one line of (NFE, metric) points per sampler, NFE on a log axis.

    Args:
        series: name -> [(nfe, value), ...]; lower values are better for FID and KID.

    Returns:
        uint8 (H, W, 3).
    """
    width, height = size
    img = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(img), _font()
    left, right, top, bottom = 62, width - 150, 40, height - 40
    points = [p for values in series.values() for p in values]
    xs = [math.log10(max(n, 1e-9)) for n, _ in points]
    lo_x, hi_x = min(xs) - 0.1, max(xs) + 0.1
    lo_y, hi_y = min(v for _, v in points), max(v for _, v in points)
    pad = 0.08 * (hi_y - lo_y) if hi_y > lo_y else 1.0
    lo_y, hi_y = lo_y - pad, hi_y + pad

    def xy(nfe: float, value: float) -> tuple[float, float]:
        fx = (math.log10(max(nfe, 1e-9)) - lo_x) / (hi_x - lo_x)
        return left + (right - left) * fx, bottom - (bottom - top) * (value - lo_y) / (hi_y - lo_y)

    _frontier_axes(draw, font, (left, top, right, bottom), xy, (lo_x, hi_x, lo_y, hi_y))
    for k, (name, values) in enumerate(series.items()):
        colour, line = _SERIES[k % len(_SERIES)], [xy(n, v) for n, v in sorted(values)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for x, y in line:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.line([(right + 14, top + 8 + 18 * k), (right + 34, top + 8 + 18 * k)], fill=colour,
                  width=3)  # fmt: skip
        draw.text((right + 40, top + 8 + 18 * k), name, fill=_INK, font=font, anchor="lm")
    draw.text((width / 2, 8), f"{y_label} against network evaluations", fill=_INK, font=font,
              anchor="ma")  # fmt: skip
    draw.text(((left + right) / 2, height - 4), "NFE per image (log scale)", fill=_INK,
              font=font, anchor="md")  # fmt: skip
    draw.text((left, top - 4), y_label, fill=_INK, font=font, anchor="ld")
    return torch.from_numpy(_as_array(img))


def _frontier_axes(draw, font, box, xy, limits) -> None:
    """The frame, y ticks at three levels and x ticks at the powers of ten and their halves."""
    left, top, right, bottom = box
    lo_x, hi_x, lo_y, hi_y = limits
    for frac in (0.0, 0.5, 1.0):
        value = lo_y + frac * (hi_y - lo_y)
        _, y = xy(1.0, value)
        draw.line([(left, y), (right, y)], fill=_GRID)
        draw.text((left - 6, y), f"{value:.3g}", fill=_INK, font=font, anchor="rm")
    for exponent in range(math.floor(lo_x), math.ceil(hi_x) + 1):
        for tick in (10**exponent, 2 * 10**exponent, 5 * 10**exponent):
            if lo_x <= math.log10(tick) <= hi_x:
                x, _ = xy(tick, lo_y)
                draw.line([(x, bottom), (x, bottom + 4)], fill=_INK)
                draw.line([(x, top), (x, bottom)], fill=_GRID)
                draw.text((x, bottom + 6), f"{tick:g}", fill=_INK, font=font, anchor="ma")
    draw.rectangle([left, top, right, bottom], outline=_INK)


def labelled_rows(rows: Sequence[tuple[str, torch.Tensor]], scale: int = 2, pad: int = 2):
    """Rows of images, each with its label on the left: uint8 (H, W, 3).

    Args:
        rows: (label, uint8 images (B, h, w, 3)) per row, the same B, h and w in every row.
    """
    _, h, w, _ = rows[0][1].shape
    label_w = 12 + max(int(_font().getlength(label)) for label, _ in rows)
    cell_w, cell_h = w * scale, h * scale
    cols = max(len(images) for _, images in rows)
    size = (label_w + cols * (cell_w + pad) + pad, len(rows) * (cell_h + pad) + pad)
    figure = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(figure), _font()
    for r, (label, images) in enumerate(rows):
        top = pad + r * (cell_h + pad)
        draw.text((6, top + cell_h / 2), label, fill=_INK, font=font, anchor="lm")
        for c, image in enumerate(images):
            cell = Image.fromarray(image.numpy()).resize((cell_w, cell_h), Image.Resampling.NEAREST)
            figure.paste(cell, (label_w + pad + c * (cell_w + pad), top))
    return torch.from_numpy(_as_array(figure))
