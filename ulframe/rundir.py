"""The run directory: what a run leaves behind besides checkpoints.

workdir/
  config.gin             the full config as parsed (files + overrides)
  operative_config.gin   the parameters actually used (written after the first stage builds)
  command.txt            the command line
  versions.json          Python, torch, ulframe and every plugin distribution used
  metrics.jsonl          one JSON object per log step / evaluation
  stages/<name>/         checkpoints, images and DONE.json of each stage
"""

from __future__ import annotations

import json
import math
import platform
import shlex
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ulframe.errors import WorkdirError


def prepare(workdir: Path) -> Path:
    """Create the workdir and check it is writable; a `WorkdirError` names the problem."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise WorkdirError(f"workdir {workdir} cannot be written: {err.strerror or err}") from err
    return workdir


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


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
    return out


def write_run_files(workdir: Path, full_config: str, distributions: Iterable[str]) -> None:
    write_text(workdir / "config.gin", full_config)
    write_text(workdir / "command.txt", shlex.join(sys.argv) + "\n")
    write_text(workdir / "versions.json", json.dumps(versions(distributions), indent=2) + "\n")


def _plain(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsFile:
    """Appends one JSON object per line to `metrics.jsonl` (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
