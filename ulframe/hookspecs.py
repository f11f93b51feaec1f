"""The lifecycle: every hook a plugin may implement, grouped by phase.

Hooks observe and extend the run; they never replace the loop. Implement any subset of these
with the `hookimpl` marker in a class whose factory is an entry point of the `ulframe.hooks`
group, then switch it on in gin: `Experiment.hooks = [@hooks.console(), @hooks.my_hook()]`.

Order of calls in one run::

    ulframe_run_start
      for each stage:  ulframe_stage_start
                       ulframe_after_build
                       ulframe_check_step          (every step, after backward; may skip it)
                       ulframe_train_step_end      (every `log_every_samples`)
                       ulframe_eval_end            (every `eval_every_samples` and at the end)
                       ulframe_checkpoint_saved    (every `checkpoint_every_samples` and at the end)
                       ulframe_stage_end
    ulframe_run_end
    ulframe_error                                  (instead of the rest, when the run fails)

Hooks are called on every rank; `RunInfo.is_main` tells whether this process is rank 0, and
plugins that write files or to the console act only there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy
import torch

from ulframe.errors import PluginError, UserError

PROJECT = "ulframe"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass
class RunInfo:
    """The run as a whole."""

    workdir: Path
    stage_names: list[str]
    operative_config: str  # gin's operative config, filled after the first stage is built
    is_main: bool = True
    world_size: int = 1


@dataclass
class StageInfo:
    """One stage being trained."""

    name: str
    index: int
    stage_dir: Path
    total_samples: int  # samples the stage trains for
    samples_seen: int  # samples already seen (non-zero when resuming)
    batch_size: int  # global batch size
    is_main: bool = True


@dataclass
class StepInfo:
    """One logged training step. Scalars are already reduced across ranks."""

    stage: StageInfo
    step: int
    samples_seen: int
    scalars: dict[str, float]  # loss terms (nats), bits/pixel, lr, grad norms, samples/s...
    step_time_s: float
    data_wait_s: float
    extras: dict[str, Any] = field(default_factory=dict)


class StopTraining(UserError):
    """Raised by a hook (e.g. `ulframe_check_step`), or by the loop's NaN/Inf policy
    (`TrainSettings.nan_policy`), to stop the run.

    The loop writes a checkpoint of the last good state (skipped steps changed no weight), then
    the CLI exits with code 2 and this message.
    """


# ---- run -------------------------------------------------------------------------------------
@hookspec
def ulframe_run_start(run: RunInfo) -> None:
    """The experiment is built and the workdir prepared; no stage has started."""


@hookspec
def ulframe_run_end(run: RunInfo, results: dict[str, dict[str, float]]) -> None:
    """Every stage finished. `results` maps stage name to its final evaluation scalars."""


@hookspec
def ulframe_error(run: RunInfo, error: BaseException) -> None:
    """The run failed with `error` (also KeyboardInterrupt). Called once, then re-raised."""


# ---- stage -----------------------------------------------------------------------------------
@hookspec
def ulframe_stage_start(run: RunInfo, stage: StageInfo) -> None:
    """A stage that is not finished starts (or resumes at `stage.samples_seen`)."""


@hookspec
def ulframe_after_build(run: RunInfo, stage: StageInfo, model: torch.nn.Module) -> None:
    """The stage's networks are built and restored; training is about to begin."""


@hookspec(firstresult=True)
def ulframe_check_step(
    run: RunInfo, stage: StageInfo, step: int, scalars: dict[str, torch.Tensor]
) -> str | None:
    """Every training step, after backward and gradient clipping, before the optimizer step.

    `scalars` are this rank's 0-d tensors: the loss terms (batch means), `loss_nats` and
    `grad_norm` (the global norm before clipping). Return a reason (str) to skip this step's
    optimizer and EMA update, or None to take it; the first non-None answer wins. The decision
    is made the same on every rank (a skip on any rank skips everywhere). Raise `StopTraining`
    to stop the run. Keep it cheap: it runs every step. Non-finite scalars need no hook: the
    loop skips such a step (or stops) itself (`TrainSettings.nan_policy`).
    """


@hookspec
def ulframe_train_step_end(run: RunInfo, step: StepInfo) -> None:
    """A logged training step ended (every `TrainSettings.log_every_samples`)."""


@hookspec
def ulframe_eval_end(
    run: RunInfo,
    stage: StageInfo,
    samples_seen: int,
    scalars: dict[str, float],
    images: dict[str, torch.Tensor],
) -> None:
    """An evaluation (on EMA weights) ended. Images are (N, C, H, W) in [-1, 1]."""


@hookspec
def ulframe_checkpoint_saved(run: RunInfo, stage: StageInfo, path: Path, samples_seen: int) -> None:
    """A checkpoint was written atomically to `path`."""


@hookspec
def ulframe_stage_end(run: RunInfo, stage: StageInfo, scalars: dict[str, float]) -> None:
    """A stage finished; `scalars` are its final evaluation."""


def hook_names() -> list[str]:
    """Every hook of the lifecycle, in the order of this module."""
    import sys

    module = sys.modules[__name__]
    return [n for n in vars(module) if n.startswith(PROJECT + "_") and callable(getattr(module, n))]


def _plugin_name(obj: Any) -> str:
    klass = type(obj)
    return f"{klass.__qualname__} ({klass.__module__})"


def _explain(pm: pluggy.PluginManager, obj: Any, err: pluggy.PluginValidationError) -> PluginError:
    """pluggy's validation error as a `PluginError` naming the plugin and the valid choices."""
    import difflib
    import inspect

    names = hook_names()
    for attr in dir(obj):
        opts = None if attr.startswith("__") else pm.parse_hookimpl_opts(obj, attr)
        if opts is None:
            continue
        spec = opts.get("specname") or attr
        if spec not in names:
            close = difflib.get_close_matches(spec, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            return PluginError(
                f"hook plugin {_plugin_name(obj)} implements unknown hook '{spec}'{hint} "
                f"(hooks: {', '.join(names)})"
            )
        expected = list(inspect.signature(globals()[spec]).parameters)
        given = list(inspect.signature(getattr(obj, attr)).parameters)
        extra = [p for p in given if p not in expected]
        if extra:
            return PluginError(
                f"hook plugin {_plugin_name(obj)}: {spec}({', '.join(given)}) takes "
                f"{', '.join(repr(p) for p in extra)}, which the hook does not pass; "
                f"it passes ({', '.join(expected)})"
            )
    return PluginError(f"hook plugin {_plugin_name(obj)}: {err}")


def plugin_manager(hook_objects: list[Any]) -> pluggy.PluginManager:
    """A plugin manager holding `hook_objects`; pluggy validates them against the specs.

    A hook implementation with an unknown name (a misspelling) or an argument the hook does not
    pass raises `PluginError`, naming the plugin and what is valid.
    """
    import sys

    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(sys.modules[__name__])
    for obj in hook_objects:
        try:
            pm.register(obj)
            pm.check_pending()
        except pluggy.PluginValidationError as err:
            raise _explain(pm, obj, err) from err
    return pm
