"""The pictures the command line writes: image grids of samples (nearest-neighbour upscaled, near
square), labelled panels of paired rows (degraded / restored / clean) and scatter plots of 2-D points."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Values in [-1, 1] as 0..255 (NaN as -1, infinities clipped)."""
    x = np.nan_to_num(x.astype(np.float64), nan=-1.0, posinf=1.0, neginf=-1.0)
    return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


GRID_PER_ROW = 8
GRID_PAD = 2


def image_scale(h: int, w: int) -> int:
    """Nearest-neighbour upscaling factor so that small images are visible (8x8 -> 4x)."""
    return max(1, 32 // max(h, w))


def grid_columns(k: int, rows_per_sample: int = 1, least: int = GRID_PER_ROW) -> int:
    """Columns of a near-square picture of ``k`` samples (each ``rows_per_sample`` tiles tall, as in the
    restoration panels); at least ``least`` (or ``k``)."""
    return min(k, max(least, math.ceil(math.sqrt(k * rows_per_sample))))


def image_grid(
    samples: np.ndarray,
    per_row: int | None = None,
    pad: int = GRID_PAD,
    row_labels: Sequence[str] | None = None,
    blank: np.ndarray | None = None,
):
    """A PIL image of samples [K, C, H, W] (C in 1, 3) or [K, H, W], values in [-1, 1]: ``per_row`` a row
    (default: a near-square grid, at least 8 a row); ``row_labels`` name the rows in a left margin, in
    turn (rows of a restoration panel: degraded / restored / clean); tiles where ``blank`` is True are
    left empty."""
    from PIL import Image

    if samples.ndim == 3:
        samples = samples[:, None]
    k, c, h, w = samples.shape
    s = image_scale(h, w)
    imgs = to_uint8(samples).transpose(0, 2, 3, 1)  # K, H, W, C
    imgs = imgs.repeat(s, axis=1).repeat(s, axis=2)
    th, tw = h * s, w * s
    cols = grid_columns(k) if per_row is None else min(per_row, k)
    rows = math.ceil(k / cols)
    canvas = np.full((rows * th + (rows + 1) * pad, cols * tw + (cols + 1) * pad, c), 64, dtype=np.uint8)
    for i in range(k):
        if blank is not None and blank[i]:
            continue
        r, q = divmod(i, cols)
        y, x = pad + r * (th + pad), pad + q * (tw + pad)
        canvas[y : y + th, x : x + tw] = imgs[i]
    image = Image.fromarray(np.ascontiguousarray(canvas[..., 0] if c == 1 else canvas))
    if row_labels:
        image = label_rows(image, [row_labels[r % len(row_labels)] for r in range(rows)], th, pad)
    return image


def label_rows(image, labels: Sequence[str], tile: int, pad: int):
    """``image`` with a left margin holding ``labels[r]`` beside tile row r, in Pillow's built-in bitmap
    font (no font file needed); without a usable font the image is returned as it is (the manifest
    names the rows too)."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = (
            ImageFont.load_default_imagefont()
            if hasattr(ImageFont, "load_default_imagefont")
            else ImageFont.load_default()
        )
        boxes = [ImageDraw.Draw(image).textbbox((0, 0), t, font=font) for t in labels]
    except (OSError, ImportError, AttributeError):
        return image
    margin = int(max(b[2] for b in boxes) + 3 * pad + 4)
    out = Image.new(image.mode, (image.width + margin, image.height), 64 if image.mode == "L" else (64, 64, 64))
    out.paste(image, (margin, 0))
    draw = ImageDraw.Draw(out)
    white = 255 if image.mode == "L" else (255, 255, 255)
    for r, (text, box) in enumerate(zip(labels, boxes)):
        y = pad + r * (tile + pad) + (tile - (box[3] - box[1])) // 2 - box[1]
        draw.text((2 * pad + 2, y), text, fill=white, font=font)
    return out


def panel_image(rows: Sequence[tuple[str, torch.Tensor]]) -> tuple[Any, int]:
    """A near-square labelled picture of paired image rows (e.g. degraded / restored / clean): every
    band holds the next ``cols`` digits of each row. Returns (image, cols)."""
    k = len(rows[0][1])
    cols = grid_columns(k, len(rows))
    tiles, blank = [], []
    for i in range(0, k, cols):
        for _, x in rows:  # a short last band: its rows padded with blank tiles
            part = x[i : i + cols].detach().to("cpu", torch.float64)
            tiles += [part, part.new_zeros((cols - len(part), *part.shape[1:]))]
            blank += [False] * len(part) + [True] * (cols - len(part))
    image = image_grid(
        torch.cat(tiles).numpy(), per_row=cols, row_labels=[name for name, _ in rows], blank=np.array(blank)
    )
    return image, cols


SCATTER_SIZE = 512


def scatter_plot(points: np.ndarray, size: int = SCATTER_SIZE):
    """A PIL scatter plot of 2-D points [K, 2], with light axes and unit ticks."""
    from PIL import Image, ImageDraw

    pts = points.astype(np.float64)
    finite = pts[np.isfinite(pts).all(axis=1)]
    lim = float(np.abs(finite).max()) if len(finite) else 1.0
    lim = max(1.0, math.ceil(lim * 1.1 * 2) / 2)  # symmetric range, a multiple of 0.5
    margin = 16
    span = size - 2 * margin

    def px(x: float, y: float) -> tuple[float, float]:
        return margin + (x + lim) / (2 * lim) * span, margin + (lim - y) / (2 * lim) * span

    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img, "RGBA")
    light, tick = (225, 225, 225), (190, 190, 190)
    draw.rectangle([margin, margin, size - margin, size - margin], outline=light)
    x0, y0 = px(0.0, 0.0)
    draw.line([(margin, y0), (size - margin, y0)], fill=tick)
    draw.line([(x0, margin), (x0, size - margin)], fill=tick)
    for v in range(-int(lim), int(lim) + 1):
        if v == 0:
            continue
        tx, _ = px(v, 0.0)
        _, ty = px(0.0, v)
        draw.line([(tx, margin), (tx, size - margin)], fill=light + (120,))
        draw.line([(margin, ty), (size - margin, ty)], fill=light + (120,))
        draw.line([(tx, y0 - 4), (tx, y0 + 4)], fill=tick)
        draw.line([(x0 - 4, ty), (x0 + 4, ty)], fill=tick)
    r = 2.5 if len(finite) <= 2000 else 1.5
    for x, y in finite:
        cx, cy = px(x, y)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(31, 119, 180, 170))
    return img


def render_png(samples: torch.Tensor):
    """The picture of a batch: a scatter plot for 2-D points, an image grid for images; else None."""
    a = samples.detach().to("cpu", torch.float64).numpy()
    if a.ndim == 2 and a.shape[1] == 2:
        return scatter_plot(a)
    if a.ndim == 3 or (a.ndim == 4 and a.shape[1] in (1, 3)):
        return image_grid(a)
    return None
