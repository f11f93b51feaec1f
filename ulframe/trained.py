"""A trained run, read back: its config, its stages with their EMA weights, evaluation, samples.

`ulframe sample|eval WORKDIR` go through here. A run directory describes itself: its
`config.gin` is the full config the run was trained with, overrides included (written by
`rundir.RunFiles`), so `config_files(workdir)` is all it takes to rebuild the experiment; gin
files and `--gin` overrides given on the command line apply on top of it.

Every stage is rebuilt as in its own run and loaded with the EMA weights of its newest valid
checkpoint (`checkpoint.load_stage_ema`). Sampling and sample metrics go through the stages'
own methods (`protocols.SamplingStage`): nothing here knows what a stage is made of.
"""

from __future__ import annotations

import inspect
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ulframe import rundir
from ulframe.errors import UserError
from ulframe.progress import progress
from ulframe.protocols import SamplingStage

log = logging.getLogger(__name__)
CONFIG_FILE = "config.gin"
EVAL_FILE = "eval.json"
SAMPLES_DIR = "samples"
# The Fréchet-distance metric `ulframe eval` reports as "fd" when the experiment names none
# (`Experiment.sample_metric`) and it is installed.
FD_METRIC = "fd_photos"


def config_files(workdir: Path, extra: Sequence[str | Path] = ()) -> list[str]:
    """The run's own config (`workdir/config.gin`), then `extra` gin files."""
    config = workdir / CONFIG_FILE
    if not config.is_file():
        raise UserError(
            f"{workdir} has no {CONFIG_FILE}: not a run directory written by `ulframe run` "
            f"(or name the run's gin files: `ulframe COMMAND FILE.gin --workdir {workdir}`)"
        )
    return [str(config), *map(str, extra)]


@dataclass
class Restored:
    """One stage of a trained run: the stage, its module with EMA weights (eval mode), folder."""

    stage: Any
    model: torch.nn.Module
    stage_dir: Path


@dataclass
class TrainedRun:
    """A trained run's experiment and every stage restored."""

    workdir: Path
    experiment: Any
    registry: Any
    device: torch.device
    stages: list[Restored]

    def sampling(self) -> Restored | None:
        """The last stage that draws samples (`SamplingStage`), or None."""
        found = [r for r in self.stages if isinstance(r.stage, SamplingStage)]
        return found[-1] if found else None


def open_run(
    workdir: Path, files: Sequence[str | Path], bindings: Sequence[str] = ()
) -> TrainedRun:
    """Parse `files` and `bindings`, build the experiment and restore every stage's EMA model
    from `workdir`."""
    from ulframe import wiring
    from ulframe.data.pipeline import first_example
    from ulframe.protocols import BuildContext
    from ulframe.registry import naming_plugins
    from ulframe.train import checkpoint, distributed, settings

    registry = wiring.load(files, bindings, engine=settings.CONFIGURABLES)
    experiment = wiring.experiment()
    device = distributed.pick_device(experiment.device, 0)
    if not (workdir / "stages").is_dir():
        raise UserError(f"{workdir} holds no run: train it first with `ulframe run`")
    num_classes = experiment.dataset.num_classes
    with naming_plugins(registry, experiment.dataset):
        example = first_example(experiment.dataset.source("train"), num_classes=num_classes)
    previous: dict[str, Path] = {}
    restored = []
    for stage in experiment.stages:
        stage_dir = workdir / "stages" / stage.name
        torch.manual_seed(experiment.seed)
        ctx = BuildContext(example, num_classes, device, stage_dir, dict(previous))
        model = checkpoint.load_stage_ema(stage, ctx, stage_dir)
        restored.append(Restored(stage, model.to(device).eval(), stage_dir))
        previous[stage.name] = stage_dir
    return TrainedRun(workdir, experiment, registry, device, restored)


def split_examples(experiment: Any, split: str, n: int) -> torch.Tensor:
    """Up to n examples' `x` of a split, in the split's own order, (N, C, *S) on CPU."""
    from ulframe.data.pipeline import build_loader

    # prefetch=0: a one-off read that stops early leaves no prefetch thread behind (torchdata
    # can then collect the abandoned iterator in that very thread and print a traceback).
    loader = build_loader(
        experiment.dataset.source(split), batch_size=min(n, 64), seed=experiment.seed,
        shuffle=False, repeat=False, drop_last=False, prefetch=0,
    )  # fmt: skip
    images = []
    for batch in loader:
        images.append(batch["x"])
        if sum(len(x) for x in images) >= n:
            break
    return torch.cat(images)[:n]


