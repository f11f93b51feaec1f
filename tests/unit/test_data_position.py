"""The training loader's global sample stream (ulframe.data.pipeline): one sequence of positions
for every world size, resumable under another number of processes (docs/architecture.md,
"Multi-process training").

The expected streams are computed here from numpy's seeded permutations and `shard_indices`
(what the per-rank sampler visited before the stream was global), not from the sampler.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest
import torch

from ulframe.data.pipeline import (
    PipelineLoader,
    build_loader,
    merge_positions,
    sample_rng,
    shard_indices,
)

SEED = 3


class Numbers:
    """A fake source: item i decodes to label i and an x that records the augmentation draw
    (`sample_rng`, seeded per (seed, epoch, item)); items in ``bad`` are unreadable."""

    def __init__(self, n: int, bad: frozenset[int] = frozenset()) -> None:
        self.items = list(range(n))
        self.bad = bad

    def decode(self, item: int) -> dict[str, Any] | None:
        if item in self.bad:
            return None
        return {"x": torch.full((1, 1, 1), float(sample_rng().uniform(-1, 1))), "label": item}


def draws(keys: list[tuple[int, int]]) -> torch.Tensor:
    """The augmentation draws `Numbers` records for (epoch, item) keys, float32."""
    values = [np.random.default_rng((SEED, e, i)).uniform(-1, 1) for e, i in keys]
    return torch.tensor(values, dtype=torch.float32)


def stream(n: int, start: int, stop: int) -> list[tuple[int, int]]:
    """(epoch, item) at global positions [start, stop): epoch e's seeded permutation, in turn."""
    return [
        (p // n, int(np.random.default_rng((SEED, p // n)).permutation(n)[p % n]))
        for p in range(start, stop)
    ]


def loader(n: int, batch: int, rank: int = 0, world: int = 1, **kwargs: Any) -> PipelineLoader:
    source = Numbers(n, kwargs.pop("bad", frozenset()))
    return build_loader(
        source, batch_size=batch, rank=rank, world_size=world, seed=SEED, prefetch=0, **kwargs
    )


def labels(batches: list[dict[str, torch.Tensor]]) -> list[list[int]]:
    return [batch["label"].tolist() for batch in batches]


def flat(lists: Iterable[list[int]]) -> list[int]:
    return list(itertools.chain.from_iterable(lists))


def take(it: Any, count: int) -> list[dict[str, torch.Tensor]]:
    return list(itertools.islice(it, count))


def test_one_process_streams_the_epochs_permutations_as_before() -> None:
    n, batch, steps = 10, 4, 8  # 32 examples: into the fourth epoch, boundaries mid-batch
    got = take(iter(loader(n, batch)), steps)
    before = np.concatenate([shard_indices(n, epoch=e, seed=SEED) for e in range(4)])
    assert flat(labels(got)) == before[: batch * steps].tolist()
    # The augmentation of each example is drawn from (seed, epoch, item): unchanged too.
    assert torch.equal(torch.cat([b["x"].flatten() for b in got]), draws(stream(n, 0, 32)))


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_stream_as_before_when_the_world_size_divides_the_items(world: int) -> None:
    n, steps = 12, 9  # 18 examples per rank: three epochs under W = 2, six under W = 4
    for rank in range(world):
        got = flat(labels(take(iter(loader(n, 2, rank, world)), steps)))
        per_epoch = [
            shard_indices(n, epoch=e, seed=SEED, rank=rank, world_size=world) for e in range(6)
        ]
        assert got == np.concatenate(per_epoch)[: 2 * steps].tolist()


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rank_batches_together_are_the_global_batch_across_epochs(world: int) -> None:
    n, global_batch, steps = 13, 12, 5  # 13 % W != 0 for W > 1; epoch boundaries at 13, 26, 39
    per_rank = [
        labels(take(iter(loader(n, global_batch // world, r, world)), steps)) for r in range(world)
    ]
    for k in range(steps):
        expected = stream(n, k * global_batch, (k + 1) * global_batch)
        for r in range(world):  # rank r holds positions kB + r, kB + r + W, ...
            assert per_rank[r][k] == [item for _, item in expected[r::world]], (k, r)


def saved_under(
    world: int, n: int, global_batch: int, steps: int, **kwargs: Any
) -> list[dict[str, Any]]:
    """Every rank's state after `steps` batches, through torch.save/load(weights_only=True)."""
    states = []
    for rank in range(world):
        source = loader(n, global_batch // world, rank, world, **kwargs)
        take(iter(source), steps)
        buffer = io.BytesIO()
        torch.save(source.state_dict(), buffer)
        buffer.seek(0)
        states.append(torch.load(buffer, weights_only=True))
    return states


@pytest.mark.parametrize("new_world", [1, 3, 4])
def test_a_run_saved_by_two_ranks_resumes_under_another_world_size(new_world: int) -> None:
    n, global_batch, saved_steps, steps = 13, 12, 3, 3  # resumes at 36, in epoch 2
    states = saved_under(2, n, global_batch, saved_steps)
    positions = [PipelineLoader.position_of(state) for state in states]
    assert positions == [36, 36]
    fresh = loader(n, global_batch // new_world, 0, new_world)
    assert [fresh.global_position(state, r, 2) for r, state in enumerate(states)] == positions
    assert merge_positions(positions) == (36, 0)

    per_rank = []
    for rank in range(new_world):
        resumed = loader(n, global_batch // new_world, rank, new_world)
        resumed.seek(36)
        got = take(iter(resumed), steps)
        per_rank.append(labels(got))
        assert resumed.skipped == 0
        # The epoch of each position keys its augmentation, as in the uninterrupted stream.
        keys = stream(n, 36, 36 + steps * global_batch)[rank::new_world]
        assert torch.equal(torch.cat([b["x"].flatten() for b in got]), draws(keys))
    for k in range(steps):
        expected = stream(n, 36 + k * global_batch, 36 + (k + 1) * global_batch)
        together = sorted(flat(batches[k] for batches in per_rank))
        assert together == sorted(item for _, item in expected), k


def test_seek_replaces_a_loaded_state_and_restarts_the_counters() -> None:
    n, bad = 13, frozenset({5})
    saved = loader(n, 4, bad=bad)
    saved_batches = iter(saved)
    take(saved_batches, 4)
    assert saved.skipped == 1  # item 5 among the first 16 positions
    resumed = loader(n, 4, bad=bad)
    resumed.load_state_dict(saved.state_dict())
    resumed.seek(20)  # the last call wins
    after = [item for _, item in stream(n, 20, 25)]
    assert 5 in after  # the batch is positions 20 .. 24 but item 5
    assert labels(take(iter(resumed), 1)) == [[item for item in after if item not in bad][:4]]
    assert resumed.skipped == 1 and resumed.unreadable == 1
    resumed.seek(20)
    resumed.load_state_dict(saved.state_dict())  # this time the state wins
    assert labels(take(iter(resumed), 1)) == labels(take(saved_batches, 1))

    early = loader(n, 4)
    early.state_dict()  # makes the iterator that the next iter() returns: seek resets it too
    early.seek(20)
    assert labels(take(iter(early), 1)) == [[item for _, item in stream(n, 20, 24)]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_same_world_size_resumes_exactly_past_an_unreadable_item(num_workers: int) -> None:
    n, bad, dropped = 11, frozenset({4}), 0
    for rank in range(2):
        source = loader(n, 3, rank, 2, bad=bad, num_workers=num_workers)
        it = iter(source)
        taken = take(it, 4)  # 12 examples of this rank, into epoch 2
        state = source.state_dict()
        expected = take(it, 4)
        resumed = loader(n, 3, rank, 2, bad=bad, num_workers=num_workers)
        resumed.load_state_dict(state)
        assert labels(take(iter(resumed), 4)) == labels(expected)
        # It took positions rank, rank + 2, ..., dropping the unreadable ones it met.
        mine = [item for _, item in stream(n, 0, 60)[rank::2]]
        readable = [i for i, item in enumerate(mine) if item not in bad]
        assert flat(labels(taken)) == [mine[i] for i in readable[:12]]
        assert PipelineLoader.position_of(state) == 2 * (readable[11] + 1)
        dropped += readable[11] + 1 - 12
    assert dropped > 0  # the ranks did meet the unreadable item


def test_a_state_of_per_rank_epochs_loads() -> None:
    n, world, rank = 13, 2, 1
    current = loader(n, 2, rank, world)
    state = current.state_dict()
    legacy = replace_sampler(state, {"epoch": 2, "offset": 3})
    assert current.global_position(legacy, rank, world) == 2 * 13 + 3 * 2
    with pytest.raises(ValueError, match="records no rank"):
        PipelineLoader.position_of(legacy)
    resumed = loader(n, 2, rank, world)
    resumed.load_state_dict(legacy)
    # Its next item is the one the per-rank sampler would have taken: rank 1's 4th of epoch 2.
    old_shard = shard_indices(n, epoch=2, seed=SEED, rank=rank, world_size=world)
    got = labels(take(iter(resumed), 2))
    assert got[0][0] == old_shard[3]
    position = 2 * 13 + 3 * 2 + rank
    assert flat(got) == [item for _, item in stream(n, position, position + 8)[::world]]

    # At the end of its shard (6 items of 13 for rank 1 of 2), its next item opened epoch 3.
    used_up = replace_sampler(state, {"epoch": 2, "offset": 6})
    assert current.global_position(used_up, rank, world) == 3 * 13
    resumed = loader(n, 2, rank, world)
    resumed.load_state_dict(used_up)
    next_shard = shard_indices(n, epoch=3, seed=SEED, rank=rank, world_size=world)
    assert labels(take(iter(resumed), 1)) == [next_shard[:2].tolist()]


def replace_sampler(state: Any, sampler: dict[str, int]) -> Any:
    """`state` with its sampler part ({"position", ...}) replaced by `sampler`."""
    if isinstance(state, dict):
        if "position" in state:
            return sampler
        return {key: replace_sampler(value, sampler) for key, value in state.items()}
    return state


def test_a_state_resumes_only_its_own_rank_and_world_size() -> None:
    state = saved_under(2, 13, 4, 1)[1]
    with pytest.raises(ValueError, match="rank 1 of 2 cannot resume rank 1 of 3"):
        loader(13, 4, 1, 3).load_state_dict(state)
    with pytest.raises(ValueError, match="rank 1 of 2 read as rank 0 of 2"):
        loader(13, 4).global_position(state, 0, 2)
    with pytest.raises(ValueError, match="holds no sampler position"):
        loader(13, 4).load_state_dict({"num_yielded": 0})


def test_merge_positions_resumes_at_the_furthest_rank() -> None:
    # W = 3: rank 0 dropped one unreadable item more than rank 1, rank 2 two more (W positions
    # further on each); untaken below 18: rank 0's position 15, rank 1's 13 and 16.
    assert merge_positions([15, 12, 18]) == (18, 3)
    assert merge_positions([24, 24]) == (24, 0)
    assert merge_positions([7]) == (7, 0)
    rng = np.random.default_rng(0)
    for world in (2, 3, 4):  # against counting: in a run begun at a seek to `start` (< W),
        for _ in range(20):  # rank r took start + r, + W, ... below positions[r] + r
            start = int(rng.integers(world))
            positions = [int(p) for p in start + world * rng.integers(0, 8, world)]
            taken = {p for r, g in enumerate(positions) for p in range(start + r, g + r, world)}
            resume = max(positions)
            assert merge_positions(positions) == (resume, len(set(range(start, resume)) - taken))
    with pytest.raises(ValueError, match="one global position >= 0 per rank"):
        merge_positions([])
    with pytest.raises(ValueError, match="got -1"):
        loader(5, 1).seek(-1)
