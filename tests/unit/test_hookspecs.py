"""ulframe.hookspecs: the documented lifecycle is the one a real run follows; bad hooks fail early.

The order test runs a tiny `ulframe run` in this process (through `ulframe.cli.main`) with a
recording hook object added to the plugin manager the CLI builds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from ulframe import cli, hookspecs
from ulframe.errors import PluginError
from ulframe.hookspecs import RunInfo, StageInfo, StepInfo, hookimpl, plugin_manager

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "gin" / "quickstart.gin"


class Recorder:
    """Records every hook call as (hook, samples seen or stage name)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    @hookimpl
    def ulframe_run_start(self, run: RunInfo) -> None:
        self.calls.append(("ulframe_run_start", run.stage_names))

    @hookimpl
    def ulframe_stage_start(self, run: RunInfo, stage: StageInfo) -> None:
        self.calls.append(("ulframe_stage_start", stage.samples_seen))

    @hookimpl
    def ulframe_after_build(self, run: RunInfo, stage: StageInfo, model: Any) -> None:
        self.calls.append(("ulframe_after_build", type(model).__name__))

    @hookimpl
    def ulframe_train_step_end(self, run: RunInfo, step: StepInfo) -> None:
        self.calls.append(("ulframe_train_step_end", step.samples_seen))

    @hookimpl
    def ulframe_eval_end(
        self, run: RunInfo, stage: StageInfo, samples_seen: int, scalars: Any, images: Any
    ) -> None:
        self.calls.append(("ulframe_eval_end", samples_seen))

    @hookimpl
    def ulframe_checkpoint_saved(
        self, run: RunInfo, stage: StageInfo, path: Path, samples_seen: int
    ) -> None:
        self.calls.append(("ulframe_checkpoint_saved", samples_seen))

    @hookimpl
    def ulframe_stage_end(self, run: RunInfo, stage: StageInfo, scalars: dict[str, float]) -> None:
        self.calls.append(("ulframe_stage_end", sorted(scalars)[:1]))

    @hookimpl
    def ulframe_run_end(self, run: RunInfo, results: dict[str, dict[str, float]]) -> None:
        self.calls.append(("ulframe_run_end", sorted(results)))

    @hookimpl
    def ulframe_error(self, run: RunInfo, error: BaseException) -> None:
        self.calls.append(("ulframe_error", type(error).__name__))


def run_in_process(args: list[str], hooks: list[Any], monkeypatch: pytest.MonkeyPatch) -> int:
    """`ulframe ARGS` in this process, with `hooks` added to the run's plugin manager."""
    real = hookspecs.plugin_manager
    monkeypatch.setattr(hookspecs, "plugin_manager", lambda objs: real([*objs, *hooks]))
    return cli.main(args)


def test_hooks_fire_in_the_documented_order(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_run: list[str],
    tiny_threads: None,
    restore_logging: None,
) -> None:
    recorder = Recorder()
    workdir = tmp_path / "run"
    # 12 samples in batches of 4: logged and evaluated every 4 samples, a checkpoint every 7 (so
    # one mid-stage checkpoint, at 8, and none that coincides with the final one).
    args = ["run", str(QUICKSTART), "--workdir", str(workdir), *tiny_run]
    args += ["--gin.TRAIN_SAMPLES=12", "--gin_param", "Experiment.hooks = []"]
    args += ["--gin_param", "stage1/TrainSettings.checkpoint_every_samples = 7"]
    assert run_in_process(args, [recorder], monkeypatch) == 0
    expected = [
        ("ulframe_run_start", ["stage1"]),
        ("ulframe_stage_start", 0),
        ("ulframe_after_build", "ULJointModel"),
        # after each step: log, then evaluate, then checkpoint, when their period is crossed
        ("ulframe_train_step_end", 4),
        ("ulframe_eval_end", 4),
        ("ulframe_train_step_end", 8),
        ("ulframe_eval_end", 8),
        ("ulframe_checkpoint_saved", 8),
        ("ulframe_train_step_end", 12),
        # the end of the stage: the final evaluation, then the final checkpoint
        ("ulframe_eval_end", 12),
        ("ulframe_checkpoint_saved", 12),
        ("ulframe_stage_end", ["bits_per_pixel"]),
        ("ulframe_run_end", ["stage1"]),
    ]
    assert recorder.calls == expected
    assert (
        json.loads((workdir / "stages" / "stage1" / "DONE.json").read_text())["samples_seen"] == 12
    )

    # The same command again: the stage is finished, so only the run hooks fire.
    again = Recorder()
    assert run_in_process(args, [again], monkeypatch) == 0
    assert again.calls == [("ulframe_run_start", ["stage1"]), ("ulframe_run_end", ["stage1"])]


