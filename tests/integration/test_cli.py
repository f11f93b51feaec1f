"""`ulframe`: help, plugin listing, config checks, errors, a tiny run and resume.

Each test asserts the text a person reads. `--help` runs in a subprocess (the installed entry
point); the other commands run in this process (`cli`, conftest.py: the same `main`, without a
second interpreter's start-up). The run uses gin/quickstart.gin shrunk by the `tiny_run`
overrides (conftest.py): 12 samples, small networks, every phase of a run.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from ulframe.errors import ConfigError
from ulframe.registry import KINDS

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "gin" / "quickstart.gin"
GIN_REFERENCE = REPO / "docs" / "gin_reference.md"

RunCli = Callable[..., subprocess.CompletedProcess[str]]


def one_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{text}"
    return lines[0]


# ---- help -------------------------------------------------------------------------------------
def test_help_shows_examples(run_cli: RunCli) -> None:
    done = run_cli("--help")
    assert done.returncode == 0, done.stderr
    usage = " ".join(done.stdout.split("\n\n")[0].split())
    assert usage.startswith("usage: ulframe [-h] [--debug] [--version] {run,config,plugins"), usage
    assert {"run", "config", "plugins", "export"} <= set(
        usage.split("{")[1].split("}")[0].split(",")
    )
    assert "\nexamples:\n  ulframe run gin/quickstart.gin " in done.stdout
    assert "  ulframe config gin/quickstart.gin " in done.stdout
    assert "run `ulframe COMMAND --help` for a command's options and examples" in done.stdout

    done = run_cli("run", "--help")
    assert done.returncode == 0, done.stderr
    assert " ".join(done.stdout.split()).startswith(
        "usage: ulframe run [-h] [--gin-param BINDING] [--gin-file FILE] [--gin-search-path DIR] "
        "[--workdir WORKDIR]"
    )
    assert "\nexamples:\n  ulframe run gin/quickstart.gin\n" in done.stdout
    assert (
        "  ulframe run gin/quickstart.gin --workdir runs/lf17 --gin.LOSS_FACTOR=1.7\n"
        in done.stdout
    )
    assert (
        "Re-running the same command on the same workdir resumes where it stopped." in done.stdout
    )


# ---- plugins ----------------------------------------------------------------------------------
def test_plugins_lists_every_kind_and_the_builtins(cli: RunCli) -> None:
    done = cli("plugins")
    assert done.returncode == 0, done.stderr
    headers = [
        line.split("  (")[0] for line in done.stdout.splitlines() if not line.startswith(" ")
    ]
    assert headers == list(KINDS)
    assert "weightings  (bind as @weightings.NAME())\n" in done.stdout
    assert "encoders  (bind as @encoders.NAME)\n" in done.stdout
    names = {
        line.split()[0]
        for line in done.stdout.splitlines()
        if line.startswith("  ") and line.split()[1:2] == ["ulframe"]
    }
    builtins = {"resnet", "vit", "uvit", "elbo", "sigmoid", "cosine", "shifted_cosine", "linear"}
    builtins |= {
        "photos",
        "image_folder",
        "ul_joint",
        "ancestral",
        "ddim",
        "psnr",
        "console",
        "tensorboard",
    }
    assert builtins <= names
    assert "  sigmoid          ulframe 0.1.0    Sigmoid weighting" in done.stdout
    assert "                   bias=0.0\n" in done.stdout


def test_plugins_markdown_is_the_checked_in_gin_reference(
    cli: RunCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Built-ins only, whatever else is installed where the tests run.
    monkeypatch.setenv("ULFRAME_DISABLE_PLUGIN_AUTOLOAD", "1")
    done = cli("plugins", "--markdown")
    assert done.returncode == 0, done.stderr
    assert done.stdout == GIN_REFERENCE.read_text(), (
        "docs/gin_reference.md is stale: regenerate it with "
        "`ULFRAME_DISABLE_PLUGIN_AUTOLOAD=1 ulframe plugins --markdown > docs/gin_reference.md`"
    )


# ---- config -----------------------------------------------------------------------------------
def test_config_of_the_quickstart_is_ok(cli: RunCli, tmp_path: Path) -> None:
    # Overrides apply in command-line order, whichever form they take: the last one wins.
    done = cli(
        "config", "gin/quickstart.gin", "--gin-param", "TRAIN_SAMPLES = 5", "--gin.TRAIN_SAMPLES=7",
        "--workdir", tmp_path / "run",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("\n# config OK\n")
    assert "\nTRAIN_SAMPLES = 7\n" in done.stdout
    assert "\nstage1/ul_joint.loss_factor = %LOSS_FACTOR\n" in done.stdout
    assert "Traceback" not in done.stderr

    # Each network's parameter count, per stage (built on the meta device).
    lines = done.stdout.splitlines()
    start = lines.index("# parameters (networks built from one train example, on the meta device):")
    stage1 = re.fullmatch(r"#   stage1: ([\d,]+)", lines[start + 1])
    assert stage1, lines[start + 1]
    nets = {}
    for line in lines[start + 2 : start + 5]:
        m = re.fullmatch(r"#     (\w+) +([\d,]+)", line)
        assert m, line
        nets[m.group(1)] = int(m.group(2).replace(",", ""))
    assert set(nets) == {"encoder", "prior", "decoder"}
    assert sum(nets.values()) == int(stage1.group(1).replace(",", ""))
    # stage 2 builds on stage 1's trained weights: not in this empty workdir, and it says so
    assert lines[start + 5].startswith(
        "#   stage2: not built here: stage 'stage1' has no valid checkpoint under "
        f"{tmp_path / 'run' / 'stages' / 'stage1' / 'checkpoints'}"
    )


def misspelled_config(tmp_path: Path) -> Path:
    path = tmp_path / "misspelled.gin"
    path.write_text(f"include '{QUICKSTART}'\n\nstage1/stages.ul_joint.los_factor = 1.7\n")
    return path


def test_misspelled_parameter_exits_2_with_one_line(cli: RunCli, tmp_path: Path) -> None:
    path = misspelled_config(tmp_path)
    done = cli("config", path)
    assert done.returncode == 2
    assert done.stdout == ""
    assert one_line(done.stderr) == (
        f"ulframe: error: {path}:3: 'stages.ul_joint' has no parameter 'los_factor'. "
        "Did you mean 'loss_factor'?"
    )


def test_debug_shows_the_traceback(cli: RunCli, tmp_path: Path) -> None:
    # --debug lets the error propagate out of `main` (a process then exits 1 with Python's
    # traceback, whose last line is the exception's type and message, checked here).
    path = misspelled_config(tmp_path)
    with pytest.raises(ConfigError) as raised:
        cli("--debug", "config", path)
    assert f"{type(raised.value).__module__}.{type(raised.value).__qualname__}: {raised.value}" == (
        f"ulframe.errors.ConfigError: {path}:3: 'stages.ul_joint' has no parameter 'los_factor'. "
        "Did you mean 'loss_factor'?"
    )


def test_unwritable_workdir_exits_2_with_a_clear_message(cli: RunCli, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    workdir = blocker / "run"
    done = cli("run", "gin/quickstart.gin", "--workdir", workdir)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"ulframe: error: workdir {workdir} cannot be written: Not a directory"
    )


# ---- a tiny run, then the same command again ----------------------------------------------------
def read_events(folder: Path) -> tuple[set[str], set[str]]:
    """Scalar and image tags in the TensorBoard event files under `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: set[str] = set()
    images: set[str] = set()
    for events in folder.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
        images |= set(acc.Tags()["images"])
    return scalars, images


@pytest.mark.slow
def test_tiny_run_writes_the_run_files_and_resumes(
    cli: RunCli, tmp_path: Path, tiny_run: list[str]
) -> None:
    workdir = tmp_path / "run"
    args = ["run", "gin/quickstart.gin", "--workdir", workdir, *tiny_run, "--gin.TRAIN_SAMPLES=12"]
    done = cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]

    for name in ("config.gin", "operative_config.gin", "command.txt", "versions.json", "log.txt"):
        assert (workdir / name).is_file(), name
    assert "TRAIN_SAMPLES = 12" in (workdir / "config.gin").read_text()
    operative = (workdir / "operative_config.gin").read_text()
    assert "stage1/TrainSettings.batch_size = 4" in operative
    assert "gin/quickstart.gin" in (workdir / "command.txt").read_text()
    versions = json.loads((workdir / "versions.json").read_text())
    assert {"python", "torch", "ulframe", "gin-config", "pluggy", "stevedore"} <= set(versions)
    assert ("git_commit" in versions) == (REPO / ".git").exists()

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["samples_seen"] for r in train] == [4, 8, 12]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(r["stage"] == "stage1" for r in records)
    assert all(isinstance(r["time"], float) for r in records)
    assert [r["time"] for r in records] == sorted(r["time"] for r in records)
    assert all({"bits_per_pixel", "loss_nats", "lr"} <= set(r) for r in train)
    assert [r["samples_seen"] for r in evals] == [4, 8, 12]
    assert all({"eval/psnr", "eval/bits_per_pixel"} <= set(r) for r in evals)

    scalars, images = read_events(workdir / "tb" / "stage1")
    assert {"train/loss_nats", "train/bits_per_pixel", "eval/psnr"} <= scalars
    assert {"eval/reconstructions", "eval/prior_samples"} <= images

    stage_dir = workdir / "stages" / "stage1"
    done_record = json.loads((stage_dir / "DONE.json").read_text())
    assert done_record["samples_seen"] == 12
    assert "[stage1] starting at 0/12 samples" in done.stdout
    assert "[stage1] done" in done.stdout

    # The same command again: the finished stage is skipped, nothing is retrained or rewritten.
    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stage stage1 already finished: skipping" in again.stderr
    assert "[stage1] starting" not in again.stdout
    assert json.loads((stage_dir / "DONE.json").read_text()) == done_record
    assert (workdir / "metrics.jsonl").read_text().count("\n") == len(records)
