"""Command-line conventions: `--version`, `--gin-file` / `--gin-search-path` (T5X's flags),
dashed flags with the underscore spellings as hidden aliases, parameter counts in `ulframe
config`, a `time` in every metrics.jsonl row and the git commit in versions.json."""

from __future__ import annotations

import argparse
import platform
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from ulframe import cli as ulframe_cli
from ulframe import rundir

REPO = Path(__file__).resolve().parents[2]
RunCli = Callable[..., subprocess.CompletedProcess[str]]


def parse(*argv: str) -> argparse.Namespace:
    return ulframe_cli._parser().parse_args(ulframe_cli._expand_gin_overrides(list(argv)))


def parsers(p: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from parsers(sub)


# ---- --version ----------------------------------------------------------------------------------
def test_version_names_ulframe_torch_and_python(run_cli: RunCli) -> None:
    done = run_cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        f"ulframe 0.1.0 (torch {torch.__version__}, Python {platform.python_version()})\n"
    )


# ---- dashed flags, underscore aliases -----------------------------------------------------------
def test_every_flag_is_dashed() -> None:
    for p in parsers(ulframe_cli._parser()):
        for action in p._actions:
            for flag in action.option_strings:
                assert "_" not in flag, f"{p.prog}: {flag}"


def test_underscore_spellings_are_hidden_aliases() -> None:
    dashed = parse("eval", "runs/x", "--fd-samples", "3", "--gin-param", "A = 1")
    underscored = parse("eval", "runs/x", "--fd_samples=3", "--gin_param", "A = 1")
    assert vars(dashed) == vars(underscored)
    assert dashed.fd_samples == 3 and dashed.gin_param == ["A = 1"]
    run = parse(
        "run", "a.gin", "--allow_config_change", "--max_restarts", "2", "--gin_file", "b.gin",
        "--gin_search_path", "gin", "--gin.stage1/TrainSettings.batch_size=4",
    )  # fmt: skip
    assert run.allow_config_change and run.max_restarts == 2
    assert run.gin_file == ["b.gin"] and run.gin_search_path == ["gin"]
    # an override's name keeps its underscores
    assert run.gin_param == ["stage1/TrainSettings.batch_size = 4"]
    assert "--gin_param" not in ulframe_cli._parser().format_help()
    assert "_" not in " ".join(re.findall(r"--[\w-]+", _help("run") + _help("eval")))


def _help(command: str) -> str:
    p = ulframe_cli._parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command].format_help()


# ---- --gin-file, --gin-search-path ------------------------------------------------------------
def test_gin_file_and_search_path_resolve_names_and_includes(cli: RunCli, tmp_path: Path) -> None:
    # a file name and an `include` of a bare name found through the search paths; positional
    # files first, then --gin-file ones, in order
    elsewhere = tmp_path / "configs"
    elsewhere.mkdir()
    (elsewhere / "mine.gin").write_text("include 'quickstart.gin'\nTRAIN_SAMPLES = 11\n")
    (elsewhere / "more.gin").write_text("TRAIN_SAMPLES = 13\n")
    done = cli(
        "config", "--gin-search-path", elsewhere, "--gin_search_path", REPO / "gin",
        "--gin-file", "mine.gin", "--gin_file", elsewhere / "more.gin",
        "--gin_param", "LOSS_FACTOR = 2.5", "--workdir", tmp_path / "run",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "\nTRAIN_SAMPLES = 13\n" in done.stdout
    assert "\nLOSS_FACTOR = 2.5\n" in done.stdout
    assert "\nstage1/ul_joint.loss_factor = %LOSS_FACTOR\n" in done.stdout  # quickstart.gin's

    done = cli("config", "--gin-search-path", tmp_path / "missing", "--gin-file", "x.gin")
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        f"ulframe: error: --gin-search-path {tmp_path / 'missing'}: no such folder"
    )
    done = cli("config")
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        "ulframe: error: no gin file given: `ulframe config FILE.gin` or --gin-file"
    )


# ---- parameter counts (`ulframe config` prints them: tests/integration/test_cli.py) ----------
def test_parameter_counts_of_a_module() -> None:
    from ulframe import parameters

    model = torch.nn.Module()
    model.a = torch.nn.Linear(3, 4)  # 16
    model.b = torch.nn.Linear(4, 1).requires_grad_(False)  # 5, frozen
    model.c = torch.nn.ReLU()  # none: left out
    assert parameters.networks(model) == [("a", 16, 16), ("b", 5, 0)]
    text = parameters.describe([parameters.StageParameters("s", parameters.networks(model))])
    assert text.splitlines()[1:] == [
        "#   s: 21 (16 trainable, 5 frozen)",
        "#     a             16",
        "#     b              5 frozen",
    ]


# ---- metrics.jsonl time, versions.json git commit ----------------------------------------------
def test_metrics_rows_carry_their_time(tmp_path: Path) -> None:
    metrics = rundir.MetricsFile(tmp_path / "metrics.jsonl")
    metrics.write({"kind": "train", "samples_seen": 4})
    metrics.write({"kind": "eval", "time": 5.0})
    rows = rundir.read_metrics(tmp_path / "metrics.jsonl")
    assert isinstance(rows[0]["time"], float) and rows[0]["time"] > 1.6e9  # Unix seconds
    assert rows[0]["kind"] == "train" and rows[1]["time"] == 5.0  # a row's own time is kept


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_versions_carry_the_git_commit_of_a_checkout(tmp_path: Path) -> None:
    assert rundir.git_commit(tmp_path) == {}  # not a checkout: nothing

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip

    git("init", "-q")
    (tmp_path / "a.txt").write_text("1")
    git("add", "a.txt")
    git("commit", "-q", "-m", "one")
    head = git("rev-parse", "HEAD")
    assert rundir.git_commit(tmp_path) == {"git_commit": head, "git_dirty": False}
    (tmp_path / "a.txt").write_text("2")
    assert rundir.git_commit(tmp_path) == {"git_commit": head, "git_dirty": True}

    versions = rundir.versions([])
    if (REPO / ".git").exists():  # this checkout's own commit
        assert re.fullmatch(r"[0-9a-f]{40}", versions["git_commit"])
        assert isinstance(versions["git_dirty"], bool)
    else:
        assert "git_commit" not in versions
