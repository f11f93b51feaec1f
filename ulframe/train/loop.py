"""The training loop: one loop for every stage of every experiment.

A stage gives a module whose forward is its loss (`model(batch, noise) -> LossTerms`) and an
evaluation; this loop does the rest: data, optimizer, EMA, seeding, logging, evaluation,
checkpoints, resume. Progress is counted in samples seen. Every random stream of a step is seeded
from (seed, rank, samples seen), so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ulframe import rundir
from ulframe.data.pipeline import build_loader, collate, first_example, readable_examples
from ulframe.diffusion import BatchNoise
from ulframe.errors import ConfigError, UserError
from ulframe.eval.media import save_media
from ulframe.hookspecs import RunInfo, StageInfo, StepInfo, StopTraining
from ulframe.protocols import BuildContext, EvalReport
from ulframe.registry import naming_plugins
from ulframe.rundir import MetricsFile
from ulframe.train import checkpoint, distributed, parallelize, perf
from ulframe.train.distributed import World
from ulframe.train.optim import EMA
from ulframe.train.parallelize import checkpoint_activations as checkpoint_activations
from ulframe.train.parallelize import checkpointed_blocks as checkpointed_blocks
from ulframe.train.parallelize import compile_model as compile_model
from ulframe.train.state import TrainState

log = logging.getLogger(__name__)
DONE_FILE = "DONE.json"
EVAL_STREAM = 2**62  # a samples-seen value no training step reaches: the evaluation's seed


class StopRequested(StopTraining):
    """SIGTERM/SIGINT arrived: a checkpoint was written and the run stopped; re-run to resume."""


def seed_for(seed: int, rank: int, samples_seen: int) -> int:
    """A 63-bit seed that is a pure function of (seed, rank, samples seen)."""
    return int(
        np.random.SeedSequence([seed, rank, samples_seen]).generate_state(2, np.uint64)[0] >> 1
    )


@dataclass
class RunContext:
    """What every stage of one run shares."""

    workdir: Path
    world: World
    hooks: Any  # pluggy.PluginManager
    info: RunInfo
    metrics: MetricsFile
    seed: int = 0
    num_workers: int = 0
    operative_config: Callable[[], str] = str  # the CLI passes gin's operative config
    stop: list[int] = field(default_factory=list)  # signals received
    config: str = ""  # the full gin config; saved in checkpoints, compared on resume
    allow_config_change: bool = False
    commit: Callable[[], None] = lambda: None  # a stage really starts: write the run files


class NonFiniteError(UserError):
    """The weights of a stage are not finite at its end: it is not marked done."""


def run_experiment(experiment: Any, ctx: RunContext) -> dict[str, dict[str, float]]:
    """Run each unfinished stage in order; finished ones (DONE.json) are skipped."""
    results: dict[str, dict[str, float]] = {}
    previous: dict[str, Path] = {}
    for index, stage in enumerate(experiment.stages):
        stage_dir = ctx.workdir / "stages" / stage.name
        done = _read_done(stage_dir / DONE_FILE)
        if done is not None:
            log.info("stage %s already finished: skipping", stage.name)
            results[stage.name] = done
        else:
            results[stage.name] = train_stage(
                stage, index, experiment.dataset, stage_dir, previous, ctx
            )
        previous[stage.name] = stage_dir
    return results


def _read_done(path: Path) -> dict[str, float] | None:
    """The final scalars of a finished stage; None when DONE.json is missing or damaged (then
    the stage resumes from its last checkpoint and writes it again)."""
    record = rundir.read_json_dict(path, "stage record")
    if record is None:
        return None
    if not isinstance(record.get("scalars"), dict):
        log.warning("ignoring damaged stage record %s: no scalars", path)
        return None
    return dict(record["scalars"])


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _crossed(before: int, after: int, period: int) -> bool:
    return period > 0 and before // period != after // period


@dataclass
class _Evaluator:
    """Evaluates the EMA weights on a fixed set of held-out batches."""

    stage: Any
    batches: list[dict[str, torch.Tensor]]
    info: StageInfo
    ctx: RunContext

    def __call__(self, model: torch.nn.Module, samples_seen: int) -> dict[str, float]:
        # The same noise at every evaluation, so successive evaluations are comparable.
        gen = torch.Generator(self.ctx.world.device).manual_seed(
            seed_for(self.ctx.seed, self.ctx.world.rank, EVAL_STREAM)
        )
        model.eval()
        with torch.no_grad():
            report: EvalReport = self.stage.evaluate(model, self.batches, gen)
        scalars = distributed.mean_over_ranks(report.scalars, self.ctx.world)
        if self.ctx.world.is_main:
            for name, images in report.images.items():
                save_media(images, self.info.stage_dir / "images" / f"{name}-{samples_seen:09d}")
            self.ctx.metrics.write(
                {
                    "stage": self.info.name,
                    "step": samples_seen // self.info.batch_size,
                    "samples_seen": samples_seen,
                    "kind": "eval",
                }
                | {f"eval/{k}": v for k, v in scalars.items()}
            )
        self.ctx.hooks.hook.ulframe_eval_end(
            run=self.ctx.info,
            stage=self.info,
            samples_seen=samples_seen,
            scalars=scalars,
            images=report.images,
        )
        return scalars


def _checkpoint(info: StageInfo, ctx: RunContext, state: TrainState, keep: int) -> None:
    """Save `state` (every rank takes part: a sharded state is gathered)."""
    saved = state.state_dict()
    # Every rank's loader state lives in its own file; rank 0 writes the shared rest.
    world = ctx.world
    if world.is_main or world.world_size > 1:
        directory = checkpoint.checkpoint_dir(info.stage_dir, world.rank, world.world_size)
        path = checkpoint.save(directory, state.samples_seen, saved, keep=keep)
        if world.is_main:
            ctx.hooks.hook.ulframe_checkpoint_saved(
                run=ctx.info, stage=info, path=path, samples_seen=state.samples_seen
            )


def _finite(*models: torch.nn.Module) -> bool:
    """Whether every parameter and buffer (this rank's shard, when sharded) is finite."""
    tensors = [t for m in models for t in [*m.parameters(), *m.buffers()]]
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return checkpoint.all_finite([t.detach() for t in local])


def _last_finite(ckpt_dir: Path) -> str:
    path = checkpoint.newest_finite(ckpt_dir)
    return str(path) if path is not None else f"none in {ckpt_dir}"


def _restore(ckpt_dir: Path, world: World) -> dict[str, Any] | None:
    """The newest checkpoint valid on every rank (each rank keeps its own loader position)."""
    limit = None
    while True:
        state = checkpoint.load_latest(ckpt_dir, map_location=world.device, at_most=limit)
        mine = int(state["samples_seen"]) if state is not None else -1
        lowest, highest = distributed.min_max_over_ranks(mine, world)
        if lowest == highest:
            return state
        limit = lowest  # a rank lost its newest checkpoint (killed mid-save): all step back


# ---- one training step -------------------------------------------------------------------------
@dataclass
class Trainer:
    """What a training step reads and changes; built once per stage (`Trainer.build`)."""

    model: torch.nn.Module  # the stage's module: EMA, gradient norms and checkpoints read it
    wrapped: torch.nn.Module  # what the step calls: `model` wrapped for DDP/FSDP (or itself)
    ema: EMA
    opt: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    settings: Any  # ulframe.train.settings.TrainSettings
    world: World
    seed: int = 0
    # (step, scalars) -> a reason to skip the step, or None (the loop asks the hooks)
    check_step: Callable[[int, dict[str, torch.Tensor]], str | None] = lambda step, s: None
    stop: list[int] = field(default_factory=list)  # signals received (RunContext.stop)
    autocast: Any = None
    flops_per_example: float = 0.0  # model FLOPs of one example's forward + backward (0: unknown)
    peak_flops: float = 0.0  # FLOP/s of one device: TrainSettings.peak_flops, or measured
    name: str = ""  # the stage's, for messages
    nonfinite_in_a_row: int = 0  # non-finite steps since the last finite one (nan_policy)

    @classmethod
    def build(
        cls, model: torch.nn.Module, settings: Any, world: World, seed: int = 0, **kw: Any
    ) -> Trainer:
        """The EMA (an eager copy of `model`), `model` transformed for training
        (`parallelize.parallelize`: wrapped, activation checkpointing, compiled), the optimizer
        (on the trainable parameters) and the autocast (`parallelize.autocast`, unless given)."""
        ema = EMA(model, settings.ema_halflife_samples)  # an eager copy: evaluation runs it
        wrapped = parallelize.parallelize(model, world, settings)
        if distributed.is_sharded(model):
            ema.track_sharded(model)
        params = [p for p in model.parameters() if p.requires_grad]  # (sharded ones under FSDP)
        opt = settings.build_optimizer(params)
        kw.setdefault("autocast", parallelize.autocast(settings, world.device))
        return cls(model, wrapped, ema, opt, params, settings, world, seed, **kw)


def probe_batch(source: Any, size: int = 2, tries: int = 16) -> dict[str, torch.Tensor] | None:
    """A batch of the first `size` readable examples of a Source (among its first `tries`
    items, decoded as the loader decodes them: `readable_examples`), or None, logged, when
    there is none or they make no batch: the run then logs no MFU, and goes on."""
    try:
        examples = readable_examples(source, size, tries)
        if not examples:
            raise ValueError(f"none of the first {tries} items could be decoded")
        return collate(examples)
    except Exception as err:  # only the MFU needs it: the loader reports bad data itself
        log.warning("no batch to count the model's FLOPs on (%s): perf/mfu is not logged", err)
        return None


def count_example_flops(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], autocast: Any = None
) -> float:
    """Model FLOPs of one example's forward and backward, counted (`perf.train_flops`) on
    `batch` with eager `model` before it is wrapped or compiled; 0 when counting fails. The
    random streams, the gradients and the buffers (running statistics a training forward
    updates, e.g. a KL autoencoder's latent variance) are left as they were."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    device = next(iter(batch.values())).device
    rows = len(next(iter(batch.values())))

    def step() -> torch.Tensor:
        noise = BatchNoise(torch.Generator(device).manual_seed(0), 0, 1)
        with autocast if autocast is not None else torch.autocast(device.type, enabled=False):
            return model(batch, noise).total_nats().mean()

    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            flops = perf.train_flops(step)
    except Exception as err:  # a model FlopCounterMode cannot run: no MFU, training goes on
        log.warning("could not count the model's FLOPs (%s): perf/mfu is not logged", err)
        flops = 0
    finally:
        for p in model.parameters():
            p.grad = None
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
    return flops / max(rows, 1)


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
    policy = getattr(trainer.settings, "nan_policy", "skip")
    limit = getattr(trainer.settings, "max_nonfinite_steps", 3)
    if policy == "stop":
        raise StopTraining(f"{reason} (TrainSettings.nan_policy = 'stop')")
    if trainer.nonfinite_in_a_row >= limit:
        raise StopTraining(
            f"{reason}: {trainer.nonfinite_in_a_row} consecutive steps skipped "
            f"(TrainSettings.max_nonfinite_steps = {limit})"
        )
    return reason


@dataclass
class _Window:
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

    def write(
        self, info: StageInfo, ctx: RunContext, trainer: Trainer, samples_seen: int, norms: dict
    ) -> None:
        """Log the window's means (a metrics row, the train-step hook)."""
        world = ctx.world
        scalars = {k: float(v) / max(self.taken, 1) for k, v in self.sums.items()}
        scalars["lr"] = trainer.opt.param_groups[0]["lr"]
        scalars["skipped_steps"] = float(self.skipped)
        scalars = distributed.mean_over_ranks(scalars, world) | norms
        scalars["samples_per_s"] = self.steps * info.batch_size / max(self.seconds, 1e-9)
        scalars["data_wait_fraction"] = self.waiting / max(self.seconds, 1e-9)
        scalars |= perf.mfu_scalars(
            trainer.flops_per_example, scalars["samples_per_s"], world.world_size,
            trainer.peak_flops,
        )  # fmt: skip
        step = samples_seen // info.batch_size
        if world.is_main:
            row = {"stage": info.name, "step": step, "samples_seen": samples_seen, "kind": "train"}
            ctx.metrics.write(row | scalars)
        per_step = (self.seconds / self.steps, self.waiting / self.steps)
        ctx.hooks.hook.ulframe_train_step_end(
            run=ctx.info, step=StepInfo(info, step, samples_seen, scalars, *per_step)
        )


