"""``datasets.moving_digits``: Moving-MNIST-style clips of scikit-learn's handwritten digits.

The construction of Moving MNIST (Srivastava, Mansimov, Salakhutdinov, 2015), with the digits of
``datasets.digits`` (scikit-learn's 1,797 8x8 digits; no download) instead of MNIST's: each clip
shows ``num_digits`` digits (2 by default, as in Moving MNIST; 1 gives single-digit clips) on a
black ``resolution`` x ``resolution`` frame for ``num_frames`` frames. Each digit starts at a
uniform position inside the frame and moves at a constant velocity (a uniform direction, a
speed uniform in [``max_speed / 2``, ``max_speed``] pixels per frame), bouncing off the frame's
borders (the velocity component normal to a border flips); where digits overlap the frame is
their pixel-wise maximum. Positions are rounded to whole pixels, so a frame is the maximum of a
few numpy slices of cached digit images.

Digit size: each 8x8 digit is scaled to ``digit_size`` x ``digit_size`` pixels with
``digits.resize_digit`` (bilinear, values kept in [0, 1]); by default ``digit_size`` is half the
frame, ``resolution // 2`` (16x16 digits in 32x32 frames, 8x8 in 16x16). sklearn's digits fill
their 8x8 box almost to the edges, so a digit's ink spans about half the frame: larger than
Moving MNIST's 28x28-box digits (~20 pixels of ink) in 64x64 frames, which keeps the strokes
several pixels wide at 32x32 and still leaves room to move and to bounce. Digits never leave the
frame: the top-left corner of a digit stays in [0, ``resolution - digit_size``] on both axes.

Values: white strokes on black, in [-1, 1] (-1: no ink); ``channels = 3`` repeats the grey
channel. Examples are ``{"x": float32 (channels, T, R, R), "label": int}``; the label is the
class of the first digit (the only digit with ``num_digits = 1``).

Splits: train clips use train digits only and eval clips eval digits only
(``digits.split_indices``: a fixed, stratified split; no eval digit is ever trained on). Clip
``i``'s first digit is of class ``i % 10`` (the ``i // 10``-th digit of that class in the split,
cycling), so the classes are balanced in every split and in any prefix of 10k eval clips. The
other digits and the trajectories of a train clip are drawn in ``decode`` from
``ulframe.data.sample_rng()``: a fresh clip for every (epoch, item), reproducible and
resume-safe. Those of eval clip ``i`` are fixed by ``(seed, i)``: every evaluation sees the same
clips.
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import numpy as np
import torch

from ulframe.data import EmptyDatasetError, Example, sample_rng
from ulframe.errors import ConfigError

from .digits import NUM_CLASSES, SPLITS, load_digits, resize_digit, split_indices
from .moving_photos import bounce

_SPLIT_STREAM = {"train": 0, "eval": 1}

_resized: dict[int, np.ndarray] = {}
_resized_lock = threading.Lock()


def resized_digits(size: int) -> np.ndarray:
    """Every digit of :func:`digits.load_digits` at ``size`` x ``size``: float32 (1797, S, S) in
    [0, 1]; computed once per process and size."""
    with _resized_lock:
        if size not in _resized:
            images, _ = load_digits()
            _resized[size] = np.stack([resize_digit(image, size) for image in images])
        return _resized[size]


def class_round_robin(indices: list[int]) -> list[int]:
    """``indices`` (digit indices) reordered so that item ``i`` is of class ``i % 10``: the
    ``i // 10``-th digit of that class, cycling; as long as the largest class times 10."""
    _, labels = load_digits()
    members = [[i for i in indices if labels[i] == c] for c in range(NUM_CLASSES)]
    if any(not m for m in members):
        return list(indices)
    longest = max(len(m) for m in members)
    return [members[c][j % len(members[c])] for j in range(longest) for c in range(NUM_CLASSES)]


def trajectory(
    rng: np.random.Generator, span: int, num_frames: int, max_speed: float
) -> tuple[np.ndarray, np.ndarray]:
    """(left, top) of one digit in each frame, int arrays (T,) in [0, ``span``]: a uniform
    start, a uniform direction, a speed in [max_speed / 2, max_speed], bounces at 0 and span."""
    start = rng.uniform(0.0, span, size=2)
    angle = rng.uniform(0.0, 2 * math.pi)
    speed = rng.uniform(0.5 * max_speed, max_speed)
    steps = np.arange(num_frames)
    x = bounce(start[0] + speed * math.cos(angle) * steps, 0.0, float(span))
    y = bounce(start[1] + speed * math.sin(angle) * steps, 0.0, float(span))
    return np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)


class Clip(NamedTuple):
    """One clip: its first digit (an index into load_digits), and the seed of the rest (the other
    digits and every trajectory; None: drawn in decode from the engine's per-sample RNG)."""

    digit: int
    key: tuple[int, int, int] | None


