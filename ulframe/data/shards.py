"""Shard sets: examples packed into plain tar files, with a JSON manifest that indexes them.

A shard set is a folder::

    manifest.json          kind, class names, and per split the shards: name, member count,
                           size in bytes, SHA-256, and each example's data offset, size, label
    train-000000.tar       KEY.EXT (the original file's bytes: .jpg, .png, .mp4, ...) and
    train-000001.tar       KEY.cls (the label as decimal text), KEY a 9-digit index in the split
    ...
    eval-000000.tar

The tar files are written with the standard library's `tarfile` and keep webdataset's layout
(one KEY per example, one member per field), so `tar`, webdataset or any tar reader can read them
too; no package beyond Python is needed to write or read them. Examples are stored in a seeded
random order (`write_shard_set`), so a stretch of one shard is a mix of classes.

The manifest lets a reader know the split's length without opening a tar, and read any example
at random with one `os.pread` of ``size`` bytes at ``offset`` (`read_member`): the engine's
sampler permutes *examples*, not shards (ulframe/data/pipeline.py), so a shard set is split over
ranks and loader workers exactly as a folder of files is, and resumes at the same example.

This module knows the format only: which files go in a shard set (and whether each is
readable) is decided by the caller (the ``datasets.shards`` plugin lists image and Kinetics
folders).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from ulframe import rundir
from ulframe.errors import DataError, UserError
from ulframe.progress import progress

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
"""The manifest's file name inside a shard set."""
FORMAT = "ulframe-shards"
FORMAT_VERSION = 1
KINDS = ("image", "clip")
"""What the members of a shard set are: encoded images, or encoded video files."""
Kind = Literal["image", "clip"]
LABEL_EXTENSION = "cls"
"""webdataset's field name for an integer class label."""
KEY_DIGITS = 9

_BLOCK = tarfile.BLOCKSIZE  # 512: a tar header, and the unit data is padded to
_CHUNK = 256  # files read and checked per batch handed to the writer's thread pool
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


class ShardSetError(DataError):
    """A shard set whose manifest is missing or wrong, or whose shards do not match it."""


