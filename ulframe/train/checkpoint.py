"""Checkpoints: atomic, checksummed, loaded without unpickling code.

A checkpoint is a dict of tensors and plain values saved with `torch.save` to a temporary file,
fsynced, then renamed into place, with a SHA-256 sidecar written the same way. Loading uses
`torch.load(weights_only=True)`; a file whose checksum does not match, or that would need
arbitrary unpickling, is reported and the previous checkpoint is used.

Every checkpoint also holds the full gin config of the run that wrote it (`config`) and its
SHA-256 (`config_sha256`); a resume under a different config is refused (`ConfigChangedError`,
with a unified diff) unless the user passes `--allow-config-change`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ulframe.errors import UserError

log = logging.getLogger(__name__)
PATTERN = "ckpt-{samples:012d}.pt"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save(directory: Path, samples_seen: int, state: dict[str, Any], keep: int = 3) -> Path:
    """Write `state` as the checkpoint at `samples_seen`; keep the newest `keep`."""
    import io

    directory.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    path = directory / PATTERN.format(samples=samples_seen)
    _atomic_write(path, data)
    digest = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "samples_seen": samples_seen,
    }
    _atomic_write(path.with_suffix(".json"), json.dumps(digest).encode())
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files, oldest first."""
    return sorted(directory.glob("ckpt-*.pt")) if directory.is_dir() else []


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one checkpoint, verifying its checksum; raises ValueError when it is not valid."""
    meta_path = path.with_suffix(".json")
    data = path.read_bytes()
    if not meta_path.is_file():
        raise ValueError(f"{path.name}: no checksum file (write interrupted?)")
    meta = json.loads(meta_path.read_text())
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise ValueError(f"{path.name}: checksum mismatch (truncated or corrupt)")
    import io

    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as err:  # UnpicklingError for anything that is not plain data
        raise ValueError(f"{path.name}: refused to load ({type(err).__name__}: {err})") from err


def load_latest(
    directory: Path, map_location: str | torch.device = "cpu", at_most: int | None = None
) -> dict[str, Any] | None:
    """The newest valid checkpoint in `directory` (of at most `at_most` samples), or None.

    Invalid ones are logged and skipped."""
    for path in reversed(list_checkpoints(directory)):
        if at_most is not None and int(path.stem.split("-")[1]) > at_most:
            continue
        try:
            return load(path, map_location)
        except (ValueError, OSError, json.JSONDecodeError) as err:
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
