"""Multi-process training: the launcher, the global batch, restore agreement, a 2-process run.

A 2-process run computes what a 1-process run with the same global batch computes
(docs/architecture.md, "Multi-process training"): the ranks' batches are interleaved rows of the
1-process batch, and `BatchNoise` gives every row the noise and diffusion time it gets in one
process. Tested here: the rows (data order included, across epochs and a resume), the noise
rows, identical weights on every rank, the parameters of a 1-process run within float32
tolerance, and one record per logged step.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ulframe.data.pipeline import build_loader
from ulframe.train import checkpoint, distributed
from ulframe.train.distributed import World
from ulframe.train.state import newest_agreed

RunCli = Callable[..., subprocess.CompletedProcess[str]]


class _Numbers:
    """A Source whose example i is the number i (the engine never looks inside items)."""

    def __init__(self, n: int) -> None:
        self.items = list(range(n))

    def decode(self, item: int) -> dict[str, Any]:
        return {"x": torch.full((1, 2, 2), float(item)), "label": item}


def _labels(loader: Any, steps: int) -> list[list[int]]:
    it = iter(loader)
    return [next(it)["label"].tolist() for _ in range(steps)]


def test_two_ranks_together_see_the_global_batch_of_one() -> None:
    source, steps = _Numbers(24), 10  # 24 items in batches of 4: an epoch boundary at step 6
    one = _labels(build_loader(source, batch_size=4, seed=3, prefetch=0), steps)
    ranks = [
        _labels(build_loader(source, batch_size=2, rank=r, world_size=2, seed=3, prefetch=0), steps)
        for r in (0, 1)
    ]
    for step in range(steps):
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(one[step]), step

    # Resumed from a loader position, each rank goes on with the same examples.
    loader = build_loader(source, batch_size=2, rank=1, world_size=2, seed=3, prefetch=0)
    it = iter(loader)
    for _ in range(4):
        next(it)
    state = loader.state_dict()
    again = build_loader(source, batch_size=2, rank=1, world_size=2, seed=3, prefetch=0)
    again.load_state_dict(state)
    assert _labels(again, steps - 4) == ranks[1][4:]


def test_batch_noise_rows_of_two_ranks_interleave_to_the_rows_of_one() -> None:
    from ulframe.diffusion import BatchNoise

    def draws(rank: int, world: int) -> list[torch.Tensor]:
        noise = BatchNoise(torch.Generator().manual_seed(7), rank, world)
        b = 6 // world
        return [
            noise.randn((b, 3), torch.device("cpu")),
            noise.antithetic_t(b, torch.device("cpu")),
            noise.rand((b,), torch.device("cpu")),
        ]

    one = draws(0, 1)
    ranks = [draws(r, 2) for r in (0, 1)]
    for whole, part0, part1 in zip(one, *ranks, strict=True):
        interleaved = torch.stack([part0, part1], 1).flatten(0, 1)  # rows 0, 1, 2, ... again
        assert torch.equal(interleaved, whole)


def test_restore_steps_back_to_a_checkpoint_every_rank_has(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This rank has 4 and 8; another rank lost its 8 (killed mid-save): both resume at 4."""
    for n in (4, 8):
        checkpoint.save(tmp_path, n, {"samples_seen": n}, keep=5)
    other_rank = {"newest": 4}

    def min_max(value: int, world: World) -> tuple[int, int]:
        return min(value, other_rank["newest"]), max(value, other_rank["newest"])

    monkeypatch.setattr(distributed, "min_max_over_ranks", min_max)
    world = World(0, 2, 0, torch.device("cpu"))
    path = newest_agreed(checkpoint.list_checkpoints(tmp_path), world)
    assert path is not None and path.name == "ckpt-000000000004"
    other_rank["newest"] = -1  # the other rank has none: both start from scratch
    assert newest_agreed(checkpoint.list_checkpoints(tmp_path), world) is None


def test_launch_argv_is_torchrun() -> None:
    argv = distributed.launch_argv(2, 3, ["run", "gin/quickstart.gin"], signals=["SIGUSR1"])
    assert argv[1:] == [
        "-m", "torch.distributed.run", "--standalone", "--signals-to-handle", "SIGUSR1",
        "--nproc-per-node", "2", "--max-restarts", "3", "-m", "ulframe", "run",
        "gin/quickstart.gin",
    ]  # fmt: skip


