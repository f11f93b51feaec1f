"""Progress of the long steps outside the training loop: evaluation, latent caching, sampling.

    for batch in progress(batches, phase="evaluation", unit="batch"):
        ...
    with progress(n, phase="sampling", unit="sample") as bar:
        ...
        bar.update(len(chunk))

On a terminal (rank 0) a tqdm bar: phase, percentage, count, units/s and ETA. Anywhere else
(CI logs, `2> file`) plain lines, at most one every `interval_s` seconds, so that a short phase
prints nothing and a long one says how far it is:

    [latent caching] 40% 576/1433 examples | 95.1 examples/s | ETA 00:09

and, when it printed anything, one closing line (`[latent caching] done: 1433 examples in
00:15 | 95.5 examples/s`). Off rank 0 (`RANK` other than 0) nothing. Lines go to stderr: stdout
stays for what a command prints as its result (`ulframe sample|eval` print JSON there).
The training loop's own progress is the console hook's (`hooks.console`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TextIO, TypeVar, overload

T = TypeVar("T")
PLAIN_INTERVAL_S = 10.0  # seconds between two plain lines


def is_main_process() -> bool:
    """Whether this process is rank 0 (`RANK` unset counts as rank 0)."""
    return os.environ.get("RANK", "0") in ("", "0")


def clock(seconds: float) -> str:
    """`MM:SS`, or `H:MM:SS` from an hour on."""
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress(Generic[T]):
    """One phase's progress: iterate it (when made from an iterable) or call `update(n)`.

    `mode` is "bar" (tqdm), "plain" (periodic lines) or "off"; `progress()` picks it.
    """

    def __init__(
        self,
        iterable: Iterable[T] | None,
        total: int | None,
        phase: str,
        unit: str,
        mode: str,
        stream: TextIO,
        interval_s: float = PLAIN_INTERVAL_S,
        leave: bool = True,
    ) -> None:
        self.iterable = iterable
        self.total = total
        self.phase = phase
        self.unit = unit
        self.mode = mode
        self.stream = stream
        self.interval_s = interval_s
        self.n = 0
        self._start = time.monotonic()
        self._last = self._start
        self._printed = False
        self._closed = False
        self._bar: Any = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, desc=phase, unit=f" {unit}", file=stream, dynamic_ncols=True,
                leave=leave, smoothing=0.1,
            )  # fmt: skip

    def __iter__(self) -> Iterator[T]:
        if self.iterable is None:
            raise TypeError("this progress was made from a total: call update(n) instead")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> Progress[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "plain":
            now = time.monotonic()
            if now - self._last >= self.interval_s:
                self._last = now
                self._line(self._status(now))

    def _status(self, now: float) -> str:
        elapsed = now - self._start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        if self.total:
            count = f"{100 * self.n // self.total}% {self.n}/{self.total} {self.unit}"
        else:
            count = f"{self.n} {self.unit}"
        parts = [f"[{self.phase}] {count}", f"{rate:.1f} {self.unit}/s"]
        if self.total and rate > 0:
            parts.append(f"ETA {clock((self.total - self.n) / rate)}")
        return " | ".join(parts)

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
        self._printed = True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "plain":
            now = time.monotonic()
            elapsed = now - self._start
            if self._printed or elapsed >= self.interval_s:
                rate = self.n / elapsed if elapsed > 0 else 0.0
                self._line(
                    f"[{self.phase}] done: {self.n} {self.unit} in {clock(elapsed)} | "
                    f"{rate:.1f} {self.unit}/s"
                )


# Deliberately repeated: typing.overload spells out each signature (ints, then iterables).
@overload
def progress(
    iterable_or_total: int,
    phase: str,
    unit: str = ...,
    *,
    total: int | None = ...,
    stream: TextIO | None = ...,
    enabled: bool | None = ...,
    live: bool | None = ...,
    interval_s: float = ...,
    leave: bool = ...,
) -> Progress[int]: ...
@overload
def progress(
    iterable_or_total: Iterable[T],
    phase: str,
    unit: str = ...,
    *,
    total: int | None = ...,
    stream: TextIO | None = ...,
    enabled: bool | None = ...,
    live: bool | None = ...,
    interval_s: float = ...,
    leave: bool = ...,
) -> Progress[T]: ...
def progress(
    iterable_or_total: Iterable[T] | int,
    phase: str,
    unit: str = "it",
    *,
    total: int | None = None,
    stream: TextIO | None = None,
    enabled: bool | None = None,
    live: bool | None = None,
    interval_s: float = PLAIN_INTERVAL_S,
    leave: bool = True,
) -> Progress[Any]:
    """The progress of `phase`: over an iterable (its `len()` is the total unless `total` is
    given) or over a count (`update(n)` by hand).

    `enabled`: default rank 0 only. `live`: a bar (default: when `stream`, stderr by default,
    is a terminal; `leave`: the finished bar stays, else it is erased); otherwise plain lines
    every `interval_s` seconds.
    """
    stream = stream or sys.stderr
    if isinstance(iterable_or_total, int):
        iterable, total = None, iterable_or_total if total is None else total
    else:
        iterable = iterable_or_total
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
    if enabled is None:
        enabled = is_main_process()
    if live is None:
        live = _isatty(stream)
    mode = "off" if not enabled else "bar" if live else "plain"
    return Progress(iterable, total, phase, unit, mode, stream, interval_s, leave)


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False
