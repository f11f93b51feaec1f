"""Evaluation media: any tensor a stage's evaluation returns, written as a PNG grid or a GIF.

Images go through `ulframe.eval.images`, videos through `ulframe.eval.video` (which builds on
the image grids); this module imports both, and neither imports it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ulframe.eval.images import save_grid
from ulframe.eval.video import save_gif


def save_media(x: torch.Tensor, stem: Path) -> Path:
    """Write an evaluation tensor next to `stem` (a path without suffix); returns the file.

    Images (N, C, H, W) in [-1, 1] -> ``stem.png``, their grid (:func:`save_grid`). Videos
    (N, C, T, H, W) in [-1, 1] -> ``stem.gif``, a looping animation whose frame t is the grid of
    frame t of the N clips (:func:`ulframe.eval.video.save_gif`, 8 fps). An even N gets an even
    number of columns, so interleaved pairs (input, reconstruction) stay side by side.
    """
    ncols = math.ceil(math.sqrt(x.shape[0]))
    if x.shape[0] % 2 == 0 and ncols % 2:
        ncols += 1
    if x.dim() == 4:
        return save_grid(x, stem.with_name(stem.name + ".png"), ncols=ncols)
    if x.dim() == 5:
        return save_gif(x, stem.with_name(stem.name + ".gif"), ncols=ncols)
    raise ValueError(
        f"expected (N, C, H, W) images or (N, C, T, H, W) videos, got {tuple(x.shape)}"
    )
