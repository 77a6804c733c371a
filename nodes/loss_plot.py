"""A loss-history chart drawn with PIL: raw losses, a smoothed curve, axes with min/max labels.

A flat history (all values equal, or one value) is drawn as a level line in the middle instead of
dividing by a zero range; NaN/Inf values are skipped.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
AXIS = (40, 40, 40)
RAW = (150, 180, 230)
SMOOTH = (20, 70, 170)
GRID = (225, 225, 225)


def smoothed(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard draws it)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def draw_loss(losses: Sequence[float], width: int = 640, height: int = 360,
              title: str = "loss") -> Image.Image:
    """The chart as an RGB image of `width` x `height`."""
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 64, 16, 28, 36
    x0, x1, y0, y1 = left, width - right, top, height - bottom
    points = [(i, float(v)) for i, v in enumerate(losses) if math.isfinite(float(v))]
    draw.text((left, 8), f"{title}  ({len(losses)} steps)", fill=AXIS, font=font)
    for k in range(5):
        y = y0 + (y1 - y0) * k / 4
        draw.line([(x0, y), (x1, y)], fill=GRID)
    draw.line([(x0, y0), (x0, y1), (x1, y1)], fill=AXIS, width=1)
    if not points:
        draw.text((x0 + 8, (y0 + y1) // 2), "no finite loss values", fill=AXIS, font=font)
        return img
    lo = min(v for _, v in points)
    hi = max(v for _, v in points)
    span = hi - lo
    last = max(len(losses) - 1, 1)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = x0 + (x1 - x0) * i / last
        frac = 0.5 if span <= 0 else (v - lo) / span
        return x, y1 - (y1 - y0) * frac

    raw = [xy(i, v) for i, v in points]
    if len(raw) > 1:
        draw.line(raw, fill=RAW, width=1)
    smooth = [xy(i, v) for (i, _), v in zip(points, smoothed([v for _, v in points]))]
    if len(smooth) > 1:
        draw.line(smooth, fill=SMOOTH, width=2)
    else:
        x, y = smooth[0]
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=SMOOTH)
    if span > 0:
        draw.text((4, y0 - 6), _fmt(hi), fill=AXIS, font=font)
        draw.text((4, y1 - 6), _fmt(lo), fill=AXIS, font=font)
    else:
        draw.text((4, (y0 + y1) // 2 - 6), _fmt(hi), fill=AXIS, font=font)
    draw.text((x0, y1 + 8), "0", fill=AXIS, font=font)
    draw.text((x1 - 40, y1 + 8), f"step {len(losses)}", fill=AXIS, font=font)
    draw.text((x0 + 60, y1 + 8), f"last {_fmt(points[-1][1])}", fill=AXIS, font=font)
    return img
