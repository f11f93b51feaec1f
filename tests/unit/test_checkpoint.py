"""ulframe.train.checkpoint: atomic, checksummed, newest-valid fallback, no code unpickled."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from ulframe.train import checkpoint


def _state(value: float) -> dict[str, object]:
    return {"model": {"w": torch.full((3,), value)}, "samples_seen": int(value), "stage": "s"}


def test_save_load_roundtrip_and_keep(tmp_path: Path) -> None:
    for n in (4, 8, 12, 16):
        checkpoint.save(tmp_path, n, _state(n), keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "ckpt-000000000012.pt",
        "ckpt-000000000016.pt",
    ]
    assert not list(tmp_path.glob("*.tmp"))
    state = checkpoint.load_latest(tmp_path)
    assert state is not None and state["samples_seen"] == 16
    assert torch.equal(state["model"]["w"], torch.full((3,), 16.0))


def test_truncated_newest_falls_back_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint.save(tmp_path, 4, _state(4))
    newest = checkpoint.save(tmp_path, 8, _state(8))
    newest.write_bytes(newest.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="ulframe.train.checkpoint"):
        state = checkpoint.load_latest(tmp_path)
    assert state is not None and state["samples_seen"] == 4
    assert "ckpt-000000000008.pt: checksum mismatch" in caplog.text


def test_missing_sidecar_is_skipped(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, 4, _state(4))
    checkpoint.save(tmp_path, 8, _state(8)).with_suffix(".json").unlink()
    state = checkpoint.load_latest(tmp_path)
    assert state is not None and state["samples_seen"] == 4
    with pytest.raises(ValueError, match="no checksum file"):
        checkpoint.load(tmp_path / "ckpt-000000000008.pt")


class _RunsCode:
    """Unpickling this calls os.system: what weights_only=True must refuse."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch PWNED",))


def test_a_checkpoint_that_needs_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ckpt-000000000004.pt"
    torch.save({"model": {}, "payload": _RunsCode()}, path)
    data = path.read_bytes()  # a valid checksum: only the unpickler stands in the way
    meta = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "samples_seen": 4}
    path.with_suffix(".json").write_text(json.dumps(meta))
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(ValueError, match="refused to load"):
            checkpoint.load(path)
        assert checkpoint.load_latest(tmp_path) is None
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "PWNED").exists()


def test_export_writes_the_ema_of_the_newest_valid_checkpoint(tmp_path: Path) -> None:
    from safetensors import safe_open

    from ulframe import cli

    ckpts = tmp_path / "run" / "stages" / "stage1" / "checkpoints"
    for n in (4, 8):
        ema = {"w": torch.full((2, 3), float(n)), "b": torch.zeros(3)}
        state = {
            "model": {},
            "ema": ema,
            "samples_seen": n,
            "config": "a = 1",
            "config_sha256": "x",
        }
        checkpoint.save(ckpts, n, state)
    newest = ckpts / "ckpt-000000000008.pt"
    newest.write_bytes(newest.read_bytes()[:50])  # truncated: the export uses the one at 4
    out = tmp_path / "ema.safetensors"
    assert cli.main(["export", str(tmp_path / "run"), "--out", str(out)]) == 0
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["samples_seen"] == "4" and f.metadata()["stage"] == "stage1"
        assert f.metadata()["config"] == "a = 1"
        assert torch.equal(f.get_tensor("w"), torch.full((2, 3), 4.0))
        assert set(f.keys()) == {"w", "b"}
    code = cli.main(["export", str(tmp_path / "run"), "--stage", "nope", "--out", str(out)])
    assert code == cli.EXIT_USER_ERROR