class MovingDigitClips:
    """The Source of :class:`MovingDigits`: clip descriptors in, (C, T, R, R) clips out."""

    hint = "Set datasets.moving_digits.clips_per_epoch / datasets.moving_digits.eval_clips above 0."

    def __init__(
        self,
        items: list[Clip],
        *,
        pool: list[int],
        resolution: int,
        num_frames: int,
        num_digits: int,
        digit_size: int,
        channels: int,
        max_speed: float,
    ) -> None:
        self.items = items
        self.pool = pool  # the split's digits, where the other digits of a clip come from
        self.resolution = resolution
        self.num_frames = num_frames
        self.num_digits = num_digits
        self.digit_size = digit_size
        self.channels = channels
        self.max_speed = max_speed

    def layout(
        self, item: Clip, rng: np.random.Generator | None = None
    ) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(digit, left (T,), top (T,)) of each digit of ``item``'s clip, the first digit first:
        the other digits (from this split's ``pool``) and the trajectories drawn from ``rng``
        (default: the item's seed, or ``sample_rng()`` for train items)."""
        if rng is None:
            rng = np.random.default_rng(item.key) if item.key is not None else sample_rng()
        others = rng.choice(len(self.pool), size=self.num_digits - 1)
        chosen = [item.digit, *(self.pool[int(j)] for j in others)]
        span = self.resolution - self.digit_size
        return [(d, *trajectory(rng, span, self.num_frames, self.max_speed)) for d in chosen]

    def decode(self, item: Clip) -> Example:
        images = resized_digits(self.digit_size)  # (N, S, S) in [0, 1]
        _, labels = load_digits()
        r, s = self.resolution, self.digit_size
        frames = np.zeros((self.num_frames, r, r), dtype=np.float32)
        for digit, left, top in self.layout(item):
            for t, (x, y) in enumerate(zip(left, top)):
                window = frames[t, y : y + s, x : x + s]
                np.maximum(window, images[digit], out=window)  # overlapping digits: the max
        x = torch.from_numpy(frames * 2.0 - 1.0)[None].expand(self.channels, -1, -1, -1)
        return {"x": x.contiguous(), "label": int(labels[item.digit])}


class MovingDigits:
    """Moving-MNIST-style clips of handwritten digits bouncing in a black frame; no download.

    Args:
        resolution: side of the square frames, in pixels.
        num_frames: frames per clip, T.
        num_digits: digits per clip (Moving MNIST: 2); the label is the first digit's class.
        digit_size: side of each digit in the frame, in pixels (None: ``resolution // 2``).
        channels: 1 (grey, the default) or 3 (the grey channel repeated).
        clips_per_epoch: number of train clips (one epoch), balanced over the classes.
        eval_clips: number of eval clips, made of eval digits only.
        max_speed: largest digit speed, in pixels per frame (speeds are uniform in
            [max_speed / 2, max_speed], directions uniform).
        seed: seeds the eval clips (train ones come from the engine's per-sample RNG).
    """

    def __init__(
        self,
        resolution: int = 32,
        num_frames: int = 16,
        num_digits: int = 2,
        digit_size: int | None = None,
        channels: int = 1,
        clips_per_epoch: int = 4096,
        eval_clips: int = 256,
        max_speed: float = 2.0,
        seed: int = 0,
    ) -> None:
        def refuse(param: str, value: object, need: str) -> ConfigError:
            return ConfigError(f"datasets.moving_digits.{param} must be {need}; got {value!r}")

        if not isinstance(resolution, int) or resolution < 8:
            raise refuse("resolution", resolution, "an int >= 8")
        if not isinstance(num_frames, int) or num_frames < 1:
            raise refuse("num_frames", num_frames, "an int >= 1")
        if not isinstance(num_digits, int) or num_digits < 1:
            raise refuse("num_digits", num_digits, "an int >= 1")
        size = resolution // 2 if digit_size is None else digit_size
        if not isinstance(size, int) or not 4 <= size <= resolution:
            raise refuse("digit_size", digit_size, f"an int in [4, resolution = {resolution}]")
        if channels not in (1, 3):
            raise refuse("channels", channels, "1 or 3")
        if not isinstance(max_speed, int | float) or not 0 <= max_speed < math.inf:
            raise refuse("max_speed", max_speed, "a finite number >= 0 (pixels per frame)")
        for param, value in (("clips_per_epoch", clips_per_epoch), ("eval_clips", eval_clips)):
            if not isinstance(value, int):
                raise refuse(param, value, "an int")
        self.resolution = resolution
        self.num_frames = num_frames
        self.num_digits = num_digits
        self.digit_size = size
        self.channels = channels
        self.clips_per_epoch = clips_per_epoch
        self.eval_clips = eval_clips
        self.max_speed = float(max_speed)
        self.seed = seed
        self.num_classes = NUM_CLASSES

    def source(self, split: str) -> MovingDigitClips:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}; got {split!r}")
        count = self.clips_per_epoch if split == "train" else self.eval_clips
        parameter = "clips_per_epoch" if split == "train" else "eval_clips"
        if count < 1:
            raise EmptyDatasetError(
                f"datasets.moving_digits.{parameter} is {count}: the {split} split has no "
                "clips; set it to 1 or more."
            )
        pool = split_indices(split)
        order = class_round_robin(pool)
        if split == "train":
            items = [Clip(order[i % len(order)], None) for i in range(count)]
        else:
            stream = _SPLIT_STREAM[split]
            items = [Clip(order[i % len(order)], (self.seed, stream, i)) for i in range(count)]
        return MovingDigitClips(
            items,
            pool=pool,
            resolution=self.resolution,
            num_frames=self.num_frames,
            num_digits=self.num_digits,
            digit_size=self.digit_size,
            channels=self.channels,
            max_speed=self.max_speed,
        )
