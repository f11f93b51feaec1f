"""A lifecycle hook plugin: counts logged training steps and writes them to a JSON file."""

from __future__ import annotations

import json
from typing import Any

from ulframe.hookspecs import RunInfo, StepInfo, hookimpl

DEFAULT_FILENAME = "example_counter.json"


class ExampleCounter:
    """Counts `ulframe_train_step_end` calls per stage; writes `workdir/<filename>` at run end.

    The file holds ``{"train_step_end_calls": N, "per_stage": {stage: n}, "last_samples_seen":
    {stage: samples}}``. Only rank 0 writes it.

    Args:
        filename: name of the JSON file written in the run's workdir.
    """

    def __init__(self, filename: str = DEFAULT_FILENAME) -> None:
        self.filename = filename
        self.calls = 0
        self.per_stage: dict[str, int] = {}
        self.last_samples_seen: dict[str, int] = {}

    @hookimpl
    def ulframe_train_step_end(self, run: RunInfo, step: StepInfo) -> None:
        self.calls += 1
        self.per_stage[step.stage.name] = self.per_stage.get(step.stage.name, 0) + 1
        self.last_samples_seen[step.stage.name] = step.samples_seen

    @hookimpl
    def ulframe_run_end(self, run: RunInfo, results: dict[str, Any]) -> None:
        if not run.is_main:
            return
        record = {
            "train_step_end_calls": self.calls,
            "per_stage": self.per_stage,
            "last_samples_seen": self.last_samples_seen,
        }
        (run.workdir / self.filename).write_text(json.dumps(record, indent=2) + "\n")
