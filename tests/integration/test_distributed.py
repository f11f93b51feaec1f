"""Multi-process training: the launcher, the global batch, restore agreement, a 2-process run.

A 2-process run is not bit-identical to a 1-process run with the same global batch, by design
(docs/architecture.md, "Multi-process training"): each rank draws its noise and its antithetic
diffusion times from its own stream. What is equal by construction, and tested here: the set of
examples in every global batch (data order included, across epochs and a resume), identical
weights on every rank, and one record per logged step.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ulframe.data.pipeline import build_loader
from ulframe.train import checkpoint, distributed, loop
from ulframe.train.distributed import World

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
    state = loop._restore(tmp_path, world)
    assert state is not None and state["samples_seen"] == 4
    other_rank["newest"] = -1  # the other rank has none: both start from scratch
    assert loop._restore(tmp_path, world) is None


def test_launch_argv_is_torchrun() -> None:
    argv = distributed.launch_argv(2, 3, ["run", "gin/quickstart.gin"])
    assert argv[1:] == [
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "--max-restarts", "3", "-m", "ulframe", "run", "gin/quickstart.gin",
    ]  # fmt: skip


@pytest.mark.slow
def test_two_process_gloo_run(run_cli: RunCli, tmp_path: Path, tiny_run: list[str]) -> None:
    workdir = tmp_path / "run"
    done = run_cli(
        "run", "gin/quickstart.gin", "--workdir", workdir, *tiny_run, "--nproc", "2",
        timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "launching 2 processes" in done.stderr
    assert done.stdout.count("[stage1] done") == 1  # console: rank 0 only

    ckpts = workdir / "stages" / "stage1" / "checkpoints"
    ranks = [checkpoint.load(ckpts / f"rank{r}" / "ckpt-000000000008.pt") for r in (0, 1)]
    for part in ("model", "ema"):
        assert all(torch.equal(ranks[0][part][k], ranks[1][part][k]) for k in ranks[0][part])
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [
        ("train", 1), ("eval", 1), ("train", 2), ("eval", 2),
    ]  # fmt: skip
    assert (
        json.loads((workdir / "stages" / "stage1" / "DONE.json").read_text())["samples_seen"] == 8
    )
