"""``datasets.kinetics``: class-per-folder videos, the Kinetics layout.

::

    root/train/<class>/<video>.mp4    labels: sorted class folder names -> 0 .. num_classes - 1
    root/val/<class>/<video>.mp4      optional; without it a deterministic 1% of train is held out
    root/test/...                     not used (no labels)

Videos are ``.mp4``, ``.webm``, ``.mkv`` or ``.avi`` (``extensions``). With ``annotations`` (the
Kinetics CSV files, columns ``label,youtube_id,time_start,time_end,split``) labels come from the
CSV instead: a file named ``<youtube_id>_<time_start:06d>_<time_end:06d>.<ext>`` anywhere under
the split folder gets the label of its row, classes are the sorted label names of all rows, and
files without a row are ignored (counted in one WARNING).

An example is a clip ``{"x": float32 (3, T, H, W) in [-1, 1], "label": int}`` with
``T = num_frames`` and ``H = W = resolution``: frames ``frame_stride`` apart (or resampled to
``fps`` by their timestamps), decoded with PyAV, resized so the shorter side is ``resolution``
and cropped to a square. Train clips start at a random frame and are cropped at a random position
and mirrored at random; eval clips are the centered clip, centered crop, never mirrored. Random
choices come from ``ulframe.data.sample_rng()``: reproducible and resume-safe.

Constructing the dataset and ``source(split)`` only list files (no decoding). A video that cannot
be decoded (corrupt, empty, truncated) or is shorter than a clip decodes to ``None`` with a
WARNING naming the file; the engine's loader skips and counts it.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ulframe.data import EmptyDatasetError, Example, sample_rng
from ulframe.errors import ConfigError

from .common import files_under, hold_out
from .video import VIDEO_EXTENSIONS, ClipSpec, read_clip, to_tensor

logger = logging.getLogger(__name__)

HOLDOUT_FRACTION = 0.01
"""Share of train videos held out for eval when ``eval_dir`` does not exist."""

ANNOTATION_COLUMNS = ("label", "youtube_id", "time_start", "time_end")
"""Columns a Kinetics annotations CSV must have (``split`` may follow; it is not used)."""

_ROOT_PARAMETER = "datasets.kinetics.root"
_ANNOTATIONS_PARAMETER = "datasets.kinetics.annotations"


class KineticsSource:
    """The Source of :class:`Kinetics`: items are (path, label) pairs, examples are clips.

    ``decode`` returns ``{"x": float32 (3, T, R, R) in [-1, 1], "label": int}`` or ``None``.
    """

    def __init__(self, items: list[tuple[str, int]], *, clip: ClipSpec, hint: str) -> None:
        self.items = items
        self.clip = clip
        self.hint = hint

    def decode(self, item: tuple[str, int]) -> Example | None:
        path, label = item
        frames = read_clip(path, self.clip, sample_rng())  # (T, R, R, 3) uint8 or None
        if frames is None:
            return None
        return {"x": to_tensor(frames), "label": label}


def annotation_key(youtube_id: str, time_start: int, time_end: int) -> str:
    """The file stem of a Kinetics clip: ``<youtube_id>_<time_start:06d>_<time_end:06d>``."""
    return f"{youtube_id}_{time_start:06d}_{time_end:06d}"


def read_annotations(paths: Sequence[str | os.PathLike[str]]) -> dict[str, str]:
    """File stem -> label name, from Kinetics CSV files (rows without a label are skipped).

    Raises:
        EmptyDatasetError: a file is missing or lacks one of :data:`ANNOTATION_COLUMNS`.
    """
    labels: dict[str, str] = {}
    for path in paths:
        path = Path(path).expanduser()
        if not path.is_file():
            raise EmptyDatasetError(
                f"{_ANNOTATIONS_PARAMETER}: no file at {path}. Set it to the Kinetics CSV "
                "files (label,youtube_id,time_start,time_end,split) or to None to take labels "
                "from the class folders."
            )
        with open(path, newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file)
            missing = [c for c in ANNOTATION_COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise EmptyDatasetError(
                    f"{_ANNOTATIONS_PARAMETER}: {path} has no column {', '.join(missing)} "
                    f"(found: {', '.join(reader.fieldnames or ()) or 'none'}); a Kinetics CSV "
                    f"has the columns {','.join(ANNOTATION_COLUMNS)},split."
                )
            for row in reader:
                label = (row["label"] or "").strip()
                if not label:
                    continue  # the test split has no labels
                key = annotation_key(
                    row["youtube_id"].strip(),
                    int(float(row["time_start"])),
                    int(float(row["time_end"])),
                )
                labels[key] = label
    return labels


class Kinetics:
    """Videos in class folders under ``root`` (the Kinetics layout), decoded into clips.

    Args:
        root: folder holding ``train_dir`` and, optionally, ``eval_dir``.
        num_frames: frames per clip, T.
        frame_stride: native frames between consecutive clip frames (ignored when ``fps`` is
            set).
        fps: if set, resample every video to this frame rate by timestamps (clip frames
            ``1 / fps`` seconds apart, each the decoded frame nearest to its time).
        resolution: side of the square frames, in pixels.
        train_dir: train folder under ``root``, one sub-folder per class.
        eval_dir: eval folder under ``root`` (Kinetics: "val"); if it does not exist, a
            deterministic 1% of the train videos (by hash of their path) is held out instead.
        annotations: Kinetics CSV file(s) (``label,youtube_id,time_start,time_end,split``)
            mapping ``<youtube_id>_<start:06d>_<end:06d>.<ext>`` files to labels; None: labels
            from the sorted class folder names.
        extensions: file endings counted as videos (compared case-insensitively).
        random_clip: train clips start at a random frame (else the centered clip).
        random_crop: train crops at a random position (else centered).
        hflip: mirror train clips with probability 1/2.
        decoder_threads: FFmpeg threads per decoded video (1: none, the loader's workers
            decode videos in parallel; 0: FFmpeg's choice).
    """

    def __init__(
        self,
        root: str,
        num_frames: int = 16,
        frame_stride: int = 1,
        fps: float | None = None,
        resolution: int = 128,
        train_dir: str = "train",
        eval_dir: str = "val",
        annotations: str | Sequence[str] | None = None,
        extensions: tuple[str, ...] = VIDEO_EXTENSIONS,
        random_clip: bool = True,
        random_crop: bool = True,
        hflip: bool = True,
        decoder_threads: int = 1,
    ) -> None:
        for name, value in (("num_frames", num_frames), ("frame_stride", frame_stride)):
            if value < 1:
                raise ConfigError(f"datasets.kinetics.{name} must be >= 1; got {value}")
        if resolution < 1:
            raise ConfigError(f"datasets.kinetics.resolution must be >= 1; got {resolution}")
        if fps is not None and not fps > 0:
            raise ConfigError(f"datasets.kinetics.fps must be positive or None; got {fps}")
        if decoder_threads < 0:
            raise ConfigError(
                f"datasets.kinetics.decoder_threads must be >= 0; got {decoder_threads}"
            )
        self.root = Path(root).expanduser()
        self.num_frames = num_frames
        self.frame_stride = frame_stride
        self.fps = None if fps is None else float(fps)
        self.resolution = resolution
        self.train_dir = train_dir
        self.eval_dir = eval_dir
        if isinstance(annotations, (str, os.PathLike)):
            annotations = [annotations]
        self.annotations = tuple(str(a) for a in annotations) if annotations else ()
        self.extensions = tuple(extension.lower() for extension in extensions)
        self.random_clip = random_clip
        self.random_crop = random_crop
        self.hflip = hflip
        self.decoder_threads = decoder_threads
        self._classes: list[str] | None = None
        self._labels_by_key: dict[str, str] | None = None
        self._splits: dict[str, list[tuple[str, int]]] | None = None

    # ---- scanning (lazy, main process only) -----------------------------------------------

    def _train_folder(self) -> Path:
        train = self.root / self.train_dir
        if not train.is_dir():
            looked_at = train if self.root.is_dir() else self.root
            raise EmptyDatasetError(
                f"{_ROOT_PARAMETER}: no folder at {looked_at}. Set {_ROOT_PARAMETER} to a "
                f"folder laid out as <root>/{self.train_dir}/<class>/<video>.mp4 "
                "(datasets.kinetics.train_dir names the train folder)."
            )
        return train

    @property
    def classes(self) -> list[str]:
        """Sorted class names: the annotations' labels, or the folders under ``train_dir``."""
        if self._classes is None:
            if self.annotations:
                self._labels_by_key = read_annotations(self.annotations)
                self._classes = sorted(set(self._labels_by_key.values()))
            else:
                self._classes = sorted(
                    entry.name
                    for entry in os.scandir(self._train_folder())
                    if entry.is_dir() and not entry.name.startswith(".")
                )
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _is_video(self, name: str) -> bool:
        return not name.startswith(".") and name.lower().endswith(self.extensions)

    def _videos_under(self, folder: str | Path, seen: set[tuple[int, int]]) -> list[str]:
        """Every video file under ``folder`` (recursively), sorted by path; symlinked folders
        followed once, each real file once (``common.files_under``)."""
        return files_under(folder, self._is_video, seen)

    def _scan(self, folder: Path) -> list[tuple[str, int]]:
        """(path, label) of every labelled video under ``folder``, sorted by path."""
        labels = {name: label for label, name in enumerate(self.classes)}
        if not folder.is_dir():
            return []
        seen: set[tuple[int, int]] = set()
        if self.annotations:
            assert self._labels_by_key is not None
            items, unlabelled = [], 0
            for path in self._videos_under(folder, seen):
                name = self._labels_by_key.get(Path(path).stem)
                if name is None:
                    unlabelled += 1
                else:
                    items.append((path, labels[name]))
            if unlabelled:
                logger.warning(
                    "%s: %d videos under %s have no row in %s; they are ignored",
                    _ANNOTATIONS_PARAMETER,
                    unlabelled,
                    folder,
                    ", ".join(self.annotations),
                )
            return items
        items = []
        for entry in sorted(os.scandir(folder), key=lambda entry: entry.name):
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            if entry.name not in labels:
                logger.warning(
                    "%s: class folder %s is not in %s; its videos are ignored",
                    _ROOT_PARAMETER,
                    entry.path,
                    self.root / self.train_dir,
                )
                continue
            label = labels[entry.name]
            items.extend((path, label) for path in self._videos_under(entry.path, seen))
        return items

    def _split_items(self) -> dict[str, list[tuple[str, int]]]:
        if self._splits is not None:
            return self._splits
        train = self._scan(self._train_folder())
        eval_folder = self.root / self.eval_dir
        if eval_folder.is_dir():
            splits = {"train": train, "eval": self._scan(eval_folder)}
        else:
            splits = hold_out(train, self.root, HOLDOUT_FRACTION, "videos", _ROOT_PARAMETER)
        self._splits = splits
        return splits

    # ---- the Dataset protocol --------------------------------------------------------------

    def clip_spec(self, split: str) -> ClipSpec:
        """How ``split``'s clips are cut: random start, crop and flip for train only."""
        train = split == "train"
        return ClipSpec(
            num_frames=self.num_frames,
            frame_stride=self.frame_stride,
            fps=self.fps,
            resolution=self.resolution,
            random_clip=train and self.random_clip,
            random_crop=train and self.random_crop,
            hflip=train and self.hflip,
            threads=self.decoder_threads,
        )

    def source(self, split: str) -> KineticsSource:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval'; got {split!r}")
        items = self._split_items()[split]
        folder = self.root / (self.train_dir if split == "train" else self.eval_dir)
        hint = (
            f"Check the videos under {folder}, or set {_ROOT_PARAMETER} "
            f"(now {str(self.root)!r}) to another folder."
        )
        if not items:
            where = (
                f"matching a row of {_ANNOTATIONS_PARAMETER}"
                if self.annotations
                else f"in {len(self.classes)} class folders"
            )
            raise EmptyDatasetError(
                f"{_ROOT_PARAMETER}: no {split} videos ({', '.join(self.extensions)}) found "
                f"under {folder}/<class>/ {where}. Set {_ROOT_PARAMETER} to a folder laid out "
                f"as <root>/{self.train_dir}/<class>/<video>.mp4."
            )
        return KineticsSource(items, clip=self.clip_spec(split), hint=hint)
