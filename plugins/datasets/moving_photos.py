"""``datasets.moving_photos``: real-pixel video with no download, panned over the photographs.

Each clip is a ``resolution`` x ``resolution`` window moving across one of the photographs that
scikit-image ships (the eight of ``datasets.photos``; the label is the photograph's index) for
``num_frames`` frames. Each photograph is first downscaled (antialiased bicubic, once per
process) so that its shorter side is ``scale * resolution`` pixels: the window then sees a
recognisable part of the scene, and a motion of a pixel or two per frame is visible. The window
moves at constant velocity (a uniform direction, a speed uniform in
[``max_speed / 2``, ``max_speed``] pixels per frame) from a uniform start and bounces off the
borders of its region; positions are rounded to whole pixels, so a frame is a numpy slice of the
cached photograph.

Held-out pixels, as in ``datasets.photos``: each downscaled photograph is split at a column;
train windows stay left of it, eval windows right of it, so no eval pixel is ever trained on.
The split is at 85% of the width (``photos.TRAIN_FRACTION``), moved left where needed so that the
eval part is at least ``EVAL_MIN_WIDTH`` windows wide (room to move).

Train trajectories are drawn in ``decode`` from ``ulframe.data.sample_rng()``: a fresh path for
every (epoch, item), reproducible and resume-safe. Eval trajectories are fixed by ``seed`` (each
evaluation sees the same clips). Examples are ``{"x": float32 (3, T, R, R) in [-1, 1],
"label": int}``.
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import numpy as np
import torch

from ulframe.data import EmptyDatasetError, Example, sample_rng
from ulframe.errors import ConfigError

from .common import RESAMPLE
from .photos import PHOTOGRAPHS, load_photographs, split_column

EVAL_MIN_WIDTH = 1.5
"""Smallest width of a photograph's eval part, in windows (``resolution``)."""

_SPLIT_STREAM = {"train": 0, "eval": 1}

_scaled: dict[int, tuple[np.ndarray, ...]] = {}
_scaled_lock = threading.Lock()


def scaled_photographs(short_side: int) -> tuple[np.ndarray, ...]:
    """The photographs as uint8 (H, W, 3) arrays with shorter side ``short_side``; cached."""
    with _scaled_lock:
        if short_side not in _scaled:
            arrays = []
            for photo in load_photographs():
                width, height = photo.size
                factor = short_side / min(width, height)
                size = (
                    max(short_side, round(width * factor)),
                    max(short_side, round(height * factor)),
                )
                arrays.append(np.asarray(photo.resize(size, RESAMPLE), dtype=np.uint8))
            _scaled[short_side] = tuple(arrays)
        return _scaled[short_side]


def region_columns(width: int, window: int, split: str) -> tuple[int, int]:
    """[x0, x1): the columns of a ``width``-pixel photograph that ``split``'s windows use."""
    column = min(split_column(width), width - math.ceil(EVAL_MIN_WIDTH * window))
    return (0, column) if split == "train" else (column, width)


class Clip(NamedTuple):
    """One clip: which photograph, and the seed of its trajectory (None: drawn in decode)."""

    photo: int
    key: tuple[int, int, int] | None


def bounce(position: np.ndarray, low: float, high: float) -> np.ndarray:
    """Fold positions into [low, high] as a point bouncing off both ends would move."""
    length = high - low
    if length <= 0:
        return np.full_like(position, low)
    phase = np.mod(position - low, 2 * length)
    return low + np.where(phase > length, 2 * length - phase, phase)