class FailsAfterBuild:
    @hookimpl
    def ulframe_after_build(self, run: RunInfo, stage: StageInfo, model: Any) -> None:
        raise RuntimeError("boom")


def test_a_failing_run_calls_the_error_hook_instead_of_the_rest(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_run: list[str],
    tiny_threads: None,
    restore_logging: None,
) -> None:
    recorder = Recorder()
    workdir = tmp_path / "run"
    args = ["run", str(QUICKSTART), "--workdir", str(workdir), *tiny_run]
    args += ["--gin_param", "Experiment.hooks = []"]
    with pytest.raises(RuntimeError, match="boom"):  # not a user error: the traceback stays
        run_in_process(args, [recorder, FailsAfterBuild()], monkeypatch)
    names = [name for name, _ in recorder.calls]
    assert names[:2] == ["ulframe_run_start", "ulframe_stage_start"]
    assert recorder.calls[-1] == ("ulframe_error", "RuntimeError")
    assert "ulframe_train_step_end" not in names and "ulframe_run_end" not in names
    assert (workdir / "operative_config.gin").is_file()  # written on the way out
    assert not (workdir / "stages" / "stage1" / "DONE.json").exists()


def test_the_docstring_documents_every_hook() -> None:
    doc = hookspecs.__doc__ or ""
    documented = re.findall(r"\b(ulframe_\w+)", doc.split("Order of calls")[1])
    assert documented == [
        "ulframe_run_start",
        "ulframe_stage_start",
        "ulframe_after_build",
        "ulframe_check_step",
        "ulframe_train_step_end",
        "ulframe_eval_end",
        "ulframe_checkpoint_saved",
        "ulframe_stage_end",
        "ulframe_run_end",
        "ulframe_error",
    ]
    assert sorted(documented) == sorted(hookspecs.hook_names())


# ---- validation at registration ----------------------------------------------------------------
class Misspelled:
    @hookimpl
    def ulframe_train_step_ends(self, run: RunInfo, step: StepInfo) -> None: ...


class WrongArgument:
    @hookimpl
    def ulframe_train_step_end(self, run: RunInfo, stepp: StepInfo) -> None: ...


class FewerArguments:
    """A hook may take a subset of the arguments."""

    @hookimpl
    def ulframe_run_end(self, run: RunInfo) -> None: ...


def test_misspelled_hook_fails_at_registration_naming_plugin_and_hook() -> None:
    with pytest.raises(PluginError) as err:
        plugin_manager([FewerArguments(), Misspelled()])
    assert str(err.value) == (
        f"hook plugin Misspelled ({__name__}) implements unknown hook 'ulframe_train_step_ends'; "
        "did you mean 'ulframe_train_step_end'? (hooks: ulframe_run_start, ulframe_run_end, "
        "ulframe_error, ulframe_stage_start, ulframe_after_build, ulframe_check_step, "
        "ulframe_train_step_end, "
        "ulframe_eval_end, ulframe_checkpoint_saved, ulframe_stage_end)"
    )


def test_argument_the_hook_does_not_pass_fails_at_registration() -> None:
    with pytest.raises(PluginError) as err:
        plugin_manager([WrongArgument()])
    assert str(err.value) == (
        f"hook plugin WrongArgument ({__name__}): ulframe_train_step_end(run, stepp) takes "
        "'stepp', which the hook does not pass; it passes (run, step)"
    )


def test_a_subset_of_arguments_is_fine() -> None:
    pm = plugin_manager([FewerArguments()])
    assert [type(p).__name__ for p in pm.get_plugins()] == ["FewerArguments"]
