"""Faults a run meets, each answered by exit code 2 and one line, or by a repair: refused runs that
change nothing, the workdir lock, torn and damaged run files, non-finite training, a full disk,
odd image files, bad gin values, plugins' configuration errors, export and lost checkpoints.

The runs are the `tiny_run` quickstart (conftest.py): 8 samples in steps of 4, a checkpoint every
4 samples; seconds each on one CPU thread.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ulframe.train import checkpoint

REPO = Path(__file__).resolve().parents[2]
RunCli = Callable[..., subprocess.CompletedProcess[str]]


def _args(workdir: Path, tiny_run: list[str], *extra: str) -> list[str]:
    return ["run", "gin/quickstart.gin", "--workdir", str(workdir), *tiny_run, *extra]


def _ckpts(workdir: Path) -> Path:
    return workdir / "stages" / "stage1" / "checkpoints"


def _error(done: subprocess.CompletedProcess[str]) -> str:
    """The error message a refused command ends with (exit 2, no traceback): one line, but for
    a changed config, which shows its diff."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "\nulframe: error: " in "\n" + done.stderr, done.stderr[-3000:]
    return ("\n" + done.stderr).rsplit("\nulframe: error: ", 1)[1].strip()


def _snapshot(workdir: Path) -> dict[str, bytes]:
    """The files a refused run must leave as they were."""
    names = ["config.gin", "operative_config.gin", "command.txt", "metrics.jsonl"]
    files = [workdir / n for n in names] + sorted((workdir / "stages").rglob("*"))
    return {str(p.relative_to(workdir)): p.read_bytes() for p in files if p.is_file()}


