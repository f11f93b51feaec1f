"""The latent cache of stage 2: the train split encoded once by the frozen stage-1 model.

Two layouts (`ul_base.latent_cache_format`), the same items either way:

- ``"file"`` (the default): `stage_dir/latent_cache/latents-<key>.pt` holds
  `{"z": (N, Cz, *s), "label": (N,)}` (and `"context"`, the latents of the clips' first frames,
  when the stage conditions on them), loaded whole into memory (`LatentSource`).
- ``"shards"``: `stage_dir/latent_cache/latents-<key>.shards/`, a folder of tar shards written
  by `ulframe.data.shards.ShardWriter` (`train-<id>-000000.tar`, ... of at most
  `ul_base.latent_cache_shard_size` each; `<id>` is drawn at each write, so a process never
  reads a rebuilt cache through a descriptor it kept open on the shard of the same name it read
  before) and `latents.json`, which records the layout of an example and every shard's name,
  size, SHA-256 and per-example offset and label. Each example is one member `KEY.latent` (the
  raw bytes of z, then of the context when there is one, C order, in the dtypes and shapes of
  `latents.json`) beside `KEY.cls` (its label), so any tar reader can read them.
  `ShardLatentSource` reads an example with one `os.pread` at its offset: nothing is held in
  memory but the offsets, so a cache larger than memory trains. The encoder's output goes to
  the shards batch by batch (`encode_batches`), never held whole.

key = SHA-256 of what the encoding depends on (`LatentModel.latent_state()`: the encoder's
weights, and for a KL autoencoder its latent scale), of the context length, of the pickled train
Source (its items and settings) and of the layout (a file cache's key is the one it always
had), so a cache of another encoder, dataset or layout is never used. The shard size is not in
the key: it changes where the bytes lie, not the items.

Both layouts are written atomically. The file cache through the engine's atomic writer
(`rundir.write_bytes`: a temporary file named after the process, fsynced and renamed; on a full
disk the temporary file is removed and `DiskFullError` names the file), the data first and then
the marker `latents-<key>.json` (key, SHA-256 of the data, count): data without a valid marker,
or whose checksum does not match (a run killed mid-write), is rebuilt. The shard cache is
written into `latents-<key>.shards.<host>.<pid>.tmp/` (each shard renamed into place when
complete, `latents.json` last), fsynced and renamed as a whole to its name: a folder of that
name is complete when it was renamed, and it is rebuilt when `latents.json` is missing or does
not parse, or a shard is missing or of another size than recorded (one `stat` each when it is
opened; the SHA-256 of a shard is recorded but not read back, as that is one pass over the whole
cache at every start). Other keys' caches are removed when a cache is written, and so are temporary
files and folders untouched for `STALE_TMP_S` (left by a killed run).

Random augmentation inside the dataset's decode is frozen by the cache (one draw per item). The
key covers the Source's configuration (paths, crop boxes, resolution), not the bytes of files it
reads: replacing an image file in place is not noticed. With several processes every rank
encodes and renames the same cache into place (safe, but the work is repeated; the first folder
renamed into place wins, the others are discarded).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import pickle
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor, nn

from ulframe import rundir
from ulframe.data.shards import ShardInfo, ShardWriter, parse_size, read_member
from ulframe.errors import ConfigError, DataError, UserError
from ulframe.progress import progress

CACHE_DIR = "latent_cache"
CACHE_FORMAT = 2  # bump when the cache layout changes: old caches get another key
STALE_TMP_S = 600.0  # a temporary cache file or folder this old was left by a killed run

CacheFormat = Literal["file", "shards"]
CACHE_FORMATS: tuple[str, ...] = get_args(CacheFormat)

SHARD_SIZE = "1GB"
"""The default size of a shard of the shard cache (`ul_base.latent_cache_shard_size`)."""
SHARD_BYTES = parse_size(SHARD_SIZE)
SHARD_LAYOUT = "latents.json"
"""The file inside a shard cache's folder that describes its examples and shards."""
SHARD_FORMAT = "ulframe-latent-shards"
SHARD_FORMAT_VERSION = 1
SHARD_PREFIX = "train"
LATENT_EXTENSION = "latent"
"""The tar member of an example's latents: the raw bytes of its fields, one after the other."""
NO_EXAMPLE = "the train split has no readable example to encode into the latent cache"
FIELDS = ("z", "context")
"""The tensors of an example a cache holds, in the order a shard member stores them."""


