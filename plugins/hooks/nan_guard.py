"""NaN/Inf guard: skip optimizer steps whose loss or gradient is not finite; stop after K in a row.

`ulframe run` adds it to every run whose `Experiment.hooks` does not list it; configure it in gin
with `hooks.nan_guard.max_consecutive = 3`. A skipped step changes no weight, optimizer state or
EMA and does not count towards the stage's samples; the loop counts it (`skipped_steps` in
metrics.jsonl). After `max_consecutive` skips in a row the run stops with a checkpoint and a
message naming the step, the terms that were not finite and the last finite checkpoint.
"""

from __future__ import annotations

import torch

from ulframe.errors import ConfigError
from ulframe.hookspecs import RunInfo, StageInfo, StopTraining, hookimpl


class NaNGuard:
    """Skips non-finite steps; stops the run after `max_consecutive` of them in a row."""

    def __init__(self, max_consecutive: int = 3) -> None:
        if max_consecutive < 1:
            raise ConfigError(
                f"hooks.nan_guard.max_consecutive must be >= 1, got {max_consecutive}"
            )
        self.max_consecutive = max_consecutive
        self.consecutive = 0

    @hookimpl
    def ulframe_stage_start(self, run: RunInfo, stage: StageInfo) -> None:
        self.consecutive = 0

    @hookimpl
    def ulframe_check_step(
        self, run: RunInfo, stage: StageInfo, step: int, scalars: dict[str, torch.Tensor]
    ) -> str | None:
        names = list(scalars)
        finite = torch.stack([scalars[n].detach().float().reshape(()) for n in names]).isfinite()
        if bool(finite.all()):  # one device sync per step
            self.consecutive = 0
            return None
        bad = [n for n, ok in zip(names, finite.tolist(), strict=True) if not ok]
        self.consecutive += 1
        reason = f"non-finite {', '.join(bad)} at step {step} of stage {stage.name}"
        if self.consecutive >= self.max_consecutive:
            raise StopTraining(
                f"{reason}: {self.consecutive} consecutive steps skipped "
                f"(hooks.nan_guard.max_consecutive = {self.max_consecutive})"
            )
        return reason
