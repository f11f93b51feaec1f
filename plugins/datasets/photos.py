"""``datasets.photos``: real pixels with no download, cut from scikit-image's photographs.

The colour photographs that ship inside the scikit-image wheel (see :data:`PHOTOGRAPHS`; the
grayscale and synthetic images are left out) are cut into random square crops: a side of
``scale`` times the shorter side of the region (``scale`` uniform in ``scale_range``), a uniform
position, a coin-flip mirror, resized to ``resolution`` x ``resolution`` with Pillow's
antialiased bicubic filter. The label is the photograph's index, so class conditioning has
something to learn.

Held-out pixels: each photograph is split at 85% of its width (:data:`TRAIN_FRACTION`). Train
crops lie in the left part, eval crops in the right part, so no eval pixel is ever trained on.
The right part is narrow, so eval crops are smaller and often upsampled at ``resolution``.

The crop descriptors are drawn in ``source(split)`` from ``seed``: a train epoch is a fixed set
of ``crops_per_epoch`` crops (balanced over photographs), reshuffled by the loader each epoch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from PIL import Image

from ulframe.data import EmptyDatasetError, Example
from ulframe.errors import ConfigError

from .common import RESAMPLE, hflip, to_tensor

logger = logging.getLogger(__name__)

TRAIN_FRACTION = 0.85
"""Share of each photograph's width (from the left) that train crops come from."""

_SPLIT_STREAM = {"train": 0, "eval": 1}


def _motorcycle() -> np.ndarray:
    import skimage.data

    left, _right, _disparity = skimage.data.stereo_motorcycle()
    return left


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


PHOTOGRAPHS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),  # 512x512, portrait
    "chelsea": _skimage("chelsea"),  # 451x300, a cat
    "coffee": _skimage("coffee"),  # 600x400, a cup
    "rocket": _skimage("rocket"),  # 640x427, a launch
    "hubble_deep_field": _skimage("hubble_deep_field"),  # 1000x872, galaxies
    "immunohistochemistry": _skimage("immunohistochemistry"),  # 512x512, stained tissue
    "retina": _skimage("retina"),  # 1411x1411, fundus photograph
    "motorcycle": _motorcycle,  # 741x500, left view of a stereo pair
}
"""The RGB photographs in scikit-image's wheel (load offline); label = position here."""

_photos: tuple[Image.Image, ...] | None = None
_photos_lock = threading.Lock()


def load_photographs() -> tuple[Image.Image, ...]:
    """The photographs as RGB PIL images, loaded once per process."""
    global _photos
    with _photos_lock:
        if _photos is None:
            _photos = tuple(
                Image.fromarray(np.ascontiguousarray(load()[..., :3])).convert("RGB")
                for load in PHOTOGRAPHS.values()
            )
        return _photos


class Crop(NamedTuple):
    """One crop: which photograph, the (left, upper, right, lower) pixel box, mirrored or not."""

    photo: int
    box: tuple[int, int, int, int]
    flip: bool


def split_column(width: int) -> int:
    """First pixel column of a photograph's held-out (eval) part."""
    return round(width * TRAIN_FRACTION)


def draw_crops(
    sizes: list[tuple[int, int]],
    count: int,
    split: str,
    scale_range: tuple[float, float],
    seed: int,
) -> list[Crop]:
    """``count`` crops of ``split``, balanced over photographs of (width, height) ``sizes``."""
    rng = np.random.default_rng((seed, _SPLIT_STREAM[split]))
    crops = []
    for i in range(count):
        photo = i % len(sizes)
        width, height = sizes[photo]
        x0, x1 = (0, split_column(width)) if split == "train" else (split_column(width), width)
        side = max(1, round(min(x1 - x0, height) * rng.uniform(*scale_range)))
        left = x0 + int(rng.integers(0, x1 - x0 - side + 1))
        top = int(rng.integers(0, height - side + 1))
        crops.append(Crop(photo, (left, top, left + side, top + side), bool(rng.integers(2))))
    return crops


class PhotoCrops:
    """The Source of :class:`Photos`: crop descriptors in, resized crops out."""

    hint = "Set datasets.photos.crops_per_epoch / datasets.photos.eval_crops above 0."

    def __init__(self, items: list[Crop], resolution: int) -> None:
        self.items = items
        self.resolution = resolution

    def decode(self, item: Crop) -> Example:
        photo = load_photographs()[item.photo]
        size = (self.resolution, self.resolution)
        image = photo.resize(size, RESAMPLE, box=item.box)
        if item.flip:
            image = hflip(image)
        return {"x": to_tensor(image), "label": item.photo}


class Photos:
    """Random crops of the photographs scikit-image ships: real pixels, no download.

    Args:
        resolution: side of the square examples, in pixels.
        crops_per_epoch: number of train crops (one epoch).
        eval_crops: number of eval crops, cut from the held-out right 15% of each photograph.
        scale_range: crop side as a fraction of the shorter side of the region, (min, max).
        seed: seeds the crop descriptors.
    """

    def __init__(
        self,
        resolution: int = 32,
        crops_per_epoch: int = 4096,
        eval_crops: int = 256,
        scale_range: tuple[float, float] = (0.25, 1.0),
        seed: int = 0,
    ) -> None:
        low, high = scale_range
        if not 0.0 < low <= high <= 1.0:
            raise ConfigError(
                f"datasets.photos.scale_range must satisfy 0 < min <= max <= 1; got {scale_range}"
            )
        if resolution < 1:
            raise ConfigError(f"datasets.photos.resolution must be >= 1; got {resolution}")
        self.resolution = resolution
        self.crops_per_epoch = crops_per_epoch
        self.eval_crops = eval_crops
        self.scale_range = (float(low), float(high))
        self.seed = seed
        self.num_classes = len(PHOTOGRAPHS)

    def source(self, split: str) -> PhotoCrops:
        if split not in _SPLIT_STREAM:
            raise ValueError(f"split must be one of {sorted(_SPLIT_STREAM)}; got {split!r}")
        count = self.crops_per_epoch if split == "train" else self.eval_crops
        parameter = "crops_per_epoch" if split == "train" else "eval_crops"
        if count < 1:
            raise EmptyDatasetError(
                f"datasets.photos.{parameter} is {count}: the {split} split has no crops; "
                "set it to 1 or more."
            )
        sizes = [photo.size for photo in load_photographs()]
        crops = draw_crops(sizes, count, split, self.scale_range, self.seed)
        return PhotoCrops(crops, self.resolution)
