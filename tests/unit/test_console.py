"""The console hook: one plain line per event off a terminal, exactly; a tqdm bar on one; MFU
when the step scalars carry it; nothing on other ranks."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest

from ulframe.hookspecs import RunInfo, StageInfo, StepInfo
from ulframe_plugins.hooks import console
from ulframe_plugins.hooks.console import ConsoleProgress


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


def _feed(hook: ConsoleProgress, clock: Clock, is_main: bool = True) -> None:
    run = RunInfo(Path("/tmp/run"), ["stage1"], "", is_main=is_main, world_size=2)
    stage = StageInfo("stage1", 0, Path("/tmp/run/stages/stage1"), 100, 0, 4, is_main=is_main)
    hook.ulframe_stage_start(run=run, stage=stage)
    clock.now += 2.0  # 8 samples in 2 s: 4 samples/s, 92 samples left -> ETA 23 s
    scalars = {"loss_nats": 1234.56, "bits_per_pixel": 0.88888, "samples_per_s": 3.5}
    step = StepInfo(stage, step=2, samples_seen=8, scalars=scalars, step_time_s=1.0, data_wait_s=0)
    hook.ulframe_train_step_end(run=run, step=step)
    hook.ulframe_train_step_end(
        run=run, step=StepInfo(stage, 3, 12, {"loss_nats": 2.0}, 1.0, 0.0)
    )  # no bits/pixel: left out; no samples/s: the measured rate
    hook.ulframe_eval_end(
        run=run,
        stage=stage,
        samples_seen=12,
        scalars={"psnr": 21.456, "bits_per_pixel": 0.5},
    )
    hook.ulframe_stage_end(run=run, stage=stage, scalars={})


def test_plain_lines_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(100.0)
    monkeypatch.setattr(console, "time", SimpleNamespace(monotonic=clock.monotonic))
    out = io.StringIO()  # not a TTY: plain lines
    hook = ConsoleProgress(stream=out)
    assert not hook.live
    _feed(hook, clock)
    assert out.getvalue().splitlines() == [
        "[stage1] starting at 0/100 samples",
        "[stage1] 8/100 | loss 1234.6 nats | bpp 0.8889 | 3.5 samples/s | ETA 00:23",
        "[stage1] 12/100 | loss 2.0 nats | 6.0 samples/s | ETA 00:14",
        "[stage1] eval at 12: bits_per_pixel 0.5, psnr 21.46",
        "[stage1] done",
    ]
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_other_ranks_print_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(100.0)
    monkeypatch.setattr(console, "time", SimpleNamespace(monotonic=clock.monotonic))
    out = io.StringIO()
    _feed(ConsoleProgress(stream=out), clock, is_main=False)
    assert out.getvalue() == ""


def test_eta_format() -> None:
    assert console._eta(0) == "00:00"
    assert console._eta(-5) == "00:00"
    assert console._eta(83) == "01:23"
    assert console._eta(3725) == "1:02:05"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_mfu_is_shown_when_the_scalars_carry_it(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(100.0)
    monkeypatch.setattr(console, "time", SimpleNamespace(monotonic=clock.monotonic))
    out = io.StringIO()
    hook = ConsoleProgress(stream=out)
    run = RunInfo(Path("/tmp/run"), ["stage1"], "")
    stage = StageInfo("stage1", 0, Path("/tmp/run/stages/stage1"), 100, 0, 4)
    hook.ulframe_stage_start(run=run, stage=stage)
    clock.now += 1.0
    scalars = {"loss_nats": 1.0, "perf/mfu": 0.4125, "samples_per_s": 4.0}
    hook.ulframe_train_step_end(run=run, step=StepInfo(stage, 1, 4, scalars, 1.0, 0.0))
    assert out.getvalue().splitlines()[-1] == (
        "[stage1] 4/100 | loss 1.0 nats | MFU 41.2% | 4.0 samples/s | ETA 00:24"
    )


def test_a_terminal_gets_a_bar_with_the_same_facts(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(100.0)
    monkeypatch.setattr(console, "time", SimpleNamespace(monotonic=clock.monotonic))
    out = Terminal()
    hook = ConsoleProgress(stream=out)
    assert hook.live
    _feed(hook, clock)
    text = out.getvalue()
    assert "\r" in text  # the bar redraws in place
    assert "[stage1] starting at 0/100 samples\n" in text
    assert "[stage1] eval at 12: bits_per_pixel 0.5, psnr 21.46\n" in text
    assert "[stage1] done\n" in text
    assert "12/100" in text and "loss 2.0 nats" in text and "bpp 0.8889" in text
    assert "samples/s" in text
    assert hook._bar is None  # closed at the end of the stage

    quiet = Terminal()
    _feed(ConsoleProgress(stream=quiet), Clock(100.0), is_main=False)
    assert quiet.getvalue() == ""