# ---- one stage ---------------------------------------------------------------------------------
def train_stage(
    stage: Any,
    index: int,
    dataset: Any,
    stage_dir: Path,
    previous: dict[str, Path],
    ctx: RunContext,
) -> dict[str, float]:
    """Build, restore, train, evaluate and checkpoint one stage; its final evaluation."""
    settings, world = stage.train, ctx.world
    if settings.batch_size % world.world_size:
        raise ConfigError(
            f"TrainSettings.batch_size={settings.batch_size} is not divisible by the {world.world_size} processes"
        )
    stage_dir.mkdir(parents=True, exist_ok=True)
    trainer, loaders, eval_batches = _build(stage, dataset, stage_dir, previous, ctx)
    ckpt_dir = checkpoint.checkpoint_dir(stage_dir, world.rank, world.world_size)
    state = TrainState(
        trainer.model, trainer.ema, trainer.opt, loaders[0], stage=stage.name, config=ctx.config
    )
    _resume(stage, state, ckpt_dir, ctx)
    info = StageInfo(
        stage.name, index, stage_dir, settings.train_samples, state.samples_seen,
        settings.batch_size, world.is_main,
    )  # fmt: skip
    keep = settings.keep_checkpoints
    ctx.info.operative_config = ctx.operative_config()  # every factory has now been called
    ctx.hooks.hook.ulframe_stage_start(run=ctx.info, stage=info)
    ctx.hooks.hook.ulframe_after_build(run=ctx.info, stage=info, model=trainer.model)
    trainer.check_step = lambda step, scalars: ctx.hooks.hook.ulframe_check_step(
        run=ctx.info, stage=info, step=step, scalars=scalars
    )
    trainer.wrapped.train()
    evaluate = _Evaluator(stage, eval_batches, info, ctx)
    batches: Iterator[dict[str, torch.Tensor]] = iter(loaders[0])
    window = _Window()
    try:
        with _stop_on_signals(ctx.stop):
            stopping = False
            while state.samples_seen < settings.train_samples and not stopping:
                t0 = time.perf_counter()
                batch = _to_device(next(batches), world.device)
                t_data = time.perf_counter() - t0
                before, after = state.samples_seen, state.samples_seen + settings.batch_size
                log_due = _crossed(before, after, settings.log_every_samples)
                result = train_step(trainer, batch, before, log_due)
                stopping = result.stopping
                if result.skipped is None:
                    state.samples_seen = after
                else:  # a skipped step does not count: the stage trains one more
                    log.warning("stage %s: step skipped: %s", stage.name, result.skipped)
                window.add(result, time.perf_counter() - t0, t_data)
                if log_due and result.skipped is None:
                    window.write(info, ctx, trainer, state.samples_seen, result.module_norms)
                    window = _Window()
                unfinished = state.samples_seen < settings.train_samples
                if _crossed(before, state.samples_seen, settings.eval_every_samples) and unfinished:
                    trainer.ema.sync()
                    evaluate(trainer.ema.model, state.samples_seen)
                if (
                    _crossed(before, state.samples_seen, settings.checkpoint_every_samples)
                    and unfinished
                ):
                    _checkpoint(info, ctx, state, keep)
            if stopping:  # pre-empted: save what we have and stop
                signum = ctx.stop[0] if ctx.stop else signal.SIGTERM  # (another rank's signal)
                raise StopRequested(
                    f"stopped by signal {int(signum)} at {state.samples_seen} samples; "
                    "checkpoint saved, re-run to resume"
                )
    except StopTraining as err:  # StopRequested, or a hook: skipped steps changed no weight
        _checkpoint(info, ctx, state, keep)
        if isinstance(err, StopRequested):
            raise
        raise StopTraining(
            f"{err}; checkpoint saved at {state.samples_seen} samples; "
            f"last finite checkpoint: {_last_finite(ckpt_dir)}"
        ) from err
    return _finish(info, ctx, trainer, state, loaders, evaluate, ckpt_dir)


