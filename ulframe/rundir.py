"""The run directory: what a run leaves behind besides checkpoints.

workdir/
  config.gin             the full config as parsed (files + overrides)
  operative_config.gin   the parameters actually used (written after the first stage builds)
  command.txt            the command line
  versions.json          Python, torch, ulframe and every plugin distribution used, and the
                         git commit of the ulframe source tree when it is a git checkout
  metrics.jsonl          one JSON object per log step / evaluation, with its `time` (Unix
                         seconds)
  run.lock               the lock of the process training here (host, pid, start time)
  stages/<name>/         checkpoints, images and DONE.json of each stage

Every file is written to a temporary file and renamed into place (`write_bytes`, `write_text`);
metrics.jsonl is appended one whole line per write and repaired (torn last line, rows past the
restored checkpoint) when a stage resumes. A full disk raises `DiskFullError` naming the file,
with the temporary file removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import platform
import shlex
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ulframe.errors import UserError, WorkdirError

log = logging.getLogger(__name__)
LOCK_FILE = "run.lock"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(UserError):
    """No space left on the device while writing `path`."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        super().__init__(f"no space left on device writing {path}")


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in _DISK_FULL


def prepare(workdir: Path) -> Path:
    """Create the workdir and check it is writable; a `WorkdirError` names the problem."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        if is_disk_full(err):
            raise DiskFullError(workdir / ".write-test") from err
        raise WorkdirError(f"workdir {workdir} cannot be written: {err.strerror or err}") from err
    return workdir


# ---- atomic writes -----------------------------------------------------------------------------
@contextlib.contextmanager
def replacing(path: Path, durable: bool = False, unique: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path` (fsynced if `durable`).

    On any error the temporary file is removed; a full disk becomes `DiskFullError(path)`.
    `unique`: the temporary file is named after this process (`NAME.<pid>.tmp`), for files
    several processes may write at once (each renames a whole file into place).
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp" if unique else f"{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if durable:
            _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent, os.O_RDONLY)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if is_disk_full(err):
            raise DiskFullError(path) from err
        raise


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` (a rename into it) durable."""
    _fsync(path, os.O_RDONLY)


def write_bytes(path: Path, data: bytes, durable: bool = False, unique: bool = False) -> None:
    """Write `data` to `path` atomically (see `replacing`)."""
    with replacing(path, durable, unique) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def versions(distributions: Iterable[str]) -> dict[str, Any]:
    import importlib.metadata

    import torch

    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    for name in sorted(
        set(distributions) | {"ulframe", "gin-config", "pluggy", "stevedore", "torchdata"}
    ):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "?"
    out |= git_commit(Path(__file__).resolve().parent.parent)
    return out


def git_commit(source: Path) -> dict[str, Any]:
    """`{"git_commit": HEAD, "git_dirty": bool}` of `source` when it is the top of a git
    checkout (tracked files changed: dirty); `{}` otherwise (an installed wheel, no git)."""
    import subprocess

    if not (source / ".git").exists():
        return {}

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(source), *args], capture_output=True, text=True, check=True,
            timeout=10,
        ).stdout.strip()  # fmt: skip

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError) as err:
        log.debug("no git commit for versions.json: %s", err)
        return {}
    return {"git_commit": commit, "git_dirty": dirty}


def write_run_files(workdir: Path, full_config: str, distributions: Iterable[str]) -> None:
    write_text(workdir / "config.gin", full_config)
    write_text(workdir / "command.txt", shlex.join(sys.argv) + "\n")
    write_text(workdir / "versions.json", json.dumps(versions(distributions), indent=2) + "\n")


class RunFiles:
    """config.gin, command.txt and versions.json, written only once a stage has really started
    (restored and checked), so a refused run leaves the workdir as it was."""

    def __init__(self, workdir: Path, config: str, distributions: Iterable[str], main: bool):
        self.workdir = workdir
        self.config = config
        self.distributions = list(distributions)
        self.main = main
        self.committed = False

    def commit(self) -> None:
        if self.main and not self.committed:
            write_run_files(self.workdir, self.config, self.distributions)
        self.committed = True

    def write_operative(self, text: str) -> None:
        """operative_config.gin, if this run committed; never raises (it runs on the way out)."""
        if not (self.main and self.committed):
            return
        try:
            write_text(self.workdir / "operative_config.gin", text)
        except (OSError, UserError) as err:
            log.warning("operative_config.gin not written: %s", err)


def read_config(path: Path) -> str | None:
    """A workdir's config.gin, or None (with a warning) when it is missing, empty or unreadable."""
    if not path.is_file():
        return None
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        log.warning("ignoring %s: %s", path, err)
        return None
    if not text.strip():
        log.warning("ignoring %s: empty", path)
        return None
    return text


