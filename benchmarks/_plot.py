"""Line and scatter plots as PNG, drawn with matplotlib on its Agg canvas (no display needed).

Single-series bits/pixel-PSNR plots use the project's own `rate_distortion_figure`
(plugins/hooks/tensorboard.py); `xy_figure` draws several labelled series with a legend, for the
benchmarks that compare curves (bias × loss factor, Normal vs diffusion prior, the controller).
Both return a PIL image of the requested size in pixels (callers `.save(path)` it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image

from ulframe_plugins.hooks.tensorboard import figure_image, new_figure

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


def _rgb(color: tuple[int, int, int]) -> tuple[float, float, float]:
    return (color[0] / 255, color[1] / 255, color[2] / 255)


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
    """An RGB image: each series as points (and lines), a legend, and optional dashed reference
    lines, horizontal and vertical (value, label). `logx` / `logy` put x / y on a log axis
    (non-positive values are left out). `legend`: "upper left", "upper right", "lower left" or
    "lower right" inside the axes."""

    def ok(x: float, y: float) -> bool:
        return math.isfinite(x) and math.isfinite(y) and (x > 0 or not logx) and (y > 0 or not logy)

    fig = new_figure(size)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=8)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, color="0.9", which="major")
    if not any(ok(x, y) for s in series for x, y in s.points):
        ax.text(0.5, 0.5, "no points", color="gray", ha="center", va="center",
                transform=ax.transAxes)  # fmt: skip
        return figure_image(fig)
    from matplotlib.ticker import FuncFormatter

    short = FuncFormatter(lambda v, _: f"{v:.3g}")
    for on, axis, scale in ((logx, ax.xaxis, ax.set_xscale), (logy, ax.yaxis, ax.set_yscale)):
        if on:  # log axes labelled 0.5, 1, 2 (not 5×10⁻¹), minor ticks too
            scale("log")
            axis.set_major_formatter(short)
            axis.set_minor_formatter(short)
    ax.tick_params(which="both", labelsize=7)
    for i, s in enumerate(series):
        color = _rgb(s.color or COLORS[i % len(COLORS)])
        keep = [(k, x, y) for k, (x, y) in enumerate(s.points) if ok(x, y)]
        xs, ys = [x for _, x, _ in keep], [y for _, _, y in keep]
        ax.plot(
            xs, ys, color=color, label=s.name,
            linestyle=("--" if s.dashed else "-") if s.connect else "none",
            linewidth=1.5, marker="o" if s.markers else None, markersize=4,
            markeredgecolor="black", markeredgewidth=0.5,
        )  # fmt: skip
        if s.markers:
            for k, x, y in keep:
                if k < len(s.labels) and s.labels[k]:
                    ax.annotate(s.labels[k], (x, y), xytext=(4, 4), textcoords="offset points",
                                fontsize=7, color=color)  # fmt: skip
    for value, label in hlines:
        ax.axhline(value, color="0.45", linestyle="--", linewidth=1)
        ax.annotate(label, (1, value), xycoords=("axes fraction", "data"), xytext=(-4, 3),
                    textcoords="offset points", ha="right", fontsize=7, color="0.35")  # fmt: skip
    for value, label in vlines:
        ax.axvline(value, color="0.45", linestyle="--", linewidth=1)
        ax.annotate(label, (value, 0), xycoords=("data", "axes fraction"), xytext=(-3, 4),
                    textcoords="offset points", ha="right", fontsize=7, color="0.35")  # fmt: skip
    ax.margins(0.08)
    ax.legend(loc=legend, fontsize=7, frameon=True)
    return figure_image(fig)
