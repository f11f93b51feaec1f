"""TensorBoard logger (rank 0 only): scalars, evaluation images and the operative config."""

from __future__ import annotations

from typing import Any

import torch

from ulframe.eval.images import grid
from ulframe.hookspecs import RunInfo, StageInfo, StepInfo, hookimpl


class TensorBoardLogger:
    """Writes `workdir/tb/<stage>` event files: every logged scalar, eval images, the config."""

    def __init__(self, subdir: str = "tb", flush_secs: int = 30) -> None:
        self.subdir = subdir
        self.flush_secs = flush_secs
        self._writers: dict[str, Any] = {}
        self._config_logged = False

    def _writer(self, run: RunInfo, stage: StageInfo) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        if stage.name not in self._writers:
            self._writers[stage.name] = SummaryWriter(
                str(run.workdir / self.subdir / stage.name), flush_secs=self.flush_secs
            )
        return self._writers[stage.name]

    @hookimpl
    def ulframe_train_step_end(self, run: RunInfo, step: StepInfo) -> None:
        if not run.is_main:
            return
        w = self._writer(run, step.stage)
        for k, v in step.scalars.items():
            w.add_scalar(f"train/{k}", v, step.samples_seen)
        w.add_scalar("perf/step_time_s", step.step_time_s, step.samples_seen)
        if torch.cuda.is_available():
            w.add_scalar(
                "perf/gpu_memory_gib", torch.cuda.max_memory_allocated() / 2**30, step.samples_seen
            )
        if not self._config_logged:
            text = run.operative_config
            w.add_text(
                "config/operative",
                "\n".join("    " + line for line in text.splitlines()),
                step.samples_seen,
            )
            self._config_logged = True

    @hookimpl
    def ulframe_eval_end(
        self,
        run: RunInfo,
        stage: StageInfo,
        samples_seen: int,
        scalars: dict[str, float],
        images: dict[str, torch.Tensor],
    ) -> None:
        if not run.is_main:
            return
        w = self._writer(run, stage)
        for k, v in scalars.items():
            w.add_scalar(f"eval/{k}", v, samples_seen)
        for name, x in images.items():
            ncols = 2 * 4 if name == "reconstructions" else None
            w.add_image(f"eval/{name}", grid(x, ncols), samples_seen, dataformats="HWC")
        w.flush()

    @hookimpl
    def ulframe_stage_end(self, run: RunInfo, stage: StageInfo, scalars: dict[str, float]) -> None:
        if stage.name in self._writers:
            self._writers.pop(stage.name).close()

    @hookimpl
    def ulframe_error(self, run: RunInfo, error: BaseException) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()
