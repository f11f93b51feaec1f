"""Parameter counts of an experiment's networks, per stage, without training (`ulframe config`).

Every stage is built as in its run, from one decoded train example, but on torch's meta device:
modules get shapes and no storage, so even the paper-scale networks are counted in a moment and
without memory (a stage whose build cannot run on the meta device is built on the CPU instead).
A stage built on a finished earlier stage (it loads that stage's trained weights from the run's
`workdir/stages/<name>/checkpoints`) is counted once that stage has a checkpoint there; until
then its line says why it is not. Its weights are not read: on the meta device a checkpoint is
loaded as shapes only (`torch.load(map_location="meta")`), which still refuses a checkpoint that
does not fit the config. Nothing is written.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ulframe.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class StageParameters:
    """One stage's networks: (name, parameters, trainable) per child module, or why not built."""

    stage: str
    networks: list[tuple[str, int, int]] = field(default_factory=list)
    not_built: str = ""

    @property
    def total(self) -> int:
        return sum(n for _, n, _ in self.networks)

    @property
    def trainable(self) -> int:
        return sum(t for _, _, t in self.networks)


def count(module: torch.nn.Module) -> tuple[int, int]:
    """(parameters, trainable parameters) of a module; shared parameters counted once."""
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def networks(model: torch.nn.Module) -> list[tuple[str, int, int]]:
    """(name, parameters, trainable) of each child module that has parameters, then the
    parameters held by the model itself (`(own)`)."""
    out = []
    for name, child in model.named_children():
        total, trainable = count(child)
        if total:
            out.append((name, total, trainable))
    own = [p for p in model.parameters(recurse=False)]
    if own:
        total = sum(p.numel() for p in own)
        out.append(("(own)", total, sum(p.numel() for p in own if p.requires_grad)))
    return out


@contextlib.contextmanager
def _checkpoints_as_shapes() -> Iterator[None]:
    """Within the block, every checkpoint `ulframe.train.checkpoint` loads (`load_latest`, as
    `load_stage_ema` calls it) is read onto the meta device: the pickled structure and the
    tensors' shapes, none of their data (no checksum either: nothing is trained from it). Meta
    weights load into meta parameters without copying (and without torch's per-key "no-op"
    warning of real weights copied into meta ones), shapes still checked."""
    from ulframe.train import checkpoint

    def shapes(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
        del map_location
        try:
            state = torch.load(path, map_location="meta", weights_only=True)
        except Exception as err:  # as `checkpoint.load`: not a checkpoint, try an older one
            raise ValueError(f"{path.name}: refused to load ({type(err).__name__}: {err})") from err
        if not isinstance(state, dict) or "samples_seen" not in state:
            raise ValueError(f"{path.name}: not a checkpoint (no samples_seen)")
        return checkpoint.upgrade(state)

    original = checkpoint.load
    checkpoint.load = shapes  # type: ignore[assignment]
    try:
        yield
    finally:
        checkpoint.load = original  # type: ignore[assignment]


def _build(stage: Any, ctx: Any) -> torch.nn.Module:
    from ulframe.protocols import BuildContext

    meta = torch.device("meta")
    example = {k: v.to(meta) if isinstance(v, torch.Tensor) else v for k, v in ctx.example.items()}
    try:
        with meta, _checkpoints_as_shapes():
            return stage.build(BuildContext(example, ctx.num_classes, meta, ctx.stage_dir,
                                            ctx.previous))  # fmt: skip
    except (RuntimeError, NotImplementedError, TypeError) as err:  # not buildable on meta
        log.info("stage %s: built on the CPU to count its parameters (%s)", stage.name, err)
        return stage.build(ctx)


def stage_parameters(experiment: Any, workdir: Path) -> list[StageParameters]:
    """Each stage's networks with their parameter counts (see the module docstring); earlier
    stages' weights, where a stage builds on them, come from `workdir`.

    Raises UserError when the data cannot give the example the networks are built from."""
    from ulframe.data.pipeline import first_example
    from ulframe.protocols import BuildContext
    from ulframe.registry import naming_plugins

    num_classes = experiment.dataset.num_classes
    with naming_plugins(source_of=experiment.dataset):
        example = first_example(experiment.dataset.source("train"), num_classes=num_classes)
    out: list[StageParameters] = []
    previous: dict[str, Path] = {}
    for stage in experiment.stages:
        stage_dir = workdir / "stages" / stage.name
        ctx = BuildContext(example, num_classes, torch.device("cpu"), stage_dir, dict(previous))
        try:
            model = _build(stage, ctx)
        except UserError as err:
            out.append(StageParameters(stage.name, not_built=str(err).splitlines()[0]))
        else:
            out.append(StageParameters(stage.name, networks(model)))
        previous[stage.name] = stage_dir
    return out


def describe(counts: list[StageParameters]) -> str:
    """`# parameters` comment lines: a stage's total and trainable, then each network."""
    lines = ["# parameters (networks built from one train example, on the meta device):"]
    for c in counts:
        if c.not_built:
            lines.append(f"#   {c.stage}: not built here: {c.not_built}")
            continue
        frozen = c.total - c.trainable
        note = f" ({c.trainable:,} trainable, {frozen:,} frozen)" if frozen else ""
        lines.append(f"#   {c.stage}: {c.total:,}{note}")
        width = max((len(name) for name, _, _ in c.networks), default=0)
        for name, total, trainable in c.networks:
            tag = "" if trainable == total else " frozen" if trainable == 0 else " partly frozen"
            lines.append(f"#     {name:<{width}}  {total:>13,}{tag}")
    return "\n".join(lines) + "\n"
