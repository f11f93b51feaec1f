"""The repository stands alone (docs/architecture.md, "Rules").

Users get the repository only, so nothing in it may point to a file that is not in it:

(a) no tracked text file names one of the project-internal notes that never ship (their names
    are built below, so this file does not name them either);
(b) every path written in docs/architecture.md's folder map exists;
(c) the folder map lists every top-level folder and every module of ulframe/.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARCHITECTURE = ROOT / "docs" / "architecture.md"
NOT_IN_REPOSITORY = tuple(name + ".md" for name in ("PAPER", "DESIGN", "STYLE"))
# Folder map: an entry's path starts before this column; a line indented this far continues the
# description of the entry above it.
DESCRIPTION_COLUMN = 20
# A file or folder name inside a description: `name/` or `name.ext`, relative to the entry's folder.
PATH_IN_DESCRIPTION = re.compile(
    r"(?<![\w./-])([\w.-]+/|[\w.-]*\w\.(?:py|md|gin|pt|toml|txt|json))(?![\w/])"
)


def tracked_files() -> list[str]:
    """`git ls-files` of the repository (paths relative to ROOT); skips outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"not a git checkout: {e}")
    return [p for p in out.decode().split("\0") if p]


def references_outside(paths: list[str]) -> list[str]:
    """`path:line: name` for every mention of a note that is not in the repository."""
    found = []
    for rel in paths:
        path = ROOT / rel
        if not path.is_file():  # tracked but deleted in the working tree
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary (images, weights)
            continue
        for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            found += [f"{rel}:{n}: {name}" for name in NOT_IN_REPOSITORY if name in line]
    return found


def folder_map_paths(markdown: str) -> list[str]:
    """Every path the "Folder map" code block names, relative to the repository root.

    An entry is `name` (indented two spaces per level below its folder) followed by a
    description; names of the form `x/` or `x.py` (`.md`, `.gin`, ...) inside the description
    are read relative to the entry's folder (the entry itself if it is a folder).
    """
    block = markdown.split("## Folder map", 1)[1].split("```", 2)[1]
    paths: list[str] = []
    folders: list[str] = []  # the enclosing folders of the current entry
    entry_folder = ""
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        if indent < DESCRIPTION_COLUMN:
            name, _, description = line.strip().partition(" ")
            del folders[indent // 2 :]
            paths.append("".join(folders) + name)
            if name.endswith("/"):
                folders.append(name)
            entry_folder = "".join(folders)
        else:
            description = line
        paths += [entry_folder + p for p in PATH_IN_DESCRIPTION.findall(description)]
    return paths


def test_no_tracked_file_refers_to_a_file_outside_the_repository() -> None:
    found = references_outside(tracked_files())
    assert not found, (
        "the repository must stand alone: cite the UL paper (arXiv 2602.17270) by its own "
        "numbers, docs/method.md or docs/architecture.md instead of:\n" + "\n".join(found)
    )


def test_every_path_of_the_folder_map_exists() -> None:
    paths = folder_map_paths(ARCHITECTURE.read_text())
    assert "ulframe/" in paths and "ulframe/diffusion/elbo.py" in paths, paths  # parsed at all
    missing = [
        p for p in paths if not ((ROOT / p).is_dir() if p.endswith("/") else (ROOT / p).exists())
    ]
    assert not missing, (
        f"docs/architecture.md's folder map names paths that do not exist: {missing}"
    )


def test_folder_map_lists_every_top_level_folder_and_engine_module() -> None:
    listed = set(folder_map_paths(ARCHITECTURE.read_text()))
    tracked = tracked_files()
    wanted = {p.split("/", 1)[0] + "/" for p in tracked if "/" in p}
    wanted |= {
        p
        for p in tracked
        if p.startswith("ulframe/") and p.endswith(".py") and not p.endswith("/__init__.py")
    }
    missing = sorted(wanted - listed)
    assert not missing, f"docs/architecture.md's folder map does not list: {missing}"
