"""One optimizer step: the `Trainer` it reads and changes, and the NaN/Inf policy.

`train_step` is the body of the training loop (`ulframe.train.loop`), kept apart so that tests
and benchmarks step a stage exactly as a run does. Every random stream of a step is a pure
function of (seed, rank, samples seen) (`seed_for`): a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ulframe.diffusion import BatchNoise
from ulframe.hookspecs import StopTraining
from ulframe.train import distributed, parallelize, perf
from ulframe.train.distributed import World
from ulframe.train.optim import EMA
from ulframe.train.posthoc_ema import PowerEMAs
from ulframe.train.settings import TrainSettings


def seed_for(seed: int, rank: int, samples_seen: int) -> int:
    """A 63-bit seed that is a pure function of (seed, rank, samples seen)."""
    return int(
        np.random.SeedSequence([seed, rank, samples_seen]).generate_state(2, np.uint64)[0] >> 1
    )


@dataclass
class Trainer:
    """What a training step reads and changes; built once per stage (`Trainer.build`)."""

    model: torch.nn.Module  # the stage's module: EMA, gradient norms and checkpoints read it
    wrapped: torch.nn.Module  # what the step calls: `model` wrapped for DDP/FSDP (or itself)
    ema: EMA
    opt: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    settings: TrainSettings
    world: World
    seed: int = 0
    # (step, scalars) -> a reason to skip the step, or None (the loop asks the hooks)
    check_step: Callable[[int, dict[str, torch.Tensor]], str | None] = lambda step, s: None
    stop: list[int] = field(default_factory=list)  # signals received (RunContext.stop)
    # the step's autocast (`parallelize.autocast`; Trainer.build makes it): disabled by default
    autocast: torch.autocast = field(default_factory=lambda: torch.autocast("cpu", enabled=False))
    flops_per_example: float = 0.0  # model FLOPs of one example's forward + backward (0: unknown)
    peak_flops: float = 0.0  # FLOP/s of one device: TrainSettings.peak_flops, or measured
    name: str = ""  # the stage's, for messages
    nonfinite_in_a_row: int = 0  # non-finite steps since the last finite one (nan_policy)
    power_ema: PowerEMAs | None = None  # the post-hoc EMA's profiles (posthoc_ema_sigma_rels)

    @classmethod
    def build(
        cls, model: torch.nn.Module, settings: TrainSettings, world: World, seed: int = 0, **kw: Any
    ) -> Trainer:
        """The EMA (an eager copy of `model`), `model` transformed for training
        (`parallelize.parallelize`: wrapped, activation checkpointing, compiled), the optimizer
        (on the trainable parameters) and the autocast (`parallelize.autocast`, unless given);
        the post-hoc EMA's power-function profiles when `posthoc_ema_sigma_rels` names some."""
        ema = EMA(model, settings.ema_halflife_samples)  # an eager copy: evaluation runs it
        sigma_rels = settings.posthoc_ema_sigma_rels
        power = PowerEMAs(model, sigma_rels) if sigma_rels else None  # eager copies too
        wrapped = parallelize.parallelize(model, world, settings)
        if distributed.is_sharded(model):
            ema.track_sharded(model)
            if power is not None:
                power.track_sharded(model)
        kw.setdefault("power_ema", power)
        params = [p for p in model.parameters() if p.requires_grad]  # (sharded ones under FSDP)
        opt = settings.build_optimizer(params)
        kw.setdefault("autocast", parallelize.autocast(settings, world.device))
        return cls(model, wrapped, ema, opt, params, settings, world, seed, **kw)


@dataclass
class StepResult:
    """What one step did."""

    scalars: dict[str, torch.Tensor]  # detached: the loss terms' metrics, loss_nats, grad_norm
    module_norms: dict[str, float]  # per-module gradient norms (only when the step logs)
    skipped: str | None  # why the step changed no weight (None: it stepped)
    stopping: bool  # a signal arrived (on any rank): checkpoint and stop


