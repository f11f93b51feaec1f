"""Exported model formats: `ulframe export RUN --out DIR` writes a folder, `ulframe.load(DIR)`
reads it, with no gin, run directory or dataset.

A format is a plugin in the entry-point group `ulframe.formats` (the built-in one: `ul`, a
Unified Latents model): a module or object with

    export(workdir, out, stats_examples=None, bindings=()) -> dict   the config.json written
    load(path, device="cpu", dtype=torch.float32) -> model

Every exported folder holds `config.json` whose `"format"` names the plugin that wrote it, so
`load` needs nothing but the folder. The engine knows no format: it finds one by name (stevedore's
driver pattern) and calls it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from ulframe.errors import UserError

if TYPE_CHECKING:
    import torch

GROUP = "ulframe.formats"
DEFAULT = "ul"
CONFIG_FILE = "config.json"


class Format(Protocol):
    """What a format plugin provides (see the module docstring)."""

    def export(
        self,
        workdir: Path,
        out: Path,
        stats_examples: int | None = None,
        bindings: Sequence[str] = (),
    ) -> dict[str, Any]: ...

    def load(self, path: str | Path, device: Any = "cpu", dtype: Any = None) -> Any: ...


def names() -> list[str]:
    """The installed formats' names."""
    from importlib.metadata import entry_points

    return sorted(ep.name for ep in entry_points(group=GROUP))


def plugin(name: str) -> Format:
    """The format plugin `name`; a one-line UserError naming the installed ones otherwise."""
    from stevedore import DriverManager
    from stevedore.exception import NoMatches

    try:
        return cast(Format, DriverManager(namespace=GROUP, name=name).driver)
    except (NoMatches, RuntimeError) as err:
        raise UserError(
            f"no model format {name!r} is installed (formats: {', '.join(names()) or 'none'})"
        ) from err


def export(
    workdir: Path,
    out: Path,
    stats_examples: int | None = None,
    bindings: Sequence[str] = (),
    format: str = DEFAULT,
) -> dict[str, Any]:
    """Write the trained run `workdir` as a folder `out` in `format`; the config.json written."""
    return plugin(format).export(workdir, out, stats_examples, bindings)


def load(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Any:
    """The model of an exported folder, on `device` with weights of `dtype` (default float32),
    read by the format plugin its config.json names. A folder that is not an export is one
    UserError naming the file."""
    import torch

    folder = Path(path)
    config = folder / CONFIG_FILE
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder (an export of `ulframe export RUN --out DIR`)")
    try:
        name = json.loads(config.read_text()).get("format")
    except FileNotFoundError:
        raise UserError(
            f"{config}: missing; {folder} is not a folder written by `ulframe export`"
        ) from None
    except (OSError, ValueError, AttributeError) as err:
        raise UserError(f"{config}: not a JSON object ({err})") from err
    if not isinstance(name, str):
        raise UserError(f'{config}: no "format" names the format that wrote it')
    return plugin(name).load(folder, device=device, dtype=dtype or torch.float32)