def parse_size(text: str, name: str = "--size") -> int:
    """Bytes in a size such as ``1GB``, ``500MB``, ``64MiB`` or ``1e9`` (decimal units are
    powers of 1000, binary ones of 1024; case does not matter).

    Raises:
        UserError: not a positive size; the message names the setting `name` (the CLI's
            option, or a gin parameter).
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS or float(match.group(1)) * _UNITS[unit] < 1:
        raise UserError(
            f"{name} {text!r} is not a size; give a positive number of bytes with a unit, e.g. "
            "1GB, 500MB, 64MiB"
        )
    return int(float(match.group(1)) * _UNITS[unit])


# ---- the manifest ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardInfo:
    """One tar file of a split, as the manifest records it.

    Attributes:
        name: file name inside the shard set (``train-000000.tar``).
        nbytes: size of the file; checked against the file before it is read.
        sha256: checksum of the file (`ShardSet.check(verify=True)` recomputes it).
        offsets, sizes, labels: (count,) int64: where each example's data starts in the
            file, its length in bytes, and its label; in the order the examples were written.
    """

    name: str
    nbytes: int
    sha256: str
    offsets: np.ndarray
    sizes: np.ndarray
    labels: np.ndarray

    @property
    def count(self) -> int:
        return len(self.offsets)

    @classmethod
    def from_json(cls, entry: Mapping[str, Any], num_classes: int) -> ShardInfo:
        """The inverse of `to_json`, its fields checked against each other and labels against
        ``0 .. num_classes - 1``.

        Raises:
            ValueError, KeyError, TypeError: an entry that is incomplete or contradicts itself.
        """
        return _shard_info(entry, num_classes)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "count": self.count,
            "bytes": self.nbytes,
            "sha256": self.sha256,
            "offset": self.offsets.tolist(),
            "size": self.sizes.tolist(),
            "label": self.labels.tolist(),
        }


@dataclass(frozen=True)
class ShardSet:
    """A shard set's manifest, read and checked (`ShardSet.load`).

    Attributes:
        folder: the shard set's folder.
        kind: ``"image"`` or ``"clip"``.
        classes: class names; label ``i`` is ``classes[i]``.
        splits: split name -> its shards, in order.
        skipped: split name -> source files left out by the writer as unreadable.
    """

    folder: Path
    kind: Kind
    classes: tuple[str, ...]
    splits: Mapping[str, tuple[ShardInfo, ...]]
    skipped: Mapping[str, int]

    def count(self, split: str) -> int:
        """Examples in `split` (0 when the split has no shards)."""
        return sum(shard.count for shard in self.splits.get(split, ()))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "kind": self.kind,
            "classes": list(self.classes),
            "skipped": dict(self.skipped),
            "splits": {s: [shard.to_json() for shard in v] for s, v in self.splits.items()},
        }

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> ShardSet:
        """Read ``folder/manifest.json`` and check that it is consistent (not the tar files:
        `check` does that).

        Raises:
            ShardSetError: no manifest, not a manifest of this format, or an entry that
                contradicts itself; one line naming the file and the entry.
        """
        folder = Path(folder).expanduser()
        path = folder / MANIFEST
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise ShardSetError(
                f"no {MANIFEST} in {folder}; write a shard set with `ulframe shard SRC {folder}`"
            ) from None
        except (OSError, ValueError) as err:
            raise ShardSetError(f"cannot read {path}: {err}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ShardSetError(f'{path} is not a shard manifest (no "format": "{FORMAT}")')
        if data.get("version") != FORMAT_VERSION:
            raise ShardSetError(
                f"{path} has version {data.get('version')!r}; this ulframe reads version "
                f"{FORMAT_VERSION} (rewrite it with `ulframe shard`)"
            )
        try:
            kind, classes = data["kind"], tuple(str(c) for c in data["classes"])
            if kind not in KINDS:
                raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
            splits = {
                str(split): tuple(_shard_info(entry, len(classes)) for entry in entries)
                for split, entries in data["splits"].items()
            }
            skipped = {str(k): int(v) for k, v in data.get("skipped", {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            what = f"no {err}" if isinstance(err, KeyError) else str(err)
            raise ShardSetError(f"{path}: bad entry: {what}") from None
        return cls(folder, cast(Kind, kind), classes, splits, skipped)

    def check(self, split: str, verify: bool = False) -> None:
        """Check that every shard of `split` exists and has the manifest's size (one `stat`
        each), and with `verify` its SHA-256 (reads every byte).

        Raises:
            ShardSetError: the first shard that is missing or differs, named.
        """
        for shard in self.splits.get(split, ()):
            path = self.folder / shard.name
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise ShardSetError(
                    f"shard {shard.name} of {self.folder / MANIFEST} is missing"
                ) from None
            if size != shard.nbytes:
                raise ShardSetError(
                    f"shard {path} has {size} bytes, {MANIFEST} says {shard.nbytes}: rewritten "
                    "or truncated since the manifest was written; write the set again"
                )
            if verify and file_sha256(path) != shard.sha256:
                raise ShardSetError(
                    f"shard {path} does not match the SHA-256 in {MANIFEST}: corrupted or "
                    "rewritten; write the set again"
                )


def _shard_info(entry: Mapping[str, Any], num_classes: int) -> ShardInfo:
    """One manifest entry as a `ShardInfo`, its fields checked against each other."""
    name = str(entry["name"])
    if Path(name).name != name or not name.endswith(".tar"):
        raise ValueError(f"shard name {name!r} is not a .tar file name")
    offsets, sizes, labels = (
        np.asarray(entry[k], dtype=np.int64) for k in ("offset", "size", "label")
    )
    count, nbytes = int(entry["count"]), int(entry["bytes"])
    if not len(offsets) == len(sizes) == len(labels) == count:
        raise ValueError(
            f"shard {name} has count {count} but {len(offsets)} offsets, {len(sizes)} sizes, "
            f"{len(labels)} labels"
        )
    if count and (offsets.min() < 0 or sizes.min() < 0 or (offsets + sizes).max() > nbytes):
        raise ValueError(f"shard {name} has a member outside its {nbytes} bytes")
    if count and (labels.min() < 0 or labels.max() >= max(num_classes, 1)):
        raise ValueError(f"shard {name} has a label outside 0 .. {max(num_classes, 1) - 1}")
    return ShardInfo(name, nbytes, str(entry["sha256"]), offsets, sizes, labels)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


# ---- reading -----------------------------------------------------------------------------------

MAX_OPEN_SHARDS = 256
"""Shards a process keeps open for reading; beyond them, each read opens and closes its shard
(a descriptor is never closed while another thread may read it, and a set of many small
shards stays under the limit of open files)."""

_descriptors: dict[str, int] = {}
_descriptors_lock = threading.Lock()


def read_member(path: str, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of the file at `path`: one example's data in a shard.

    Each process keeps the first `MAX_OPEN_SHARDS` shards it reads open (read-only, for the
    life of the process) and reads them with `os.pread`, which moves no file position, so any
    number of threads read one descriptor at once.

    Raises:
        OSError: the file cannot be opened or read, or ends before ``offset + size``.
    """
    fd = _descriptors.get(path)
    if fd is None:
        with _descriptors_lock:
            fd = _descriptors.get(path)
            if fd is None and len(_descriptors) < MAX_OPEN_SHARDS:
                fd = _descriptors[path] = os.open(path, os.O_RDONLY)
    if fd is None:
        with open(path, "rb", buffering=0) as file:
            data = os.pread(file.fileno(), size, offset)
    else:
        data = os.pread(fd, size, offset)
    if len(data) != size:
        raise OSError(f"{path} ends before byte {offset + size} (truncated?)")
    return data


