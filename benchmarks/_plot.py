"""Line and scatter plots as PNG with Pillow (matplotlib is not a dependency of ulframe).

Single-series bits/pixel-PSNR plots use the project's own `rate_distortion_figure`
(plugins/hooks/tensorboard.py); `xy_figure` draws several labelled series with a legend, for the
benchmarks that compare curves (bias × loss factor, Normal vs diffusion prior, the controller).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

COLORS = [
    (200, 60, 40),
    (40, 110, 200),
    (40, 150, 70),
    (150, 80, 180),
    (220, 140, 20),
    (90, 90, 90),
    (0, 170, 170),
    (140, 90, 40),
]


@dataclass
class Series:
    """One curve: (x, y) points with optional per-point labels, drawn in `color`."""

    name: str
    points: list[tuple[float, float]]
    labels: list[str] = field(default_factory=list)
    color: tuple[int, int, int] | None = None
    connect: bool = True
    markers: bool = True
    dashed: bool = False


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round numbers covering [lo, hi]."""
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _span(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = max((hi - lo) * 0.08, 0.02 * max(abs(lo), abs(hi)), 1e-3)
    return lo - pad, hi + pad


def _fmt(v: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 2
    if step > 0 and abs(step * 10**decimals - round(step * 10**decimals)) > 1e-9:
        decimals += 1  # 2.5-steps
    return f"{v:.{decimals}f}"


def xy_figure(
    series: Sequence[Series],
    title: str,
    xlabel: str,
    ylabel: str,
    size: tuple[int, int] = (560, 400),
    hlines: Sequence[tuple[float, str]] = (),
    logx: bool = False,
    vlines: Sequence[tuple[float, str]] = (),
    logy: bool = False,
    legend: str = "upper left",
) -> Image.Image:
    """An RGB image: axes with round ticks, each series as points (and lines), a legend, and
    optional dashed reference lines, horizontal and vertical (value, label). `logx` / `logy`
    put x / y on a log10 axis (non-positive values are left out). `legend`: "upper left",
    "upper right", "lower left" or "lower right" inside the axes."""
    tx = (lambda v: math.log10(v)) if logx else (lambda v: v)
    ty = (lambda v: math.log10(v)) if logy else (lambda v: v)

    def ok(x: float, y: float) -> bool:
        return math.isfinite(x) and math.isfinite(y) and (x > 0 or not logx) and (y > 0 or not logy)

    pts = [(tx(x), ty(y)) for s in series for x, y in s.points if ok(x, y)]
    width, height = size
    left, right, top, bottom = 66, 16, 30, 44
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((width // 2, 8), title, fill="black", font=font, anchor="mt")
    x0, y0, x1, y1 = left, top, width - right, height - bottom
    draw.text(((x0 + x1) // 2, height - 6), xlabel, fill="black", font=font, anchor="mb")
    draw.text((4, y0 - 6), ylabel, fill="black", font=font, anchor="lb")
    if not pts:
        draw.rectangle((x0, y0, x1, y1), outline="black")
        draw.text(((x0 + x1) // 2, (y0 + y1) // 2), "no points", fill="gray", anchor="mm")
        return img
    xlo, xhi = _span([p[0] for p in pts] + [tx(v) for v, _ in vlines])
    ylo, yhi = _span([p[1] for p in pts] + [ty(v) for v, _ in hlines])

    def px(x: float, y: float) -> tuple[float, float]:
        return (x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y1 - (y - ylo) / (yhi - ylo) * (y1 - y0))

    xt, yt = nice_ticks(xlo, xhi), nice_ticks(ylo, yhi)
    for v in xt:
        u = px(v, ylo)[0]
        draw.line((u, y0, u, y1), fill=(232, 232, 232))
        draw.line((u, y1, u, y1 + 4), fill="black")
        text = f"{10**v:.3g}" if logx else _fmt(v, xt[1] - xt[0] if len(xt) > 1 else 0)
        draw.text((u, y1 + 6), text, "black", font, "mt")
    for v in yt:
        w = px(xlo, v)[1]
        draw.line((x0, w, x1, w), fill=(232, 232, 232))
        draw.line((x0 - 4, w, x0, w), fill="black")
        text = f"{10**v:.3g}" if logy else _fmt(v, yt[1] - yt[0] if len(yt) > 1 else 0)
        draw.text((x0 - 6, w), text, "black", font, "rm")
    draw.rectangle((x0, y0, x1, y1), outline="black")
    for value, label in hlines:
        w = px(xlo, ty(value))[1]
        for u in range(int(x0), int(x1), 8):
            draw.line((u, w, min(u + 4, x1), w), fill=(120, 120, 120))
        draw.text((x1 - 4, w - 3), label, fill=(90, 90, 90), font=font, anchor="rb")
    for value, label in vlines:
        u = px(tx(value), ylo)[0]
        for w in range(int(y0), int(y1), 8):
            draw.line((u, w, u, min(w + 4, y1)), fill=(120, 120, 120))
        draw.text((u - 3, y1 - 4), label, fill=(90, 90, 90), font=font, anchor="rb")
    for i, s in enumerate(series):
        color = s.color or COLORS[i % len(COLORS)]
        keep = [(k, px(tx(x), ty(y))) for k, (x, y) in enumerate(s.points) if ok(x, y)]
        xy = [p for _, p in keep]
        if s.connect and len(xy) > 1:
            if s.dashed:
                for a, b in itertools.pairwise(xy):
                    _dashed(draw, a, b, color)
            else:
                draw.line(xy, fill=color, width=2)
        if s.markers:
            for k, (u, w) in keep:
                draw.ellipse((u - 3, w - 3, u + 3, w + 3), fill=color, outline="black")
                if k < len(s.labels) and s.labels[k]:
                    draw.text((u + 5, w - 5), s.labels[k], fill=color, font=font, anchor="ls")
    # legend inside the axes
    text_width = max(int(draw.textlength(s.name, font=font)) for s in series)
    lx = x0 + 8 if legend.endswith("left") else x1 - 8 - (text_width + 22)
    top_y = y0 + 8 if legend.startswith("upper") else y1 - 8 - 14 * (len(series) - 1)
    for i, s in enumerate(series):
        color = s.color or COLORS[i % len(COLORS)]
        ly = top_y + 14 * i
        draw.line((lx, ly, lx + 16, ly), fill=color, width=3)
        draw.text((lx + 22, ly), s.name, fill="black", font=font, anchor="lm")
    return img


def _dashed(
    draw: ImageDraw.ImageDraw,
    a: tuple[float, float],
    b: tuple[float, float],
    color: tuple[int, int, int],
    dash: float = 6.0,
) -> None:
    length = math.hypot(b[0] - a[0], b[1] - a[1])
    n = max(1, int(length / dash))
    for k in range(0, n, 2):
        t0, t1 = k / n, min(1.0, (k + 1) / n)
        draw.line(
            (
                a[0] + (b[0] - a[0]) * t0,
                a[1] + (b[1] - a[1]) * t0,
                a[0] + (b[0] - a[0]) * t1,
                a[1] + (b[1] - a[1]) * t1,
            ),
            fill=color,
            width=2,
        )
