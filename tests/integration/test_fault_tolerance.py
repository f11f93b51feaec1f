"""Fault tolerance of `ulframe run`: SIGKILL, SIGTERM, corrupt checkpoints, config changes.

Every run here is the `tiny_run` quickstart (conftest.py) with 24 samples in steps of 4, a
checkpoint every 4 samples and no intermediate evaluation: seconds per run on one CPU thread.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ulframe.train import checkpoint

RunCli = Callable[..., subprocess.CompletedProcess[str]]
SAMPLES = 24
LONGER = [
    "--gin_param", f"TRAIN_SAMPLES = {SAMPLES}",
    "--gin_param", "stage1/TrainSettings.eval_every_samples = 0",
    "--gin_param", "stage1/TrainSettings.keep_checkpoints = 100",
]  # fmt: skip


def _args(workdir: Path, tiny_run: list[str], *extra: str) -> list[str]:
    return ["run", "gin/quickstart.gin", "--workdir", str(workdir), *tiny_run, *LONGER, *extra]


def _ckpts(workdir: Path) -> Path:
    return workdir / "stages" / "stage1" / "checkpoints"


def _start_and_signal(
    args: list[str], env: dict[str, str], workdir: Path, sig: int, wait_for: int = 4
) -> tuple[int, str, str]:
    """Start `ulframe ARGS`; send `sig` once the checkpoint at `wait_for` samples exists."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ulframe", *args],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = _ckpts(workdir) / f"ckpt-{wait_for:012d}"  # renamed into place when complete
    deadline = time.monotonic() + 120
    while not first.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def _final(workdir: Path) -> dict[str, Any]:
    return checkpoint.load(_ckpts(workdir) / f"ckpt-{SAMPLES:012d}")


def _assert_bit_identical(a: dict[str, Any], b: dict[str, Any]) -> None:
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        differ = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not differ, f"{part}: {len(differ)} tensors differ, e.g. {differ[:3]}"
    assert a["samples_seen"] == b["samples_seen"] == SAMPLES


