"""A per-block bar chart of the block analyser, drawn with PIL.

One bar per block in canonical order, coloured by group (text encoder / in / mid / out, or
double / single / ...). The bar height is ‖ΔW‖/‖W‖ when every block has it (the node got a base
model), else ‖ΔW‖; blocks whose value cannot be known are drawn as a hatched "n/a" stub.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
AXIS = (40, 40, 40)
GRID = (228, 228, 228)
MISSING = (190, 190, 190)
# group id -> bar colour
GROUP_COLOURS = {
    "te": (214, 124, 48), "in": (60, 120, 200), "mid": (150, 80, 180), "out": (50, 160, 90),
    "double": (60, 120, 200), "single": (50, 160, 90), "joint": (150, 80, 180), "other": (120, 120, 120),
}
FALLBACK_COLOURS = ((200, 70, 70), (70, 160, 170), (170, 150, 50), (110, 90, 160))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _colour(group: str) -> tuple[int, int, int]:
    if group in GROUP_COLOURS:
        return GROUP_COLOURS[group]
    return FALLBACK_COLOURS[sum(map(ord, group)) % len(FALLBACK_COLOURS)]


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def draw_blocks(rows: Sequence, groups: Sequence[str], *, title: str = "",
                height: int = 360, bar_width: int = 22) -> Image.Image:
    """The analysis `rows` (BlockChange-like: block, norm_delta, rel_change) as an RGB image.

    `groups[i]` is the group id of `rows[i]` (its colour). Values that are None are drawn as
    hatched grey stubs labelled n/a.
    """
    rel = bool(rows) and all(r.rel_change is not None for r in rows)
    values = [r.rel_change if rel else r.norm_delta for r in rows]
    measure = "|dW| / |W|" if rel else "|dW|"
    font, small = _font(13), _font(11)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_h = max([_text_size(probe, r.block, small)[0] for r in rows] or [0]) + 8
    left, right, top = 58, 16, 40
    bottom = label_h + 10
    gap = max(4, bar_width // 3)
    min_width = 420
    if rows:  # few blocks: wider bars fill the minimum width
        fit = (min_width - left - right - gap) // len(rows) - gap
        bar_width = max(bar_width, min(fit, 3 * bar_width))
        gap = max(4, bar_width // 3)
    width = max(min_width, left + right + len(rows) * (bar_width + gap) + gap)
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    x0, x1, y0, y1 = left, width - right, top, height - bottom
    heading = f"{title}  -  {measure} per block" if title else f"{measure} per block"
    draw.text((left, 10), heading, fill=AXIS, font=font)
    known = [v for v in values if v is not None and math.isfinite(v)]
    top_value = max(known) if known and max(known) > 0 else 1.0
    for k in range(5):
        y = y1 - (y1 - y0) * k / 4
        draw.line([(x0, y), (x1, y)], fill=GRID)
        text = _fmt(top_value * k / 4)
        tw, th = _text_size(draw, text, small)
        draw.text((x0 - tw - 6, y - th / 2 - 2), text, fill=AXIS, font=small)
    draw.line([(x0, y0), (x0, y1), (x1, y1)], fill=AXIS)
    if not rows:
        draw.text((x0 + 10, (y0 + y1) // 2), "no blocks", fill=AXIS, font=font)
        return img
    for i, (row, value) in enumerate(zip(rows, values)):
        bx = x0 + gap + i * (bar_width + gap)
        if value is None or not math.isfinite(value):
            stub = y1 - 14
            draw.rectangle([bx, stub, bx + bar_width, y1], outline=MISSING)
            for hx in range(bx - 14, bx + bar_width, 5):
                draw.line([(max(hx, bx), stub + max(0, bx - hx)),
                           (min(hx + 14, bx + bar_width), y1 - max(0, hx + 14 - bx - bar_width))],
                          fill=MISSING)
            tw, th = _text_size(draw, "n/a", small)
            draw.text((bx + (bar_width - tw) / 2, stub - th - 6), "n/a", fill=MISSING, font=small)
        else:
            h = (y1 - y0) * max(value, 0.0) / top_value
            draw.rectangle([bx, y1 - h, bx + bar_width, y1], fill=_colour(groups[i]))
        # block label, rotated to read bottom-up under the bar
        tw, th = _text_size(draw, row.block, small)
        label = Image.new("RGB", (tw + 4, th + 6), BACKGROUND)
        ImageDraw.Draw(label).text((2, 0), row.block, fill=AXIS, font=small)
        label = label.rotate(90, expand=True)
        img.paste(label, (int(bx + (bar_width - label.width) / 2), int(y1 + 4)))
    return img


def to_image_tensor(img: Image.Image):
    """A PIL image as a ComfyUI IMAGE: float tensor [1, H, W, 3] in 0..1."""
    import numpy as np
    import torch

    array = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy())[None]
