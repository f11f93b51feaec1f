"""Image helpers shared by the dataset plugins (Pillow in, engine tensors out)."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ulframe.data import sample_rng

logger = logging.getLogger(__name__)

RESAMPLE = Image.Resampling.BICUBIC
"""Pillow's resize widens the bicubic kernel by the downscale factor: antialiased."""


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a float32 (3, H, W) tensor in [-1, 1]."""
    array = np.asarray(to_rgb(image), dtype=np.uint8)  # (H, W, 3)
    x = torch.from_numpy(array.copy()).permute(2, 0, 1)  # (3, H, W)
    return x.to(torch.float32) / 127.5 - 1.0


BACKGROUND = (255, 255, 255)
"""What transparent pixels become: white."""

_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB, without losing the picture.

    16-bit and 32-bit grey (``I;16``, ``I``) and float (``F``) are scaled to 0..255 (Pillow
    would clip them); transparency (RGBA, LA, PA, a palette with a transparent colour) is
    composited over :data:`BACKGROUND`; CMYK, 1-bit, YCbCr, ... convert as Pillow does.
    """
    if image.mode in _WIDE_MODES:
        return Image.fromarray(_to_uint8(np.asarray(image), image.mode)).convert("RGB")
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Grey values of a wide mode on 0..255: 16-bit data (``I;16``, or ``I`` up to 65535) by
    255/65535, floats in [0, 1] by 255, 8-bit data as it is, anything else min-max scaled."""
    x = np.nan_to_num(values.astype(np.float64))
    low, high = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and low >= 0 and 255 < high <= 65535):
        x = x / 257.0
    elif mode == "F" and low >= 0 and high <= 1:
        x = x * 255.0
    elif low < 0 or high > 255:
        x = (x - low) * (255.0 / (high - low)) if high > low else np.zeros_like(x)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def open_rgb(path: str | Path) -> Image.Image | None:
    """Read an image file fully into memory as RGB; ``None`` (with a WARNING, once per file) if
    unreadable."""
    try:
        with Image.open(path) as image:
            image.load()  # every pixel: truncation shows here
            return to_rgb(image)
    except Exception as error:  # Pillow signals bad files with OSError, SyntaxError, ...
        warn_once(logger, path, "skipping unreadable image %s: %s: %s", type(error).__name__, error)
        return None


_warned_bytes: set[bytes] = set()
_warned_lock = threading.Lock()


def warn_once(log: logging.Logger, path: str | Path, message: str, *args: object) -> None:
    """``log.warning(message, path, *args)`` the first time `path` is reported in this process:
    an unreadable file is named once, not once per epoch. The path is shown with bytes that
    are not UTF-8 escaped."""
    key = os.fsencode(path)
    with _warned_lock:
        if key in _warned_bytes:
            return
        _warned_bytes.add(key)
    log.warning(message, shown(path), *args)


def shown(path: str | Path) -> str:
    """`path` for messages: a file name that is not valid UTF-8 gets its bytes escaped."""
    return os.fsencode(path).decode(errors="backslashreplace")


def files_under(
    folder: str | Path, accept: Callable[[str], bool], seen: set[tuple[int, int]]
) -> list[str]:
    """Every file under `folder` whose name `accept`s, recursively, sorted by path.

    Symbolic links to folders are followed once: a folder already in `seen` (by device and
    inode: a link loop, or a second link to the same folder) is not entered again, and a file
    already in `seen` is not listed again, so every real file counts once. Hidden entries
    (names starting with a dot) are skipped.
    """
    paths: list[str] = []
    if not _first_visit(folder, seen):
        return paths
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [
            name
            for name in sorted(dirnames)
            if not name.startswith(".") and _first_visit(os.path.join(dirpath, name), seen)
        ]
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if not name.startswith(".") and accept(name) and _first_visit(path, seen):
                paths.append(path)
    return paths


def _first_visit(path: str | Path, seen: set[tuple[int, int]]) -> bool:
    """Whether `path`'s target is new to `seen` (and add it); a broken link counts as new."""
    try:
        st = os.stat(path)
    except OSError:
        return True
    key = (st.st_dev, st.st_ino)
    if key in seen:
        return False
    seen.add(key)
    return True


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


def square_view(image: Image.Image, size: int, random_crop: bool, flip: bool) -> torch.Tensor:
    """An image as a dataset shows it: its shorter side resized to `size`, a square crop (random
    or centred) and, with `flip`, a left-right mirror half the time; (3, size, size) in [-1, 1].
    The random choices come from ``ulframe.data.sample_rng()``: reproducible and resume-safe."""
    image = resize_shorter_side(image, size)
    if random_crop:
        left, top = random_offsets(image, size, sample_rng())
    else:
        left, top = center_offsets(image, size)
    image = crop_square(image, size, left, top)
    if flip and sample_rng().random() < 0.5:
        image = hflip(image)
    return to_tensor(image)


def hold_out(
    train: list[tuple[str, int]], root: Path, fraction: float, what: str, parameter: str
) -> dict[str, list[tuple[str, int]]]:
    """Split (path, label) items into "train" and a deterministic "eval" share `fraction`.

    Items are ranked by a hash of their path relative to `root`, so the split is stable under
    re-scans, file additions and machines. At least one item is held out when there are two or
    more. Logs a WARNING (naming `parameter`) since a missing eval folder is usually a mistake.
    """

    def rank(item: tuple[str, int]) -> str:
        relative = os.fsencode(os.path.relpath(item[0], root))  # any file name, UTF-8 or not
        return hashlib.md5(relative, usedforsecurity=False).hexdigest()

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