def _build(
    stage: Any, dataset: Any, stage_dir: Path, previous: dict[str, Path], ctx: RunContext
) -> tuple[Trainer, tuple[Any, Any], list[dict[str, torch.Tensor]]]:
    """The stage's networks (measured from the data), trainer, loaders and eval batches."""
    settings, world = stage.train, ctx.world
    per_rank = settings.batch_size // world.world_size
    train_source = dataset.source("train")
    with naming_plugins(source_of=dataset):
        example = first_example(train_source, num_classes=dataset.num_classes)
    torch.manual_seed(seed_for(ctx.seed, 0, 0))  # identical initial weights on every rank
    build_ctx = BuildContext(example, dataset.num_classes, world.device, stage_dir, dict(previous))
    model = stage.build(build_ctx).to(world.device)
    # A stage may train on another Source built from the data (e.g. cached latents).
    train_source = stage.train_source(train_source)
    autocast = parallelize.autocast(settings, world.device)
    # Model FLOPs per example, once (eager, before wrapping), on two examples of the stage's data;
    # the peak they are compared with: given, or the matmul probe. Only when MFU is logged.
    flops, peak = 0.0, 0.0
    if getattr(settings, "measure_mfu", True):
        probe = probe_batch(train_source)
        if probe:
            flops = count_example_flops(model, _to_device(probe, world.device), autocast)
        if flops:
            dtype = torch.bfloat16 if settings.precision == "bf16" else torch.float32
            peak = settings.peak_flops or perf.matmul_rate(world.device, dtype)
    trainer = Trainer.build(
        model, settings, world, ctx.seed, stop=ctx.stop, name=stage.name, autocast=autocast
    )
    trainer.flops_per_example, trainer.peak_flops = flops, peak
    loader = build_loader(
        train_source, batch_size=per_rank, rank=world.rank, world_size=world.world_size,
        seed=ctx.seed, num_workers=ctx.num_workers,
    )  # fmt: skip
    eval_loader = build_loader(
        dataset.source("eval"), batch_size=per_rank, rank=world.rank, world_size=world.world_size,
        seed=ctx.seed, shuffle=False, repeat=False, drop_last=False, num_workers=ctx.num_workers,
    )  # fmt: skip
    eval_batches = [
        _to_device(b, world.device) for _, b in zip(range(settings.eval_batches), eval_loader)
    ]
    return trainer, (loader, eval_loader), eval_batches