# ---- writing -----------------------------------------------------------------------------------


def _closed_size(offset: int) -> int:
    """The size of a tar file closed after `offset` bytes of members: two zero blocks end it,
    and `tarfile` pads it to a whole record (10 KiB), as tar does."""
    return -(-(offset + 2 * _BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _member_bytes(size: int) -> int:
    """Bytes a tar member of `size` data bytes with a short name takes: header + padded data."""
    return _BLOCK + -(-size // _BLOCK) * _BLOCK


class ShardWriter:
    """Writes one split's examples into ``PREFIX-NNNNNN.tar`` files of at most `max_bytes`.

    A shard is closed when the next example would take it past `max_bytes` (a single example
    larger than that gets a shard of its own; a tar file is never smaller than one 10 KiB
    record). Each shard is written to ``NAME.tmp``, fsynced and renamed into place when
    complete; `close` returns the shards' `ShardInfo`.
    """

    def __init__(self, folder: Path, prefix: str, max_bytes: int) -> None:
        self.folder = folder
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.shards: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._members: list[tuple[int, int, int]] = []  # (offset, size, label)
        self._index = 0  # examples written: the next KEY

    def _path(self) -> Path:
        return self.folder / f"{self.prefix}-{len(self.shards):06d}.tar"

    def add(self, extension: str, data: bytes, label: int) -> None:
        """Append one example: ``KEY.extension`` holding `data`, ``KEY.cls`` its label."""
        text = str(label).encode()
        need = _member_bytes(len(data)) + _member_bytes(len(text))
        if self._tar is not None and self._members:
            if _closed_size(self._tar.offset + need) > self.max_bytes:
                self._finish()
        if self._tar is None:
            tmp = self._path().with_suffix(".tar.tmp")
            self._tar = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)
        key = f"{self._index:0{KEY_DIGITS}d}"
        offset = self._add_member(f"{key}.{extension}", data)
        self._add_member(f"{key}.{LABEL_EXTENSION}", text)
        self._members.append((offset, len(data), label))
        self._index += 1

    def _add_member(self, name: str, data: bytes) -> int:
        """Write one member; the offset of its data in the file."""
        assert self._tar is not None
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        header = info.tobuf(self._tar.format, self._tar.encoding, self._tar.errors)
        offset = self._tar.offset + len(header)
        self._tar.addfile(info, io.BytesIO(data))
        return offset

    def _finish(self) -> None:
        assert self._tar is not None
        path = self._path()
        tmp = Path(cast(str, self._tar.name))
        self._tar.close()
        with open(tmp, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(tmp, path)
        offsets, sizes, labels = (np.asarray(c, dtype=np.int64) for c in zip(*self._members))
        self.shards.append(
            ShardInfo(path.name, path.stat().st_size, file_sha256(path), offsets, sizes, labels)
        )
        self._tar, self._members = None, []

    def close(self) -> list[ShardInfo]:
        """Finish the open shard; every shard written, in order."""
        if self._tar is not None:
            self._finish()
        return self.shards


def _read_checked(
    item: tuple[str, int], readable: Callable[[str, bytes], bool]
) -> tuple[str, int, bytes | None]:
    path, label = item
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        logger.warning(
            "skipping unreadable file %s: %s",
            os.fsencode(path).decode(errors="backslashreplace"),
            err,
        )
        return path, label, None
    return path, label, data if readable(path, data) else None


def _checked(
    items: Sequence[tuple[str, int]], readable: Callable[[str, bytes], bool], workers: int
) -> Iterator[tuple[str, int, bytes | None]]:
    """(path, label, bytes or None when unreadable) of every item, in order; `workers` threads
    read and check them a chunk at a time."""
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        for start in range(0, len(items), _CHUNK):
            chunk = items[start : start + _CHUNK]
            yield from pool.map(lambda item: _read_checked(item, readable), chunk)


def write_shard_set(
    out: str | os.PathLike[str],
    *,
    kind: Kind,
    classes: Sequence[str],
    splits: Mapping[str, Sequence[tuple[str, int]]],
    max_bytes: int,
    readable: Callable[[str, bytes], bool],
    seed: int = 0,
    workers: int = 4,
) -> ShardSet:
    """Write (path, label) files as a shard set in `out` (an empty or new folder).

    Each split's files go in a random order seeded by `seed`; each is read and passed to
    `readable(path, data)`, and the ones it refuses (it logs why) or that cannot be read are
    left out and counted (`ShardSet.skipped`). The manifest is written last, so a folder
    without one was not finished.

    Raises:
        UserError: `out` is a file or a folder that is not empty, or `kind` is unknown.
    """
    out = Path(out).expanduser()
    if kind not in KINDS:
        raise UserError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"OUT {out} exists and is not an empty folder; name a new folder")
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, tuple[ShardInfo, ...]] = {}
    skipped: dict[str, int] = {}
    for number, (split, items) in enumerate(splits.items()):
        order = np.random.default_rng((seed, number)).permutation(len(items))
        writer = ShardWriter(out, split, max_bytes)
        skipped[split] = 0
        ordered = [items[i] for i in order]
        for path, label, data in progress(
            _checked(ordered, readable, workers), f"sharding {split}", "files", total=len(items)
        ):
            if data is None:
                skipped[split] += 1
            else:
                writer.add(Path(path).suffix.lstrip(".").lower() or "bin", data, label)
        written[split] = tuple(writer.close())
    shard_set = ShardSet(out, kind, tuple(classes), written, skipped)
    rundir.write_bytes(out / MANIFEST, json.dumps(shard_set.to_json()).encode(), durable=True)
    return shard_set