# ---- the checkpoint folder of a stage, and a finished stage's EMA model ------------------------
def test_checkpoint_dir_is_the_one_layout(tmp_path: Path) -> None:
    stage_dir = tmp_path / "stages" / "stage1"
    assert checkpoint.checkpoint_dir(stage_dir, 0, 1) == stage_dir / "checkpoints"
    assert checkpoint.checkpoint_dir(stage_dir, 1, 2) == stage_dir / "checkpoints" / "rank1"
    # Reading (world size unknown): the layout on disk, rank 0's folder of a multi-process run.
    assert checkpoint.checkpoint_dir(stage_dir) == stage_dir / "checkpoints"
    checkpoint.save(stage_dir / "checkpoints" / "rank0", 4, _state(4))
    assert checkpoint.checkpoint_dir(stage_dir) == stage_dir / "checkpoints" / "rank0"
    assert checkpoint.stage_checkpoints(tmp_path) == {"stage1": stage_dir / "checkpoints" / "rank0"}
    checkpoint.save(stage_dir / "checkpoints", 4, _state(4))
    assert checkpoint.checkpoint_dir(stage_dir) == stage_dir / "checkpoints"


class _Stage:
    name = "stage1"

    def __init__(self, width: int = 3) -> None:
        self.width = width

    def build(self, ctx) -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Linear(self.width, 2)


def test_load_stage_ema_builds_and_loads_the_ema_weights(tmp_path: Path) -> None:
    from ulframe.errors import ConfigError
    from ulframe.protocols import BuildContext

    stage_dir = tmp_path / "stages" / "stage1"
    ctx = BuildContext({}, 0, torch.device("cpu"), tmp_path / "stages" / "stage2")
    with pytest.raises(ConfigError, match="no valid checkpoint"):
        checkpoint.load_stage_ema(_Stage(), ctx, stage_dir)
    trained = torch.nn.Linear(3, 2)
    ema = {k: v + 1.0 for k, v in trained.state_dict().items()}
    state = {"model": trained.state_dict(), "ema": ema, "samples_seen": 8}
    checkpoint.save(checkpoint.checkpoint_dir(stage_dir, 0, 1), 8, state)
    model = checkpoint.load_stage_ema(_Stage(), ctx, stage_dir)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ema[k])
    with pytest.raises(ConfigError, match="does not fit this config"):
        checkpoint.load_stage_ema(_Stage(width=5), ctx, stage_dir)


def test_checkpoints_of_another_number_of_processes_are_refused_not_restarted(
    tmp_path: Path,
) -> None:
    """A stage never starts from 0 beside another world size's checkpoints (that work would be
    lost): 2 processes' checkpoints under 1, 1's under 2, 4's under 2 are one line each."""
    from ulframe.errors import UserError

    two, one = tmp_path / "two" / "checkpoints", tmp_path / "one" / "checkpoints"
    for rank in (0, 1):
        checkpoint.save(checkpoint.checkpoint_dir(two.parent, rank, 2), 8, {"samples_seen": 8})
    checkpoint.save(checkpoint.checkpoint_dir(one.parent, 0, 1), 8, {"samples_seen": 8})
    with pytest.raises(UserError) as refused:
        checkpoint.check_world_size(two, 1)
    assert str(refused.value) == (
        f"{two} holds checkpoints written by 2 process(es), this run has 1: resume with "
        "--nproc 2 (a checkpoint is not resharded to another number of processes); nothing was "
        "changed"
    )
    with pytest.raises(UserError, match=r"by 1 process\(es\), this run has 2: resume with one"):
        checkpoint.check_world_size(one, 2)
    with pytest.raises(UserError, match=r"by 2 process\(es\), this run has 1"):
        checkpoint.check_world_size(two, 1)
    checkpoint.check_world_size(two, 2)  # its own world size: resumed, not refused
    checkpoint.check_world_size(one, 1)
    checkpoint.check_world_size(tmp_path / "none" / "checkpoints", 2)  # nothing written yet
    # only rank 0 saved before a kill (a first save cut short): a restart of 2 is not refused
    checkpoint.save(checkpoint.checkpoint_dir(tmp_path / "cut", 0, 2), 4, {"samples_seen": 4})
    checkpoint.check_world_size(tmp_path / "cut" / "checkpoints", 2)
    four = tmp_path / "four" / "checkpoints"
    for rank in range(4):
        checkpoint.save(checkpoint.checkpoint_dir(four.parent, rank, 4), 8, {"samples_seen": 8})
    with pytest.raises(
        UserError, match=r"by 4 process\(es\), this run has 2: resume with --nproc 4"
    ):
        checkpoint.check_world_size(four, 2)