def read_json_dict(path: Path, what: str) -> dict[str, Any] | None:
    """A JSON object from `path`, or None (with a warning) when it is missing or damaged."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        log.warning("ignoring damaged %s %s: %s", what, path, err)
        return None
    if not isinstance(value, dict):
        log.warning("ignoring damaged %s %s: not a JSON object", what, path)
        return None
    return value


# ---- metrics.jsonl -----------------------------------------------------------------------------
def _plain(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsFile:
    """Appends one JSON object per line to `metrics.jsonl` (rank 0 only), each with the `time`
    it was written (Unix seconds) unless it has its own."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        """Append one line in one write; on failure the file is cut back to where it was."""
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3)} | record
        data = (json.dumps({k: _plain(v) for k, v in record.items()}) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except OSError as err:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            if is_disk_full(err):
                raise DiskFullError(self.path) from err
            raise
        finally:
            os.close(fd)

    def keep(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Rewrite the file (atomically) with the valid rows for which `keep` is true."""
        if not self.enabled or not self.path.is_file():
            return
        lines = self.path.read_bytes().decode(errors="replace").splitlines()
        rows = _parse_rows(lines, self.path)
        kept = [line for line, row in rows if keep(row)]
        if len(kept) != len(lines):
            write_text(self.path, "".join(line + "\n" for line in kept))

    def resume(self, stage: str, samples_seen: int, finished: bool) -> None:
        """Drop the rows of `stage` that the resumed run writes again: those past the restored
        checkpoint and, when it is the stage's last (`finished`), its final evaluation rows."""

        def keep(row: dict[str, Any]) -> bool:
            if row.get("stage") != stage:
                return True
            seen = row.get("samples_seen", 0)
            if not isinstance(seen, int) or seen > samples_seen:
                return False
            return not (finished and seen == samples_seen and row.get("kind") != "train")

        self.keep(keep)


def _parse_rows(lines: list[str], path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, row) for every line that holds a JSON object; one warning for the others."""
    rows, bad = [], 0
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append((line, row))
        elif line.strip():
            bad += 1
    if bad:
        log.warning("%s: %d damaged line(s) ignored (a write cut short?)", path, bad)
    return rows


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every row of a metrics.jsonl; damaged lines (a torn last line) are skipped with a warning."""
    lines = path.read_bytes().decode(errors="replace").splitlines()
    return [row for _, row in _parse_rows(lines, path)]


# ---- the workdir lock --------------------------------------------------------------------------
class WorkdirLock:
    """`workdir/run.lock`: an exclusive `flock` held by the process that trains in the workdir.

    The kernel drops the lock when its holder dies, so a lock left by a dead process is taken
    over (one log line). The file names the holder (host, pid, start time) for the message a
    second run gets; it is written in place (a rename would make a second, unlocked file).
    """

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self, inheritable: bool = False) -> WorkdirLock:
        """Take the lock, or raise `WorkdirError` naming the live holder.

        `inheritable`: the lock survives `os.execv`. A holder that is our parent process (the
        `--nproc` launcher, which runs torch's elastic agent in its own process, seen from its
        rank-0 worker) counts as ours: nothing is taken.
        """
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            if _is_parent(holder):
                return self
            raise WorkdirError(
                f"workdir {self.path.parent} is in use by {_describe(holder)}; wait for that "
                "run to end, stop it, or use another --workdir"
            ) from None
        except OSError as err:  # a filesystem without flock: run, but say so
            os.close(fd)
            log.warning("workdir %s cannot be locked (%s): not locked", self.path.parent, err)
            return self
        previous = _holder(fd)
        if previous:
            log.warning(
                "workdir %s: taking over the lock left by %s (no longer running)",
                self.path.parent, _describe(previous),
            )  # fmt: skip
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.set_inheritable(fd, inheritable)
        self.fd = fd
        return self

    def release(self, clean: bool = True) -> None:
        """Clear the holder record and unlock (the file stays: removing it would race a new
        holder). Held by our parent (the launcher's elastic agent): its record is cleared only
        after a `clean` end, since after a failure the agent may restart us."""
        with contextlib.suppress(OSError):
            if self.fd is not None:
                os.ftruncate(self.fd, 0)
                os.close(self.fd)
            elif clean and _is_parent(_read_holder(self.path)):
                os.truncate(self.path, 0)
        self.fd = None

    def __enter__(self) -> WorkdirLock:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.release(clean=exc_type is None)


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z")


def _holder(fd: int) -> dict[str, Any]:
    try:
        value = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return {}
    try:
        return _holder(fd)
    finally:
        os.close(fd)


def _is_parent(holder: dict[str, Any]) -> bool:
    return holder.get("pid") == os.getppid() and holder.get("host") == socket.gethostname()


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process (no holder recorded yet)"
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
        f"(started {holder.get('started', '?')})"
    )
