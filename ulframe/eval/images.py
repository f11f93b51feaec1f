"""Image grids: (N, C, H, W) tensors in [-1, 1] to PNG files and uint8 arrays.

`ulframe.eval.media.save_media` writes any evaluation tensor: images as PNG grids (here), videos
(N, C, T, H, W) as GIFs (`ulframe.eval.video`, which builds on this module).
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