@pytest.mark.slow
def test_sigkill_and_a_truncated_newest_checkpoint_resume_bit_identical(
    run_cli: RunCli, cli_env: Any, tmp_path: Path, tiny_run: list[str]
) -> None:
    reference = tmp_path / "reference"
    done = run_cli(*_args(reference, tiny_run))
    assert done.returncode == 0, done.stderr[-3000:]

    # SIGKILL once two checkpoints exist; the newest's data file is then truncated (as a kill
    # mid-write on a filesystem without atomic rename would leave it). The same command again warns, resumes
    # from the previous checkpoint and ends with bit-identical weights, data order included.
    killed = tmp_path / "killed"
    code, _, err = _start_and_signal(
        _args(killed, tiny_run), cli_env(), killed, signal.SIGKILL, wait_for=8
    )
    assert code == -signal.SIGKILL, f"the run ended before it was killed:\n{err[-2000:]}"
    assert not (killed / "stages" / "stage1" / "DONE.json").exists()
    *_, previous, newest = checkpoint.list_checkpoints(_ckpts(killed))
    data = newest / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:1000])
    resumed = run_cli(*_args(killed, tiny_run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = f"skipping checkpoint {newest}: {newest.name}: __0_0.distcp has the wrong size"
    assert expected in resumed.stderr
    assert f"resumed at {checkpoint.load(previous)['samples_seen']} samples" in resumed.stderr
    _assert_bit_identical(_final(reference), _final(killed))


@pytest.mark.slow
def test_sigterm_checkpoints_and_a_changed_config_is_refused_on_resume(
    run_cli: RunCli, cli_env: Any, tmp_path: Path, tiny_run: list[str]
) -> None:
    workdir = tmp_path / "run"
    code, _, err = _start_and_signal(_args(workdir, tiny_run), cli_env(), workdir, signal.SIGTERM)
    assert code == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("ulframe: error: stopped by signal 15 at "), last
    assert "checkpoint saved, re-run to resume" in last
    stopped_at = int(last.split(" at ")[1].split()[0])
    assert (_ckpts(workdir) / f"ckpt-{stopped_at:012d}" / "manifest.json").is_file()

    # A changed config is refused before anything is built, with the lines that changed.
    changed = ["--gin.stage1/TrainSettings.lr=2e-3"]
    refused = run_cli(*_args(workdir, tiny_run, *changed))
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"ulframe: error: workdir {workdir} was trained with a different config:" in (
        refused.stderr
    )
    assert "-stage1/TrainSettings.lr = 0.001\n+stage1/TrainSettings.lr = 0.002" in refused.stderr
    assert "--allow-config-change" in refused.stderr
    assert "Traceback" not in refused.stderr

    # Moving the workdir changes no gin binding: the same command resumes there.
    moved = tmp_path / "moved"
    workdir.rename(moved)
    resumed = run_cli(*_args(moved, tiny_run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed at {stopped_at} samples" in resumed.stderr
    assert (moved / "stages" / "stage1" / "DONE.json").is_file()

    # --allow-config-change: accepted, the diff logged.
    allowed = run_cli(*_args(moved, tiny_run, *changed, "--allow-config-change"))
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "with a changed config (--allow-config-change)" in allowed.stderr
    assert "stage stage1 already finished: skipping" in allowed.stderr


POISON = '''
import dataclasses

import torch
from ulframe.hookspecs import hookimpl


class Poison:
    """Test-only: makes the first loss term NaN on the given training steps (1-based)."""

    def __init__(self, steps=()):
        self.steps = set(steps)
        self.calls = 0

    @hookimpl
    def ulframe_after_build(self, run, stage, model):
        model.register_forward_hook(self._poison)

    def _poison(self, module, args, terms):
        if not module.training:
            return terms
        self.calls += 1
        if self.calls not in self.steps:
            return terms
        first = dataclasses.fields(terms)[0].name
        return dataclasses.replace(terms, **{first: getattr(terms, first) * float("nan")})
'''


@pytest.mark.slow
def test_the_nan_policy_skips_non_finite_steps_and_stops_after_k_in_a_row(
    run_cli: RunCli, cli_env: Any, make_distribution: Any, tmp_path: Path, tiny_run: list[str]
) -> None:
    site = make_distribution(
        tmp_path / "site", "poison-plugin", {"ulframe.hooks": {"poison": "poison:Poison"}},
        {"poison.py": POISON},
    )  # fmt: skip
    workdir = tmp_path / "run"
    guard = [
        "--gin.Experiment.hooks=[@hooks.console(), @hooks.poison()]",
        "--gin.stage1/TrainSettings.max_nonfinite_steps=2",
        "--gin.hooks.poison.steps=(2, 4, 5)",  # 2: skipped, then recovered; 4, 5: stop
    ]
    done = run_cli(*_args(workdir, tiny_run, *guard), env=cli_env({"PYTHONPATH": str(site)}))
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ulframe: error: non-finite "), last
    # A skipped step does not count: forward passes 1 and 3 trained (8 samples), 4 and 5 were
    # both attempts at step 3.
    assert "at step 3 of stage stage1: 2 consecutive steps skipped" in last
    assert "(TrainSettings.max_nonfinite_steps = 2)" in last
    assert "loss_nats" in last and "grad_norm" in last
    assert "checkpoint saved at 8 samples" in last
    assert last.endswith(f"last finite checkpoint: {_ckpts(workdir) / 'ckpt-000000000008'}")
    assert done.stderr.count("step skipped: non-finite") == 2  # passes 2 and 4; 5 stops

    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    skipped = {r["step"]: r["skipped_steps"] for r in records if r["kind"] == "train"}
    assert skipped == {1: 0, 2: 1}
    assert all(math.isfinite(r["loss_nats"]) for r in records if "loss_nats" in r)

    # The stop checkpoint holds the weights of the last good step: passes 4, 5 changed nothing.
    stop = checkpoint.load(_ckpts(workdir) / "ckpt-000000000008")
    assert stop["samples_seen"] == 8
    for part in ("model", "ema"):
        assert all(t.isfinite().all() for t in stop[part].values() if t.is_floating_point())


def _worker_pid(agent: int, rank: int, deadline_s: float = 120) -> int:
    """The pid of the torchrun worker of `rank` under the elastic agent `agent` (Linux /proc)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                environ = (stat.parent / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if ppid == agent and f"RANK={rank}".encode() in environ:
                return int(stat.parent.name)
        time.sleep(0.05)
    raise AssertionError(f"no worker of rank {rank} under pid {agent}")


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ulframe", *args],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert path.exists(), f"{path} never appeared"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds workers through /proc")
def test_two_processes_a_killed_worker_is_restarted(
    cli_env: Any, tmp_path: Path, tiny_run: list[str]
) -> None:
    # A worker SIGKILLed mid-run: the elastic agent restarts both processes, which agree on the
    # newest checkpoint every rank has, resume from it and finish. (--max-restarts 2: on a busy
    # machine a restarted gloo group can fail to connect once; the agent then tries again.)
    workdir = tmp_path / "restarted"
    proc = _start([*_args(workdir, tiny_run), "--nproc", "2", "--max-restarts", "2"], cli_env())
    _wait_for(_ckpts(workdir) / f"ckpt-{8:012d}", proc)
    victim = _worker_pid(proc.pid, rank=1)
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed at" in err, err[-3000:]
    assert (workdir / "stages" / "stage1" / "DONE.json").is_file()
    final = _ckpts(workdir) / f"ckpt-{SAMPLES:012d}"
    assert sorted(p.name for p in final.glob("loader-rank*.json")) == [
        "loader-rank0.json", "loader-rank1.json",
    ]  # fmt: skip


@pytest.mark.slow
def test_two_processes_sigterm_checkpoints_every_rank_and_resume_as_one_process_trains(
    cli_env: Any, tmp_path: Path, tiny_run: list[str]
) -> None:
    # SIGTERM to the launcher (a scheduler's pre-emption): the agent forwards it, every rank
    # writes its part of the checkpoint at the same step, the run stops; the same command
    # resumes. Under FSDP2 (the sharded model, optimizer and EMA state written and read back
    # as shards); it ends with the weights of one uninterrupted process. (DDP's pre-emption:
    # tests/integration/test_faults.py; DDP and FSDP2 checkpoints resumed under other numbers
    # of processes: tests/integration/test_distributed.py.)
    eps = ["--gin_param", "optimizers.AdamW.eps = 1e-4"]  # see test_distributed.py
    fsdp = ["--gin_param", "stage1/TrainSettings.parallelism = 'fsdp'"]
    final = _preempt_and_resume(tmp_path / "fsdp", [*tiny_run, *eps, *fsdp], cli_env())
    one = _start(_args(tmp_path / "one", [*tiny_run, *eps]), cli_env())
    _, err = one.communicate(timeout=300)
    assert one.returncode == 0, err[-3000:]
    reference = _final(tmp_path / "one")
    for part in ("model", "ema"):
        worst = max(
            float((reference[part][k] - final[part][k]).abs().max()) for k in reference[part]
        )
        assert worst < 1e-6, (part, worst)


def _preempt_and_resume(workdir: Path, tiny_run: list[str], env: dict[str, str]) -> dict[str, Any]:
    proc = _start([*_args(workdir, tiny_run), "--nproc", "2"], env)
    _wait_for(_ckpts(workdir) / f"ckpt-{4:012d}", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "checkpoint saved, re-run to resume" in err, err[-3000:]
    newest = checkpoint.list_checkpoints(_ckpts(workdir))[-1]
    assert len(list(newest.glob("loader-rank*.json"))) == 2, newest  # every rank's part
    assert not (workdir / "stages" / "stage1" / "DONE.json").exists()
    resumed = _start([*_args(workdir, tiny_run), "--nproc", "2"], env)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert "resumed at" in err
    assert (workdir / "stages" / "stage1" / "DONE.json").is_file()
    return checkpoint.load(_ckpts(workdir) / f"ckpt-{SAMPLES:012d}")
