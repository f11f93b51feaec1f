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


def _save_file(directory: Path, samples: int, state: dict[str, object]) -> Path:
    """A checkpoint file as ulframe <= format 2 wrote it: `torch.save` and a checksum sidecar."""
    path = directory / f"ckpt-{samples:012d}.pt"
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    data = path.read_bytes()
    meta = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "samples_seen": samples}
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path


def test_save_load_roundtrip_and_keep(tmp_path: Path) -> None:
    for n in (4, 8, 12, 16):
        checkpoint.save(tmp_path, n, _state(n), keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "ckpt-000000000012",
        "ckpt-000000000016",
    ]
    assert not list(tmp_path.glob("*.tmp"))
    newest = tmp_path / "ckpt-000000000016"
    assert sorted(p.name for p in newest.iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "manifest.json",
    ]
    record = json.loads((newest / "manifest.json").read_text())
    assert record["plain"] == {"samples_seen": 16, "stage": "s"} and record["finite"] is True
    state = checkpoint.load_latest(tmp_path)
    assert state is not None and state["samples_seen"] == 16
    assert torch.equal(state["model"]["w"], torch.full((3,), 16.0))
    shapes = checkpoint.load(newest, map_location="meta")  # the index alone
    assert shapes["model"]["w"].is_meta and shapes["model"]["w"].shape == (3,)


def test_flatten_keeps_tensors_apart_from_values_and_unflattens() -> None:
    state = {
        "model": {"a.weight": torch.ones(2), "b": {"c": torch.zeros(1)}},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": ["a.weight"]}]},
        "samples_seen": 8,
    }
    tensors, plain = checkpoint.flatten(state)
    assert tensors.keys() == {"model/a.weight", "model/b/c"}
    assert plain == {
        "optimizer/state": {}, "optimizer/param_groups": [{"lr": 0.1, "params": ["a.weight"]}],
        "samples_seen": 8,
    }  # fmt: skip
    back = checkpoint.unflatten(tensors, plain)
    assert back["optimizer"] == state["optimizer"] and back["samples_seen"] == 8
    assert back["model"]["b"]["c"] is state["model"]["b"]["c"]
    with pytest.raises(ValueError, match="keys are strings without"):
        checkpoint.flatten({"model": {"a/b": torch.ones(1)}})


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_a_damaged_newest_falls_back_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    checkpoint.save(tmp_path, 4, _state(4))
    newest = checkpoint.save(tmp_path, 8, _state(8))
    data = newest / "__0_0.distcp"
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[:100])
    elif damage == "flip":
        raw = bytearray(data.read_bytes())
        raw[-20] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "delete":
        data.unlink()
    else:
        (newest / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING, logger="ulframe.train.checkpoint"):
        state = checkpoint.load_latest(tmp_path)
    assert state is not None and state["samples_seen"] == 4
    expected = {
        "truncate": "__0_0.distcp has the wrong size", "flip": "__0_0.distcp: checksum mismatch",
        "delete": "__0_0.distcp is missing", "manifest": "no manifest.json",
    }[damage]  # fmt: skip
    assert f"ckpt-000000000008: {expected}" in caplog.text
    assert checkpoint.newest_valid(checkpoint.list_checkpoints(tmp_path)).name.endswith("04")