def shard_bytes(size: str | float, parameter: str = "ul_base.latent_cache_shard_size") -> int:
    """Bytes in a shard size such as ``"1GB"``, ``"256MB"``, ``"64MiB"`` or a number of bytes.

    Raises:
        ConfigError: not a positive size; one line naming `parameter`.
    """
    try:
        return parse_size(str(size), parameter)
    except UserError as err:
        raise ConfigError(str(err)) from None


class LatentSource:
    """In-memory Source of cached latents: items are indices, decode gives {"z", "label"}
    (and "context", the latent of the clip's first frames, when the stage conditions on them)."""

    def __init__(self, z: Tensor, labels: Tensor, context: Tensor | None = None) -> None:
        self.z = z
        self.labels = labels
        self.context = context
        self.items = list(range(z.shape[0]))

    def decode(self, item: int) -> dict[str, Any]:
        example = {"z": self.z[item], "label": int(self.labels[item])}
        if self.context is not None:
            example["context"] = self.context[item]
        return example


class ShardLatentSource:
    """Source of latents streamed from a shard cache: the items and examples of the
    `LatentSource` of the same cache (items `range(N)`; decode gives {"z", "label"} and
    "context" when the cache has it, in the same dtypes and shapes, bit for bit).

    Holds the shards' paths and each example's shard, offset and label (a few int64 arrays:
    it pickles small, for loader processes); `decode` reads the example's member with
    `ulframe.data.shards.read_member` (one `os.pread` of a descriptor kept open per process).

    Args:
        folder: the cache's folder.
        shards: its shards in order (`ShardInfo`: name, size, offsets, labels).
        fields: (name, dtype, shape) of the tensors in every member, in their order there.
    """

    def __init__(
        self,
        folder: Path,
        shards: tuple[ShardInfo, ...],
        fields: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...],
    ) -> None:
        self.folder = folder
        self.fields = fields
        self.paths = [os.path.abspath(folder / shard.name) for shard in shards]
        counts = [shard.count for shard in shards]
        empty = np.empty(0, dtype=np.int64)
        self.shard = np.repeat(np.arange(len(shards), dtype=np.int64), counts)
        self.offsets = np.concatenate([s.offsets for s in shards]) if shards else empty
        self.labels = np.concatenate([s.labels for s in shards]) if shards else empty
        self.member_bytes = sum(_nbytes(dtype, shape) for _, dtype, shape in fields)
        # (name, dtype, shape, byte offset in the member, element count) of each field
        self._slices: list[tuple[str, torch.dtype, tuple[int, ...], int, int]] = []
        start = 0
        for name, dtype, shape in fields:
            count = int(np.prod(shape, dtype=np.int64))
            self._slices.append((name, dtype, shape, start, count))
            start += count * _itemsize(dtype)
        self.items = range(len(self.offsets))
        self.hint = f"Remove {folder} to encode the latent cache again."

    def decode(self, item: int) -> dict[str, Any]:
        """The example `item`: {"z": (Cz, *s), "label": int[, "context": (Cz, *s)]}.

        Raises:
            DataError: the shard cannot be read there (removed or truncated while training).
        """
        path, offset = self.paths[self.shard[item]], int(self.offsets[item])
        try:
            data = bytearray(read_member(path, offset, self.member_bytes))
        except OSError as err:
            raise DataError(
                f"latent cache shard {path} cannot be read at byte {offset}: {err}. {self.hint}"
            ) from None
        example: dict[str, Any] = {}
        for name, dtype, shape, start, count in self._slices:
            tensor = torch.frombuffer(data, dtype=dtype, count=count, offset=start)
            example[name] = tensor.view(shape)
            if name == "z":
                example["label"] = int(self.labels[item])
        return example


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return _itemsize(dtype) * int(np.prod(shape, dtype=np.int64))


