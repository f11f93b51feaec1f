"""Console progress: stage, samples seen, loss, bits/pixel, samples/s, MFU and ETA (rank 0 only).

On a terminal a tqdm bar per stage (percentage, samples seen / total, samples/s, ETA, and the
loss, bits/pixel and MFU beside it), with evaluations and stage messages printed above it.
Elsewhere (CI logs, files) one plain line per log step, e.g.
`[stage1] 8/100 | loss 1234.6 nats | bpp 0.8889 | 3.5 samples/s | ETA 00:23`.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from ulframe.hookspecs import RunInfo, StageInfo, StepInfo, hookimpl
from ulframe.progress import clock


def _eta(seconds: float) -> str:
    return clock(seconds)


class ConsoleProgress:
    """Progress display on stdout: a live line on a terminal, plain lines otherwise."""

    def __init__(self, stream: TextIO | None = None, force_plain: bool = False) -> None:
        self.stream = stream or sys.stdout
        self.live = not force_plain and self.stream.isatty()
        self._start = time.monotonic()
        self._start_samples = 0
        self._bar: Any = None

    def _write(self, text: str, run: RunInfo) -> None:
        if not run.is_main:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    @hookimpl
    def ulframe_stage_start(self, run: RunInfo, stage: StageInfo) -> None:
        self._start = time.monotonic()
        self._start_samples = stage.samples_seen
        self._close_bar()
        verb = "resuming" if stage.samples_seen else "starting"
        self._write(
            f"[{stage.name}] {verb} at {stage.samples_seen}/{stage.total_samples} samples", run
        )
        if self.live and run.is_main:
            from tqdm import tqdm

            self._bar = tqdm(
                total=stage.total_samples, initial=stage.samples_seen, desc=f"[{stage.name}]",
                unit=" samples", file=self.stream, dynamic_ncols=True, smoothing=0.1,
            )  # fmt: skip

    @staticmethod
    def _scalars(s: dict[str, float]) -> list[str]:
        parts = [f"loss {s.get('loss_nats', float('nan')):.1f} nats"]
        if "bits_per_pixel" in s:
            parts.append(f"bpp {s['bits_per_pixel']:.4f}")
        if "perf/mfu" in s:  # a fraction of the accelerator's peak
            parts.append(f"MFU {100 * s['perf/mfu']:.1f}%")
        return parts

    @hookimpl
    def ulframe_train_step_end(self, run: RunInfo, step: StepInfo) -> None:
        if not run.is_main:
            return
        s = step.scalars
        if self._bar is not None:
            self._bar.set_postfix_str(" | ".join(self._scalars(s)), refresh=False)
            self._bar.update(step.samples_seen - self._bar.n)
            self._bar.refresh()  # every log step shows its numbers (update() may skip drawing)
            return
        done = step.samples_seen - self._start_samples
        elapsed = time.monotonic() - self._start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (step.stage.total_samples - step.samples_seen) / rate if rate > 0 else 0.0
        parts = [f"[{step.stage.name}] {step.samples_seen}/{step.stage.total_samples}"]
        parts += self._scalars(s)
        parts += [f"{s.get('samples_per_s', rate):.1f} samples/s", f"ETA {_eta(eta)}"]
        self._write(" | ".join(parts), run)

    @hookimpl
    def ulframe_eval_end(
        self, run: RunInfo, stage: StageInfo, samples_seen: int, scalars: dict[str, float]
    ) -> None:  # (pluggy passes only the arguments an implementation names: no images here)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(scalars.items()))
        self._write(f"[{stage.name}] eval at {samples_seen}: {shown}", run)

    @hookimpl
    def ulframe_stage_end(self, run: RunInfo, stage: StageInfo, scalars: dict[str, float]) -> None:
        self._close_bar()
        self._write(f"[{stage.name}] done", run)

    @hookimpl
    def ulframe_error(self, run: RunInfo, error: BaseException) -> None:
        self._close_bar()
