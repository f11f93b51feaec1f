"""Checkpoints: one directory per checkpoint, written by every rank through
`torch.distributed.checkpoint` (DCP), atomic, checksummed, resharded on load.

A checkpoint is the directory `checkpoints/ckpt-<samples:012d>/`:

    __<rank>_<i>.distcp    DCP's data files: each rank writes its own part of the tensors once
                           (DTensor shards under FSDP2; a tensor every rank holds, e.g. a DDP
                           weight, is written by one rank only)
    .metadata              DCP's index of the tensors (pickled by DCP)
    loader-rank<r>.json    rank r's training-loader position
    manifest.json          the SHA-256 and size of every other file, whether every tensor is
                           finite, the world size, and every value that is not a tensor (the
                           step counters, the optimizer's hyper-parameters, the config), as JSON

Every rank writes into `ckpt-<samples>.tmp/`; when the whole checkpoint is on disk rank 0
hashes it, writes the manifest (fsynced) and renames the directory into place, so a checkpoint
is either complete or absent (a torn `.tmp` is never read). Loading verifies every file's
checksum before DCP reads any of it (DCP unpickles `.metadata`); the tensors themselves load
with `torch.load(weights_only=True)` and nothing else is unpickled (no value other than a
tensor goes through DCP). `TrainSettings.async_checkpoint` saves in the background
(`dcp.async_save`): the tensors are copied first, and the training steps go on while the files
are written; a kill during the write leaves the previous checkpoint as it is.

DCP reshards on load: a checkpoint written by W processes (DDP or FSDP2) loads into W' (into
the tensors each rank holds now), and a reader without processes (`load`: sample, eval,
export) reads the full tensors. The data position moves with it (`TrainState`).

The layout of a checkpoint's state (its keys, `FORMAT`, and `FORMAT_VERSION`) is defined here,
once: `ulframe.train.state.TrainState` writes it and reads it; `upgrade` turns a state of an older
version into the current one. Checkpoints of version <= 2 (one `ckpt-<samples>.pt` file per rank,
`torch.save` of the full state with a `.json` checksum sidecar) still load.

Every checkpoint also holds the full gin config of the run that wrote it (`config`) and its
SHA-256 (`config_sha256`); a resume under a different config is refused (`ConfigChangedError`,
with a unified diff) unless the user passes `--allow-config-change`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Collection, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ulframe import rundir
from ulframe.errors import ConfigError, UserError
from ulframe.train.optim import without_compile_prefix

if TYPE_CHECKING:
    from ulframe.protocols import BuildContext

log = logging.getLogger(__name__)

FORMAT_VERSION = 3
"""The version of the checkpoint layout, under the key "format". Version 0: the checkpoints
written before it had a version (the same keys, without "format"); version 1: before
"power_ema"; version 2: one `torch.save` file per rank; version 3: a DCP directory.
`upgrade` reads them all."""
FORMAT: dict[str, str] = {
    "format": "FORMAT_VERSION",
    "model": "the training model's state dict (DCP: this rank's shards; `load`: full)",
    "ema": "the EMA model's state dict (weights and buffers), the weights evaluation uses",
    "power_ema": "the post-hoc EMA's power-function EMAs, {sigma_rel: state dict}, or None",
    "optimizer": "the optimizer's state dict, keyed by parameter name (DCP's state-dict API)",
    "loader": "this rank's training loader position (each rank writes its own file)",
    "samples_seen": "the training samples the weights have seen (int)",
    "stage": "the stage's name",
    "config": "the full gin config of the run",
    "config_sha256": "its SHA-256",
}
"""Every key of a checkpoint, with what it holds. Model and EMA keys never hold torch.compile's
`_orig_mod.` (`without_compile_prefix`). Only "samples_seen" is required: other writers (e.g.
benchmarks) save a partial checkpoint, e.g. with "ema" alone."""


def upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """`state`, a checkpoint of any known version, in the current layout (`FORMAT`): version 0
    gains "format"; versions 0 and 1 gain "power_ema" (None: none tracked); model and EMA keys
    lose any compile prefix. Raises ValueError for a version newer than this code knows."""
    version = state.get("format", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"checkpoint format {version!r} is newer than this ulframe's ({FORMAT_VERSION})"
        )
    state = dict(state)
    for key in ("model", "ema"):
        if isinstance(state.get(key), dict):
            state[key] = without_compile_prefix(state[key])
    if version < 2:
        state.setdefault("power_ema", None)
    state["format"] = FORMAT_VERSION
    return state


PATTERN = "ckpt-{samples:012d}"  # a checkpoint directory; version <= 2: a file, PATTERN + ".pt"
CHECKPOINTS = "checkpoints"  # a stage's checkpoint folder, under stages/<name>/
MANIFEST = "manifest.json"
LOADER_FILE = "loader-rank{rank}.json"
SEP = "/"  # joins the keys of a nested state into one DCP key (parameter names hold dots)


def checkpoint_dir(stage_dir: Path, rank: int = 0, world_size: int | None = None) -> Path:
    """The folder of a stage's checkpoints: `stage_dir/checkpoints/`, whatever the number of
    processes (each checkpoint directory holds every rank's part).

    Checkpoints of version <= 2 written by several processes live in `checkpoints/rank<r>/`
    (one file per rank): with `world_size` None (reading a run) that folder of rank `rank` is
    returned when `checkpoints/` itself holds no checkpoint; with `world_size` > 1 and such a
    folder and no checkpoint directory, too (a resume under the world size that wrote them)."""
    base = stage_dir / CHECKPOINTS
    legacy = base / f"rank{rank}"
    if (world_size is None or world_size > 1) and not list_checkpoints(base) and legacy.is_dir():
        return legacy
    return base


def check_world_size(directory: Path, world_size: int) -> None:
    """Refuse (one line, before anything is written) to start a stage from 0 when `directory`
    (a stage's `checkpoints/` folder) holds only checkpoint files of version <= 2 that another
    number of processes wrote (each rank kept its own loader position in its own file, so they
    do not reshard): `checkpoints/*.pt` under several processes, `checkpoints/rank<r>/*.pt`
    under one or under fewer than r + 1. Checkpoint directories (version 3) load under any
    number of processes."""
    ranks = [int(p.name[4:]) for p in directory.glob("rank*") if p.name[4:].isdigit()]
    ranks = [r for r in ranks if _legacy_files(directory / f"rank{r}")]
    if world_size == 1:
        written = max(ranks) + 1 if ranks else 0
    elif _legacy_files(directory):
        written = 1
    else:  # fewer ranks than this run's may be a first save cut short: not refused
        written = max(ranks) + 1 if ranks and max(ranks) >= world_size else 0
    if written:
        again = f"--nproc {written}" if written > 1 else "one process (no --nproc)"
        raise UserError(
            f"{directory} holds checkpoints of an older ulframe written by {written} "
            f"process(es), this run has {world_size}: resume with {again} (files of that format "
            "are not resharded to another number of processes); nothing was changed"
        )


def _legacy_files(directory: Path) -> list[Path]:
    return [p for p in list_checkpoints(directory) if p.is_file()]


def resume_candidates(stage_dir: Path, rank: int, world_size: int) -> list[Path]:
    """The checkpoints rank `rank` of `world_size` may resume from, oldest first: every
    checkpoint directory, and the version <= 2 files written under this world size (its own)."""
    base = stage_dir / CHECKPOINTS
    found = [p for p in list_checkpoints(base) if p.is_dir()]
    found += _legacy_files(base if world_size == 1 else base / f"rank{rank}")
    return sorted(found, key=_order)


def stage_checkpoints(workdir: Path) -> dict[str, Path]:
    """Stage name -> its checkpoint folder (rank 0's under several processes), for every stage
    of a workdir that has at least one checkpoint file."""
    found = {}
    for stage_dir in sorted((workdir / "stages").glob("*")):
        directory = checkpoint_dir(stage_dir)
        if list_checkpoints(directory):
            found[stage_dir.name] = directory
    return found


def load_stage_ema(
    stage: Any, ctx: BuildContext, stage_dir: Path, map_location: str | torch.device = "cpu"
) -> torch.nn.Module:
    """A finished (or checkpointed) stage's model: `stage.build(ctx)` as in its own run, with the
    EMA weights of the newest valid checkpoint under `stage_dir` loaded, or the post-hoc EMA
    `ulframe ema` wrote into the stage (`stage_ema`).

    When another stage builds on this one (`ctx.stage_dir` is not `stage_dir`, e.g. UL's stage 2
    on stage 1's encoder) which EMA it got is recorded before that stage trains, and a stage
    trained on another EMA than the one loaded now is logged as stale in one line
    (`posthoc_ema.note_source`).

    Raises ConfigError when there is no valid checkpoint, or when the checkpoint does not fit
    the model built (the config is not the one the stage was trained with)."""
    from ulframe import protocols
    from ulframe.train import posthoc_ema

    directory = checkpoint_dir(stage_dir)
    sub = protocols.BuildContext(
        ctx.example, ctx.num_classes, ctx.device, stage_dir, dict(ctx.previous)
    )
    model = stage.build(sub)
    state = load_latest(directory, map_location=map_location, only=("ema",))
    if state is None:
        raise ConfigError(
            f"stage '{stage.name}' has no valid checkpoint under {directory} to load its EMA "
            "weights from: train it first with `ulframe run`"
        )
    weights, which = stage_ema(stage_dir, state)
    if ctx.stage_dir != stage_dir:
        trained = bool(list_checkpoints(checkpoint_dir(ctx.stage_dir)))
        posthoc_ema.note_source(ctx.stage_dir, stage_dir, which, trained)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:  # shapes differ: not the config the stage was trained with
        first = str(err).strip().splitlines()[-1].strip()
        raise ConfigError(
            f"stage '{stage.name}': the checkpoint in {directory} does not fit this config "
            f"({first}); run it with the config it was trained with "
            f"({stage_dir.parent.parent / 'config.gin'})"
        ) from err
    return model


def stage_ema(stage_dir: Path, state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The EMA weights sample, eval and export use for the stage in `stage_dir`, and which they
    are (`posthoc_ema.ema_identity`; `posthoc_ema.describe` puts it in words): the post-hoc EMA
    `ulframe ema` wrote into the stage when there is one, else `state`'s (the stage's newest
    checkpoint)."""
    from ulframe.train import posthoc_ema

    posthoc = posthoc_ema.read_posthoc(stage_dir)
    which = posthoc_ema.ema_identity(posthoc, int(state["samples_seen"]))
    if posthoc is None:
        return state["ema"], which
    log.info("stage %s: %s", stage_dir.name, posthoc_ema.describe(which))
    return posthoc["ema"], which


def all_finite(value: Any) -> bool:
    """Whether every floating-point tensor in a (nested) state is finite (of a DTensor, this
    rank's shard)."""
    if isinstance(value, torch.Tensor):
        value = value.to_local() if hasattr(value, "to_local") else value
        return not value.is_floating_point() or bool(value.isfinite().all())
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(all_finite(v) for v in value)
    return True


# ---- writing -------------------------------------------------------------------------------


def flatten(
    state: Mapping[str, Any], prefix: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A nested state as two flat dicts keyed by the `SEP`-joined path of each leaf: the tensors
    (DCP writes them) and every other value (the manifest holds them, as JSON; a tuple comes
    back as a list). Keys must be strings without `SEP`; an empty dict is a value."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str) or SEP in key:
            raise ValueError(
                f"checkpoint key {prefix + str(key)!r}: keys are strings without {SEP!r}"
            )
        name = prefix + key
        if isinstance(value, torch.Tensor):
            tensors[name] = value
        elif isinstance(value, Mapping) and value:
            more_tensors, more_plain = flatten(value, name + SEP)
            tensors |= more_tensors
            plain |= more_plain
        else:
            plain[name] = value
    return tensors, plain


def unflatten(*flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `flatten`: the nested state of flat dicts keyed by `SEP`-joined paths."""
    state: dict[str, Any] = {}
    for part in flat:
        for name, value in part.items():
            *parents, leaf = name.split(SEP)
            node = state
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
    return state


class Saving:
    """A checkpoint being written: `path` is where it will be; `wait()` returns it once it is
    complete (and re-raises what went wrong in the background)."""

    def __init__(self, path: Path, future: Future[Path] | None = None) -> None:
        self.path = path
        self._future = future

    def done(self) -> bool:
        return self._future is None or self._future.done()

    def wait(self) -> Path:
        if self._future is not None:
            self._future.result()
        return self.path


_background: ThreadPoolExecutor | None = None


# DCP warns at every call without a process group that it assumes one process (here on
# purpose: `no_dist`), also from the thread of a background save.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")


def write(
    directory: Path,
    samples_seen: int,
    state: Mapping[str, Any],
    *,
    keep: int = 3,
    rank: int = 0,
    world_size: int = 1,
    finite: bool | None = None,
    loader: Mapping[str, Any] | None = None,
    process_group: Any = None,
    background: bool = False,
) -> Saving:
    """Write `state` (a nested dict: tensors, which may be DTensor shards, and JSON values) as
    the checkpoint directory at `samples_seen`, with this rank's `loader` position. Under
    several processes every rank calls it (DCP's collectives run on `process_group`, default
    the world's); alone, it needs no process group.

    Rank 0 completes it: checksums, manifest, rename into place, then keeps the newest `keep`
    checkpoints and always the newest finite one. `finite` (every tensor of every rank finite;
    default: this rank's tensors): a non-finite state never replaces a checkpoint already
    written at the same count. `background`: the tensors are copied now and written by a
    thread (`dcp.async_save`): call `wait()` on the result before the next save."""
    import torch.distributed.checkpoint as dcp

    final = directory / PATTERN.format(samples=samples_seen)
    tmp = final.with_name(final.name + ".tmp")
    tensors, plain = flatten(state)
    json.dumps(plain)  # a value JSON cannot hold fails now, not in the background
    record = {
        "format": FORMAT_VERSION,
        "samples_seen": samples_seen,
        "finite": all_finite(tensors) if finite is None else finite,
        "world_size": world_size,
        "plain": plain,
    }
    alone = process_group is None and not torch.distributed.is_initialized()
    if not background:
        with _cleaned_on_error(tmp, final):
            tmp.mkdir(parents=True, exist_ok=True)
            if loader is not None:
                rundir.write_bytes(tmp / LOADER_FILE.format(rank=rank), json.dumps(loader).encode())
            writer = dcp.FileSystemWriter(tmp)
            dcp.save(tensors, storage_writer=writer, process_group=process_group, no_dist=alone)
            if rank == 0:
                _complete(tmp, final, record, keep)
        return Saving(final)
    with _cleaned_on_error(tmp, final):
        tmp.mkdir(parents=True, exist_ok=True)
        if loader is not None:
            rundir.write_bytes(tmp / LOADER_FILE.format(rank=rank), json.dumps(loader).encode())
        upload = dcp.async_save(
            tensors, storage_writer=dcp.FileSystemWriter(tmp), process_group=process_group,
            no_dist=alone,
        )  # fmt: skip
    written: Future[Any] = getattr(upload, "upload_completion", upload)  # type: ignore[arg-type]

    def finish() -> Path:
        with _cleaned_on_error(tmp, final):
            written.result()
            if rank == 0:
                _complete(tmp, final, record, keep)
        return final

    global _background
    if _background is None:
        _background = ThreadPoolExecutor(1, thread_name_prefix="ulframe-checkpoint")
    return Saving(final, _background.submit(finish))


@contextlib.contextmanager
def _cleaned_on_error(tmp: Path, final: Path) -> Iterator[None]:
    """A save that fails leaves no temporary directory; a full disk (anywhere in DCP's
    errors) becomes one `DiskFullError` naming the checkpoint."""
    try:
        yield
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(err):
            raise rundir.DiskFullError(final) from err
        raise


def _disk_full(err: BaseException) -> bool:
    """Whether `err`, its causes or the per-rank failures DCP collects are a full disk."""
    seen: list[BaseException] = []
    todo = [err]
    while todo:
        e = todo.pop()
        if e in seen:
            continue
        seen.append(e)
        if rundir.is_disk_full(e) or isinstance(e, rundir.DiskFullError):
            return True
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
        todo += [f for f in getattr(e, "failures", {}).values() if isinstance(f, BaseException)]
    return False


def save(directory: Path, samples_seen: int, state: dict[str, Any], keep: int = 3) -> Path:
    """Write a full state (e.g. `TrainState.state_dict()`, or a partial one of a benchmark) as
    the checkpoint at `samples_seen`, from one process; its "loader" goes to rank 0's file."""
    state = dict(state)
    loader = state.pop("loader", None)
    return write(directory, samples_seen, state, keep=keep, loader=loader).wait()


def _complete(tmp: Path, final: Path, record: dict[str, Any], keep: int) -> None:
    """Rank 0, once every rank's files are in `tmp`: hash them, write the manifest, rename
    `tmp` to `final` (fsynced), prune."""
    files = {}
    for path in sorted(tmp.iterdir()):
        if path.is_file() and path.name != MANIFEST:
            files[path.name] = {"sha256": _sha256(path, fsync=True), "bytes": path.stat().st_size}
    record = record | {"files": files}
    rundir.write_bytes(tmp / MANIFEST, json.dumps(record).encode(), durable=True)
    if final.exists():
        if not record["finite"]:  # (a stop at the step of the last good checkpoint)
            log.warning(
                "weights not finite at %d samples: %s kept as it is", record["samples_seen"], final
            )
            shutil.rmtree(tmp)
            return
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    rundir.fsync_dir(final.parent)
    prune(final.parent, keep)


def _sha256(path: Path, fsync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def prune(directory: Path, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints (directories and older files) of
    `directory`, always keeping the newest finite one; `keep` <= 0 keeps all."""
    if keep <= 0:
        return
    keep_also = newest_finite(directory)
    for old in list_checkpoints(directory)[:-keep]:
        if old == keep_also:
            continue
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)


def remove_partial(directory: Path) -> None:
    """Clean what a killed save left in `directory` (rank 0, before this run saves): a torn
    `ckpt-*.tmp` is removed; a `ckpt-*.old` whose replacement never arrived is put back."""
    if not directory.is_dir():
        return
    for path in directory.glob("ckpt-*.old"):
        final = path.with_name(path.name.removesuffix(".old"))
        if final.exists():
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.rename(path, final)
    for path in directory.glob("ckpt-*.tmp"):
        shutil.rmtree(path, ignore_errors=True)


# ---- reading -------------------------------------------------------------------------------

_NAME = re.compile(r"ckpt-(\d{12})(\.pt)?")


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints in `directory`, oldest first: directories `ckpt-<samples>` and files
    `ckpt-<samples>.pt` (version <= 2; at the same count, the directory comes last)."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.fullmatch(path.name)
        if match and (path.is_file() if match.group(2) else path.is_dir()):
            found.append(path)
    return sorted(found, key=_order)


def _order(path: Path) -> tuple[int, bool]:
    return _samples(path), path.suffix != ".pt"


def _samples(path: Path) -> int:
    match = _NAME.fullmatch(path.name)
    return int(match.group(1)) if match else -1


def samples_of(path: Path) -> int:
    """The samples-seen count of checkpoint `path`, from its name."""
    return _samples(path)


def saved_config(path: Path) -> str:
    """The gin config checkpoint `path` was trained under ("" when it holds none)."""
    if path.is_dir():
        return str(manifest(path)["plain"].get("config", ""))
    return str(_load_file(path, "cpu").get("config", ""))


def tensor_keys(path: Path) -> set[str]:
    """The keys of the tensors checkpoint directory `path` (verified) holds."""
    return set(_tensor_index(path))


def manifest(path: Path) -> dict[str, Any]:
    """The record of checkpoint `path`: a directory's manifest, or a file's checksum sidecar
    (version <= 2). Raises ValueError when it is missing or damaged; reads nothing else."""
    if path.is_file():
        return sidecar(path)
    record_path = path / MANIFEST
    if not record_path.is_file():
        raise ValueError(f"{path.name}: no {MANIFEST} (write interrupted?)")
    try:
        record = json.loads(record_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path.name}/{MANIFEST}: damaged ({err})") from err
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        raise ValueError(f"{path.name}/{MANIFEST}: damaged (no file list)")
    if not isinstance(record.get("plain"), dict) or ".metadata" not in record["files"]:
        raise ValueError(f"{path.name}/{MANIFEST}: damaged (no values or no .metadata)")
    return record


def verify(path: Path, data: bool = True) -> dict[str, Any]:
    """The manifest of checkpoint directory `path` after checking that every file it lists is
    there with its size and (`data`; else only DCP's `.metadata`) its SHA-256. Raises
    ValueError naming the first file that is not."""
    record = manifest(path)
    for name, expected in record["files"].items():
        file = path / name
        if not file.is_file():
            raise ValueError(f"{path.name}: {name} is missing")
        if file.stat().st_size != expected.get("bytes"):
            raise ValueError(f"{path.name}: {name} has the wrong size (truncated?)")
        if (data or name == ".metadata") and _sha256(file) != expected.get("sha256"):
            raise ValueError(f"{path.name}: {name}: checksum mismatch (corrupt)")
    return record


def sidecar(path: Path) -> dict[str, Any]:
    """The checksum record of checkpoint file `path` (version <= 2); raises ValueError when
    missing or damaged."""
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise ValueError(f"{path.name}: no checksum file (write interrupted?)")
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{meta_path.name}: damaged checksum file ({err})") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
        raise ValueError(f"{meta_path.name}: damaged checksum file (no sha256)")
    return meta


def newest_finite(directory: Path) -> Path | None:
    """The newest checkpoint whose record is intact, lists files of the sizes on disk and does
    not mark it non-finite (no file is hashed; `load` verifies)."""
    for path in reversed(list_checkpoints(directory)):
        try:
            record = manifest(path)
            if path.is_dir():
                sizes_ok = all(
                    (path / n).is_file() and (path / n).stat().st_size == f.get("bytes")
                    for n, f in record["files"].items()
                )
            else:
                sizes_ok = record.get("bytes") == path.stat().st_size
        except (ValueError, OSError):
            continue
        if record.get("finite", True) and sizes_ok:
            return path
    return None


def _tensor_index(path: Path) -> dict[str, Any]:
    """DCP's index of checkpoint directory `path`: key -> TensorStorageMetadata (unpickled by
    DCP: call `verify` first)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(path).read_metadata()
    return {
        key: value
        for key, value in metadata.state_dict_metadata.items()
        if isinstance(value, TensorStorageMetadata)
    }


def read_into(path: Path, tensors: dict[str, torch.Tensor], process_group: Any = None) -> None:
    """Load the tensors of checkpoint directory `path` (verified) into `tensors` in place,
    resharded to how this rank holds them (DTensor shards or full tensors). Under several
    processes every rank calls it with the same keys. Raises ConfigError, before reading any
    tensor, when a key is missing or has another shape (the checkpoint of another model)."""
    import torch.distributed.checkpoint as dcp

    index = _tensor_index(path)
    missing = [key for key in tensors if key not in index]
    wrong = [
        f"{key}: {tuple(index[key].size)} in the checkpoint, {tuple(t.shape)} here"
        for key, t in tensors.items()
        if key in index and tuple(index[key].size) != tuple(t.shape)
    ]
    if missing or wrong:
        first = wrong[0] if wrong else f"{missing[0]} is not in it"
        count = len(missing) + len(wrong)
        raise ConfigError(
            f"the checkpoint {path} does not fit this model ({first}; {count} tensor(s) differ): "
            "it was trained with another config"
        )
    reader = dcp.FileSystemReader(path)
    if process_group is None and not torch.distributed.is_initialized():
        dcp.load(tensors, storage_reader=reader, no_dist=True)
    else:
        dcp.load(tensors, storage_reader=reader, process_group=process_group)


def loader_state(path: Path, rank: int) -> dict[str, Any] | None:
    """Rank `rank`'s loader position saved in checkpoint directory `path` (verified), or None."""
    file = path / LOADER_FILE.format(rank=rank)
    return json.loads(file.read_text()) if file.is_file() else None


def load(
    path: Path, map_location: str | torch.device = "cpu", only: Collection[str] | None = None
) -> dict[str, Any]:
    """One checkpoint as a full state (every tensor whole, in the current layout: `upgrade`),
    read by this process alone, checksums verified first; "loader" is rank 0's position.
    `only`: the top-level keys whose tensors are read (e.g. {"ema"}); the values that are not
    tensors are always there. `map_location` "meta": the tensors' shapes, none of their data
    (only the index is verified and read). Raises ValueError when it is not valid."""
    if path.is_file():
        return _load_file(path, map_location)
    meta = torch.device(map_location) == torch.device("meta")
    record = verify(path, data=not meta)
    try:
        index = _tensor_index(path)
    except Exception as err:  # (verified: an index DCP cannot read is not a checkpoint)
        raise ValueError(
            f"{path.name}: unreadable .metadata ({type(err).__name__}: {err})"
        ) from err
    tensors = {
        key: torch.empty(
            tuple(info.size), dtype=info.properties.dtype, device="meta" if meta else "cpu"
        )
        for key, info in index.items()
        if only is None or key.split(SEP)[0] in only
    }
    if not meta and tensors:
        read_into(path, tensors)
    if not meta:
        tensors = {k: v.to(map_location) for k, v in tensors.items()}  # (no copy on the CPU)
    state = unflatten(tensors, record["plain"])
    state["loader"] = loader_state(path, 0)
    if "samples_seen" not in state:
        raise ValueError(f"{path.name}: not a checkpoint (no samples_seen)")
    try:
        return upgrade(state)
    except ValueError as err:
        raise ValueError(f"{path.name}: {err}") from err


def _load_file(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    """A checkpoint file of version <= 2, its checksum verified (not for "meta")."""
    import io

    if torch.device(map_location) == torch.device("meta"):
        source: Any = path
    else:
        meta = sidecar(path)
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise ValueError(f"{path.name}: checksum mismatch (truncated or corrupt)")
        source = io.BytesIO(data)
    try:
        state = torch.load(source, map_location=map_location, weights_only=True)
    except Exception as err:  # UnpicklingError for anything that is not plain data
        raise ValueError(f"{path.name}: refused to load ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or "samples_seen" not in state:
        raise ValueError(f"{path.name}: not a checkpoint (no samples_seen)")
    try:
        return upgrade(state)
    except ValueError as err:
        raise ValueError(f"{path.name}: {err}") from err


def check(path: Path) -> dict[str, Any]:
    """Checkpoint `path` verified (checksums) and finite, its record; raises ValueError."""
    if path.is_file():
        record = sidecar(path)
        if hashlib.sha256(path.read_bytes()).hexdigest() != record["sha256"]:
            raise ValueError(f"{path.name}: checksum mismatch (truncated or corrupt)")
    else:
        record = verify(path)
    if record.get("finite", True) is False:
        raise ValueError(f"{path.name}: weights are not finite (NaN/Inf)")
    return record


def newest_valid(candidates: list[Path], at_most: int | None = None) -> Path | None:
    """The newest of `candidates` (oldest first) that `check` passes, of at most `at_most`
    samples; the others are logged and skipped."""
    for path in reversed(candidates):
        if at_most is not None and _samples(path) > at_most:
            continue
        try:
            check(path)
            return path
        except (ValueError, OSError) as err:
            log.warning("skipping checkpoint %s: %s", path, err)
    return None


def load_latest(
    directory: Path,
    map_location: str | torch.device = "cpu",
    at_most: int | None = None,
    only: Collection[str] | None = None,
) -> dict[str, Any] | None:
    """The newest valid checkpoint in `directory` (of at most `at_most` samples) as a full
    state (`load`), or None. Invalid ones and non-finite ones are logged and skipped."""
    for path in reversed(list_checkpoints(directory)):
        if at_most is not None and _samples(path) > at_most:
            continue
        try:
            if manifest(path).get("finite", True) is False:
                raise ValueError(f"{path.name}: weights are not finite (NaN/Inf)")
            return load(path, map_location, only=only)
        except (ValueError, OSError) as err:
            log.warning("skipping checkpoint %s: %s", path, err)
    return None


class ConfigChangedError(UserError):
    """The workdir was trained under a different gin config than this run's."""


def config_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def config_diff(old: str, new: str, max_lines: int = 40) -> str:
    """The lines that changed between two configs, as a short unified diff."""
    import difflib

    lines = list(
        difflib.unified_diff(
            old.splitlines(), new.splitlines(), "trained with", "this run", n=0, lineterm=""
        )
    )
    lines = [ln for ln in lines if not ln.startswith("@@")]
    if len(lines) > max_lines:
        lines = [*lines[:max_lines], f"... ({len(lines) - max_lines} more lines)"]
    return "\n".join(lines)


def check_config(old: str, new: str, where: str, allow: bool) -> None:
    """Refuse (or, when `allow`, warn about) a resume whose config differs from `old`."""
    if config_digest(old) == config_digest(new):
        return
    diff = config_diff(old, new)
    if not allow:
        raise ConfigChangedError(
            f"{where} was trained with a different config:\n{diff}\n"
            "use a new --workdir, or pass --allow-config-change to resume with this config"
        )
    log.warning("resuming %s with a changed config (--allow-config-change):\n%s", where, diff)


def models_finite(*models: torch.nn.Module) -> bool:
    """Whether every parameter and buffer of `models` (this rank's shard, when sharded) is
    finite."""
    tensors = [t for m in models for t in [*m.parameters(), *m.buffers()]]
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return all_finite([t.detach() for t in local])


def last_finite(ckpt_dir: Path) -> str:
    """The newest finite checkpoint in `ckpt_dir`, for a message (`none in DIR` when none)."""
    path = newest_finite(ckpt_dir)
    return str(path) if path is not None else f"none in {ckpt_dir}"
