"""``datasets.image_folder``: class-per-folder images, the ImageNet layout.

::

    root/train/<class>/<image>      labels: sorted class folder names -> 0 .. num_classes - 1
    root/val/<class>/<image>        optional; without it a deterministic 1% of train is held out

Images are decoded with Pillow, converted to RGB (``common.to_rgb``: 16-bit and float grey scaled
to the full range, transparency composited over white), resized so the shorter side is ``resolution``
(antialiased bicubic) and cropped to a square: centered, or at a random position for train with
``random_crop``; train images are mirrored at random with ``hflip``. Random choices come from
``ulframe.data.sample_rng()``, so they are reproducible and survive a resume. An unreadable file
(corrupt, truncated, not an image) is logged at WARNING once and skipped by the loader, which
counts it. Symbolic links to folders are followed, each real file listed once (loops are not
followed twice); file names need not be valid UTF-8.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ulframe.data import EmptyDatasetError, Example
from ulframe.errors import ConfigError

from .common import (
    files_under,
    hold_out,
    open_rgb,
    shown,
    square_view,
)

logger = logging.getLogger(__name__)

HOLDOUT_FRACTION = 0.01
"""Share of train images held out for eval when ``eval_dir`` does not exist."""

_ROOT_PARAMETER = "datasets.image_folder.root"


class ImageFolderSource:
    """The Source of :class:`ImageFolder`: items are (path, label) pairs."""

    def __init__(
        self,
        items: list[tuple[str, int]],
        *,
        resolution: int,
        random_crop: bool,
        hflip: bool,
        hint: str,
    ) -> None:
        self.items = items
        self.resolution = resolution
        self.random_crop = random_crop
        self.hflip = hflip
        self.hint = hint

    def decode(self, item: tuple[str, int]) -> Example | None:
        path, label = item
        image = open_rgb(path)
        if image is None:
            return None
        x = square_view(image, self.resolution, self.random_crop, self.hflip)
        return {"x": x, "label": label}


class ImageFolder:
    """Images in class folders under ``root`` (ImageNet layout); labels from sorted folder names.

    Args:
        root: folder holding ``train_dir`` and, optionally, ``eval_dir``.
        resolution: side of the square examples, in pixels.
        train_dir: train folder under ``root``, one sub-folder per class.
        eval_dir: eval folder under ``root``, same class folders; if it does not exist, a
            deterministic 1% of the train images (by hash of their path) is held out instead.
        extensions: file endings counted as images (compared case-insensitively).
        random_crop: train crops at a random position instead of the center.
        hflip: mirror train images with probability 1/2.
    """

    def __init__(
        self,
        root: str,
        resolution: int = 256,
        train_dir: str = "train",
        eval_dir: str = "val",
        extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".JPEG"),
        random_crop: bool = False,
        hflip: bool = True,
    ) -> None:
        if resolution < 1:
            raise ConfigError(f"datasets.image_folder.resolution must be >= 1; got {resolution}")
        self.root = Path(root).expanduser()
        self.resolution = resolution
        self.train_dir = train_dir
        self.eval_dir = eval_dir
        self.extensions = tuple(extension.lower() for extension in extensions)
        self.random_crop = random_crop
        self.hflip = hflip
        self._classes: list[str] | None = None
        self._splits: dict[str, list[tuple[str, int]]] | None = None

    # ---- scanning (lazy, main process only) -----------------------------------------------

    @property
    def classes(self) -> list[str]:
        """Sorted class folder names under ``root/train_dir``; scanned on first use."""
        if self._classes is None:
            train = self.root / self.train_dir
            if not train.is_dir():
                looked_at = train if self.root.is_dir() else self.root
                raise EmptyDatasetError(
                    f"{_ROOT_PARAMETER}: no folder at {looked_at}. Set {_ROOT_PARAMETER} to a "
                    f"folder laid out as <root>/{self.train_dir}/<class>/<image> "
                    "(datasets.image_folder.train_dir names the train folder)."
                )
            self._classes = sorted(
                entry.name
                for entry in os.scandir(train)
                if entry.is_dir() and not entry.name.startswith(".")
            )
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _is_image(self, name: str) -> bool:
        return not name.startswith(".") and name.lower().endswith(self.extensions)

    def _scan(self, folder: Path) -> list[tuple[str, int]]:
        """(path, label) of every image under ``folder/<class>/``, sorted by path."""
        labels = {name: label for label, name in enumerate(self.classes)}
        items: list[tuple[str, int]] = []
        seen: set[tuple[int, int]] = set()  # every real folder and file once (symlinks)
        for entry in sorted(os.scandir(folder), key=lambda entry: entry.name):
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            if entry.name not in labels:
                logger.warning(
                    "%s: class folder %s is not in %s; its images are ignored",
                    _ROOT_PARAMETER,
                    shown(entry.path),
                    self.root / self.train_dir,
                )
                continue
            label = labels[entry.name]
            items.extend((path, label) for path in files_under(entry.path, self._is_image, seen))
        return items

    def _split_items(self) -> dict[str, list[tuple[str, int]]]:
        if self._splits is not None:
            return self._splits
        train = self._scan(self.root / self.train_dir)
        eval_folder = self.root / self.eval_dir
        if eval_folder.is_dir():
            splits = {"train": train, "eval": self._scan(eval_folder)}
        else:
            splits = hold_out(train, self.root, HOLDOUT_FRACTION, "images", _ROOT_PARAMETER)
        self._splits = splits
        return splits

    # ---- the Dataset protocol --------------------------------------------------------------

    def source(self, split: str) -> ImageFolderSource:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval'; got {split!r}")
        items = self._split_items()[split]
        folder = self.root / (self.train_dir if split == "train" else self.eval_dir)
        hint = (
            f"Check the images under {folder}, or set {_ROOT_PARAMETER} "
            f"(now {str(self.root)!r}) to another folder."
        )
        if not items:
            raise EmptyDatasetError(
                f"{_ROOT_PARAMETER}: no {split} images ({', '.join(self.extensions)}) "
                f"found under {folder}/<class>/ ({len(self.classes)} class folders). "
                f"Set {_ROOT_PARAMETER} to a folder laid out as "
                f"<root>/{self.train_dir}/<class>/<image>."
            )
        train = split == "train"
        return ImageFolderSource(
            items,
            resolution=self.resolution,
            random_crop=train and self.random_crop,
            hflip=train and self.hflip,
            hint=hint,
        )
