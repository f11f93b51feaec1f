"""``datasets.shards``: images or clips packed into tar shards by ``ulframe shard``.

::

    ulframe shard /data/imagenet /data/imagenet-shards --size 1GB     (or a Kinetics folder)

    root/manifest.json        kind (image or clip), class names, per split each shard's name,
                              size, SHA-256 and every example's offset, size and label
    root/train-000000.tar     KEY.jpg + KEY.cls, ... (webdataset's layout; the original bytes)
    root/eval-000000.tar      the eval split: the folder's val/ or its held-out 1%

The format is ``ulframe.data.shards`` (the standard library's ``tarfile``; webdataset is not
needed to write or read it, and can read it). ``source(split)`` reads the manifest, checks that
every shard of the split is there with the manifest's size (one line naming the first that is
not), and returns a Source whose items are the examples ``(shard path, offset, size, label)``:
``decode`` reads one example with one ``pread`` and decodes it as the folder datasets do,
with their functions: images as ``datasets.image_folder`` (``common.to_rgb``, shorter side
resized to ``resolution``, square crop, flip), clips as ``datasets.kinetics``
(``video.read_clip`` on the member's bytes in place, through FFmpeg's ``subfile`` protocol).

So the engine treats a shard set like a folder of files: one permutation of all examples per
epoch, rank r taking positions r, r+W, ..., loader workers taking them in turn; any number of
shards works with any number of ranks and workers, every example is seen once per epoch, and a
resume continues at the exact example (the loader's position is the number of examples drawn).
An example that cannot be decoded is warned about once (naming the shard and its offset) and
skipped and counted by the loader.

``resampled=True`` streams instead: each loader worker reads whole shards front to back (the
shards drawn at random, with replacement, in proportion to their sizes), a sequential read per
worker for storage where random reads are slow. It gives up the exact resume position and the
once-per-epoch guarantee: the order depends on which worker decodes which item, and a resumed
run starts new shard streams (the number of examples drawn, and the noise, still continue from
where they were).
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import threading
import weakref
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
from PIL import Image

from ulframe.data import EmptyDatasetError, Example, sample_rng
from ulframe.data.shards import (
    ShardInfo,
    ShardSet,
    ShardSetError,
    read_member,
    write_shard_set,
)
from ulframe.errors import ConfigError, UserError

from .common import (
    square_view,
    to_rgb,
    warn_once,
)
from .image_folder import ImageFolder
from .kinetics import Kinetics
from .video import VIDEO_EXTENSIONS, ClipSpec, read_clip
from .video import to_tensor as clip_to_tensor

logger = logging.getLogger(__name__)

_ROOT_PARAMETER = "datasets.shards.root"

Item = tuple[str, int, int, int]
"""(shard path, data offset, data size, label): one example of a shard set."""


class Members(Sequence[Item]):
    """The examples of one split's shards, in shard order, as compact int64 columns.

    ``members[i]`` is ``(shard path, offset, size, label)``; it pickles as a few arrays, not a
    million tuples.
    """

    def __init__(self, folder: Path, shards: Sequence[ShardInfo]) -> None:
        self.paths = [os.path.abspath(folder / shard.name) for shard in shards]
        counts = [shard.count for shard in shards]
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.shard = np.repeat(np.arange(len(shards), dtype=np.int64), counts)
        empty = np.empty(0, dtype=np.int64)
        self.offsets = np.concatenate([s.offsets for s in shards]) if shards else empty
        self.sizes = np.concatenate([s.sizes for s in shards]) if shards else empty
        self.labels = np.concatenate([s.labels for s in shards]) if shards else empty

    def __len__(self) -> int:
        return len(self.offsets)

    @overload
    def __getitem__(self, index: int) -> Item: ...
    @overload
    def __getitem__(self, index: slice) -> list[Item]: ...
    def __getitem__(self, index: int | slice) -> Item | list[Item]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"example {index} of {len(self)}")
        index %= len(self)
        return (
            self.paths[self.shard[index]],
            int(self.offsets[index]),
            int(self.sizes[index]),
            int(self.labels[index]),
        )


class _Stream:
    """One worker's position in resampled mode: the rows of the shard it is reading."""

    def __init__(self, start: int, end: int) -> None:
        self.next, self.end = start, end