def trajectory(
    rng: np.random.Generator,
    region: tuple[int, int, int, int],
    window: int,
    num_frames: int,
    max_speed: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(left, top) of the window in each frame, int arrays (T,), inside ``region``.

    ``region`` is (x0, y0, x1, y1) in pixels; the window starts uniformly inside it and moves at
    a constant velocity (uniform direction, speed in [max_speed / 2, max_speed]) with bounces.
    """
    x0, y0, x1, y1 = region
    high_x, high_y = x1 - window, y1 - window
    start = np.array([rng.uniform(x0, high_x), rng.uniform(y0, high_y)])
    angle = rng.uniform(0.0, 2 * math.pi)
    speed = rng.uniform(0.5 * max_speed, max_speed)
    steps = np.arange(num_frames)
    x = bounce(start[0] + speed * math.cos(angle) * steps, x0, high_x)
    y = bounce(start[1] + speed * math.sin(angle) * steps, y0, high_y)
    return np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)


class MovingPhotoClips:
    """The Source of :class:`MovingPhotos`: clip descriptors in, (3, T, R, R) clips out."""

    hint = "Set datasets.moving_photos.clips_per_epoch / datasets.moving_photos.eval_clips above 0."

    def __init__(
        self,
        items: list[Clip],
        *,
        split: str,
        resolution: int,
        num_frames: int,
        max_speed: float,
        short_side: int,
    ) -> None:
        self.items = items
        self.split = split
        self.resolution = resolution
        self.num_frames = num_frames
        self.max_speed = max_speed
        self.short_side = short_side

    def decode(self, item: Clip) -> Example:
        photo = scaled_photographs(self.short_side)[item.photo]  # (H, W, 3) uint8
        height, width = photo.shape[:2]
        x0, x1 = region_columns(width, self.resolution, self.split)
        rng = np.random.default_rng(item.key) if item.key is not None else sample_rng()
        left, top = trajectory(
            rng, (x0, 0, x1, height), self.resolution, self.num_frames, self.max_speed
        )
        r = self.resolution
        frames = np.stack([photo[y : y + r, x : x + r] for x, y in zip(left, top)])  # (T,R,R,3)
        x = torch.from_numpy(frames).permute(3, 0, 1, 2)  # (3, T, R, R)
        return {"x": (x.to(torch.float32) / 127.5 - 1.0).contiguous(), "label": item.photo}


class MovingPhotos:
    """Clips of a window panning over the photographs scikit-image ships: real pixels, no download.

    Args:
        resolution: side of the square frames, in pixels.
        num_frames: frames per clip, T.
        clips_per_epoch: number of train clips (one epoch), balanced over photographs.
        eval_clips: number of eval clips, from the held-out right part of each photograph.
        max_speed: largest window speed, in pixels per frame (speeds are uniform in
            [max_speed / 2, max_speed]).
        scale: each photograph is downscaled so that its shorter side is ``scale * resolution``
            pixels (the larger, the smaller the part of the scene a window shows).
        seed: seeds the eval trajectories (train ones come from the engine's per-sample RNG).
    """

    # Its gin parameters, one keyword each (deliberately: a list of defaults that looks like other
    # constructors' shares nothing with them).
    def __init__(
        self,
        resolution: int = 16,
        num_frames: int = 16,
        clips_per_epoch: int = 4096,
        eval_clips: int = 256,
        max_speed: float = 2.0,
        scale: float = 6.0,
        seed: int = 0,
    ) -> None:
        if resolution < 1:
            raise ConfigError(f"datasets.moving_photos.resolution must be >= 1; got {resolution}")
        if num_frames < 1:
            raise ConfigError(f"datasets.moving_photos.num_frames must be >= 1; got {num_frames}")
        if max_speed < 0:
            raise ConfigError(f"datasets.moving_photos.max_speed must be >= 0; got {max_speed}")
        short_side = round(scale * resolution)
        # The narrowest photograph's train part must hold a window (its eval part always does).
        narrowest = min(photo.size[0] / min(photo.size) for photo in load_photographs())
        width = round(narrowest * short_side)
        if short_side < resolution or region_columns(width, resolution, "train")[1] < resolution:
            raise ConfigError(
                f"datasets.moving_photos.scale = {scale} is too small for resolution "
                f"{resolution}: each photograph's train and eval parts must hold a window; "
                "use a larger scale (the default is 6)"
            )
        self.resolution = resolution
        self.num_frames = num_frames
        self.clips_per_epoch = clips_per_epoch
        self.eval_clips = eval_clips
        self.max_speed = float(max_speed)
        self.scale = float(scale)
        self.short_side = short_side
        self.seed = seed
        self.num_classes = len(PHOTOGRAPHS)

    def source(self, split: str) -> MovingPhotoClips:
        if split not in _SPLIT_STREAM:
            raise ValueError(f"split must be one of {sorted(_SPLIT_STREAM)}; got {split!r}")
        count = self.clips_per_epoch if split == "train" else self.eval_clips
        parameter = "clips_per_epoch" if split == "train" else "eval_clips"
        if count < 1:
            raise EmptyDatasetError(
                f"datasets.moving_photos.{parameter} is {count}: the {split} split has no "
                "clips; set it to 1 or more."
            )
        photos = len(PHOTOGRAPHS)
        if split == "train":
            items = [Clip(i % photos, None) for i in range(count)]
        else:
            items = [Clip(i % photos, (self.seed, _SPLIT_STREAM[split], i)) for i in range(count)]
        return MovingPhotoClips(
            items,
            split=split,
            resolution=self.resolution,
            num_frames=self.num_frames,
            max_speed=self.max_speed,
            short_side=self.short_side,
        )
