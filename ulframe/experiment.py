"""The experiment: an ordered list of stages over one dataset, with the hooks that watch it.

Bound from gin as `Experiment.*`; see gin/quickstart.gin.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ulframe.data.pipeline import Dataset
from ulframe.errors import ConfigError
from ulframe.protocols import Metric, Stage


@dataclass
class Experiment:
    """What to run, in order.

    Args:
        stages: stage objects (`@stage1/stages.NAME()`, ...), run in order; each stage's
            `name` is its folder under `workdir/stages/`, so names must differ.
        dataset: the dataset object (`@datasets.photos()`); stages measure shapes from it.
        hooks: lifecycle plugins (`@hooks.console()`, `@hooks.tensorboard()`).
        seed: base seed; every random stream derives from (seed, rank, samples seen).
        device: "auto" (CUDA when available, else CPU), "cpu" or "cuda".
        num_workers: data-loader worker processes per rank (0 decodes in the main process).
        sample_metric: the Fréchet-distance metric *factory* `ulframe eval` compares end-to-end
            samples with (`@metrics.fvd_i3d`, no parentheses: it is built only when evaluating,
            so a run does not need its weights file); None: `metrics.fd_photos` for images.
    """

    stages: Sequence[Stage]
    dataset: Dataset
    hooks: Sequence[object] = field(default_factory=list)  # pluggy hook implementations
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    sample_metric: Callable[..., Metric] | None = None

    def __post_init__(self) -> None:
        from ulframe.protocols import check_built

        if not self.stages:
            raise ConfigError("Experiment.stages is empty: list at least one stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"Experiment.stages: stage names must differ, got {names}")
        for s in self.stages:
            check_built("stages", s, f"stage '{getattr(s, 'name', s)}'")
        check_built("datasets", self.dataset, "Experiment.dataset")