class ShardSource:
    """The Source of :class:`Shards`: items are :data:`Item`, examples images or clips.

    ``decode`` returns ``{"x": float32 (3, R, R) or (3, T, R, R) in [-1, 1], "label": int}``,
    or ``None`` (with a WARNING) for an example that cannot be read or decoded.
    """

    def __init__(
        self,
        items: Members,
        *,
        kind: str,
        resolution: int,
        random_crop: bool,
        hflip: bool,
        clip: ClipSpec | None,
        resampled: bool,
        hint: str,
    ) -> None:
        self.items = items
        self.kind = kind
        self.resolution = resolution
        self.random_crop = random_crop
        self.hflip = hflip
        self.clip = clip
        self.resampled = resampled
        self.hint = hint

    def decode(self, item: Item) -> Example | None:
        if self.resampled:
            item = self._streamed()
        if self.kind == "clip":
            return self._clip(item)
        return self._image(item)

    def _image(self, item: Item) -> Example | None:
        """As ``ImageFolderSource.decode``, from the member's bytes."""
        path, offset, size, label = item
        name = f"{path}@{offset}"
        try:
            with Image.open(_Member(read_member(path, offset, size), name)) as opened:
                opened.load()  # every pixel: truncation shows here
                image = to_rgb(opened)
        except Exception as error:  # OSError from the read; OSError, SyntaxError... from Pillow
            warn_once(
                logger, name, "skipping unreadable image %s: %s: %s", type(error).__name__, error
            )
            return None
        x = square_view(image, self.resolution, self.random_crop, self.hflip)
        return {"x": x, "label": label}

    def _clip(self, item: Item) -> Example | None:
        """As ``KineticsSource.decode``: FFmpeg reads the member where it lies in the shard."""
        assert self.clip is not None
        path, offset, size, label = item
        url = f"subfile,,start,{offset},end,{offset + size},,:{path}"
        try:
            url.encode()
        except UnicodeEncodeError:  # FFmpeg takes UTF-8 URLs: copy the member out instead
            return self._clip_copied(item)
        frames = read_clip(url, self.clip, sample_rng())  # (T, R, R, 3) uint8 or None
        return None if frames is None else {"x": clip_to_tensor(frames), "label": label}

    def _clip_copied(self, item: Item) -> Example | None:
        assert self.clip is not None
        path, offset, size, label = item
        try:
            data = read_member(path, offset, size)
        except OSError as error:
            warn_once(logger, f"{path}@{offset}", "skipping unreadable video %s: %s", error)
            return None
        with tempfile.NamedTemporaryFile(suffix=".video") as file:
            file.write(data)
            file.flush()
            frames = read_clip(file.name, self.clip, sample_rng())
        return None if frames is None else {"x": clip_to_tensor(frames), "label": label}

    def _streamed(self) -> Item:
        """Resampled mode: the next example of this thread's shard stream; a new shard, drawn
        with `sample_rng()` in proportion to the shards' sizes, when the stream is used up."""
        streams: weakref.WeakKeyDictionary[ShardSource, _Stream] = _streams.__dict__.setdefault(
            "by_source", weakref.WeakKeyDictionary()
        )
        stream = streams.get(self)
        if stream is None or stream.next >= stream.end:
            counts = np.diff(self.items.starts)
            shard = int(sample_rng().choice(len(counts), p=counts / counts.sum()))
            stream = streams[self] = _Stream(
                int(self.items.starts[shard]), int(self.items.starts[shard + 1])
            )
        row = stream.next
        stream.next += 1
        return self.items[row]


_streams = threading.local()
"""Per thread (and per process): each resampled Source's current shard stream."""


