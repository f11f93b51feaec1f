"""ulframe.rundir and the checkpoint files: atomic writes, a full disk, torn and damaged files,
the workdir lock, non-finite checkpoints."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ulframe import rundir
from ulframe.errors import WorkdirError
from ulframe.eval.media import save_media
from ulframe.train import checkpoint


def _enospc(*_args: object, **_kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


# ---- atomic writes and a full disk -------------------------------------------------------------
def test_write_text_replaces_atomically_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "config.gin"
    rundir.write_text(path, "a = 1\n")
    rundir.write_text(path, "a = 2\n")
    assert path.read_text() == "a = 2\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.gin"]


def test_disk_full_names_the_file_removes_the_temporary_and_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "DONE.json"
    rundir.write_text(path, "old")

    def half_then_full(self: Path, data: bytes) -> int:
        with open(self, "wb") as f:
            f.write(data[:1])
        _enospc()
        return 0

    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    with pytest.raises(rundir.DiskFullError) as raised:
        rundir.write_text(path, "new")
    assert str(raised.value) == f"no space left on device writing {path}"
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["DONE.json"]


def test_disk_full_while_saving_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: _enospc())
    with pytest.raises(rundir.DiskFullError, match=r"recon-000000004\.png"):
        save_media(torch.zeros(2, 3, 4, 4), tmp_path / "images" / "recon-000000004")
    assert list((tmp_path / "images").iterdir()) == []


def test_disk_full_while_appending_metrics_cuts_the_line_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = rundir.MetricsFile(tmp_path / "metrics.jsonl")
    metrics.write({"stage": "s", "step": 1, "samples_seen": 4, "kind": "train"})
    before = metrics.path.read_bytes()
    real_write = os.write

    def half_then_full(fd: int, data: bytes) -> int:
        real_write(fd, bytes(data[:5]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(rundir.DiskFullError, match=r"metrics\.jsonl"):
        metrics.write({"stage": "s", "step": 2, "samples_seen": 8, "kind": "train"})
    assert metrics.path.read_bytes() == before


def test_disk_full_while_saving_a_checkpoint_removes_its_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint.save(tmp_path, 4, _state(4.0))
    monkeypatch.setattr(rundir, "_fsync", _enospc)
    with pytest.raises(rundir.DiskFullError, match=r"ckpt-000000000008$"):
        checkpoint.save(tmp_path, 8, _state(8.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000000004"]


# ---- metrics.jsonl -----------------------------------------------------------------------------
def _rows(path: Path) -> list[tuple[str, int, str]]:
    return [(r["stage"], r["samples_seen"], r["kind"]) for r in rundir.read_metrics(path)]


def test_a_torn_last_line_is_skipped_when_read_and_dropped_on_resume(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = rundir.MetricsFile(tmp_path / "metrics.jsonl")
    for n in (4, 8):
        metrics.write({"stage": "s", "step": n // 4, "samples_seen": n, "kind": "train"})
    with open(metrics.path, "a") as f:
        f.write('{"stage": "s", "step": 3, "samp')  # a kill mid-write
    with caplog.at_level(logging.WARNING, logger="ulframe.rundir"):
        assert _rows(metrics.path) == [("s", 4, "train"), ("s", 8, "train")]
        metrics.resume("s", 8, finished=False)
    assert "1 damaged line(s) ignored" in caplog.text
    assert metrics.path.read_text().endswith('"kind": "train"}\n')
    assert _rows(metrics.path) == [("s", 4, "train"), ("s", 8, "train")]


def test_resume_drops_the_rows_past_the_checkpoint_and_a_finished_stage_s_final_rows(
    tmp_path: Path,
) -> None:
    metrics = rundir.MetricsFile(tmp_path / "metrics.jsonl")
    rows = [("a", 8, "eval"), ("s", 4, "train"), ("s", 4, "eval"), ("s", 8, "train")]
    rows += [("s", 8, "eval"), ("s", 8, "data"), ("s", 12, "train")]
    for stage, n, kind in rows:
        metrics.write({"stage": stage, "step": n // 4, "samples_seen": n, "kind": kind})
    metrics.resume("s", 8, finished=False)  # resumes at 8: the row at 12 is written again
    assert _rows(metrics.path) == rows[:-1]
    metrics.resume("s", 8, finished=True)  # 8 is the end: the final evaluation runs again
    assert _rows(metrics.path) == rows[:4]


# ---- damaged files ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text", ["", "not json", "[]", "{}", '{"files": 3}', '{"files": {}, "plain": {}}']
)
def test_a_damaged_manifest_skips_its_checkpoint_with_a_warning(
    tmp_path: Path, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint.save(tmp_path, 4, _state(4.0))
    newest = checkpoint.save(tmp_path, 8, _state(8.0))
    (newest / "manifest.json").write_text(text)
    with caplog.at_level(logging.WARNING, logger="ulframe.train.checkpoint"):
        state = checkpoint.load_latest(tmp_path)
    assert state is not None and state["samples_seen"] == 4
    assert f"skipping checkpoint {newest}: ckpt-000000000008/manifest.json: damaged" in (
        caplog.text
    )


@pytest.mark.parametrize("text", ["", "{", "[]", "{}", '{"scalars": 1}'])
def test_a_damaged_json_file_is_ignored_with_a_warning(
    tmp_path: Path, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    from ulframe.train.loop import _read_done

    path = tmp_path / "DONE.json"
    path.write_text(text)
    with caplog.at_level(logging.WARNING):
        assert _read_done(path) is None
    assert f"ignoring damaged stage record {path}" in caplog.text
    path.write_text('{"samples_seen": 8, "scalars": {"psnr": 9.5}}')
    assert _read_done(path) == {"psnr": 9.5}


def test_an_empty_or_undecodable_config_gin_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "config.gin"
    assert rundir.read_config(path) is None
    path.write_text("")
    assert rundir.read_config(path) is None
    path.write_bytes(b"\xff\xfe")
    assert rundir.read_config(path) is None
    path.write_text("a = 1\n")
    assert rundir.read_config(path) == "a = 1\n"


# ---- non-finite checkpoints --------------------------------------------------------------------
def _state(value: float) -> dict[str, object]:
    return {"model": {"w": torch.full((3,), value)}, "samples_seen": 4, "stage": "s"}


def test_pruning_keeps_the_newest_finite_checkpoint_and_loading_skips_non_finite_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint.save(tmp_path, 4, _state(1.0), keep=1)
    for n in (8, 12):
        checkpoint.save(tmp_path, n, _state(float("nan")), keep=1)
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path)]
    assert names == ["ckpt-000000000004", "ckpt-000000000012"]
    assert checkpoint.newest_finite(tmp_path) == tmp_path / "ckpt-000000000004"
    with caplog.at_level(logging.WARNING, logger="ulframe.train.checkpoint"):
        state = checkpoint.load_latest(tmp_path)
    assert state is not None and torch.equal(state["model"]["w"], torch.ones(3))
    assert "ckpt-000000000012: weights are not finite (NaN/Inf)" in caplog.text
    # A non-finite state never replaces the finite checkpoint of the same count.
    checkpoint.save(tmp_path, 4, _state(float("inf")), keep=1)
    assert checkpoint.newest_finite(tmp_path) == tmp_path / "ckpt-000000000004"


# ---- the workdir lock --------------------------------------------------------------------------
HOLD = """
import sys, time
from pathlib import Path
from ulframe import rundir
rundir.WorkdirLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_live_holder_is_named_and_a_dead_one_is_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLD), str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(WorkdirError) as refused:
            rundir.WorkdirLock(tmp_path).acquire()
        message = str(refused.value)
        assert message.startswith(f"workdir {tmp_path} is in use by pid {holder.pid} on host ")
        assert "(started 20" in message and "use another --workdir" in message
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="ulframe.rundir"):
        with rundir.WorkdirLock(tmp_path).acquire() as lock:
            record = json.loads(lock.path.read_text())
            assert record["pid"] == os.getpid()
    assert f"taking over the lock left by pid {holder.pid} on host" in caplog.text
    assert caplog.text.count("taking over") == 1
    assert (tmp_path / rundir.LOCK_FILE).read_text() == ""  # released: no holder recorded
    with rundir.WorkdirLock(tmp_path).acquire():  # a clean release is not "taken over"
        pass
    assert caplog.text.count("taking over") == 1


def test_a_lock_held_by_the_parent_process_counts_as_ours(tmp_path: Path) -> None:
    # The --nproc launcher takes the lock and becomes torch's elastic agent (os.execv); its
    # rank-0 worker, a child process, runs under that lock instead of being refused.
    child = f"from pathlib import Path; from ulframe import rundir; rundir.WorkdirLock(Path({str(tmp_path)!r})).acquire()"  # fmt: skip
    with rundir.WorkdirLock(tmp_path).acquire():
        done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