def _train_rows(workdir: Path) -> dict[int, float]:
    """samples_seen -> the logged training loss, nats per example (one row per step)."""
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["samples_seen"]: r["loss_nats"] for r in rows if r["kind"] == "train"}


def _cut_at(workdir: Path, samples: int, copy_to: Path) -> Path:
    """A copy of finished run `workdir` as if it had been stopped at its checkpoint at
    `samples`: the later checkpoints and DONE.json removed."""
    shutil.copytree(workdir, copy_to)
    stage_dir = copy_to / "stages" / "stage1"
    (stage_dir / "DONE.json").unlink()
    for path in checkpoint.list_checkpoints(stage_dir / "checkpoints"):
        if checkpoint.samples_of(path) > samples:
            shutil.rmtree(path)
    return copy_to


@pytest.mark.slow
def test_checkpoints_reshard_to_another_number_of_processes(
    run_cli: RunCli, tmp_path: Path, tiny_run: list[str]
) -> None:
    """One run in 1 process; the same run in 2 FSDP2 processes (async checkpoints), whose
    checkpoint at 8 samples resumes in 1 process and in 4 DDP processes; the 1-process run's checkpoint resumes in 2
    FSDP2 processes. Each (global batch 4, no dropout) logs the uninterrupted run's losses
    (within 1e-5, relative), and the 2-process run ends with its parameters."""
    # Adam's eps at 1e-4 rather than 1e-8: Adam turns any gradient into about ±lr, float32
    # rounding noise in the near-zero gradients of biases in front of a GroupNorm too (measured
    # with eps 1e-8: 2 of 104 tensors differed by 5e-4 after two steps, the rest by < 1e-8).
    base = [
        *tiny_run, "--gin_param", "optimizers.AdamW.eps = 1e-4",
        "--gin_param", "TRAIN_SAMPLES = 16", "--gin_param", "stage1/TrainSettings.keep_checkpoints = 8",
    ]  # fmt: skip
    fsdp = ["--gin_param", "stage1/TrainSettings.parallelism = 'fsdp'"]

    def run(workdir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        done = run_cli(
            "run", "gin/quickstart.gin", "--workdir", workdir, *base, *extra, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    one = tmp_path / "one"
    run(one)
    expected = _train_rows(one)
    assert sorted(expected) == [4, 8, 12, 16]

    two = tmp_path / "two"  # (its checkpoints written in the background)
    background = ["--gin_param", "stage1/TrainSettings.async_checkpoint = True"]
    done = run(two, *fsdp, *background, "--nproc", "2")
    assert "launching 2 processes" in done.stderr
    assert done.stdout.count("[stage1] done") == 1  # console: rank 0 only
    newest = checkpoint.checkpoint_dir(two / "stages" / "stage1") / "ckpt-000000000016"
    assert sorted(p.name for p in newest.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    records = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records if r["kind"] != "train"] == [
        ("eval", 1),
        ("eval", 2),
        ("eval", 3),
        ("eval", 4),
        ("data", 4),
    ]  # fmt: skip  (the last row: the unreadable files skipped, summed over ranks)
    a = checkpoint.load(checkpoint.checkpoint_dir(one / "stages" / "stage1") / "ckpt-000000000016")
    b = checkpoint.load(newest)  # (FSDP2 shards, read whole by one process)
    for part in ("model", "ema"):
        worst = max(float((a[part][k] - b[part][k]).abs().max()) for k in a[part])
        assert worst < 1e-6, (part, worst)

    resumed = {
        "2 FSDP2 -> 1": (_cut_at(two, 8, tmp_path / "2to1"), []),
        "2 FSDP2 -> 4 DDP": (_cut_at(two, 8, tmp_path / "2to4"), ["--nproc", "4"]),
        "1 -> 2 FSDP2": (_cut_at(one, 8, tmp_path / "1to2"), [*fsdp, "--nproc", "2"]),
    }
    for name, (workdir, extra) in resumed.items():
        done = run(workdir, *extra, "--allow-config-change")
        assert "resumed at 8 samples" in done.stderr, name
        rows = _train_rows(workdir)
        assert sorted(rows) == [4, 8, 12, 16], name
        for samples in (12, 16):  # (relative: the loss is thousands of nats per example)
            gap = abs(rows[samples] / expected[samples] - 1)
            assert gap < 1e-5, (name, samples, rows, expected)