def train_step(
    trainer: Trainer, batch: dict[str, torch.Tensor], samples_seen: int, log_due: bool = False
) -> StepResult:
    """One optimizer step on `batch` (this rank's rows of the global batch, on the device).

    Seeds every random stream from (seed, samples seen), sets the learning rate, computes the
    stage's loss `model(batch, noise)` and its gradients, clips them, asks `check_step` whether
    to skip, and (unless any rank skips) steps the optimizer and the EMA. `log_due`: also
    measure the per-module gradient norms (before clipping).

    The NaN/Inf policy (`TrainSettings.nan_policy`): a step whose scalars (loss terms,
    `loss_nats`, `grad_norm`) are not finite on any rank is skipped on every rank; "stop", or
    `max_nonfinite_steps` of them in a row under "skip", raises `StopTraining` before the
    optimizer step (the loop then checkpoints the unchanged weights). Whether the scalars are
    finite is read in the step's one device sync, with the other ranks' answers and signals."""
    settings, world = trainer.settings, trainer.world
    # The loss's noise: drawn for the global batch from a seed every rank shares, each rank
    # keeping its rows (BatchNoise), so W processes compute what one would.
    generator = torch.Generator(world.device).manual_seed(seed_for(trainer.seed, 0, samples_seen))
    noise = BatchNoise(generator, world.rank, world.world_size)
    torch.manual_seed(seed_for(trainer.seed, world.rank, samples_seen))  # dropout etc.
    for group in trainer.opt.param_groups:
        group["lr"] = settings.lr_at(samples_seen)
    with trainer.autocast:
        terms = trainer.wrapped(batch, noise)
    loss = terms.total_nats().mean()
    trainer.opt.zero_grad(set_to_none=True)
    loss.backward()
    module_norms = distributed.module_grad_norms(trainer.model, world) if log_due else {}
    grad_norm = torch.nn.utils.clip_grad_norm_(
        trainer.params, settings.grad_clip if settings.grad_clip > 0 else float("inf")
    )
    if hasattr(grad_norm, "full_tensor"):  # sharded gradients: a replicated DTensor
        grad_norm = grad_norm.full_tensor()
    scalars = terms.metrics() | {"loss_nats": loss, "grad_norm": grad_norm}
    scalars = {k: v.detach() for k, v in scalars.items()}
    step = samples_seen // settings.batch_size + 1
    finite = torch.stack([v.float().reshape(()) for v in scalars.values()]).isfinite()
    skip = trainer.check_step(step, scalars)
    # One device sync (an all-reduce under several processes): whether the step is finite on
    # every rank, whether a hook skips it on any, whether any rank got a signal.
    nonfinite, skipping, stopping = distributed.any_over_ranks(
        [~finite.all(), skip is not None, bool(trainer.stop)], world
    )
    if nonfinite:
        return StepResult(
            scalars, module_norms, _nonfinite(trainer, step, scalars, finite), stopping
        )
    trainer.nonfinite_in_a_row = 0
    if not skipping:
        trainer.opt.step()
        trainer.ema.update(trainer.model, settings.batch_size)
        if trainer.power_ema is not None:
            after = samples_seen + settings.batch_size
            trainer.power_ema.update(trainer.model, after, settings.batch_size)
    reason = (skip or "(another rank)") if skipping else None
    return StepResult(scalars, module_norms, reason, stopping)


def _nonfinite(
    trainer: Trainer, step: int, scalars: dict[str, torch.Tensor], finite: torch.Tensor
) -> str:
    """A non-finite step (on some rank): the reason it is skipped, or `StopTraining` when the
    NaN/Inf policy stops here (every rank counts alike: the decision was all-reduced)."""
    trainer.nonfinite_in_a_row += 1
    bad = [n for n, ok in zip(scalars, finite.tolist(), strict=True) if not ok]
    what = ", ".join(bad) if bad else "values on another rank"
    stage = f" of stage {trainer.name}" if trainer.name else ""
    reason = f"non-finite {what} at step {step}{stage}"
    policy, limit = trainer.settings.nan_policy, trainer.settings.max_nonfinite_steps
    if policy == "stop":
        raise StopTraining(f"{reason} (TrainSettings.nan_policy = 'stop')")
    if trainer.nonfinite_in_a_row >= limit:
        raise StopTraining(
            f"{reason}: {trainer.nonfinite_in_a_row} consecutive steps skipped "
            f"(TrainSettings.max_nonfinite_steps = {limit})"
        )
    return reason


@dataclass
class LogWindow:
    """The train records of one log window: sums of the steps' scalars, counts, times."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    taken: int = 0  # steps that changed the weights
    steps: int = 0  # all steps, skipped ones too
    skipped: int = 0
    seconds: float = 0.0
    waiting: float = 0.0  # of which waiting for data

    def add(self, result: StepResult, seconds: float, waiting: float) -> None:
        if result.skipped is None:
            for k, v in result.scalars.items():
                self.sums[k] = self.sums.get(k, 0.0) + v.float()
            self.taken += 1
        else:
            self.skipped += 1
        self.steps += 1
        self.seconds += seconds
        self.waiting += waiting

    def means(self, trainer: Trainer, batch_size: int) -> dict[str, float]:
        """The window's scalars: the taken steps' means (over ranks too), the learning rate,
        skipped steps, throughput, the time waiting for data and the MFU."""
        world = trainer.world
        scalars = {k: float(v) / max(self.taken, 1) for k, v in self.sums.items()}
        scalars["lr"] = trainer.opt.param_groups[0]["lr"]
        scalars["skipped_steps"] = float(self.skipped)
        scalars = distributed.mean_over_ranks(scalars, world)
        scalars["samples_per_s"] = self.steps * batch_size / max(self.seconds, 1e-9)
        scalars["data_wait_fraction"] = self.waiting / max(self.seconds, 1e-9)
        return scalars | perf.mfu_scalars(
            trainer.flops_per_example, scalars["samples_per_s"], world.world_size,
            trainer.peak_flops,
        )  # fmt: skip