def _resume(stage: Any, state: TrainState, ckpt_dir: Path, ctx: RunContext) -> None:
    """Restore `state` from the newest checkpoint valid on every rank; commit the run files."""
    saved = _restore(ckpt_dir, ctx.world)
    if saved is not None:
        checkpoint.check_config(
            saved.get("config", ""), ctx.config, f"stage {stage.name}", ctx.allow_config_change
        )
        state.load_state_dict(saved)
        log.info("stage %s: resumed at %d samples", stage.name, state.samples_seen)
    elif ckpt_dir.is_dir():
        log.warning("no valid checkpoint in %s; starting %s from 0", ckpt_dir, stage.name)
    ctx.commit()  # nothing refused this run: its config and command are now the workdir's
    done = state.samples_seen >= stage.train.train_samples
    ctx.metrics.resume(stage.name, state.samples_seen, done)


def _finish(
    info: StageInfo,
    ctx: RunContext,
    trainer: Trainer,
    state: TrainState,
    loaders: tuple[Any, Any],
    evaluate: _Evaluator,
    ckpt_dir: Path,
) -> dict[str, float]:
    """Final evaluation and checkpoint; DONE.json when the weights are finite."""
    samples_seen = state.samples_seen
    trainer.ema.sync()
    final = evaluate(trainer.ema.model, samples_seen)
    _checkpoint(info, ctx, state, trainer.settings.keep_checkpoints)
    _log_unreadable(info, ctx, {"train": loaders[0], "eval": loaders[1]}, samples_seen)
    if distributed.any_over_ranks([not _finite(trainer.model, trainer.ema.model)], ctx.world)[0]:
        raise NonFiniteError(
            f"stage {info.name}: the weights are not finite (NaN/Inf) at {samples_seen} "
            f"samples; the stage is not marked done; last finite checkpoint: "
            f"{_last_finite(ckpt_dir)}"
        )
    distributed.barrier(ctx.world)
    if ctx.world.is_main:
        rundir.write_text(
            info.stage_dir / DONE_FILE,
            json.dumps({"samples_seen": samples_seen, "scalars": final}, indent=2),
        )
    ctx.hooks.hook.ulframe_stage_end(run=ctx.info, stage=info, scalars=final)
    return final


