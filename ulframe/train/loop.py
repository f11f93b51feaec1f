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

import pluggy
import torch

from ulframe import rundir
from ulframe.data.pipeline import Dataset, PipelineLoader, build_loader, first_example
from ulframe.errors import ConfigError, UserError
from ulframe.eval.media import save_media
from ulframe.experiment import Experiment
from ulframe.hookspecs import RunInfo, StageInfo, StepInfo, StopTraining
from ulframe.protocols import BuildContext, EvalReport, Stage
from ulframe.registry import naming_plugins
from ulframe.rundir import MetricsFile
from ulframe.train import checkpoint, distributed, parallelize, perf, posthoc_ema
from ulframe.train.distributed import World
from ulframe.train.signals import requeue_requested, stop_on_signals
from ulframe.train.state import Checkpointer, TrainState, newest_agreed
from ulframe.train.step import LogWindow, Trainer, seed_for, train_step

log = logging.getLogger(__name__)
DONE_FILE = "DONE.json"
EVAL_STREAM = 2**62  # a samples-seen value no training step reaches: the evaluation's seed


class StopRequested(StopTraining):
    """SIGTERM/SIGINT or the requeue signal arrived: a checkpoint was written and the run
    stopped; re-run to resume. `requeue`: this process received the requeue signal
    (`ulframe.train.signals`), and `ulframe run` exits with `EXIT_REQUEUE`."""

    def __init__(self, message: str, requeue: bool = False) -> None:
        super().__init__(message)
        self.requeue = requeue


@dataclass
class RunContext:
    """What every stage of one run shares."""

    workdir: Path
    world: World
    hooks: pluggy.PluginManager
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


def run_experiment(experiment: Experiment, ctx: RunContext) -> dict[str, dict[str, float]]:
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

    stage: Stage
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