def cache_key(
    encoder: nn.Module | Mapping[str, Tensor],
    source: Any,
    context_frames: int = 0,
    cache_format: CacheFormat = "file",
) -> str:
    """SHA-256 of the encoder's weights (a module or the `latent_state()` of a stage-1 model),
    the context length, the Source (pickled; repr if unpicklable) and the cache's layout
    (`CACHE_FORMATS`; "file" adds nothing, so a file cache keeps its key)."""
    h = hashlib.sha256(f"ulframe-latent-cache-{CACHE_FORMAT}-{context_frames}".encode())
    if cache_format != "file":
        h.update(f"-{cache_format}".encode())
    state = encoder.state_dict() if isinstance(encoder, nn.Module) else encoder
    for name, value in sorted(state.items()):
        h.update(name.encode())
        h.update(str(value.dtype).encode() + str(tuple(value.shape)).encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    try:
        h.update(pickle.dumps(source, protocol=4))
    except Exception:  # an unpicklable Source: its type and repr
        h.update(f"{type(source).__qualname__}:{source!r}".encode())
    return h.hexdigest()


# ---- the file cache ----------------------------------------------------------------------------


def read_cache(directory: Path, key: str) -> dict[str, Tensor] | None:
    """The cached {"z", "label"[, "context"]} for `key`, or None when absent, unfinished or
    corrupt."""
    data_path, marker = directory / f"latents-{key}.pt", directory / f"latents-{key}.json"
    if not (data_path.is_file() and marker.is_file()):
        return None
    try:
        meta = json.loads(marker.read_text())
        data = data_path.read_bytes()
        if meta.get("key") != key or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            return None
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if not {"z", "label"} <= state.keys():
            return None
        return dict(state)
    except (OSError, ValueError, KeyError, RuntimeError, AttributeError, pickle.UnpicklingError):
        return None


def write_cache(directory: Path, key: str, latents: dict[str, Tensor]) -> Path:
    """Write the cache atomically: the data, then the completion marker with its checksum."""
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale(directory, key)
    buf = io.BytesIO()
    torch.save(latents, buf)
    data = buf.getvalue()
    path = directory / f"latents-{key}.pt"
    rundir.write_bytes(path, data, durable=True, unique=True)
    count = int(latents["z"].shape[0])
    meta = {"key": key, "sha256": hashlib.sha256(data).hexdigest(), "count": count}
    marker = directory / f"latents-{key}.json"
    rundir.write_bytes(marker, json.dumps(meta).encode(), durable=True, unique=True)
    return path


def _remove_stale(directory: Path, key: str) -> None:
    """Remove other keys' caches (files or shard folders), and temporary ones (any key's: of
    another writer, or left by a killed run) untouched for `STALE_TMP_S`."""
    now = time.time()
    for old in directory.glob("latents-*"):
        with contextlib.suppress(FileNotFoundError):  # removed by another writer meanwhile
            if old.name.endswith(".tmp"):
                if now - _last_modified(old) > STALE_TMP_S:
                    _remove(old)
            elif not old.name.startswith(f"latents-{key}."):
                _remove(old)


def _last_modified(path: Path) -> float:
    """The newest mtime of `path` and, for a folder, of the files in it (a shard being written
    grows without touching its folder)."""
    times = [path.stat().st_mtime]
    if path.is_dir():
        times += [child.stat().st_mtime for child in path.iterdir()]
    return max(times)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ---- the shard cache ---------------------------------------------------------------------------


def shard_cache_dir(directory: Path, key: str) -> Path:
    """The folder of the shard cache of `key` under `directory`."""
    return directory / f"latents-{key}.shards"


def read_shard_cache(directory: Path, key: str) -> ShardLatentSource | None:
    """The shard cache of `key` as a Source, or None when absent, unfinished or torn (its
    `latents.json` missing, unparsable or of another key; a shard missing or of another size)."""
    folder = shard_cache_dir(directory, key)
    try:
        layout = json.loads((folder / SHARD_LAYOUT).read_bytes())
        if (
            layout.get("format") != SHARD_FORMAT
            or layout.get("version") != SHARD_FORMAT_VERSION
            or layout.get("key") != key
        ):
            return None
        fields = tuple(
            (str(f["name"]), _dtype(f["dtype"]), tuple(int(n) for n in f["shape"]))
            for f in layout["fields"]
        )
        num_labels = int(layout["num_labels"])
        shards = tuple(ShardInfo.from_json(entry, num_labels) for entry in layout["shards"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    names = [name for name, _, _ in fields]
    if not names or names[0] != "z" or names != [n for n in FIELDS if n in names]:
        return None
    member_bytes = sum(_nbytes(dtype, shape) for _, dtype, shape in fields)
    if sum(shard.count for shard in shards) != layout.get("count"):
        return None
    for shard in shards:
        if shard.count and not (shard.sizes == member_bytes).all():
            return None
        try:
            if (folder / shard.name).stat().st_size != shard.nbytes:
                return None
        except OSError:
            return None
    return ShardLatentSource(folder, shards, fields)


def _dtype(name: Any) -> torch.dtype:
    """The torch dtype named `name` (``"float32"``); ValueError for anything else."""
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dtype


def write_shard_cache(
    directory: Path,
    key: str,
    batches: Iterable[Mapping[str, Tensor]],
    max_bytes: int = SHARD_BYTES,
) -> ShardLatentSource:
    """Write latents as the shard cache of `key` (atomically: see the module) and open it.

    Args:
        directory: the cache directory (`stage_dir/latent_cache`).
        key: `cache_key(..., cache_format="shards")`.
        batches: {"z": (b, Cz, *s), "label": (b,) int[, "context": (b, Cz, *s)]} in item order,
            every batch with the same fields, dtypes and example shapes (`encode_batches`, or
            the whole of `encode_source` as one batch).
        max_bytes: the most bytes of one shard (an example larger than that gets its own).

    Returns:
        The cache's Source, read back from what was written (or from the cache another process
        renamed into place first).

    Raises:
        DataError: no example, or a negative label.
        DiskFullError: no space left; nothing of the cache is left behind.
    """
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale(directory, key)
    folder = shard_cache_dir(directory, key)
    tmp = folder.with_name(f"{folder.name}.{_writer()}.tmp")
    _remove(tmp)  # left by a killed process of the same host and pid
    try:
        tmp.mkdir()
        _write_shards(tmp, key, batches, max_bytes)
        _fsync(tmp)
        _rename_into_place(tmp, folder, key)
        _fsync(directory)
    except BaseException as err:
        _remove(tmp)
        if rundir.is_disk_full(err):
            raise rundir.DiskFullError(folder) from err
        raise
    source = read_shard_cache(directory, key)
    if source is None:
        raise DataError(f"the latent cache {folder} was written but cannot be read back")
    return source


def _write_shards(
    folder: Path, key: str, batches: Iterable[Mapping[str, Tensor]], max_bytes: int
) -> None:
    """The shards and `latents.json` of `batches` in `folder`."""
    # Shards are named after this write: a process that read an earlier cache of the key keeps
    # its shards open (`read_member`), and must never read those through a name of this one.
    writer = ShardWriter(folder, f"{SHARD_PREFIX}-{secrets.token_hex(4)}", max_bytes)
    fields: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...] = ()
    count, num_labels = 0, 0
    for batch in batches:
        layout = tuple(
            (name, batch[name].dtype, tuple(batch[name].shape[1:]))
            for name in FIELDS
            if name in batch
        )
        if not fields:
            fields = layout
        if layout != fields or "z" not in batch:
            raise ValueError(f"a batch of latents with fields {layout}; the first had {fields}")
        labels = batch["label"].tolist()
        if labels and min(labels) < 0:
            raise DataError(f"the latent cache cannot store label {min(labels)}: labels are >= 0")
        rows = [  # (b, bytes of one example) per field
            batch[name].detach().cpu().reshape(len(labels), -1).contiguous().view(torch.uint8)
            for name, _, _ in fields
        ]
        for i, label in enumerate(labels):
            data = b"".join(row[i].numpy().tobytes() for row in rows)
            writer.add(LATENT_EXTENSION, data, label)
        count += len(labels)
        num_labels = max([num_labels, *(label + 1 for label in labels)])
    shards = writer.close()
    if count == 0:
        raise DataError(NO_EXAMPLE)
    layout_json = {
        "format": SHARD_FORMAT,
        "version": SHARD_FORMAT_VERSION,
        "key": key,
        "count": count,
        "num_labels": num_labels,
        "fields": [
            {"name": name, "dtype": str(dtype).removeprefix("torch."), "shape": list(shape)}
            for name, dtype, shape in fields
        ],
        "shards": [shard.to_json() for shard in shards],
    }
    rundir.write_bytes(folder / SHARD_LAYOUT, json.dumps(layout_json).encode(), durable=True)


def _rename_into_place(tmp: Path, folder: Path, key: str) -> None:
    """Rename the finished folder `tmp` to `folder`. A `folder` already there is kept when it
    is a readable cache (another process's, renamed first: `tmp` is removed) and moved aside
    and removed when it is torn."""
    for _ in range(2):
        try:
            os.rename(tmp, folder)
            return
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if read_shard_cache(folder.parent, key) is not None:
            _remove(tmp)
            return
        torn = folder.with_name(f"{folder.name}.{_writer()}.torn.tmp")
        with contextlib.suppress(FileNotFoundError):
            os.rename(folder, torn)
        _remove(torn)
    os.rename(tmp, folder)


def _writer() -> str:
    """This process, as a name: host and pid (ranks on several hosts share the folder)."""
    return f"{socket.gethostname()}.{os.getpid()}"


def _fsync(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- encoding ----------------------------------------------------------------------------------


@torch.no_grad()
def encode_batches(
    encoder: Callable[[Tensor], Tensor],
    source: Any,
    device: torch.device,
    batch_size: int = 64,
    context: Callable[[Tensor], Tensor] | None = None,
) -> Iterator[dict[str, Tensor]]:
    """{"z": encoder(x) (b, Cz, *s) float32, "label": (b,) int64} of every readable item of
    `source`, `batch_size` readable items at a time, in item order, on CPU (`encoder`: a module
    or a stage-1 model's `encode_clean`); with `context` (x -> the latent the stage conditions
    on, e.g. of the clips' first frames) also "context"."""
    pending: list[Tensor] = []
    labels: list[int] = []

    def batch() -> dict[str, Tensor]:
        x = torch.stack(pending).to(device)
        out = {"z": encoder(x).float().cpu(), "label": torch.tensor(labels, dtype=torch.long)}
        if context is not None:
            out["context"] = context(x).float().cpu()
        pending.clear()
        labels.clear()
        return out

    for item in progress(source.items, phase="latent caching", unit="examples"):
        example = source.decode(item)
        if example is None:
            continue
        pending.append(example["x"])
        labels.append(int(example.get("label", 0)))
        if len(pending) == batch_size:
            yield batch()
    if pending:
        yield batch()


def encode_source(
    encoder: Callable[[Tensor], Tensor],
    source: Any,
    device: torch.device,
    batch_size: int = 64,
    context: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """{"z": (N, Cz, *s) float32, "label": (N,)[, "context": (N, Cz, *s)]}: every batch of
    `encode_batches` (same arguments) concatenated, on CPU.

    Raises:
        DataError: no item of `source` could be read.
    """
    batches = list(encode_batches(encoder, source, device, batch_size, context))
    if not batches:
        raise DataError(NO_EXAMPLE)
    return {name: torch.cat([b[name] for b in batches]) for name in batches[0]}