class _RunsCode:
    """Unpickling this calls os.system: what weights_only=True must refuse."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch PWNED",))


def test_a_checkpoint_that_needs_code_is_refused(tmp_path: Path) -> None:
    """A file (format <= 2) with a valid checksum: only the unpickler stands in the way. A
    directory whose pickled `.metadata` was replaced: its checksum refuses it before DCP
    unpickles it."""
    path = _save_file(tmp_path / "file", 4, {"model": {}, "payload": _RunsCode()})
    newest = checkpoint.save(tmp_path / "dir", 4, _state(4))
    import pickle

    (newest / ".metadata").write_bytes(pickle.dumps(_RunsCode()))
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(ValueError, match="refused to load"):
            checkpoint.load(path)
        assert checkpoint.load_latest(tmp_path / "file") is None
        with pytest.raises(ValueError, match=r"wrong size|checksum mismatch"):
            checkpoint.load(newest)
        assert checkpoint.load_latest(tmp_path / "dir") is None
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "PWNED").exists()


def test_checkpoint_files_of_format_2_still_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _save_file(tmp_path, 4, _state(4))
    newest = _save_file(tmp_path, 8, _state(8))
    assert checkpoint.load_latest(tmp_path)["model"]["w"][0] == 8  # type: ignore[index]
    newest.write_bytes(newest.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="ulframe.train.checkpoint"):
        state = checkpoint.load_latest(tmp_path)
    assert state is not None and state["samples_seen"] == 4
    assert "ckpt-000000000008.pt: checksum mismatch" in caplog.text
    (tmp_path / "ckpt-000000000004.json").unlink()
    with pytest.raises(ValueError, match="no checksum file"):
        checkpoint.load(tmp_path / "ckpt-000000000004.pt")
    # a directory and a file at the same count: the directory is the newer format, read first
    checkpoint.save(tmp_path, 8, _state(9))
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)][-2:] == [
        "ckpt-000000000008.pt", "ckpt-000000000008",
    ]  # fmt: skip


def test_a_torn_save_is_never_read_and_is_cleaned(tmp_path: Path) -> None:
    """A kill during a save leaves `ckpt-N.tmp` (never listed; removed before the next run
    saves); a kill between the two renames of a re-save leaves `ckpt-N.old`, put back."""
    checkpoint.save(tmp_path, 4, _state(4))
    torn = tmp_path / "ckpt-000000000008.tmp"
    torn.mkdir()
    (torn / "__0_0.distcp").write_bytes(b"half")
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt-000000000004"]
    (tmp_path / "ckpt-000000000004").rename(tmp_path / "ckpt-000000000004.old")
    checkpoint.remove_partial(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000000004"]
    assert checkpoint.load_latest(tmp_path)["samples_seen"] == 4  # type: ignore[index]


def test_a_non_finite_state_never_replaces_a_checkpoint(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, 4, _state(4))
    bad = {"model": {"w": torch.full((3,), float("nan"))}, "samples_seen": 4, "stage": "s"}
    checkpoint.save(tmp_path, 4, bad)
    assert torch.equal(checkpoint.load_latest(tmp_path)["model"]["w"], torch.full((3,), 4.0))  # type: ignore[index]
    checkpoint.save(tmp_path, 8, bad)
    assert checkpoint.load_latest(tmp_path)["samples_seen"] == 4  # type: ignore[index]
    assert checkpoint.newest_finite(tmp_path).name == "ckpt-000000000004"  # type: ignore[union-attr]


def test_a_background_save_returns_at_once_and_the_previous_stays_until_it_lands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`background=True`: the call returns while the files are written (here held back); until
    the checkpoint is complete the previous one is the newest, and changing the tensors after
    the call does not change what is written (they were copied)."""
    import threading

    checkpoint.save(tmp_path, 4, _state(4))
    release = threading.Event()
    complete = checkpoint._complete

    def held(*args: object) -> None:
        assert release.wait(30)
        complete(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(checkpoint, "_complete", held)
    state = _state(8)
    saving = checkpoint.write(tmp_path, 8, state, background=True)
    state["model"]["w"].fill_(-1.0)  # type: ignore[index]  (the next step's update)
    assert not saving.done()
    assert checkpoint.load_latest(tmp_path)["samples_seen"] == 4  # type: ignore[index]
    release.set()
    assert saving.wait() == tmp_path / "ckpt-000000000008"
    latest = checkpoint.load_latest(tmp_path)
    assert latest is not None and torch.equal(latest["model"]["w"], torch.full((3,), 8.0))


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
    newest = ckpts / "ckpt-000000000008" / "__0_0.distcp"
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
    assert checkpoint.checkpoint_dir(stage_dir, 1, 2) == stage_dir / "checkpoints"
    # Format <= 2 under several processes: rank 0's folder when `checkpoints/` has none.
    _save_file(stage_dir / "checkpoints" / "rank0", 4, _state(4))
    assert checkpoint.checkpoint_dir(stage_dir) == stage_dir / "checkpoints" / "rank0"
    assert checkpoint.stage_checkpoints(tmp_path) == {"stage1": stage_dir / "checkpoints" / "rank0"}
    checkpoint.save(stage_dir / "checkpoints", 4, _state(4))
    assert checkpoint.checkpoint_dir(stage_dir) == stage_dir / "checkpoints"
    # what a resume may use: every directory, and the files its own world size wrote
    assert [p.name for p in checkpoint.resume_candidates(stage_dir, 0, 2)] == [
        "ckpt-000000000004.pt", "ckpt-000000000004",
    ]  # fmt: skip
    assert [p.name for p in checkpoint.resume_candidates(stage_dir, 0, 1)] == ["ckpt-000000000004"]


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


def test_checkpoint_files_of_another_number_of_processes_are_refused_not_restarted(
    tmp_path: Path,
) -> None:
    """Files of format <= 2 hold one rank's loader position each and do not reshard: a stage
    never starts from 0 beside another world size's (that work would be lost). 2 processes'
    under 1, 1's under 2, 4's under 2 are one line each; directories never are."""
    from ulframe.errors import UserError

    two, one = tmp_path / "two" / "checkpoints", tmp_path / "one" / "checkpoints"
    for rank in (0, 1):
        _save_file(two / f"rank{rank}", 8, {"samples_seen": 8})
    _save_file(one, 8, {"samples_seen": 8})
    with pytest.raises(UserError) as refused:
        checkpoint.check_world_size(two, 1)
    assert str(refused.value) == (
        f"{two} holds checkpoints of an older ulframe written by 2 process(es), this run has 1: "
        "resume with --nproc 2 (files of that format are not resharded to another number of "
        "processes); nothing was changed"
    )
    with pytest.raises(UserError, match=r"by 1 process\(es\), this run has 2: resume with one"):
        checkpoint.check_world_size(one, 2)
    checkpoint.check_world_size(two, 2)  # its own world size: resumed, not refused
    checkpoint.check_world_size(one, 1)
    checkpoint.check_world_size(tmp_path / "none" / "checkpoints", 2)  # nothing written yet
    # only rank 0 saved before a kill (a first save cut short): a restart of 2 is not refused
    _save_file(tmp_path / "cut" / "checkpoints" / "rank0", 4, {"samples_seen": 4})
    checkpoint.check_world_size(tmp_path / "cut" / "checkpoints", 2)
    four = tmp_path / "four" / "checkpoints"
    for rank in range(4):
        _save_file(four / f"rank{rank}", 8, {"samples_seen": 8})
    with pytest.raises(
        UserError, match=r"by 4 process\(es\), this run has 2: resume with --nproc 4"
    ):
        checkpoint.check_world_size(four, 2)
    dirs = tmp_path / "dirs" / "checkpoints"
    checkpoint.save(dirs, 8, {"samples_seen": 8})
    for world_size in (1, 2, 4):
        checkpoint.check_world_size(dirs, world_size)
