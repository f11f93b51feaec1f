"""Image grids: (N, C, H, W) tensors in [-1, 1] to PNG files and uint8 arrays.

`save_media` writes any evaluation tensor: images as PNG grids, videos (N, C, T, H, W) as GIFs
(see `ulframe.eval.video`).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return rearrange(x, "n c h w -> n h w c").cpu().numpy()


def grid(x: torch.Tensor, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile (N, C, H, W) in [-1, 1] into one (H', W', 3) uint8 image, `ncols` per row."""
    n, c, h, w = x.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    imgs = to_uint8(x)
    if c == 1:
        imgs = np.repeat(imgs, 3, axis=-1)
    out = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(imgs):
        r, col = divmod(i, ncols)
        out[
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + col * (w + pad) : pad + col * (w + pad) + w,
        ] = img[..., :3]
    return out


def save_grid(x: torch.Tensor, path: Path, ncols: int | None = None, scale: int = 1) -> Path:
    """Write a grid PNG (nearest-neighbour upscaled by `scale`), creating the folder; always
    PNG, whatever the suffix of `path`."""
    from ulframe import rundir

    img = Image.fromarray(grid(x, ncols))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    rundir.write_bytes(path, buffer.getvalue())  # atomic; a full disk names the file
    return path


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
        from ulframe.eval.video import save_gif  # video imports this module

        return save_gif(x, stem.with_name(stem.name + ".gif"), ncols=ncols)
    raise ValueError(
        f"expected (N, C, H, W) images or (N, C, T, H, W) videos, got {tuple(x.shape)}"
    )
