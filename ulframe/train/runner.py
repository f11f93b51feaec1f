"""Training a run: the workdir lock, the config check on resume, hooks, then the stages.

`ulframe run` parses the config and calls `train` (one process, or each process under torch's
elastic agent) or `launch` (run the agent with `--nproc N`, and as one node of a cluster with
`--nnodes N --node-rank R --rdzv-endpoint HOST:PORT`, docs/cluster.md). The run files are
written once a stage has really started (`rundir.RunFiles.commit`), so a refused run changes
nothing in the workdir.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ulframe import rundir
from ulframe.errors import EXIT_REQUEUE, UserError
from ulframe.train import checkpoint, distributed, signals

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


JOINED_ENV = "ULFRAME_JOINED_RUN"
"""Set by `launch` for the workers of a multi-node run: node 0's launcher holds the workdir lock
for every node, and no worker takes it (the rendezvous may make any node's worker rank 0)."""


def rendezvous(
    nnodes: int, node_rank: int, endpoint: str | None, timeout_s: int, workdir: Path
) -> distributed.Rendezvous | None:
    """The rendezvous of `ulframe run --nnodes N --node-rank R --rdzv-endpoint HOST:PORT`; None
    without --nnodes. Its run id is derived from the workdir, so every node that names the same
    workdir (on a shared filesystem) joins the same run. Bad flags: a one-line UserError."""
    if not nnodes:
        if endpoint is not None or node_rank:
            raise UserError("--node-rank and --rdzv-endpoint need --nnodes N")
        return None
    if nnodes < 1:
        raise UserError(f"--nnodes must be >= 1; got {nnodes}")
    if endpoint is None:
        raise UserError(
            f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (node 0's host, a free port)"
        )
    if not 0 <= node_rank < nnodes:
        raise UserError(f"--node-rank {node_rank} is outside [0, {nnodes}) for --nnodes {nnodes}")
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--rdzv-endpoint {endpoint!r} is not HOST:PORT with a port in [1, 65535]")
    if timeout_s < 1:
        raise UserError(f"--rdzv-timeout must be >= 1 second; got {timeout_s}")
    digest = hashlib.sha256(str(workdir.resolve()).encode()).hexdigest()[:16]
    return distributed.Rendezvous(nnodes, node_rank, endpoint, f"ulframe-{digest}", timeout_s)


def check_endpoint(cluster: distributed.Rendezvous) -> None:
    """Before the agent starts: node 0 can bind the endpoint's port (it hosts the store there);
    any other node reaches the endpoint within the rendezvous timeout, retrying each second.
    Either failure is one UserError naming the endpoint (the agent's own failure would come with
    pages of C++ log)."""
    host, _, port = cluster.endpoint.rpartition(":")
    if cluster.node_rank == 0:
        with socket.socket() as s:
            try:
                s.bind(("", int(port)))
            except OSError as err:
                raise UserError(
                    f"cannot host the rendezvous store at {cluster.endpoint}: port {port} "
                    f"{err.strerror or err}; pick a free one"
                ) from None
        return
    deadline = time.monotonic() + cluster.timeout_s
    while True:
        try:
            socket.create_connection(
                (host, int(port)), timeout=max(0.1, min(5.0, deadline - time.monotonic()))
            ).close()
            return
        except OSError as err:
            reason = err.strerror or str(err) or type(err).__name__
        if time.monotonic() >= deadline:
            raise UserError(
                f"cannot reach the rendezvous store at {cluster.endpoint} within "
                f"{cluster.timeout_s} s (--rdzv-timeout): {reason}; node 0 (--node-rank 0) "
                "hosts it: start it on that host"
            )
        time.sleep(max(0.0, min(1.0, deadline - time.monotonic())))


def launch(
    run_args: Sequence[str],
    workdir: Path,
    nproc: int,
    max_restarts: int,
    allow_change: bool,
    cluster: distributed.Rendezvous | None = None,
) -> int:
    """Run `ulframe run_args...` in `nproc` processes under torch's elastic agent, which runs in
    this process; the exit code of the run (`distributed.run_agent`).

    The workdir lock is taken here, by node 0 alone, and held until the agent returns, restarts
    included; on a single node the rank-0 worker sees it as its parent's (`rundir.WorkdirLock`),
    on several no worker takes it (`JOINED_ENV`). The agent handles the requeue signal too: it
    forwards it to the workers, which checkpoint and stop, and the run exits with
    `EXIT_REQUEUE` (docs/cluster.md)."""
    from ulframe import wiring

    if nproc < 1 or max_restarts < 0:
        raise UserError("--nproc must be >= 1 and --max-restarts >= 0")
    lock: Any = contextlib.nullcontext()
    if cluster is None or cluster.node_rank == 0:
        rundir.prepare(workdir)
        lock = rundir.WorkdirLock(workdir).acquire()
    with lock:
        check_workdir_config(workdir, wiring.full_config(), allow_change)
        if cluster is not None:
            check_endpoint(cluster)
        if cluster is not None and cluster.nnodes > 1:
            os.environ[JOINED_ENV] = "1"  # (the agent's workers inherit this environment)
        signal_names = signals.agent_signals()
        argv = distributed.launch_argv(
            nproc, max_restarts, list(run_args), cluster, signals=signal_names
        )
        where = "" if cluster is None else f" on node {cluster.node_rank} of {cluster.nnodes}"
        log.info("launching %d processes%s: %s", nproc, where, shlex.join(argv))
        sys.stdout.flush()
        sys.stderr.flush()
        code = distributed.run_agent(argv, cluster, signals.requeue_signal(), EXIT_REQUEUE)
    if code == EXIT_REQUEUE:
        log.warning("stopped by the requeue signal: exit %d, requeue to resume", EXIT_REQUEUE)
    return code


def train(
    experiment: Any,
    registry: Any,
    workdir: Path,
    allow_change: bool = False,
    on_start: Callable[[Any], None] = lambda world: None,
) -> dict[str, dict[str, float]]:
    """Train the experiment's unfinished stages in `workdir` (this process's part of them).

    Rank 0 takes the workdir lock (in a multi-node run none does: node 0's launcher holds it);
    `on_start(world)` runs once the lock is held and the config checked (the CLI points its log
    file at the workdir). The requeue signal only records itself from here on (`signals`). A
    full disk becomes one UserError naming the file and the last good checkpoint."""
    check_stages_fit_data(experiment)  # before anything is written or trained
    world = distributed.init(experiment.device)
    lock: Any = contextlib.nullcontext()
    joined = os.environ.get(JOINED_ENV) == "1"  # node 0's launcher holds it (see launch)
    if world.is_main and not joined:  # one lock per run: rank 0's (or its --nproc launcher's)
        rundir.prepare(workdir)
        lock = rundir.WorkdirLock(workdir).acquire()
    stop: list[int] = []  # signals received: the requeue signal from here on (see signals)
    with lock, signals.record_requeue(stop):
        from ulframe import wiring

        check_workdir_config(workdir, wiring.full_config(), allow_change)
        distributed.barrier(world)
        on_start(world)
        try:
            results = _train(experiment, world, workdir, registry, allow_change, stop)
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
    experiment: Any, world: Any, workdir: Path, registry: Any, allow_change: bool, stop: list[int]
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
        allow_config_change=allow_change, commit=files.commit, stop=stop,
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