# ---- sampler and steps overrides (`--sampler`, `--steps`, `--decoder-steps`) --------------------
def resolve_sampler(name: str | None) -> Callable[..., Any] | None:
    """The sampler registered as `name` in `ulframe.samplers` (None for None); a UserError of one
    line names the registered ones."""
    if name is None:
        return None
    from ulframe.registry import Registry

    registry = Registry()
    names = registry.names("samplers")
    if name not in names:
        raise UserError(
            f"--sampler {name!r} is not a registered sampler; one of: {', '.join(names)}"
        )
    return registry.get("samplers", name).factory


def check_sampling(
    sampler: str | None = None, steps: int | None = None, decoder_steps: int | None = None
) -> None:
    """A UserError of one line for an unknown `--sampler` or `--steps` / `--decoder-steps` < 1."""
    for flag, value in (("--steps", steps), ("--decoder-steps", decoder_steps)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    resolve_sampler(sampler)


def sampling_overrides(
    stage: Any, sampler: str | None = None, decoder_steps: int | None = None
) -> dict[str, Any]:
    """The keyword arguments that hand `--sampler` and `--decoder-steps` to `stage.sample`
    (only those given); a UserError when the stage's `sample` takes no such argument."""
    overrides: dict[str, Any] = {}
    if sampler is not None:
        overrides["sampler"] = resolve_sampler(sampler)
    if decoder_steps is not None:
        overrides["decoder_steps"] = decoder_steps
    takes = inspect.signature(stage.sample).parameters
    for key in overrides:
        if key not in takes:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{flag}: stage {stage.name} draws samples without a {key} argument")
    return overrides


class _Overridden:
    """A sampling stage whose `sample` gets the command line's steps and `sampling_overrides`
    (what `eval/samples.draw_samples` calls); every other attribute is the stage's."""

    def __init__(self, stage: Any, steps: int | None, overrides: dict[str, Any]) -> None:
        self._stage, self._steps, self._overrides = stage, steps, overrides

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stage, name)

    def sample(self, model: Any, n: int, *args: Any, **kwargs: Any) -> Any:
        if self._steps is not None:
            kwargs.setdefault("steps", self._steps)
        return self._stage.sample(model, n, *args, **kwargs, **self._overrides)


# ---- ulframe eval ------------------------------------------------------------------------------
def evaluate(
    run: TrainedRun,
    batches: int | None = None,
    fd_samples: int = 256,
    sampler: str | None = None,
    steps: int | None = None,
    decoder_steps: int | None = None,
) -> dict[str, Any]:
    """Every stage's evaluation on the eval split (its own `eval_batches` unless `batches`),
    merged (later stages win on a shared name) with `"stages": {name: scalars}`, plus the
    sample metrics of the last sampling stage (`fd_samples` samples; 0: none), drawn with
    `sampler` (a registered name), `steps` (both chains) and `decoder_steps` when given. Written
    to `workdir/eval.json`."""
    from ulframe.data.pipeline import build_loader

    experiment, device = run.experiment, run.device
    merged: dict[str, Any] = {}
    per_stage: dict[str, dict[str, float]] = {}
    for r in run.stages:
        count = r.stage.train.eval_batches if batches is None else batches
        loader = build_loader(
            experiment.dataset.source("eval"), batch_size=r.stage.train.batch_size,
            seed=experiment.seed, shuffle=False, repeat=False, drop_last=False, prefetch=0,
        )  # fmt: skip
        data = [{k: v.to(device) for k, v in b.items()} for _, b in zip(range(count), loader)]
        generator = torch.Generator(device).manual_seed(experiment.seed)
        log.info("evaluating stage %s on %d batches", r.stage.name, len(data))
        with torch.no_grad():
            report = r.stage.evaluate(r.model, data, generator)
        per_stage[r.stage.name] = dict(report.scalars)
        merged.update(report.scalars)
    if fd_samples > 0:
        merged |= sample_metrics(run, fd_samples, sampler, steps, decoder_steps)
    result = merged | {"stages": per_stage}
    rundir.write_text(run.workdir / EVAL_FILE, json.dumps(result, indent=2) + "\n")
    return result