# ---- one stage ---------------------------------------------------------------------------------
def train_stage(
    stage: Stage,
    index: int,
    dataset: Dataset,
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
    ckpt_dir = stage_dir / checkpoint.CHECKPOINTS
    state = TrainState(
        trainer.model, trainer.ema, trainer.opt, loaders[0], stage=stage.name, config=ctx.config,
        power_ema=trainer.power_ema,
    )  # fmt: skip
    _resume(stage, state, stage_dir, ctx)
    info = StageInfo(
        stage.name, index, stage_dir, settings.train_samples, state.samples_seen,
        settings.batch_size, world.is_main,
    )  # fmt: skip
    saver = Checkpointer(
        state, ckpt_dir, world, settings.keep_checkpoints, settings.async_checkpoint,
        on_saved=lambda path: _saved(info, ctx, path),
    )  # fmt: skip
    ctx.info.operative_config = ctx.operative_config()  # every factory has now been called
    ctx.hooks.hook.ulframe_stage_start(run=ctx.info, stage=info)
    ctx.hooks.hook.ulframe_after_build(run=ctx.info, stage=info, model=trainer.model)
    trainer.check_step = lambda step, scalars: ctx.hooks.hook.ulframe_check_step(
        run=ctx.info, stage=info, step=step, scalars=scalars
    )
    trainer.wrapped.train()
    evaluate = _Evaluator(stage, eval_batches, info, ctx)
    batches: Iterator[dict[str, torch.Tensor]] = iter(loaders[0])
    window = LogWindow()
    try:
        with stop_on_signals(ctx.stop):
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
                    scalars = window.means(trainer, info.batch_size) | result.module_norms
                    _log_train(info, ctx, state.samples_seen, scalars, window)
                    window = LogWindow()
                unfinished = state.samples_seen < settings.train_samples
                if _crossed(before, state.samples_seen, settings.eval_every_samples) and unfinished:
                    trainer.ema.sync()
                    evaluate(trainer.ema.model, state.samples_seen)
                every = settings.posthoc_ema_every_samples  # (before the checkpoint: see _finish)
                if _crossed(before, state.samples_seen, every) and unfinished:
                    _snapshot(info, ctx, trainer, state.samples_seen)
                if (
                    _crossed(before, state.samples_seen, settings.checkpoint_every_samples)
                    and unfinished
                ):
                    saver.save()
                saver.poll()
            if stopping:  # pre-empted: save what we have and stop
                signum = ctx.stop[0] if ctx.stop else signal.SIGTERM  # (another rank's signal)
                raise StopRequested(
                    f"stopped by signal {int(signum)} at {state.samples_seen} samples; "
                    "checkpoint saved, re-run to resume",
                    requeue=requeue_requested(ctx.stop),
                )
    except StopTraining as err:  # StopRequested, or a hook: skipped steps changed no weight
        saver.save()
        saver.wait()
        if isinstance(err, StopRequested):
            raise
        raise StopTraining(
            f"{err}; checkpoint saved at {state.samples_seen} samples; "
            f"last finite checkpoint: {checkpoint.last_finite(ckpt_dir)}"
        ) from err
    return _finish(info, ctx, trainer, saver, loaders, evaluate, ckpt_dir)


def _saved(info: StageInfo, ctx: RunContext, path: Path) -> None:
    """A checkpoint is complete: the hooks hear of it (rank 0)."""
    if ctx.world.is_main:
        ctx.hooks.hook.ulframe_checkpoint_saved(
            run=ctx.info, stage=info, path=path, samples_seen=checkpoint.samples_of(path)
        )


def _snapshot(info: StageInfo, ctx: RunContext, trainer: Trainer, samples_seen: int) -> None:
    """The post-hoc EMA's snapshot at `samples_seen` (every rank; none tracked: nothing)."""
    if trainer.power_ema is not None:
        posthoc_ema.write_snapshot(
            trainer.power_ema, info.stage_dir, samples_seen, info.batch_size, ctx.world.is_main
        )


def _log_train(
    info: StageInfo, ctx: RunContext, samples_seen: int, scalars: dict, window: LogWindow
) -> None:
    """A log window's scalars: a metrics row (rank 0) and the train-step hook (every rank)."""
    step = samples_seen // info.batch_size
    if ctx.world.is_main:
        row = {"stage": info.name, "step": step, "samples_seen": samples_seen, "kind": "train"}
        ctx.metrics.write(row | scalars)
    per_step = (window.seconds / window.steps, window.waiting / window.steps)
    ctx.hooks.hook.ulframe_train_step_end(
        run=ctx.info, step=StepInfo(info, step, samples_seen, scalars, *per_step)
    )


def _build(
    stage: Stage, dataset: Dataset, stage_dir: Path, previous: dict[str, Path], ctx: RunContext
) -> tuple[Trainer, tuple[PipelineLoader, PipelineLoader], list[dict[str, torch.Tensor]]]:
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
    if settings.measure_mfu:
        probe = perf.probe_batch(train_source)
        if probe:
            flops = perf.count_example_flops(model, _to_device(probe, world.device), autocast)
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


def _resume(stage: Stage, state: TrainState, stage_dir: Path, ctx: RunContext) -> None:
    """Restore `state` from the newest checkpoint valid on every rank (whatever number of
    processes wrote it); commit the run files."""
    world, ckpt_dir = ctx.world, stage_dir / checkpoint.CHECKPOINTS
    if world.is_main:  # what a killed save left (before any rank lists or writes)
        checkpoint.remove_partial(ckpt_dir)
    distributed.barrier(world)
    candidates = checkpoint.resume_candidates(stage_dir, world.rank, world.world_size)
    path = newest_agreed(candidates, world)
    if path is not None:
        checkpoint.check_config(
            checkpoint.saved_config(path), ctx.config, f"stage {stage.name}",
            ctx.allow_config_change,
        )  # fmt: skip
        state.load(path, world)
        log.info("stage %s: resumed at %d samples", stage.name, state.samples_seen)
    else:  # never from 0 beside checkpoints that cannot be resumed: that work would be lost
        checkpoint.check_world_size(ckpt_dir, world.world_size)
        if ckpt_dir.is_dir():
            log.warning("no valid checkpoint in %s; starting %s from 0", ckpt_dir, stage.name)
    ctx.commit()  # nothing refused this run: its config and command are now the workdir's
    done = state.samples_seen >= stage.train.train_samples
    ctx.metrics.resume(stage.name, state.samples_seen, done)


def _finish(
    info: StageInfo,
    ctx: RunContext,
    trainer: Trainer,
    saver: Checkpointer,
    loaders: tuple[PipelineLoader, PipelineLoader],
    evaluate: _Evaluator,
    ckpt_dir: Path,
) -> dict[str, float]:
    """Final evaluation and checkpoint; DONE.json when the weights are finite."""
    samples_seen = saver.state.samples_seen
    trainer.ema.sync()
    final = evaluate(trainer.ema.model, samples_seen)
    # The snapshot first: a resume from this checkpoint would not write it again.
    _snapshot(info, ctx, trainer, samples_seen)
    saver.save()
    saver.wait()
    _log_unreadable(info, ctx, {"train": loaders[0], "eval": loaders[1]}, samples_seen)
    if distributed.any_over_ranks(
        [not checkpoint.models_finite(trainer.model, trainer.ema.model)], ctx.world
    )[0]:
        raise NonFiniteError(
            f"stage {info.name}: the weights are not finite (NaN/Inf) at {samples_seen} "
            f"samples; the stage is not marked done; last finite checkpoint: "
            f"{checkpoint.last_finite(ckpt_dir)}"
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
    info: StageInfo, ctx: RunContext, loaders: dict[str, PipelineLoader], samples_seen: int
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