class Shards:
    """Images or clips from a shard set written by ``ulframe shard`` (a folder with a manifest).

    Args:
        root: the shard set's folder (holding ``manifest.json``).
        resolution: side of the square examples (clips: of their frames), in pixels.
        num_frames: clips: frames per clip, T.
        frame_stride: clips: native frames between consecutive clip frames (unless ``fps``).
        fps: clips: if set, resample every video to this frame rate by timestamps.
        random_crop: train crops at a random position; None: as the folder datasets do
            (images centered, ``datasets.image_folder``; clips at random, ``datasets.kinetics``).
        random_clip: clips: train clips start at a random frame (else the centered clip).
        hflip: mirror train examples with probability 1/2.
        decoder_threads: clips: FFmpeg threads per decoded video (1: none).
        resampled: train streams whole shards drawn at random in each loader worker instead of
            reading examples in the engine's order: sequential reads, but no exact resume
            position and no once-per-epoch guarantee (see the module's documentation).
        verify: check every shard's SHA-256 against the manifest when a split is first read
            (reads the whole split once); without it only their sizes are checked.
    """

    def __init__(
        self,
        root: str,
        resolution: int = 256,
        num_frames: int = 16,
        frame_stride: int = 1,
        fps: float | None = None,
        random_crop: bool | None = None,
        random_clip: bool = True,
        hflip: bool = True,
        decoder_threads: int = 1,
        resampled: bool = False,
        verify: bool = False,
    ) -> None:
        if resolution < 1:
            raise ConfigError(f"datasets.shards.resolution must be >= 1; got {resolution}")
        self.root = Path(root).expanduser()
        self.resolution = resolution
        self.resampled = resampled
        self.verify = verify
        self.random_crop = random_crop
        self.hflip = hflip
        try:
            self._clip = ClipSpec(
                num_frames=num_frames, frame_stride=frame_stride,
                fps=None if fps is None else float(fps), resolution=resolution,
                random_clip=random_clip, random_crop=random_crop is not False, hflip=hflip,
                threads=decoder_threads,
            )  # fmt: skip
        except ConfigError as err:
            raise ConfigError(f"datasets.shards.{err}") from None
        self._set: ShardSet | None = None
        self._checked: set[str] = set()

    @property
    def shard_set(self) -> ShardSet:
        """The manifest of ``root``, read on first use."""
        if self._set is None:
            try:
                self._set = ShardSet.load(self.root)
            except ShardSetError as err:
                raise ShardSetError(f"{_ROOT_PARAMETER}: {err}") from None
        return self._set

    @property
    def classes(self) -> list[str]:
        return list(self.shard_set.classes)

    @property
    def num_classes(self) -> int:
        return len(self.shard_set.classes)

    def source(self, split: str) -> ShardSource:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval'; got {split!r}")
        shard_set = self.shard_set
        if split not in self._checked:
            try:
                shard_set.check(split, verify=self.verify)
            except ShardSetError as err:
                raise ShardSetError(f"{_ROOT_PARAMETER}: {err}") from None
            self._checked.add(split)
        if shard_set.count(split) == 0:
            raise EmptyDatasetError(
                f"{_ROOT_PARAMETER}: the shard set {self.root} has no {split} examples "
                f"({sum(1 for _ in shard_set.splits.get(split, ()))} shards); write it again "
                "with `ulframe shard` from a folder with train and val images or videos"
            )
        train = split == "train"
        clip = None
        if shard_set.kind == "clip":  # as Kinetics.clip_spec: random choices for train only
            clip = replace(
                self._clip,
                random_clip=train and self._clip.random_clip,
                random_crop=train and self._clip.random_crop,
                hflip=train and self._clip.hflip,
            )
        return ShardSource(
            Members(shard_set.folder, shard_set.splits[split]),
            kind=shard_set.kind,
            resolution=self.resolution,
            random_crop=train and bool(self.random_crop),
            hflip=train and self.hflip,
            clip=clip,
            resampled=train and self.resampled,
            hint=f"Check the shards under {self.root}, or set {_ROOT_PARAMETER} to another "
            "shard set.",
        )

    # ---- writing (``ulframe shard``) -------------------------------------------------------

    @staticmethod
    def write_folder(
        src: str | os.PathLike[str],
        out: str | os.PathLike[str],
        *,
        max_bytes: int,
        kind: Literal["auto", "image", "clip"] = "auto",
        seed: int = 0,
        workers: int = 4,
    ) -> ShardSet:
        """Write the image folder (``datasets.image_folder``'s layout) or Kinetics folder
        (``datasets.kinetics``'s, class folders) `src` as a shard set in `out`.

        The splits, labels and classes are those the folder dataset reads (train, and val or
        its held-out 1% as eval). ``kind="auto"``: clips when ``src/train`` holds a video file,
        else images. Every file is checked as it is written (an image fully decoded; a video
        opened and its middle frame decoded); files that fail are warned about, left out and
        counted in the manifest's ``skipped``.

        Raises:
            UserError: `src` is not such a folder, or `out` is not new or empty.
        """
        src = Path(src).expanduser()
        if kind == "auto":
            kind = "clip" if _holds_video(src / "train") else "image"
        if kind == "image":
            folder: ImageFolder | Kinetics = ImageFolder(str(src))
            readable = _image_readable
        elif kind == "clip":
            folder = Kinetics(str(src))
            readable = _video_readable
        else:
            raise UserError(f"--kind {kind!r} is not one of auto, image, clip")
        splits = {split: _listed(folder, split, kind) for split in ("train", "eval")}
        return write_shard_set(
            out, kind=kind, classes=folder.classes, splits=splits, max_bytes=max_bytes,
            readable=readable, seed=seed, workers=workers,
        )  # fmt: skip

    @staticmethod
    def ulframe_check_kwargs(folder: Path) -> dict[str, Any]:
        """Tiny constructor arguments for the plugin kit: a shard set of 16x16 PNGs."""
        from ulframe.testing.tiny import make_tree

        tree = make_tree(folder / "images", video=False)
        Shards.write_folder(tree, folder / "shards", max_bytes=2**20, workers=1)
        return {"root": str(folder / "shards"), "resolution": 16}


