"""Cluster launch: `ulframe run --nnodes N --node-rank R --rdzv-endpoint HOST:PORT`.

Two elastic agents on this machine stand for two nodes of one process each (c10d rendezvous on
a free port) and train what one process trains. Bad flags, a bad rank environment and an
unreachable rendezvous stop at start with one line; the requeue signal is recorded, and the
launcher turns it into exit code 75.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ulframe.errors import EXIT_REQUEUE, UserError
from ulframe.train import checkpoint, distributed, runner, signals

REPO = Path(__file__).resolve().parents[2]
# Adam's eps at 1e-4: see test_distributed.test_checkpoints_reshard_to_another_number_of_processes.
EPS = ["--gin_param", "optimizers.AdamW.eps = 1e-4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ulframe", *args],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _lock_holder(workdir: Path, procs: list[subprocess.Popen[str]]) -> int | None:
    """The pid the workdir lock records, once it records one (None: the runs ended first)."""
    while all(p.poll() is None for p in procs):
        try:
            return int(json.loads((workdir / "run.lock").read_text())["pid"])
        except (OSError, ValueError, KeyError):
            time.sleep(0.01)
    return None


@pytest.mark.slow
def test_two_nodes_train_like_one_process(
    cli_env: Callable[..., dict[str, str]], tmp_path: Path, tiny_run: list[str]
) -> None:
    workdir, single = tmp_path / "cluster", tmp_path / "single"
    run = ["run", "gin/quickstart.gin", *tiny_run, *EPS]
    cluster = ["--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}"]
    node0 = _start([*run, "--workdir", str(workdir), *cluster, "--node-rank", "0"], cli_env())
    node1 = _start([*run, "--workdir", str(workdir), *cluster, "--node-rank", "1"], cli_env())
    one = _start([*run, "--workdir", str(single)], cli_env())  # the reference, meanwhile
    holder = _lock_holder(workdir, [node0, node1])
    outs = [p.communicate(timeout=300) for p in (node0, node1, one)]
    for proc, (_, err) in zip((node0, node1, one), outs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    assert holder == node0.pid  # node 0's launcher holds the lock; node 1 joins without it
    assert (workdir / "run.lock").read_text() == ""  # released at the end
    assert "launching 1 processes on node 1 of 2" in outs[1][1]
    assert "in use by" not in outs[0][1] + outs[1][1]

    ckpts = workdir / "stages" / "stage1" / "checkpoints"
    written = ckpts / "ckpt-000000000008"  # one checkpoint, each node's rank wrote its part
    loaders = sorted(p.name for p in written.glob("loader-rank*.json"))
    assert loaders == ["loader-rank0.json", "loader-rank1.json"]
    two_nodes = checkpoint.load(written)
    reference = checkpoint.load(single / "stages" / "stage1" / "checkpoints" / "ckpt-000000000008")
    for part in ("model", "ema"):
        worst = max(
            float((reference[part][k].float() - two_nodes[part][k].float()).abs().max())
            for k in reference[part]
        )
        assert worst < 1e-6, (part, worst)
    # The logged training metrics (averaged over the ranks) too; the evaluations draw their
    # noise per rank, so those differ.
    rows = [_train_rows(d) for d in (workdir, single)]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == [1, 2]
    for got, want in zip(*rows, strict=True):
        for name in ("loss_nats", "total_nats", "bits_per_pixel", "grad_norm"):
            assert got[name] == pytest.approx(want[name], rel=1e-5), (got["step"], name)


def _train_rows(workdir: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def test_cluster_flags_are_checked_before_launching(tmp_path: Path) -> None:
    def refused(nnodes: int, node_rank: int, endpoint: str | None, timeout_s: int = 300) -> str:
        with pytest.raises(UserError) as err:
            runner.rendezvous(nnodes, node_rank, endpoint, timeout_s, tmp_path)
        return str(err.value)

    assert refused(2, 0, None) == (
        "--nnodes 2 needs --rdzv-endpoint HOST:PORT (node 0's host, a free port)"
    )
    assert refused(2, 2, "node0:29400") == "--node-rank 2 is outside [0, 2) for --nnodes 2"
    assert refused(2, -1, "node0:29400") == "--node-rank -1 is outside [0, 2) for --nnodes 2"
    assert refused(0, 1, None) == "--node-rank and --rdzv-endpoint need --nnodes N"
    assert refused(0, 0, "node0:29400") == "--node-rank and --rdzv-endpoint need --nnodes N"
    assert refused(2, 0, "node0") == (
        "--rdzv-endpoint 'node0' is not HOST:PORT with a port in [1, 65535]"
    )
    assert refused(2, 0, "node0:29400", 0) == "--rdzv-timeout must be >= 1 second; got 0"
    assert runner.rendezvous(0, 0, None, 300, tmp_path) is None

    # Every node that names the workdir, however spelled, joins the same run.
    (tmp_path / "w").mkdir()
    ids = {
        runner.rendezvous(2, rank, "node0:29400", 60, where).run_id  # type: ignore[union-attr]
        for rank, where in ((0, tmp_path / "w"), (1, tmp_path / "x" / ".." / "w"))
    }
    assert len(ids) == 1 and next(iter(ids)).startswith("ulframe-")
    other = runner.rendezvous(2, 0, "node0:29400", 60, tmp_path / "v")
    assert other is not None and other.run_id not in ids

    argv = distributed.launch_argv(
        1, 0, ["run"], runner.rendezvous(2, 1, "node0:29400", 60, tmp_path), ["SIGUSR1"]
    )
    assert argv[3:14] == [
        "--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:29400",
        "--rdzv-id", argv[10], "--rdzv-conf", "is_host=0,join_timeout=60,read_timeout=60",
        "--signals-to-handle",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "1"}, "RANK=1 is set but WORLD_SIZE is not; a launcher (torchrun, ulframe run --nproc) sets both"),
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK is not; a launcher (torchrun, ulframe run --nproc) sets both"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is outside [0, WORLD_SIZE=2)"),
        ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
        ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "1"}, "LOCAL_RANK=1 is outside [0, LOCAL_WORLD_SIZE=1)"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, "WORLD_SIZE=2 but MASTER_ADDR and MASTER_PORT not set; a launcher (torchrun, ulframe run --nproc) sets them"),
    ],
)  # fmt: skip
def test_a_bad_rank_environment_stops_the_process_at_start(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name in (*distributed.RANK_VARIABLES, "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError) as err:
        distributed.init("cpu")
    assert str(err.value) == message


def test_cuda_local_rank_beyond_the_visible_devices_stops_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in (*distributed.RANK_VARIABLES, "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    two_local = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    for name, value in (two_local | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError) as err:
        distributed.init("cuda")
    assert str(err.value) == (
        "LOCAL_RANK=1 but 1 CUDA device(s) are visible (CUDA_VISIBLE_DEVICES=0); start at most "
        "one process per visible device on a node"
    )


def test_an_unreachable_rendezvous_endpoint_waits_its_timeout_then_names_it(
    tmp_path: Path,
) -> None:
    endpoint = f"127.0.0.1:{_free_port()}"  # nothing listens there
    node1 = runner.rendezvous(2, 1, endpoint, 1, tmp_path)
    assert node1 is not None
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        runner.check_endpoint(node1)
    waited = time.monotonic() - start
    assert str(err.value) == (
        f"cannot reach the rendezvous store at {endpoint} within 1 s (--rdzv-timeout): "
        "Connection refused; node 0 (--node-rank 0) hosts it: start it on that host"
    )
    assert 0.9 < waited < 10, waited

    with socket.socket() as taken:  # node 0 hosts the store: its port must be free
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        node0 = runner.rendezvous(2, 0, f"127.0.0.1:{port}", 1, tmp_path)
        assert node0 is not None
        with pytest.raises(UserError) as err:
            runner.check_endpoint(node0)
        assert str(err.value) == (
            f"cannot host the rendezvous store at 127.0.0.1:{port}: port {port} Address "
            "already in use; pick a free one"
        )
        listening = runner.rendezvous(2, 1, f"127.0.0.1:{port}", 1, tmp_path)
        assert listening is not None
        runner.check_endpoint(listening)  # a store that listens is reached at once


def test_the_agent_s_outcome_becomes_the_launcher_s_exit_code(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
    from torch.distributed.elastic.rendezvous import RendezvousTimeoutError

    outcome: dict[str, Any] = {}

    def agent(args: Any) -> None:
        if "kill" in outcome:  # a signal to the launcher, before the agent's own handlers
            os.kill(os.getpid(), outcome.pop("kill"))
            time.sleep(5)
        if "raise" in outcome:
            raise outcome["raise"]

    def failed(*codes: int) -> ChildFailedError:
        failures = {
            rank: ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file="")
            for rank, code in enumerate(codes)
        }
        return ChildFailedError("ulframe", failures)  # type: ignore[arg-type]

    monkeypatch.setattr(torchrun, "run", agent)  # the agent's outcome, without processes
    argv = distributed.launch_argv(2, 0, ["run", "x.gin"], signals=["SIGTERM", "SIGUSR1"])
    before = signal.getsignal(signal.SIGUSR1)

    def code() -> int:
        return distributed.run_agent(argv, None, signal.SIGUSR1, EXIT_REQUEUE)

    assert code() == 0
    outcome["kill"] = signal.SIGUSR1
    assert code() == EXIT_REQUEUE
    assert signal.getsignal(signal.SIGUSR1) == before  # the launcher's handlers are back
    outcome["raise"] = SignalException("usr1", signal.SIGUSR1)  # forwarded to the workers
    assert code() == EXIT_REQUEUE
    outcome["raise"] = SignalException("term", signal.SIGTERM)
    assert code() == 128 + signal.SIGTERM
    outcome["raise"] = failed(EXIT_REQUEUE, EXIT_REQUEUE)  # the workers' own requeue stop
    assert code() == EXIT_REQUEUE
    outcome["raise"] = failed(EXIT_REQUEUE, 1)
    assert code() == 1

    # A rendezvous that the agent itself gives up on: one line naming the endpoint.
    node0 = runner.rendezvous(2, 0, "node0:29400", 60, tmp_path)
    outcome["raise"] = RendezvousTimeoutError("timed out")
    with pytest.raises(UserError) as err:
        distributed.run_agent(argv, node0, signal.SIGUSR1, EXIT_REQUEUE)
    assert str(err.value) == (
        "not all 2 nodes joined the rendezvous at node0:29400 within 60 s (--rdzv-timeout); "
        "start each with the same --nnodes and --rdzv-endpoint"
    )


def test_the_requeue_signal_only_records_itself() -> None:
    assert signals.parse_signal("USR1") == signal.SIGUSR1
    assert signals.parse_signal("sigusr2") == signal.SIGUSR2
    assert signals.parse_signal(str(int(signal.SIGXCPU))) == signal.SIGXCPU
    assert signals.parse_signal("none") is None
    with pytest.raises(UserError) as err:
        signals.parse_signal("KILL")
    assert (
        str(err.value)
        == "--requeue-signal 'KILL' is not one of USR1, USR2, TERM, HUP, XCPU or none"
    )

    before = signal.getsignal(signal.SIGUSR1)
    try:
        signals.set_requeue_signal(signal.SIGUSR1)
        assert signals.agent_signals() == ["SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1"]
        received: list[int] = []
        with signals.record_requeue(received):  # a whole run: the signal never kills it
            os.kill(os.getpid(), signal.SIGUSR1)
            with signals.stop_on_signals(received):  # a training loop
                os.kill(os.getpid(), signal.SIGTERM)
        assert received == [signal.SIGUSR1, signal.SIGTERM]
        assert signals.requeue_requested(received)
        assert not signals.requeue_requested([signal.SIGTERM])
        assert signal.getsignal(signal.SIGUSR1) == before  # the previous handlers are back
        signals.set_requeue_signal(None)
        assert not signals.requeue_requested(received)
        assert signals.agent_signals() == ["SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT"]
    finally:
        signals.set_requeue_signal(signals.DEFAULT_REQUEUE_SIGNAL)


@pytest.mark.usefixtures("restore_logging")
def test_a_requeue_stop_exits_with_75_and_a_bad_signal_name_with_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ulframe import cli
    from ulframe.train.loop import StopRequested

    def stopped(*args: Any, **kwargs: Any) -> None:
        received = [signal.SIGUSR2]
        raise StopRequested(
            "stopped by signal 12 at 8 samples; checkpoint saved, re-run to resume",
            requeue=signals.requeue_requested(received),
        )

    monkeypatch.setattr(runner, "train", stopped)
    run = ["run", "gin/quickstart.gin", "--workdir", str(tmp_path)]
    try:
        assert cli.main([*run, "--requeue-signal", "USR2"]) == EXIT_REQUEUE
        assert capsys.readouterr().err.splitlines()[-1] == (
            "ulframe: stopped by signal 12 at 8 samples; checkpoint saved, re-run to resume; "
            "exit 75: requeue the job"
        )
        assert cli.main([*run, "--requeue-signal", "USR1"]) == cli.EXIT_USER_ERROR  # a stop
        assert cli.main([*run, "--requeue-signal", "KILL"]) == cli.EXIT_USER_ERROR
        assert capsys.readouterr().err.splitlines()[-1] == (
            "ulframe: error: --requeue-signal 'KILL' is not one of USR1, USR2, TERM, HUP, XCPU "
            "or none"
        )
    finally:
        signals.set_requeue_signal(signals.DEFAULT_REQUEUE_SIGNAL)
