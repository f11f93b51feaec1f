"""Training a run: the workdir lock, the config check on resume, hooks, then the stages.

`ulframe run` parses the config and calls `train` (one process, or each process under torch's
elastic agent) or `launch` (re-execute under the agent with `--nproc N`). The run files are
written once a stage has really started (`rundir.RunFiles.commit`), so a refused run changes
nothing in the workdir.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ulframe import rundir
from ulframe.errors import UserError
from ulframe.train import checkpoint, distributed

log = logging.getLogger(__name__)


def check_workdir_config(workdir: Path, config: str, allow_change: bool) -> None:
    """Refuse to resume checkpoints trained under another config, before anything is built."""
    previous = rundir.read_config(workdir / "config.gin")
    if previous is not None and checkpoint.stage_checkpoints(workdir):
        checkpoint.check_config(previous, config, f"workdir {workdir}", allow_change)


def last_good(workdir: Path) -> str:
    """The newest finite checkpoint of any stage in `workdir` (by time written)."""
    found = [
        checkpoint.newest_finite(checkpoint.checkpoint_dir(stage_dir))
        for stage_dir in workdir.glob("stages/*")
    ]
    paths = [p for p in found if p is not None]
    return str(max(paths, key=lambda p: p.stat().st_mtime)) if paths else "none"


def launch(
    run_args: Sequence[str], workdir: Path, nproc: int, max_restarts: int, allow_change: bool
) -> int:
    """Re-execute `ulframe run_args...` in `nproc` processes under torch's elastic agent.

    The workdir lock is taken here and survives the exec: the agent holds it for the whole run,
    restarts included, and its rank-0 worker sees it as its parent's (`rundir.WorkdirLock`)."""
    from ulframe import wiring

    if nproc < 1 or max_restarts < 0:
        raise UserError("--nproc must be >= 1 and --max-restarts >= 0")
    rundir.prepare(workdir)
    rundir.WorkdirLock(workdir).acquire(inheritable=True)
    check_workdir_config(workdir, wiring.full_config(), allow_change)
    argv = distributed.launch_argv(nproc, max_restarts, list(run_args))
    log.info("launching %d processes: %s", nproc, " ".join(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
    return 0  # not reached


def train(
    experiment: Any,
    registry: Any,
    workdir: Path,
    allow_change: bool = False,
    on_start: Callable[[Any], None] = lambda world: None,
) -> dict[str, dict[str, float]]:
    """Train the experiment's unfinished stages in `workdir` (this process's part of them).

    Rank 0 takes the workdir lock; `on_start(world)` runs once the lock is held and the config
    checked (the CLI points its log file at the workdir). A full disk becomes one UserError
    naming the file and the last good checkpoint."""
    check_stages_fit_data(experiment)  # before anything is written or trained
    world = distributed.init(experiment.device)
    lock: Any = contextlib.nullcontext()
    if world.is_main:  # one lock per run: rank 0's (or the --nproc launcher's, see launch)
        rundir.prepare(workdir)
        lock = rundir.WorkdirLock(workdir).acquire()
    with lock:
        from ulframe import wiring

        check_workdir_config(workdir, wiring.full_config(), allow_change)
        distributed.barrier(world)
        on_start(world)
        try:
            results = _train(experiment, world, workdir, registry, allow_change)
        except (OSError, rundir.DiskFullError) as err:
            if not isinstance(err, rundir.DiskFullError) and not rundir.is_disk_full(err):
                raise
            path = getattr(err, "path", None) or getattr(err, "filename", None) or workdir
            raise UserError(
                f"no space left on device writing {path}; last good checkpoint: "
                f"{last_good(workdir)}"
            ) from err
    if world.is_main:
        log.info("done: %s", _json(results))
        log.info(
            "workdir: %s | images: %s | metrics: %s | tensorboard --logdir %s",
            workdir, workdir / "stages" / "*" / "images", workdir / "metrics.jsonl", workdir,
        )  # fmt: skip
        log.info("next: %s", next_commands(workdir))
    distributed.shutdown()
    return results


def check_stages_fit_data(experiment: Any) -> None:
    """Every stage that defines `check_data(example)` (an optional member of the Stage
    protocol) sees the first train example before any stage trains, so a setting that does not
    fit the data (a video stage's context length longer than the clips) stops the run at
    config time with the stage's one-line ConfigError, not after the stages before it."""
    checks = [s for s in experiment.stages if callable(getattr(s, "check_data", None))]
    if not checks:
        return
    from ulframe.data.pipeline import first_example
    from ulframe.registry import naming_plugins

    dataset = experiment.dataset
    with naming_plugins(source_of=dataset):
        example = first_example(dataset.source("train"), num_classes=dataset.num_classes)
    for stage in checks:
        stage.check_data(example)


def next_commands(workdir: Path) -> str:
    """The commands that sample and evaluate the run in `workdir`, to copy as they are: the
    workdir names its own config, so no gin file or override needs repeating."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("ulframe")
    prog = shlex.quote(str(argv0)) if argv0.name == "ulframe" else "ulframe"
    where = shlex.quote(str(workdir))
    return f"{prog} sample {where} -n 16 && {prog} eval {where}"


def _json(value: Any) -> str:
    import json

    return json.dumps(value)


def _train(
    experiment: Any, world: Any, workdir: Path, registry: Any, allow_change: bool
) -> dict[str, dict[str, float]]:
    """Run the experiment's stages with the hooks and the run files of this run."""
    from ulframe import hookspecs, wiring
    from ulframe.hookspecs import RunInfo
    from ulframe.train.loop import RunContext, run_experiment

    config = wiring.full_config()
    dists = {e.distribution for e in registry.all_entries()}
    files = rundir.RunFiles(workdir, config, dists, world.is_main)
    hooks = hookspecs.plugin_manager(list(experiment.hooks))
    info = RunInfo(
        workdir, [s.name for s in experiment.stages], "", world.is_main, world.world_size
    )
    ctx = RunContext(
        workdir, world, hooks, info, rundir.MetricsFile(workdir / "metrics.jsonl", world.is_main),
        seed=experiment.seed, num_workers=experiment.num_workers,
        operative_config=wiring.operative_config, config=config,
        allow_config_change=allow_change, commit=files.commit,
    )  # fmt: skip
    hooks.hook.ulframe_run_start(run=info)
    try:
        results = run_experiment(experiment, ctx)
    except BaseException as err:
        try:
            hooks.hook.ulframe_error(run=info, error=err)
        except Exception as hook_err:  # never hide the run's own error behind a hook's
            log.warning("a hook failed while the run stopped: %s", hook_err)
        raise
    finally:
        info.operative_config = wiring.operative_config()
        files.write_operative(info.operative_config)
    hooks.hook.ulframe_run_end(run=info, results=results)
    return results