def _listed(folder: ImageFolder | Kinetics, split: str, kind: str) -> list[tuple[str, int]]:
    """(path, label) of `split`'s files as the folder dataset lists them; none for an empty
    eval split (with a WARNING)."""
    try:
        return list(folder.source(split).items)
    except EmptyDatasetError as err:
        if split == "train":
            raise UserError(
                f"SRC {folder.root}: no {kind} files under {folder.root / 'train'}/<class>/"
            ) from err
        logger.warning(
            "SRC %s: no eval %s files; the shard set has no eval split", folder.root, kind
        )
        return []


def _holds_video(folder: Path) -> bool:
    """Whether any file under `folder` has a video extension."""
    for _, _, names in os.walk(folder, followlinks=True):
        if any(name.lower().endswith(VIDEO_EXTENSIONS) for name in names):
            return True
    return False


class _Member(io.BytesIO):
    """An example's bytes, shown by its name in Pillow's messages (not as a BytesIO object)."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.shown = name

    def __repr__(self) -> str:
        return self.shown


def _image_readable(path: str, data: bytes) -> bool:
    """Whether Pillow decodes every pixel of `data` (a WARNING naming `path` if not)."""
    try:
        with Image.open(_Member(data, os.fsdecode(path))) as image:
            image.load()
        return True
    except Exception as error:
        warn_once(logger, path, "skipping unreadable image %s: %s: %s", type(error).__name__, error)
        return False


_PROBE = ClipSpec(num_frames=1, resolution=1)
"""The clip that checks a video while sharding: its middle frame, decoded."""


def _video_readable(path: str, data: bytes) -> bool:
    """Whether the video at `path` opens and its middle frame decodes (``read_clip`` warns)."""
    return read_clip(path, _PROBE, np.random.default_rng(0)) is not None
