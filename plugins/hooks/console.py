"""Console progress: stage, samples seen, loss, bits/pixel, samples/s and ETA (rank 0 only).

On a terminal the line redraws in place; elsewhere (CI logs, files) one plain line per log step.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from ulframe.hookspecs import RunInfo, StageInfo, StepInfo, hookimpl


def _eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ConsoleProgress:
    """Progress display on stdout: a live line on a terminal, plain lines otherwise."""

    def __init__(self, stream: TextIO | None = None, force_plain: bool = False) -> None:
        self.stream = stream or sys.stdout
        self.live = not force_plain and self.stream.isatty()
        self._start = time.monotonic()

    def _write(self, text: str, run: RunInfo) -> None:
        if not run.is_main:
            return
        if self.live:
            self.stream.write("\r\x1b[2K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    @hookimpl
    def ulframe_stage_start(self, run: RunInfo, stage: StageInfo) -> None:
        self._start = time.monotonic()
        self._start_samples = stage.samples_seen
        verb = "resuming" if stage.samples_seen else "starting"
        self._write(
            f"[{stage.name}] {verb} at {stage.samples_seen}/{stage.total_samples} samples", run
        )
        if self.live:
            self.stream.write("\n")

    @hookimpl
    def ulframe_train_step_end(self, run: RunInfo, step: StepInfo) -> None:
        s = step.scalars
        done = step.samples_seen - self._start_samples
        elapsed = time.monotonic() - self._start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (step.stage.total_samples - step.samples_seen) / rate if rate > 0 else 0.0
        parts = [
            f"[{step.stage.name}] {step.samples_seen}/{step.stage.total_samples}",
            f"loss {s.get('loss_nats', float('nan')):.1f} nats",
        ]
        if "bits_per_pixel" in s:
            parts.append(f"bpp {s['bits_per_pixel']:.4f}")
        parts += [f"{s.get('samples_per_s', rate):.1f} samples/s", f"ETA {_eta(eta)}"]
        self._write(" | ".join(parts), run)

    @hookimpl
    def ulframe_eval_end(
        self,
        run: RunInfo,
        stage: StageInfo,
        samples_seen: int,
        scalars: dict[str, float],
        images: Any,
    ) -> None:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(scalars.items()))
        if self.live:
            self.stream.write("\n")
        self._write(f"[{stage.name}] eval at {samples_seen}: {shown}", run)
        if self.live:
            self.stream.write("\n")

    @hookimpl
    def ulframe_stage_end(self, run: RunInfo, stage: StageInfo, scalars: dict[str, float]) -> None:
        self._write(f"[{stage.name}] done", run)
        if self.live:
            self.stream.write("\n")
