"""Image helpers shared by the dataset plugins (Pillow in, engine tensors out)."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

RESAMPLE = Image.Resampling.BICUBIC
"""Pillow's resize widens the bicubic kernel by the downscale factor: antialiased."""


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a float32 (3, H, W) tensor in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    x = torch.from_numpy(array.copy()).permute(2, 0, 1)  # (3, H, W)
    return x.to(torch.float32) / 127.5 - 1.0


def open_rgb(path: str | Path) -> Image.Image | None:
    """Read an image file fully into memory as RGB; ``None`` (with a WARNING) if unreadable."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() loads every pixel: truncation shows here
    except Exception as error:  # Pillow signals bad files with OSError, SyntaxError, ...
        logger.warning("skipping unreadable image %s: %s: %s", path, type(error).__name__, error)
        return None


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Resize so that the shorter side is ``size``, keeping the aspect ratio."""
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    return image.resize(new_size, RESAMPLE)


def crop_square(image: Image.Image, size: int, left: int, top: int) -> Image.Image:
    """The ``size`` x ``size`` square at (left, top)."""
    return image.crop((left, top, left + size, top + size))


def center_offsets(image: Image.Image, size: int) -> tuple[int, int]:
    """(left, top) of the centered ``size`` square."""
    width, height = image.size
    return (width - size) // 2, (height - size) // 2


def random_offsets(image: Image.Image, size: int, rng: np.random.Generator) -> tuple[int, int]:
    """(left, top) of a uniformly placed ``size`` square."""
    width, height = image.size
    return int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))


def hflip(image: Image.Image) -> Image.Image:
    """Mirror left to right."""
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def hold_out(
    train: list[tuple[str, int]], root: Path, fraction: float, what: str, parameter: str
) -> dict[str, list[tuple[str, int]]]:
    """Split (path, label) items into "train" and a deterministic "eval" share `fraction`.

    Items are ranked by a hash of their path relative to `root`, so the split is stable under
    re-scans, file additions and machines. At least one item is held out when there are two or
    more. Logs a WARNING (naming `parameter`) since a missing eval folder is usually a mistake.
    """

    def rank(item: tuple[str, int]) -> str:
        relative = os.path.relpath(item[0], root)
        return hashlib.md5(relative.encode(), usedforsecurity=False).hexdigest()

    held = max(1, round(len(train) * fraction)) if len(train) > 1 else 0
    held_out = {path for path, _ in sorted(train, key=rank)[:held]}
    logger.warning(
        "%s: no eval folder; holding out %d of %d train %s (%.0f%%) for eval",
        parameter,
        held,
        len(train),
        what,
        100 * fraction,
    )
    return {
        "train": [item for item in train if item[0] not in held_out],
        "eval": [item for item in train if item[0] in held_out],
    }