def _rows(workdir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ulframe", *args], env=env, cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists() and time.monotonic() < deadline:  # (a checkpoint: renamed in whole)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    assert path.exists(), f"{path} never appeared"


# ---- 2. a refused run changes nothing -----------------------------------------------------------
def test_refused_runs_change_nothing_and_the_original_command_still_resumes(
    cli: RunCli, tmp_path: Path, tiny_run: list[str]
) -> None:
    workdir = tmp_path / "run"
    assert cli(*_args(workdir, tiny_run)).returncode == 0
    (workdir / "stages" / "stage1" / "DONE.json").unlink()  # unfinished: the stage resumes at 8
    before = _snapshot(workdir)
    refusals = {
        "was trained with a different config": ["--gin.stage1/TrainSettings.lr=2e-3"],
        # Accepted by the workdir check, refused when the stage builds its networks: this run
        # used to rewrite config.gin first, so the original command was then refused.
        "decoders.uvit: heads 5 does not divide the width": [
            "--gin.stage1/TrainSettings.lr=2e-3", "--gin.decoders.uvit.heads=5",
            "--allow-config-change",
        ],
        "TrainSettings.lr must be >= 0, got -1": ["--gin.stage1/TrainSettings.lr=-1"],
    }  # fmt: skip
    for expected, extra in refusals.items():
        assert expected in _error(cli(*_args(workdir, tiny_run, *extra)))
        assert _snapshot(workdir) == before, f"changed by the run refused with {expected!r}"
    resumed = cli(*_args(workdir, tiny_run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage stage1: resumed at 8 samples" in resumed.stderr
    keys = [(r["kind"], r["samples_seen"]) for r in _rows(workdir)]
    assert len(keys) == len(set(keys)), keys  # the final evaluation is not logged twice


# ---- 1. the workdir lock -----------------------------------------------------------------------
LONG = ["--gin_param", "TRAIN_SAMPLES = 100000"]


def test_a_live_run_holds_the_workdir_and_a_dead_one_s_lock_is_taken_over(
    cli: RunCli, cli_env: Any, tmp_path: Path, tiny_run: list[str]
) -> None:
    workdir = tmp_path / "run"
    live = _start(_args(workdir, tiny_run, *LONG), cli_env())
    try:
        _wait_for(_ckpts(workdir) / "ckpt-000000000004", live)
        refused = _error(cli(*_args(workdir, tiny_run, *LONG)))
        assert refused.startswith(f"workdir {workdir} is in use by pid {live.pid} on host "), (
            refused
        )
        assert "(started " in refused
    finally:
        live.kill()
        live.communicate()
    # The killed run's lock is taken over (one line); a smaller TRAIN_SAMPLES (allowed) makes
    # the resumed stage end at once.
    shorter = ["--gin_param", "TRAIN_SAMPLES = 4", "--allow-config-change"]
    done = cli(*_args(workdir, tiny_run, *shorter))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("taking over the lock left by pid") == 1
    assert f"left by pid {live.pid} on host " in done.stderr
    assert (workdir / "run.lock").read_text() == ""


@pytest.mark.slow
def test_nproc_the_launcher_holds_the_lock_for_its_workers(
    run_cli: RunCli, cli_env: Any, tmp_path: Path, tiny_run: list[str]
) -> None:
    # `--nproc` re-executes the launcher as torch's elastic agent: the lock taken before the
    # exec stays with it (its pid), and rank 0 trains under its parent's lock.
    workdir = tmp_path / "run"
    launcher = _start([*_args(workdir, tiny_run, *LONG), "--nproc", "2"], cli_env())
    try:
        _wait_for(_ckpts(workdir) / "ckpt-000000000004", launcher)
        assert json.loads((workdir / "run.lock").read_text())["pid"] == launcher.pid
        refused = _error(run_cli(*_args(workdir, tiny_run, *LONG, "--nproc", "2")))
        assert refused.startswith(f"workdir {workdir} is in use by pid {launcher.pid} on host ")
    finally:
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=300)
    assert "checkpoint saved, re-run to resume" in err, err[-3000:]


# ---- 3. torn and damaged run files -------------------------------------------------------------
def test_torn_metrics_empty_done_json_and_a_wrong_shaped_sidecar_are_repaired(
    cli: RunCli, tmp_path: Path, tiny_run: list[str]
) -> None:
    workdir = tmp_path / "run"
    assert cli(*_args(workdir, tiny_run)).returncode == 0
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"stage": "stage1", "step": 3, "sampl')  # a kill mid-write
    (workdir / "stages" / "stage1" / "DONE.json").write_text("")
    newest = _ckpts(workdir) / "ckpt-000000000008"
    (newest / "manifest.json").write_text("{}")
    done = cli(*_args(workdir, tiny_run))
    assert done.returncode == 0, done.stderr[-3000:]
    err = done.stderr
    assert "ignoring damaged stage record" in err and "DONE.json" in err
    assert f"skipping checkpoint {newest}: ckpt-000000000008/manifest.json: damaged" in err
    assert "metrics.jsonl: 1 damaged line(s) ignored" in err
    assert "stage stage1: resumed at 4 samples" in err
    rows = _rows(workdir)  # every line parses: the torn one is gone
    keys = [(r["kind"], r["samples_seen"]) for r in rows]
    assert len(keys) == len(set(keys)), keys  # rows past the checkpoint were dropped
    assert {("train", 4), ("train", 8), ("eval", 8), ("data", 8)} <= set(keys)
    assert json.loads((workdir / "stages" / "stage1" / "DONE.json").read_text())["scalars"]
    assert checkpoint.load(newest)["samples_seen"] == 8


def test_all_checkpoints_deleted_starts_the_stage_from_zero(
    cli: RunCli, tmp_path: Path, tiny_run: list[str]
) -> None:
    workdir = tmp_path / "run"
    assert cli(*_args(workdir, tiny_run)).returncode == 0
    (workdir / "stages" / "stage1" / "DONE.json").unlink()
    for path in _ckpts(workdir).iterdir():
        shutil.rmtree(path)
    done = cli(*_args(workdir, tiny_run))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"no valid checkpoint in {_ckpts(workdir)}; starting stage1 from 0" in done.stderr
    keys = [(r["kind"], r["samples_seen"]) for r in _rows(workdir)]
    assert len(keys) == len(set(keys)), keys


# ---- 4. NaN / Inf ------------------------------------------------------------------------------
POISON = '''
import dataclasses

import torch
from ulframe.hookspecs import hookimpl


class Poison:
    """Test-only: NaN in the first loss term on the given forward calls (1-based); with
    `weights_at_end`, NaN in a weight right after the stage's final evaluation."""

    def __init__(self, steps=(), weights_at_end=False):
        self.steps = set(steps)
        self.weights_at_end = weights_at_end
        self.calls = 0
        self.model = None

    @hookimpl
    def ulframe_after_build(self, run, stage, model):
        self.model = model
        model.register_forward_hook(self._poison)

    @hookimpl
    def ulframe_eval_end(self, run, stage, samples_seen, scalars, images):
        if self.weights_at_end and samples_seen >= stage.total_samples:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))

    def _poison(self, module, args, terms):
        if not module.training:
            return terms
        self.calls += 1
        if self.calls not in self.steps:
            return terms
        first = dataclasses.fields(terms)[0].name
        return dataclasses.replace(terms, **{first: getattr(terms, first) * float("nan")})
'''


@pytest.fixture
def poison_site(make_distribution: Any, tmp_path: Path) -> list[Path]:
    """The folder of the poison plugin's distribution, for `cli(..., sys_path=...)`."""
    site = make_distribution(
        tmp_path / "site", "poison-plugin", {"ulframe.hooks": {"poison": "poison:Poison"}},
        {"poison.py": POISON},
    )  # fmt: skip
    return [site]


HOOKS = "--gin.Experiment.hooks=[@hooks.console(), @hooks.poison()]"


def test_the_nan_policy_skips_by_default_and_skipped_steps_do_not_count(
    cli: RunCli, poison_site: list[Path], tmp_path: Path, tiny_run: list[str]
) -> None:
    workdir = tmp_path / "run"
    done = cli(
        *_args(workdir, tiny_run, HOOKS, "--gin.hooks.poison.steps=(2,)"), sys_path=poison_site
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("step skipped: non-finite") == 1
    train = {r["samples_seen"]: r["skipped_steps"] for r in _rows(workdir) if r["kind"] == "train"}
    assert train == {4: 0, 8: 1}  # three steps: the skipped one trained on nothing
    assert (
        json.loads((workdir / "stages" / "stage1" / "DONE.json").read_text())["samples_seen"] == 8
    )


def test_a_diverging_run_stops_naming_the_last_finite_checkpoint(
    cli: RunCli, poison_site: list[Path], tmp_path: Path, tiny_run: list[str]
) -> None:
    workdir = tmp_path / "run"
    poison = [HOOKS, "--gin.hooks.poison.steps=(2, 3, 4)"]
    error = _error(cli(*_args(workdir, tiny_run, *poison), sys_path=poison_site))
    assert "at step 2 of stage stage1: 3 consecutive steps skipped" in error
    assert error.endswith(f"last finite checkpoint: {_ckpts(workdir) / 'ckpt-000000000004'}")
    assert not (workdir / "stages" / "stage1" / "DONE.json").exists()


def test_non_finite_weights_are_never_marked_done_nor_pruned_in_favour_of(
    cli: RunCli, poison_site: list[Path], tmp_path: Path, tiny_run: list[str]
) -> None:
    workdir = tmp_path / "run"
    poison = [HOOKS, "--gin.hooks.poison.weights_at_end=True"]
    keep_one = "--gin.stage1/TrainSettings.keep_checkpoints=1"
    error = _error(cli(*_args(workdir, tiny_run, *poison, keep_one), sys_path=poison_site))
    good = _ckpts(workdir) / "ckpt-000000000004"
    assert error == (
        "stage stage1: the weights are not finite (NaN/Inf) at 8 samples; the stage is not "
        f"marked done; last finite checkpoint: {good}"
    )
    assert not (workdir / "stages" / "stage1" / "DONE.json").exists()
    assert checkpoint.list_checkpoints(_ckpts(workdir)) == [good, _ckpts(workdir) / "ckpt-000000000008"]  # fmt: skip
    assert checkpoint.manifest(_ckpts(workdir) / "ckpt-000000000008")["finite"] is False


# ---- 5. a full disk ----------------------------------------------------------------------------
DISK_FULL = '''
import errno

import ulframe.rundir
from ulframe.hookspecs import hookimpl


def _full(*args):
    raise OSError(errno.ENOSPC, "No space left on device")


class DiskFull:
    """Test-only: after the first checkpoint, every fsync of a run file fails with ENOSPC."""

    @hookimpl
    def ulframe_checkpoint_saved(self, run, stage, path, samples_seen):
        ulframe.rundir._fsync = _full
'''


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_temporary_file(
    cli: RunCli,
    make_distribution: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    tiny_run: list[str],
) -> None:
    import ulframe.rundir

    # The plugin replaces ulframe.rundir._fsync in this process: put it back after the test.
    monkeypatch.setattr(ulframe.rundir, "_fsync", ulframe.rundir._fsync)
    site = make_distribution(
        tmp_path / "site", "disk-full-plugin", {"ulframe.hooks": {"disk_full": "disk_full:DiskFull"}},
        {"disk_full.py": DISK_FULL},
    )  # fmt: skip
    workdir = tmp_path / "run"
    hooks = "--gin.Experiment.hooks=[@hooks.console(), @hooks.disk_full()]"
    done = cli(*_args(workdir, tiny_run, hooks), sys_path=[site])
    assert _error(done) == (
        f"no space left on device writing {_ckpts(workdir) / 'ckpt-000000000008'}; "
        f"last good checkpoint: {_ckpts(workdir) / 'ckpt-000000000004'}"
    )
    assert [p for p in workdir.rglob("*") if p.name.endswith(".tmp")] == []


# ---- 6. odd image files ------------------------------------------------------------------------
def _odd_images() -> dict[str, Image.Image]:
    """One small image per Pillow mode that RGB conversion gets wrong when done naively."""
    ramp16 = np.tile(np.linspace(0, 65535, 16), (16, 1)).astype(np.uint16)
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 1
    return {
        "grey16.png": Image.fromarray(ramp16),  # I;16
        "int32.tif": Image.fromarray(ramp16.astype(np.int32)),  # I
        "float.tif": Image.fromarray(np.tile(np.linspace(0, 1, 16), (16, 1)).astype(np.float32)),
        "palette.png": palette,
        "la.png": Image.new("LA", (16, 16), (40, 0)),
        "cmyk.jpg": Image.new("CMYK", (16, 16), (0, 255, 255, 0)),
        "bits.png": Image.new("1", (16, 16), 1),
        "rgb.png": Image.new("RGB", (16, 16), (0, 0, 255)),
    }


def test_every_pillow_mode_becomes_full_range_rgb(tmp_path: Path) -> None:
    from ulframe_plugins.datasets.common import open_rgb

    rgb = {}
    for name, image in _odd_images().items():
        path = tmp_path / name
        image.save(path, **({"transparency": 1} if name == "palette.png" else {}))
        opened = open_rgb(path)
        assert opened is not None and opened.mode == "RGB", name
        rgb[name] = np.asarray(opened).astype(int)
    for name in ("grey16.png", "int32.tif", "float.tif"):  # scaled, not clipped at 255
        row = rgb[name][0, :, 0]
        assert row[0] == 0 and row[-1] == 255 and 100 < row[8] < 160, (name, row)
    assert (rgb["palette.png"] == 255).all()  # transparent: the white background
    assert (rgb["la.png"] == 255).all()
    assert np.abs(rgb["cmyk.jpg"][8, 8] - [255, 0, 0]).max() < 8
    assert (rgb["bits.png"] == 255).all()
    assert (rgb["rgb.png"][8, 8] == [0, 0, 255]).all()


def _folder(root: Path) -> dict[str, int]:
    """train/ and val/ class folders with odd files: a corrupt image, a file name that is not
    UTF-8, a symlink loop and a second link to a folder. Returns the real file counts."""
    for split, classes in (("train", ("a", "b")), ("val", ("a", "b"))):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(3 if split == "train" else 1):
                Image.new("RGB", (20, 18), (40 * i, 80, 120)).save(root / split / c / f"{i}.png")
    (root / "train" / "a" / "bad.png").write_bytes(b"\x89PNG not really")
    with open(os.fsencode(root / "train" / "b") + b"/caf\xe9.png", "wb") as f:
        Image.new("RGB", (16, 16), (1, 2, 3)).save(f, format="PNG")
    (root / "train" / "a" / "loop").symlink_to("..")  # train/a/loop -> train: a loop
    (root / "train" / "b" / "again").symlink_to(root / "train" / "a")  # a's files, once more
    return {"train": 3 + 1 + 3 + 1, "eval": 2}


def test_image_folder_follows_links_once_and_takes_any_file_name(tmp_path: Path) -> None:
    from ulframe_plugins.datasets.image_folder import ImageFolder

    counts = _folder(tmp_path / "data")
    data = ImageFolder(str(tmp_path / "data"), resolution=16)
    items = {split: data.source(split).items for split in ("train", "eval")}
    assert {k: len(v) for k, v in items.items()} == counts
    assert len({os.path.realpath(p) for p, _ in items["train"]}) == counts["train"]
    assert any(os.fsencode(p).endswith(b"caf\xe9.png") for p, _ in items["train"])
    (tmp_path / "data" / "val").rename(tmp_path / "val")  # no eval folder: a hashed hold-out
    held = ImageFolder(str(tmp_path / "data"), resolution=16)
    assert len(held.source("eval").items) == 1 and len(held.source("train").items) == 7


def test_image_folder_run_warns_once_per_bad_file_and_counts_skipped_files(
    cli: RunCli, tmp_path: Path, tiny_run: list[str]
) -> None:
    _folder(tmp_path / "data")
    workdir = tmp_path / "run"
    data = [
        "--gin.Experiment.dataset=@datasets.image_folder()",
        f"--gin.datasets.image_folder.root='{tmp_path / 'data'}'",
        "--gin.datasets.image_folder.resolution=16",
        "--gin_param", "TRAIN_SAMPLES = 32",  # four epochs of the 8 train images
    ]  # fmt: skip
    done = cli(*_args(workdir, tiny_run, *data))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("skipping unreadable image") == 1, done.stderr[-3000:]
    assert "Logging error" not in done.stderr
    assert "stage stage1: unreadable files skipped: train 1, eval 0" in done.stderr
    data_rows = [r for r in _rows(workdir) if r["kind"] == "data"]
    assert [(r["skipped_files/train"], r["skipped_files/eval"]) for r in data_rows] == [(1, 0)]


# ---- 7. bad gin values -------------------------------------------------------------------------
def _gin(tmp_path: Path, text: str, name: str = "exp.gin") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def test_bad_gin_values_are_one_line_with_file_and_line(cli: RunCli, tmp_path: Path) -> None:
    quickstart = REPO / "gin" / "quickstart.gin"
    lr = _gin(tmp_path, f"include '{quickstart}'\nstage1/TrainSettings.lr = -0.001\n", "lr.gin")
    macro = _gin(tmp_path, f"include '{quickstart}'\nstage1/TrainSettings.lr = %MISSING\n", "m.gin")
    _gin(tmp_path, "include 'b.gin'\n", "a.gin")
    _gin(tmp_path, "X = 1\ninclude 'a.gin'\n", "b.gin")
    bracket = _gin(tmp_path, "X = 1\nY = [1,\n  2,\n\nZ = 3\n", "bracket.gin")
    missing = _gin(tmp_path, "include 'nowhere/missing.gin'\n", "missing.gin")
    cases = {
        (str(quickstart), "--gin.stage1/TrainSettings.lr='abc'"):
            "--gin override 'stage1/TrainSettings.lr = 'abc'': stage1/TrainSettings.lr: expected "
            "a number, got str 'abc'",
        (str(lr),): f"{lr}:2: TrainSettings.lr must be >= 0, got -0.001",
        (str(macro),): f"{macro}:2: undefined macro %MISSING: define it in a gin file "
            "(`MISSING = ...`) or with --gin.MISSING=VALUE",
        (str(tmp_path / "a.gin"),): f"{tmp_path / 'b.gin'}:2: circular include: "
            f"{tmp_path / 'a.gin'} -> {tmp_path / 'b.gin'} -> {tmp_path / 'a.gin'}",
        (str(bracket),): f"{bracket}:2: gin syntax error: '[' is never closed",
        (str(quickstart), "--gin.DATA_ROOT=/x"): "--gin override 'DATA_ROOT = /x': gin syntax "
            "error: Unable to parse value. (a string needs quotes: --gin.DATA_ROOT=\"'/x'\")",
    }  # fmt: skip
    for argv, expected in cases.items():
        assert _error(cli("config", *argv)) == expected
    # `run` refuses what `config` refuses, before touching a workdir.
    workdir = tmp_path / "never"
    argv = (
        "run",
        str(quickstart),
        "--workdir",
        str(workdir),
        "--gin.stage1/TrainSettings.lr='abc'",
    )
    assert _error(cli(*argv)) == cases[(str(quickstart), "--gin.stage1/TrainSettings.lr='abc'")]
    assert not workdir.exists()
    # gin's own file-lookup log lines are not shown.
    done = cli("config", str(missing))
    assert "Unable to open file: nowhere/missing.gin" in _error(done)
    assert "system_path_file_exists" not in done.stderr and "Path not found" not in done.stderr


NAN_GUARD_RETIRED = (
    "hooks.nan_guard was removed: the training loop handles non-finite steps itself; set "
    "TrainSettings.nan_policy ('skip' or 'stop') and TrainSettings.max_nonfinite_steps (was "
    "hooks.nan_guard.max_consecutive), and drop @hooks.nan_guard() from Experiment.hooks"
)


def test_the_retired_nan_guard_hook_stops_the_config_pointing_to_the_nan_policy(
    cli: RunCli, tmp_path: Path
) -> None:
    quickstart = REPO / "gin" / "quickstart.gin"
    listed = _gin(tmp_path, f"""
        include '{quickstart}'
        Experiment.hooks = [@hooks.console(), @hooks.nan_guard()]
    """)  # fmt: skip
    cases = {
        (str(listed),): f"{listed}:2: {NAN_GUARD_RETIRED}",
        (str(quickstart), "--gin.hooks.nan_guard.max_consecutive=2"):  # bound, not listed
            f"--gin override 'hooks.nan_guard.max_consecutive = 2': {NAN_GUARD_RETIRED}",
        (str(quickstart), "--gin.stage1/TrainSettings.max_nonfinite_steps=0"):
            "--gin override 'stage1/TrainSettings.max_nonfinite_steps = 0': "
            "TrainSettings.max_nonfinite_steps must be positive, got 0",
        (str(quickstart), "--gin.stage1/TrainSettings.nan_policy='ignore'"):
            "--gin override 'stage1/TrainSettings.nan_policy = 'ignore'': "
            "stage1/TrainSettings.nan_policy: expected one of 'skip', 'stop', got str 'ignore'",
    }  # fmt: skip
    for argv, expected in cases.items():
        assert _error(cli("config", *argv)) == expected
    # `run` refuses it before touching a workdir
    workdir = tmp_path / "never"
    assert _error(cli("run", str(listed), "--workdir", str(workdir))) == cases[(str(listed),)]
    assert not workdir.exists()


# ---- 8. configuration errors raised by plugins -------------------------------------------------
def test_plugins_configuration_errors_are_one_line_naming_plugin_and_parameter(
    cli: RunCli, tmp_path: Path, tiny_run: list[str]
) -> None:
    quickstart = str(REPO / "gin" / "quickstart.gin")
    folder = ["--gin.Experiment.dataset=@datasets.image_folder()", f"--gin.datasets.image_folder.root='{tmp_path}'"]  # fmt: skip
    cases = {
        (*folder, "--gin.datasets.image_folder.resolution=0"):
            "--gin override 'datasets.image_folder.resolution = 0': "
            "datasets.image_folder.resolution must be >= 1; got 0",
    }  # fmt: skip
    for extra, expected in cases.items():
        assert _error(cli("config", quickstart, *extra)) == expected
    # A network's parameter, checked when the stage builds it from the data.
    error = _error(cli(*_args(tmp_path / "run", tiny_run, "--gin.decoders.uvit.heads=5")))
    assert error == "--gin override 'decoders.uvit.heads = 5': decoders.uvit: heads 5 does not divide the width 32"  # fmt: skip


# Raises of ValueError / TypeError left in built-in plugins: checks of the engine's own calls and
# of the data, not of a gin value (those raise ulframe.errors.ConfigError).
NOT_CONFIGURATION = {
    "source",
    "split_indices",  # the engine asks for "train" or "eval" only
    "forward",  # a caller's tensors
    "conditioned_input",  # a caller's tensors (the denoisers' forward)
    "stream_info",  # a video file's header (the file is skipped as unreadable)
    "crossing_logsnr",  # callers check loss_factor > 1 first
    "_check_grid",  # a sampler's grid, built by logsnr_grid
}


def test_built_in_plugins_raise_config_error_for_configuration() -> None:
    files = [
        *(REPO / "plugins").glob("datasets/*.py"), *(REPO / "plugins").glob("networks/*.py"),
        *(REPO / "plugins").glob("hooks/*.py"),
        *(REPO / "ulframe" / "diffusion" / n for n in ("schedules.py", "weighting.py", "samplers.py")),
    ]  # fmt: skip
    found = []
    for path in files:
        for func in ast.walk(ast.parse(path.read_text())):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(func):
                exc = node.exc if isinstance(node, ast.Raise) else None
                name = getattr(getattr(exc, "func", None), "id", None)
                if name in ("ValueError", "TypeError") and func.name not in NOT_CONFIGURATION:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} in {func.name}()")
    assert found == [], "raise ulframe.errors.ConfigError for configuration: " + ", ".join(found)


# ---- 9. other commands -------------------------------------------------------------------------
def test_export_to_a_directory_or_an_unwritable_path_is_one_line(
    cli: RunCli, tmp_path: Path, tiny_run: list[str]
) -> None:
    workdir = tmp_path / "run"
    assert cli(*_args(workdir, tiny_run)).returncode == 0
    assert _error(cli("export", str(workdir), "--out", str(tmp_path))) == (
        f"--out {tmp_path} is a folder that holds other files; name a new folder (or "
        "FILE.safetensors for one stage's weights)"
    )
    fmt = ("--format", "safetensors")
    assert _error(cli("export", str(workdir), "--out", str(tmp_path), *fmt)) == (
        f"--out {tmp_path} is a directory; name a file, e.g. {tmp_path / 'ema.safetensors'}"
    )
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    out = blocked / "ema.safetensors"
    assert _error(cli("export", str(workdir), "--out", str(out))).startswith(
        f"cannot write --out {out}: "
    )
    good = cli("export", str(workdir), "--out", str(tmp_path / "ema.safetensors"))
    assert good.returncode == 0, good.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "ema.safetensors", "run"]
