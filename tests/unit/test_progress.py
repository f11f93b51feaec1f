"""`ulframe.progress`: plain lines off a terminal (periodic, exact), a bar on one, silence off
rank 0. A fake clock drives the periods: nothing here waits."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

from ulframe import progress as progress_module
from ulframe.progress import clock, progress


class Clock:
    def __init__(self, now: float = 50.0) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(progress_module, "time", SimpleNamespace(monotonic=c.monotonic))
    return c


def test_plain_lines_every_interval_then_done(fake_clock: Clock) -> None:
    out = io.StringIO()
    seen = []
    for item in progress(list(range(10)), phase="latent caching", unit="examples", stream=out):
        fake_clock.now += 4.0  # 4 s per item: a line every 10 s
        seen.append(item)
    assert seen == list(range(10))
    assert out.getvalue().splitlines() == [
        "[latent caching] 30% 3/10 examples | 0.2 examples/s | ETA 00:28",
        "[latent caching] 60% 6/10 examples | 0.2 examples/s | ETA 00:16",
        "[latent caching] 90% 9/10 examples | 0.2 examples/s | ETA 00:04",
        "[latent caching] done: 10 examples in 00:40 | 0.2 examples/s",
    ]


def test_a_short_phase_prints_nothing(fake_clock: Clock) -> None:
    out = io.StringIO()
    with progress(8, phase="sampling", unit="samples", stream=out) as bar:
        fake_clock.now += 3.0
        bar.update(8)
    assert out.getvalue() == ""


def test_unknown_total_counts_without_percentage(fake_clock: Clock) -> None:
    out = io.StringIO()
    with progress(iter(range(3)), phase="evaluation", unit="batches", stream=out) as bar:
        for _ in bar:
            fake_clock.now += 10.0
    assert out.getvalue().splitlines() == [
        "[evaluation] 1 batches | 0.1 batches/s",
        "[evaluation] 2 batches | 0.1 batches/s",
        "[evaluation] 3 batches | 0.1 batches/s",
        "[evaluation] done: 3 batches in 00:30 | 0.1 batches/s",
    ]


def test_other_ranks_are_silent(fake_clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    for stream in (io.StringIO(), Terminal()):
        for _ in progress(range(4), phase="evaluation", unit="batches", stream=stream):
            fake_clock.now += 20.0
        assert stream.getvalue() == ""


def test_a_terminal_gets_a_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    out = Terminal()
    assert list(progress(range(5), phase="sampling", unit="steps", stream=out)) == list(range(5))
    text = out.getvalue()
    assert "sampling" in text and "5/5" in text and "100%" in text and "steps/s" in text


def test_clock_format() -> None:
    assert clock(0) == "00:00"
    assert clock(-3) == "00:00"
    assert clock(83) == "01:23"
    assert clock(3725) == "1:02:05"