def sample_metrics(
    run: TrainedRun,
    n: int,
    sampler: str | None = None,
    steps: int | None = None,
    decoder_steps: int | None = None,
) -> dict[str, Any]:
    """`judge_samples` of n samples of the last sampling stage against n eval examples (empty
    without a sampling stage). The metric: `Experiment.sample_metric`, else `FD_METRIC` for
    images when installed; a UserError of the metric (e.g. a missing weights file) stops.
    `sampler`, `steps`, `decoder_steps`: the overrides of `write_samples`."""
    from ulframe import wiring
    from ulframe.eval.samples import draw_samples, judge_samples

    sampling = run.sampling()
    if sampling is None:
        return {}
    experiment = run.experiment
    factory = experiment.sample_metric
    if factory is None and FD_METRIC in run.registry.names("metrics"):
        factory = wiring.configured(f"metrics.{FD_METRIC}")
    reference = split_examples(experiment, "eval", n)
    if factory is not experiment.sample_metric and reference.dim() != 4:
        factory = None  # the default metric compares images; name a video metric for clips
    metric = wiring.call(factory) if factory is not None else None
    continues = sampling.stage.sample_settings(sampling.model).continues
    overrides = sampling_overrides(sampling.stage, sampler, decoder_steps)
    samples, labels = draw_samples(
        _Overridden(sampling.stage, steps, overrides), sampling.model, len(reference),
        experiment.dataset.num_classes,
        run.device, experiment.seed, context=reference if continues else None,
    )  # fmt: skip
    real = split_examples(experiment, "train", len(reference)) if metric else None
    return judge_samples(metric, reference, samples, labels, real)


# ---- ulframe sample ----------------------------------------------------------------------------
def write_samples(
    run: TrainedRun,
    n: int,
    label: int | None = None,
    guidance: float | None = None,
    steps: int | None = None,
    seed: int | None = None,
    sampler: str | None = None,
    decoder_steps: int | None = None,
) -> dict[str, Any]:
    """n samples of the last sampling stage, written to `workdir/samples/`: a PNG grid (images;
    n = k · classes in class order: one class per row) or a GIF and an MP4 (clips; beside the
    real clips they continue), and `samples.npz` (uint8 `images`, `labels`, `guidance`,
    `steps`). `sampler` (a registered name), `steps` (both chains) and `decoder_steps` (the
    decoder's alone) override the stage's. Returns the summary (paths, n, guidance, the
    sampler when overridden, and the stage's facts)."""
    import numpy as np
    from einops import rearrange

    from ulframe.eval.images import save_grid, to_uint8
    from ulframe.eval.video import save_gif, save_mp4

    if n < 1:
        raise UserError(f"-n must be >= 1, got {n}")
    sampling = run.sampling()
    if sampling is None:
        raise UserError("no stage of this experiment draws samples (protocols.SamplingStage)")
    stage, model, device = sampling.stage, sampling.model, run.device
    experiment = run.experiment
    num_classes = experiment.dataset.num_classes
    settings = stage.sample_settings(model, guidance, steps)
    overrides = sampling_overrides(stage, sampler, decoder_steps)
    context = None
    if settings.continues:  # real examples give what the samples continue
        context = split_examples(experiment, "eval", n)
        if len(context) < n:
            raise UserError(f"-n {n}: the eval split has only {len(context)} clips")
    if label is not None:
        if not 0 <= label < max(num_classes, 1) or num_classes == 0:
            raise UserError(f"--class must be in [0, {num_classes}), got {label}")
        labels = torch.full((n,), label, dtype=torch.long, device=device)
    else:
        labels = stage.sample_labels(n, device, num_classes)
    generator = torch.Generator(device).manual_seed(experiment.seed if seed is None else seed)
    with torch.no_grad(), progress(n, phase="sampling", unit="samples") as bar:
        samples = stage.sample(
            model, n, labels, settings.guidance, generator, steps=steps, context=context,
            **overrides,
        ).cpu()  # fmt: skip
        bar.update(n)
    out = run.workdir / SAMPLES_DIR
    npz = out / "samples.npz"
    label_array = labels.cpu().numpy() if labels is not None else np.full(n, -1)
    summary: dict[str, Any] = {"npz": str(npz), "n": n, "guidance": settings.guidance}
    if sampler is not None:
        summary["sampler"] = sampler
    if samples.dim() == 5:  # clips: (N, C, T, H, W)
        shown = samples if context is None else torch.stack([context, samples], 1).flatten(0, 1)
        ncols = 2 if context is not None else None
        summary["gif"] = str(save_gif(shown, out / "samples.gif", ncols=ncols))
        summary["mp4"] = str(save_mp4(shown, out / "samples.mp4", ncols=ncols))
        frames = rearrange(to_uint8(rearrange(samples, "n c t h w -> (n t) c h w")),
                           "(n t) h w c -> n t h w c", n=n)  # fmt: skip
        if context is not None:
            summary |= settings.facts
    else:
        # n = k * classes samples in class order: k columns, one class per row.
        per_class = n // num_classes if num_classes and label is None else 0
        ncols = per_class if per_class and n % num_classes == 0 else None
        summary["png"] = str(save_grid(samples, out / "samples.png", ncols=ncols))
        frames = to_uint8(samples)
    buffer = io.BytesIO()
    np.savez(buffer, images=frames, labels=label_array, guidance=settings.guidance,
             steps=settings.steps)  # fmt: skip
    rundir.write_bytes(npz, buffer.getvalue())  # atomic, like every run file
    return summary