def _log_unreadable(
    info: StageInfo, ctx: RunContext, loaders: dict[str, Any], samples_seen: int
) -> None:
    """How many unreadable items each split skipped (summed over ranks): a log line and a
    metrics row (kind "data")."""
    counts = {f"skipped_files/{split}": float(ld.unreadable) for split, ld in loaders.items()}
    world = ctx.world
    counts = distributed.mean_over_ranks(counts, world)
    totals = {k: round(v * world.world_size) for k, v in counts.items()}
    if not world.is_main:
        return
    shown = ", ".join(f"{k.split('/')[1]} {v}" for k, v in totals.items())
    (log.warning if any(totals.values()) else log.info)(
        "stage %s: unreadable files skipped: %s", info.name, shown
    )
    step = samples_seen // info.batch_size
    ctx.metrics.write(
        {"stage": info.name, "step": step, "samples_seen": samples_seen, "kind": "data"} | totals
    )


class _stop_on_signals:
    """Within the block, SIGTERM/SIGINT only record the signal; the loop checkpoints and stops."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, received: list[int]) -> None:
        self.received = received
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> None:
        try:
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(
                    s, lambda signum, _frame: self.received.append(signum)
                )
        except ValueError:  # not the main thread: leave signals alone
            self.previous.clear()

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
