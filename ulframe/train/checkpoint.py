"""Checkpoints: atomic, checksummed, loaded without unpickling code.

A checkpoint is a dict of tensors and plain values saved with `torch.save` to a temporary file,
fsynced, then renamed into place, with a SHA-256 sidecar written the same way. Loading uses
`torch.load(weights_only=True)`; a file whose checksum does not match, or that would need
arbitrary unpickling, is reported and the previous checkpoint is used. The sidecar also records
whether every tensor is finite: a non-finite checkpoint is never resumed from, and pruning always
keeps the newest finite one.

The layout of a checkpoint (its keys, `FORMAT`, and `FORMAT_VERSION`) is defined here, once:
`ulframe.train.state.TrainState` writes it (`state_dict()`) and reads it (`load_state_dict()`);
`upgrade` turns a checkpoint of an older version into the current one (`load` applies it).

Every checkpoint also holds the full gin config of the run that wrote it (`config`) and its
SHA-256 (`config_sha256`); a resume under a different config is refused (`ConfigChangedError`,
with a unified diff) unless the user passes `--allow-config-change`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ulframe import rundir
from ulframe.errors import ConfigError, UserError
from ulframe.train.optim import without_compile_prefix

if TYPE_CHECKING:
    from ulframe.protocols import BuildContext

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""The version of the checkpoint layout, under the key "format". Version 0: the checkpoints
written before it had a version (the same keys, without "format"); version 1: before
"power_ema"; `upgrade` reads both."""
FORMAT: dict[str, str] = {
    "format": "FORMAT_VERSION",
    "model": "the training model's full (unsharded) state dict",
    "ema": "the EMA model's state dict (weights and buffers), the weights evaluation uses",
    "power_ema": "the post-hoc EMA's power-function EMAs, {sigma_rel: state dict}, or None",
    "optimizer": "the optimizer's full state dict",
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


PATTERN = "ckpt-{samples:012d}.pt"
CHECKPOINTS = "checkpoints"  # a stage's checkpoint folder, under stages/<name>/


def checkpoint_dir(stage_dir: Path, rank: int = 0, world_size: int | None = None) -> Path:
    """The folder of a stage's checkpoints: `stage_dir/checkpoints/` under one process,
    `stage_dir/checkpoints/rank<r>/` under several (each rank keeps its own loader position).

    `world_size` None (reading a run, whatever number of processes trained it): the layout
    found on disk, `checkpoints/` when it holds checkpoints, else rank `rank`'s folder when
    there is one."""
    base = stage_dir / CHECKPOINTS
    if world_size is None:
        several = not list_checkpoints(base) and (base / f"rank{rank}").is_dir()
    else:
        several = world_size > 1
    return base / f"rank{rank}" if several else base


def check_world_size(directory: Path, world_size: int) -> None:
    """Refuse (one line, before anything is written) to start a stage from 0 when `directory`
    (a stage's `checkpoints/` folder) holds checkpoints that another number of processes wrote:
    `checkpoints/` itself under one process, `checkpoints/rank<r>/` under several (each rank's
    loader position lives in its own file, so they cannot resume here). Refused: rank folders
    under one process; `checkpoints/` itself, or a rank beyond this run's, under several."""
    ranks = [int(p.name[4:]) for p in directory.glob("rank*") if p.name[4:].isdigit()]
    ranks = [r for r in ranks if list_checkpoints(directory / f"rank{r}")]
    if world_size == 1:
        written = max(ranks) + 1 if ranks else 0
    elif list_checkpoints(directory):
        written = 1
    else:  # fewer ranks than this run's may be a first save cut short: not refused
        written = max(ranks) + 1 if ranks and max(ranks) >= world_size else 0
    if written:
        again = f"--nproc {written}" if written > 1 else "one process (no --nproc)"
        raise UserError(
            f"{directory} holds checkpoints written by {written} process(es), this run has "
            f"{world_size}: resume with {again} (a checkpoint is not resharded to another "
            "number of processes); nothing was changed"
        )


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
    state = load_latest(directory, map_location=map_location)
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
    """Whether every floating-point tensor in a (nested) state is finite."""
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(value.isfinite().all())
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(all_finite(v) for v in value)
    return True


def save(directory: Path, samples_seen: int, state: dict[str, Any], keep: int = 3) -> Path:
    """Write `state` as the checkpoint at `samples_seen`; keep the newest `keep`, and always the
    newest one whose weights are finite (the sidecar records `finite`). A non-finite state never
    replaces a checkpoint already written at the same count."""
    import io

    path = directory / PATTERN.format(samples=samples_seen)
    finite = all_finite(state)
    if not finite and path.is_file():  # (a stop at the step of the last good checkpoint)
        log.warning("weights not finite at %d samples: %s kept as it is", samples_seen, path)
        return path
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    rundir.write_bytes(path, data, durable=True)
    digest = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "samples_seen": samples_seen,
        "finite": finite,
    }
    rundir.write_bytes(path.with_suffix(".json"), json.dumps(digest).encode(), durable=True)
    keep_also = newest_finite(directory)
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        if old != keep_also:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files, oldest first."""
    return sorted(directory.glob("ckpt-*.pt")) if directory.is_dir() else []


def sidecar(path: Path) -> dict[str, Any]:
    """The checksum record of checkpoint `path`; raises ValueError when missing or damaged."""
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
    """The newest checkpoint whose sidecar is intact and does not mark it non-finite (the file is
    not read; `load` verifies it)."""
    for path in reversed(list_checkpoints(directory)):
        try:
            meta = sidecar(path)
        except (ValueError, OSError):
            continue
        if meta.get("finite", True) and meta.get("bytes") == path.stat().st_size:
            return path
    return None


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one checkpoint, verifying its checksum, in the current layout (`upgrade`); raises
    ValueError when it is not valid."""
    meta = sidecar(path)
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise ValueError(f"{path.name}: checksum mismatch (truncated or corrupt)")
    import io

    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as err:  # UnpicklingError for anything that is not plain data
        raise ValueError(f"{path.name}: refused to load ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or "samples_seen" not in state:
        raise ValueError(f"{path.name}: not a checkpoint (no samples_seen)")
    try:
        return upgrade(state)
    except ValueError as err:
        raise ValueError(f"{path.name}: {err}") from err


def load_latest(
    directory: Path, map_location: str | torch.device = "cpu", at_most: int | None = None
) -> dict[str, Any] | None:
    """The newest valid checkpoint in `directory` (of at most `at_most` samples), or None.

    Invalid ones and those whose sidecar marks them non-finite are logged and skipped."""
    for path in reversed(list_checkpoints(directory)):
        if at_most is not None and _samples(path) > at_most:
            continue
        try:
            if sidecar(path).get("finite", True) is False:
                raise ValueError(f"{path.name}: weights are not finite (NaN/Inf)")
            return load(path, map_location)
        except (ValueError, OSError) as err:
            log.warning("skipping checkpoint %s: %s", path, err)
    return None


def _samples(path: Path) -> int:
    try:
        return int(path.stem.split("-")[1])
    except (IndexError, ValueError):
        return -1


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
