"""Pre-emption signals: within a training loop a signal only records itself; the loop
checkpoints and stops at the end of the step (every rank learns of it in the step's one sync).

SIGTERM and SIGINT stop a run. The requeue signal (SIGUSR1 unless `set_requeue_signal` names
another: SLURM sends it before a job's time limit with `#SBATCH --signal=USR1@SECONDS`) stops it
the same way, and `ulframe run` then exits with `ulframe.errors.EXIT_REQUEUE`, the code a batch
script requeues the job on (docs/cluster.md). Its default action would kill the process, so it is
recorded outside the loop too (`recording`): a run that receives it while building or evaluating
stops at its next step instead.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable
from typing import Any

from ulframe.errors import UserError

DEFAULT_REQUEUE_SIGNAL = signal.SIGUSR1
REQUEUE_SIGNALS = {
    s.name.removeprefix("SIG"): s
    for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGHUP, signal.SIGXCPU)
}
"""The signals `--requeue-signal` may name (what schedulers send before they stop a job)."""

_requeue_signal: signal.Signals | None = DEFAULT_REQUEUE_SIGNAL


def parse_signal(name: str) -> signal.Signals | None:
    """The requeue signal `name` names (`USR1`, `SIGUSR1` or its number); `none`: no signal
    requeues. Anything else is a UserError listing what is allowed."""
    key = name.strip().upper().removeprefix("SIG")
    if key == "NONE":
        return None
    by_number = {str(int(s)): s for s in REQUEUE_SIGNALS.values()}
    found = REQUEUE_SIGNALS.get(key) or by_number.get(key)
    if found is None:
        allowed = ", ".join(REQUEUE_SIGNALS)
        raise UserError(f"--requeue-signal {name!r} is not one of {allowed} or none")
    return found


def set_requeue_signal(signum: signal.Signals | None) -> None:
    """Make `signum` this process's requeue signal (None: none); `ulframe run` sets it from
    `--requeue-signal`. Signal handlers are per process, and so is this setting."""
    global _requeue_signal
    _requeue_signal = signum


def requeue_signal() -> signal.Signals | None:
    return _requeue_signal


def requeue_requested(received: list[int]) -> bool:
    """Whether the requeue signal is among the signals `received`."""
    return _requeue_signal is not None and int(_requeue_signal) in received


def agent_signals() -> list[str]:
    """The signals torch's elastic agent handles and forwards to its workers: its defaults
    (SIGTERM, SIGINT, SIGHUP, SIGQUIT) and the requeue signal, which would otherwise kill the
    agent."""
    names = ["SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT"]
    if _requeue_signal is not None and _requeue_signal.name not in names:
        names.append(_requeue_signal.name)
    return names


class recording:
    """Within the block, each of `signals` only appends its number to `received` (the previous
    handlers come back at the end). Outside the main thread signals are left alone."""

    def __init__(self, received: list[int], signals: Iterable[int]) -> None:
        self.received = received
        self.signals = list(dict.fromkeys(signals))
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> None:
        try:
            for s in self.signals:
                self.previous[s] = signal.signal(
                    s, lambda signum, _frame: self.received.append(signum)
                )
        except ValueError:  # not the main thread: leave signals alone
            self.previous.clear()

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class stop_on_signals(recording):
    """Within the block, SIGTERM, SIGINT and the requeue signal only record themselves in
    `received`; the loop checkpoints and stops."""

    def __init__(self, received: list[int]) -> None:
        requeue = [] if _requeue_signal is None else [_requeue_signal]
        super().__init__(received, [signal.SIGTERM, signal.SIGINT, *requeue])


def record_requeue(received: list[int]) -> recording:
    """Record the requeue signal in `received` (nothing when there is none): held for a whole
    run, so the signal never kills it (`stop_on_signals` takes over within a loop)."""
    return recording(received, [] if _requeue_signal is None else [_requeue_signal])
