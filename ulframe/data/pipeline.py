"""The data engine: sources in, resumable batches out, on ``torchdata.nodes``.

A dataset plugin hands the engine a :class:`Source`: a plain, picklable object with a sequence
of cheap ``items`` (file paths, crop parameters) and a ``decode(item)`` that turns one item into
an example ``{"x": float32 (C, *S) in [-1, 1], "label": int}`` (``S`` the spatial axes: (H, W)
for images, (T, H, W) for videos), or ``None`` when the item is unreadable. The engine owns
everything else, as one chain of nodes::

    _ShardSampler        (seed, epoch, index) triples at this rank's positions r, r + W, ...
                         of one global stream (a seeded permutation per epoch, one epoch after
                         another when ``repeat``; one epoch's pass without)
    ParallelMapper       _DecodeTask: source.decode(source.items[index]) in worker threads
                         (or processes), in order, with the per-sample RNG of sample_rng()
    _DropUnreadable      drops the ``None`` examples and counts them
    Batcher + Mapper     lists of examples -> {"x": (B, C, *S), "label": (B,)}
    Prefetcher           a background thread keeps ``prefetch`` batches ready
    PipelineLoader       a torchdata Loader: state_dict() / load_state_dict() resume exactly;
                         position_of() / seek() resume under another world size

Only the ``Source`` and the engine's plain functions reach worker threads or processes; the
gin-configured dataset object stays in the main process: gin-configured code never runs inside
data-loader workers (docs/architecture.md, "Rules").
"""

from __future__ import annotations

import logging
import math
import pickle
import threading
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, Protocol, cast, runtime_checkable

import numpy as np
import torch
import torchdata.nodes as tn

from ulframe.errors import ContractError, DataError

logger = logging.getLogger(__name__)

SPLITS = ("train", "eval")
"""The splits a :class:`Dataset` serves through ``Dataset.source(split)``."""

MAX_LEADING_FAILURES = 64
"""How many unreadable items, before the first readable one, prove a dataset unusable."""

DEFAULT_MP_CONTEXT = "spawn"
"""Start method for ``method="process"`` workers. Not "fork": the main process already runs
threads (prefetcher, torch's pools) when the workers start, and forking a threaded process can
deadlock. "spawn" starts a clean interpreter that unpickles the Source."""

Example = dict[str, Any]
Batch = dict[str, torch.Tensor]


class EmptyDatasetError(DataError, ValueError):
    """A source has no items, or none of the first items tried can be decoded.

    Dataset plugins raise it too, naming the gin parameter that chooses the data.
    """


@runtime_checkable
class Source(Protocol):
    """What a dataset plugin hands the engine; pickled into worker processes.

    Attributes:
        items: cheap, picklable descriptors of the examples (paths, crop boxes); the engine
            shuffles and shards their indices and never looks inside them.

    ``decode(item)`` returns ``{"x": torch.float32 (C, *S) in [-1, 1], "label": int}`` (images:
    S = (H, W); videos: S = (T, H, W); every example of a source has the same shape), or
    ``None`` when the item cannot be read (and logs why at WARNING, naming the file). Random
    augmentation inside ``decode`` draws from :func:`sample_rng` so that it is reproducible.

    A source may also carry ``hint: str``, one sentence telling the user which gin parameter to
    change; the engine appends it to :class:`EmptyDatasetError` messages.
    """

    items: Sequence[Any]

    def decode(self, item: Any) -> Example | None: ...


@runtime_checkable
class Dataset(Protocol):
    """The ``ulframe.datasets`` extension point.

    Attributes:
        num_classes: number of class labels; labels are ``0 .. num_classes - 1``.

    ``source(split)`` builds the :class:`Source` for ``split`` in :data:`SPLITS`. It runs in the
    main process; the Source it returns must be picklable and gin-free.
    """

    num_classes: int

    def source(self, split: str) -> Source: ...


# ---- per-sample randomness ---------------------------------------------------------------------

_thread_state = threading.local()


def sample_rng() -> np.random.Generator:
    """The random generator for augmentation inside ``Source.decode``.

    While the engine decodes an item it is seeded from (seed, epoch, item index), so the same
    item in the same epoch gets the same augmentation whatever the worker count, method or
    resume point. Outside the engine (a plain ``decode`` call) it is a fresh, unseeded generator.
    """
    rng = getattr(_thread_state, "rng", None)
    return rng if rng is not None else np.random.default_rng()


class _Unreadable(NamedTuple):
    """What `_DecodeTask` returns for an item `decode` could not read."""

    position: int


class _DecodeTask:
    """The map function run by the workers: picklable, holds only the Source."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def __call__(self, key: tuple[int, int, int]) -> Example | _Unreadable:
        seed, epoch, index = key
        _thread_state.rng = np.random.default_rng((seed, epoch, index))
        try:
            example = self.source.decode(self.source.items[index])
        finally:
            _thread_state.rng = None
        return _Unreadable(index) if example is None else example


def _hint(source: Source) -> str:
    hint = getattr(source, "hint", "")
    return f" {hint}" if hint else ""


EXPECTED_X = "a float32 tensor C×H×W (video: C×T×H×W) in [-1, 1]"
RANGE_SLACK = 1e-3
"""How far past [-1, 1] a value may stray (rounding of a normalisation) before it is refused."""
CHANNEL_LIMIT = 4
"""A first axis longer than this before a last axis of 1, 3 or 4: channels last."""


def shown(value: Any) -> str:
    """A value as one-line messages show it (type, shape, dtype): ``numpy.ndarray (16, 16, 3) uint8``."""
    if isinstance(value, torch.Tensor):
        return f"torch.Tensor {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    name = type(value).__qualname__
    module = type(value).__module__.split(".")[0]
    name = name if module == "builtins" else f"{module}.{name}"
    return " ".join(str(p) for p in (name, shape and tuple(shape), dtype) if p is not None)


def _is_label(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.is_floating_point() and value.dtype != torch.bool
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def example_problem(
    example: Any, num_classes: int | None = None, labels_only: bool = False
) -> str | None:
    """What is wrong with one decoded example, in one line (None: nothing).

    An example is ``{"x": float32 (C, H, W) or (C, T, H, W) in [-1, 1], "label": int}``;
    with `num_classes` the label is also checked to be in ``0 .. max(num_classes, 1) - 1``.
    `labels_only` checks the label alone.
    """
    if not isinstance(example, dict) or "x" not in example:
        return f"returned {shown(example)}; expected a dict {{'x': {EXPECTED_X}, 'label': int}}"
    if not labels_only:
        x = example["x"]
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.dim() not in (3, 4):
            return f"returned {shown(x)}; expected {EXPECTED_X}"
        if x.shape[-1] in (1, 3, 4) and x.shape[0] > CHANNEL_LIMIT:
            return f"returned {shown(x)}, channels last; expected {EXPECTED_X}"
        if not bool(torch.isfinite(x).all()):
            return f"returned {shown(x)} holding nan or inf; expected {EXPECTED_X}"
        low, high = float(x.min()), float(x.max())
        if low < -1 - RANGE_SLACK or high > 1 + RANGE_SLACK:
            return f"returned {shown(x)} in [{low:g}, {high:g}]; expected {EXPECTED_X}"
    label = example.get("label")
    if not _is_label(label):
        return f"returned label {shown(label)} {label!r}; expected an int"
    classes = max(num_classes or 0, 1)
    if num_classes is not None and not 0 <= int(cast(Any, label)) < classes:
        return f"returned label {int(cast(Any, label))}; expected 0 <= label < {classes}"
    return None


def check_example(example: Example, source: Source, num_classes: int | None = None) -> Example:
    """`example` if it is well formed, else `ContractError` naming the Source by its class
    (the engine names the dataset plugin instead, `ulframe.registry.naming_plugins`), what it
    returned and what is expected (one line)."""
    problem = example_problem(example, num_classes)
    if problem is not None:
        klass = type(source)
        who = f"the Source {klass.__qualname__} ({klass.__module__})"
        raise ContractError(who, f": decode {problem}", "datasets", source)
    return example


def readable_examples(
    source: Source, count: int = 1, max_tries: int = MAX_LEADING_FAILURES
) -> list[Example]:
    """The first `count` readable examples of ``source`` among its first `max_tries` items, in
    item order, decoded as the loader decodes them (`_DecodeTask`: `sample_rng()` seeded per
    item, seed 0, epoch 0) and not checked; fewer (or none) when fewer are readable."""
    decode = _DecodeTask(source)
    examples: list[Example] = []
    for index in range(min(max_tries, len(source.items))):
        if len(examples) == count:
            break
        example = decode((0, 0, index))
        if not isinstance(example, _Unreadable):
            examples.append(example)
    return examples


def first_readable(source: Source, max_tries: int = MAX_LEADING_FAILURES) -> Example:
    """The first readable example of ``source`` (`readable_examples`), not checked.

    Raises:
        EmptyDatasetError: no items, or the first ``max_tries`` items are all unreadable.
    """
    if len(source.items) == 0:
        raise EmptyDatasetError(f"{type(source).__name__} has no items.{_hint(source)}")
    examples = readable_examples(source, 1, max_tries)
    if not examples:
        tries = min(max_tries, len(source.items))
        raise EmptyDatasetError(
            f"{type(source).__name__}: none of the first {tries} items could be decoded "
            f"(the WARNING lines above name them).{_hint(source)}"
        )
    return examples[0]


def first_example(
    source: Source, max_tries: int = MAX_LEADING_FAILURES, num_classes: int | None = None
) -> Example:
    """Decode the first readable item of ``source`` (in item order), for measuring shapes.

    The example is checked (`example_problem`; its label too, given `num_classes`): a dataset
    that returns anything else fails here, naming its Source (the engine: the dataset plugin),
    not deep inside a network.

    Raises:
        EmptyDatasetError: no items, or the first ``max_tries`` items are all unreadable.
        ContractError: the first readable example is not what a Source must return.
    """
    return check_example(first_readable(source, max_tries), source, num_classes)


# ---- the sample stream: shuffling and sharding -------------------------------------------------


def epoch_order(num_items: int, *, epoch: int, seed: int = 0, shuffle: bool = True) -> np.ndarray:
    """The item indices of ``epoch`` in stream order, (num_items,) int64: the permutation seeded
    from (seed, epoch), the same in every process (``arange`` without ``shuffle``)."""
    if shuffle:
        return np.random.default_rng((seed, epoch)).permutation(num_items)
    return np.arange(num_items)


def shard_indices(
    num_items: int,
    *,
    epoch: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
) -> np.ndarray:
    """The item indices ``rank`` visits in one pass over ``epoch`` (``repeat=False``), in order.

    All ranks draw the same `epoch_order` and take every ``world_size``-th entry from position
    ``rank``: within an epoch the ranks' indices are disjoint and together cover every item once.
    Shards differ in length by at most one. In training (``repeat``) the ranks share one stream
    across epochs (`_ShardSampler`), and a rank visits exactly these items in ``epoch`` when
    ``world_size`` divides ``num_items``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}); got {rank}")
    return epoch_order(num_items, epoch=epoch, seed=seed, shuffle=shuffle)[rank::world_size]


class _ShardSampler(tn.BaseNode[tuple[int, int, int]]):
    """Yields (seed, epoch, index) at this rank's positions of the global sample stream.

    The stream (N items) is one sequence for all ranks: position ``i`` is item
    ``epoch_order(N, epoch=e)[i - e N]`` of epoch ``e = i // N``. Rank ``r`` of ``W`` takes
    positions ``r, r + W, r + 2W, ...``, so the union of the ranks' k-th batches of ``b`` is
    stream positions ``[k W b, (k + 1) W b)`` whatever N and W, across epoch boundaries (as long
    as no item is unreadable: a dropped item's rank takes its next position, W further on).
    One process (W = 1) walks the epochs' permutations one after the other.

    With ``repeat`` the stream runs on forever (training). Without it, one epoch per iterator: a
    pass over epoch ``e`` takes the positions below ``(e + 1) N``, `shard_indices`; like
    torchdata's SamplerWrapper, a fresh iterator after a started one moves to the next epoch.

    State (restored in O(1)): ``{"position": p, "epoch": e, "rank": r, "world_size": W}``, with
    ``p`` the stream position this rank takes next and ``e`` its epoch (without ``repeat``: the
    pass's epoch). A state written before the stream was global, ``{"epoch": e, "offset": o}``
    (``o`` items into the rank's shard of epoch ``e``), loads as ``p = e N + o W + r``
    (`legacy_position`): exactly the same stream when W divides N.
    """

    POSITION_KEY = "position"
    EPOCH_KEY = "epoch"
    RANK_KEY = "rank"
    WORLD_SIZE_KEY = "world_size"
    LEGACY_OFFSET_KEY = "offset"

    def __init__(
        self,
        num_items: int,
        *,
        seed: int,
        rank: int,
        world_size: int,
        shuffle: bool,
        repeat: bool,
    ) -> None:
        super().__init__()
        self.num_items = num_items
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.repeat = repeat
        self._position = rank
        self._epoch = 0  # of the pass (repeat: of the last position taken)
        self._started = False
        self._seek: int | None = None
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    @classmethod
    def is_legacy(cls, state: dict[str, Any]) -> bool:
        """Whether `state` is a sampler state of the per-rank epochs ({"epoch", "offset"})."""
        return state.keys() == {cls.EPOCH_KEY, cls.LEGACY_OFFSET_KEY}

    def seek(self, position: int | None) -> None:
        """The next fresh iterator (``reset(None)``) starts at global stream position `position`,
        this rank at ``position + rank``; None: as without a seek."""
        self._seek = position

    def _order_of(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order = epoch_order(
                self.num_items, epoch=epoch, seed=self.seed, shuffle=self.shuffle
            )
            self._order_epoch = epoch
        return self._order

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        if initial_state is not None:
            if self.is_legacy(initial_state):
                self._position = self.rank + legacy_position(
                    initial_state, self.num_items, rank=self.rank, world_size=self.world_size
                )
            else:
                self._position = int(initial_state[self.POSITION_KEY])
            saved_epoch = int(initial_state[self.EPOCH_KEY])
            self._epoch = self._position // self.num_items if self.repeat else saved_epoch
        elif self._seek is not None:
            self._position = self._seek + self.rank
            self._epoch = self._seek // self.num_items
        else:
            if self._started:
                self._epoch += 1
            self._position = self._epoch * self.num_items + self.rank
        self._seek = None
        self._started = False

    def next(self) -> tuple[int, int, int]:
        epoch = self._position // self.num_items if self.repeat else self._epoch
        within = self._position - epoch * self.num_items
        if within >= self.num_items:  # only without repeat: the pass is over
            raise StopIteration()
        index = int(self._order_of(epoch)[within])
        self._epoch = epoch
        self._position += self.world_size
        self._started = True
        return (self.seed, epoch, index)

    def get_state(self) -> dict[str, Any]:
        return {
            self.POSITION_KEY: self._position,
            self.EPOCH_KEY: self._position // self.num_items if self.repeat else self._epoch,
            self.RANK_KEY: self.rank,
            self.WORLD_SIZE_KEY: self.world_size,
        }


def legacy_position(state: dict[str, Any], num_items: int, *, rank: int, world_size: int) -> int:
    """The global stream position of a sampler state of per-rank epochs, ``{"epoch": e,
    "offset": o}`` saved by ``rank`` of ``world_size``: ``e N + o W``, where that rank's next item
    stands in epoch ``e``'s order (``o`` items into its shard, `shard_indices`), or ``(e + 1) N``
    when its shard of epoch ``e`` was used up (the rank's next item opened epoch ``e + 1``).

    Exact when ``world_size`` divides ``num_items`` (N): the old per-rank epochs were then the
    global stream. Otherwise each rank still resumes at the item it would have taken next, but
    the ranks' epochs had drifted apart, so their streams from there on may overlap; resuming
    every rank at `merge_positions` of all the ranks' positions takes no example twice.
    """
    epoch = int(state[_ShardSampler.EPOCH_KEY])
    offset = int(state[_ShardSampler.LEGACY_OFFSET_KEY])
    if offset >= len(range(rank, num_items, world_size)):
        return (epoch + 1) * num_items
    return epoch * num_items + offset * world_size


def _sampler_state(state: Any) -> dict[str, Any] | None:
    """The sampler's part of a nested `PipelineLoader.state_dict()` (None: there is none).

    build_loader's nodes snapshot their sources after every item (torchdata's default
    ``snapshot_frequency=1``), so this part is the position of the batches consumed so far.
    """
    if not isinstance(state, dict):
        return None
    if _ShardSampler.POSITION_KEY in state or _ShardSampler.is_legacy(state):
        return state
    for value in state.values():
        found = _sampler_state(value)
        if found is not None:
            return found
    return None


def merge_positions(positions: Sequence[int]) -> tuple[int, int]:
    """Where a run resumes under any world size, from its ranks' global stream positions.

    Args:
        positions: ``positions[r]`` is old rank r's `PipelineLoader.position_of` its state, one
            entry per rank of the world size W that saved them. Rank r took the positions
            ``positions[r] + r - W, positions[r] + r - 2W, ...`` (down to where its run began).

    Returns:
        ``(resume, skipped)``: ``resume = max(positions)``, so that no example is taken twice;
        ``skipped`` counts the stream positions below ``resume`` that no rank took, 0 unless the
        ranks dropped different numbers of unreadable items. (For legacy states of ranks whose
        epochs had drifted, `legacy_position`, the count is an estimate.)
    """
    if not positions or min(positions) < 0:
        raise ValueError(f"positions must be one global position >= 0 per rank; got {positions}")
    world_size, resume = len(positions), max(positions)
    untaken = (resume - (position + rank) for rank, position in enumerate(positions))
    return resume, sum(-(-gap // world_size) for gap in untaken if gap > 0)


class _DropUnreadable(tn.BaseNode[Example]):
    """Passes decoded examples on, drops the unreadable ones and counts them (part of the
    state): every drop (``skipped``) and the distinct items (``unreadable``)."""

    SOURCE_KEY = "source"
    SKIPPED_KEY = "skipped"
    YIELDED_KEY = "yielded"
    UNREADABLE_KEY = "unreadable"

    def __init__(
        self, source: tn.BaseNode[Example | _Unreadable], *, limit: int, name: str, hint: str
    ) -> None:
        super().__init__()
        self.source = source
        self.limit = limit
        self.name = name
        self.hint = hint
        self.skipped = 0
        self.yielded = 0
        self.unreadable: set[int] = set()

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        if initial_state is not None:
            self.source.reset(initial_state[self.SOURCE_KEY])
            self.skipped = initial_state[self.SKIPPED_KEY]
            self.yielded = initial_state[self.YIELDED_KEY]
            self.unreadable = set(initial_state.get(self.UNREADABLE_KEY, []))
        else:
            self.source.reset()
            self.skipped = 0
            self.yielded = 0
            self.unreadable = set()

    def next(self) -> Example:
        while True:
            example = next(self.source)
            if not isinstance(example, _Unreadable):
                self.yielded += 1
                return example
            self.skipped += 1
            self.unreadable.add(example.position)
            if self.yielded == 0 and self.skipped >= self.limit:
                raise EmptyDatasetError(
                    f"{self.name}: none of the first {self.skipped} items tried could be "
                    f"decoded (the WARNING lines above name them).{self.hint}"
                )
            if math.log10(self.skipped).is_integer():  # 1, 10, 100, ... : a trail, not a flood
                logger.warning("%s: %d unreadable items skipped so far", self.name, self.skipped)

    def get_state(self) -> dict[str, Any]:
        return {
            self.SOURCE_KEY: self.source.state_dict(),
            self.SKIPPED_KEY: self.skipped,
            self.YIELDED_KEY: self.yielded,
            self.UNREADABLE_KEY: sorted(self.unreadable),
        }


def collate(examples: Sequence[Example]) -> Batch:
    """Stack examples key by key: tensors along a new dim 0, ints (labels) into int64.

    Any tensor rank: (C, H, W) images give (B, C, H, W), (C, T, H, W) clips (B, C, T, H, W).
    """
    batch: Batch = {}
    for key, first in examples[0].items():
        values = [example[key] for example in examples]
        if isinstance(first, torch.Tensor):
            batch[key] = torch.stack(values)
        else:
            batch[key] = torch.as_tensor(
                values, dtype=torch.int64 if isinstance(first, int) else None
            )
    return batch


class PipelineLoader(tn.Loader[Batch]):
    """A ``torchdata.nodes.Loader`` of batches that also reports what it skipped.

    ``state_dict()`` / ``load_state_dict()`` resume at exactly the next batch, on the same rank
    of the same world size; the state is plain ints and tensors-free dicts, safe for
    ``torch.save`` / ``weights_only`` loads. Under another world size, a run resumes from the
    global stream position instead (`_ShardSampler`): ``position_of(state)`` of every old rank
    (``global_position`` reads legacy states too), `merge_positions` of those, then
    ``seek(resume)`` on every new rank.
    """

    def __init__(
        self,
        root: tn.BaseNode[Batch],
        *,
        sampler: _ShardSampler,
        filter_node: _DropUnreadable,
        items_per_epoch: int,
    ) -> None:
        super().__init__(root)
        self._sampler = sampler
        self._filter = filter_node
        self.items_per_epoch = items_per_epoch

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The next iterator resumes where `state_dict` (a ``state_dict()`` of a loader over the
        same source, by the same rank of the same world size) left off; replaces a ``seek``.

        Raises:
            ValueError: the state holds no sampler position, or was saved by another rank or
                world size (resume those with ``seek``).
        """
        saved = self._saved_sampler(state_dict)
        if not _ShardSampler.is_legacy(saved):
            by = (int(saved[_ShardSampler.RANK_KEY]), int(saved[_ShardSampler.WORLD_SIZE_KEY]))
            ours = (self._sampler.rank, self._sampler.world_size)
            if by != ours:
                raise ValueError(
                    f"loader state of rank {by[0]} of {by[1]} cannot resume rank {ours[0]} of "
                    f"{ours[1]}; seek() to merge_positions of every old rank's position_of"
                )
        super().load_state_dict(state_dict)  # (the sampler restores it before any seek)

    @staticmethod
    def position_of(state: dict[str, Any]) -> int:
        """The global stream position at which `state` resumes: ``p - rank``, ``p`` the stream
        position its rank takes next (the ranks of a run without unreadable items all give the
        number of samples their global batches took).

        `state` is a ``state_dict()`` of a loader over the same source, of any rank and world
        size; one written before positions were global (``{"epoch", "offset"}``) records no
        rank: read it with `global_position`.

        Raises:
            ValueError: `state` holds no sampler position, or a legacy one.
        """
        saved = PipelineLoader._saved_sampler(state)
        if _ShardSampler.is_legacy(saved):
            raise ValueError(
                "a loader state of per-rank epochs ({'epoch', 'offset'}) records no rank; "
                "read it with global_position(state, rank, world_size)"
            )
        return int(saved[_ShardSampler.POSITION_KEY]) - int(saved[_ShardSampler.RANK_KEY])

    def global_position(self, state: dict[str, Any], rank: int, world_size: int) -> int:
        """`position_of` a `state` saved by `rank` of `world_size`, legacy states included
        (`legacy_position`, with this loader's number of items).

        Raises:
            ValueError: `state` holds no sampler position, or records another rank or world
                size than the ones given.
        """
        saved = self._saved_sampler(state)
        if _ShardSampler.is_legacy(saved):
            return legacy_position(saved, self._sampler.num_items, rank=rank, world_size=world_size)
        by = (int(saved[_ShardSampler.RANK_KEY]), int(saved[_ShardSampler.WORLD_SIZE_KEY]))
        if by != (rank, world_size):
            raise ValueError(
                f"loader state of rank {by[0]} of {by[1]} read as rank {rank} of {world_size}"
            )
        return self.position_of(state)

    def seek(self, position: int) -> None:
        """The next iterator starts at global stream position `position` (this rank takes
        ``position + rank``, then every ``world_size``-th), with fresh counters (``skipped``,
        ``unreadable``); replaces a loaded state. Without ``repeat``: in the pass over epoch
        ``position // N``.

        Raises:
            ValueError: `position` is negative.
        """
        if position < 0:
            raise ValueError(f"position must be >= 0; got {position}")
        self._sampler.seek(position)
        self._next_iter_state_dict = None
        self._iter_for_state_dict = False  # an iterator made for state_dict() is reset too

    @staticmethod
    def _saved_sampler(state: dict[str, Any]) -> dict[str, Any]:
        saved = _sampler_state(state)
        if saved is None:
            raise ValueError(
                f"loader state with keys {sorted(state)} holds no sampler position; "
                "expected a PipelineLoader.state_dict()"
            )
        return saved

    @property
    def skipped(self) -> int:
        """Unreadable items dropped by the current iterator (resumed from state).

        Counted when decoded, so it may include items of the prefetched batches ahead.
        """
        return self._filter.skipped

    @property
    def unreadable(self) -> int:
        """Distinct unreadable items met so far (each counted once, whatever the epochs)."""
        return len(self._filter.unreadable)


def build_loader(
    source: Source,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    repeat: bool = True,
    num_workers: int = 0,
    prefetch: int = 2,
    drop_last: bool = True,
    method: Literal["thread", "process"] = "thread",
    multiprocessing_context: str = DEFAULT_MP_CONTEXT,
) -> PipelineLoader:
    """A resumable loader of ``{"x": (B, C, *S) float32, "label": (B,) int64}`` batches.

    Args:
        source: the items and their decoder (see :class:`Source`).
        batch_size: examples per batch on this rank.
        rank, world_size: this process takes positions rank, rank + world_size, ... of the
            global sample stream (`_ShardSampler`; one pass: :func:`shard_indices`).
        seed: seeds the per-epoch permutation and the per-sample augmentation RNG.
        shuffle: permute the items each epoch (False: item order).
        repeat: epochs follow one another forever, batches flowing across epoch boundaries
            (training); False: one pass per iterator (evaluation).
        num_workers: parallel decoders; 0 decodes in the consuming thread.
        prefetch: batches prepared ahead by a background thread; 0 for none.
        drop_last: drop the final short batch of a pass (only matters when ``repeat`` is False).
        method: "thread" (default; Pillow and PyAV release the GIL while decoding, nothing
            is pickled and workers start instantly) or "process" (for decoders that hold the GIL;
            the Source must be picklable and workers start with ``multiprocessing_context``;
            each spawned worker re-imports torch, ~3 s on a 2-core machine, at every new
            iterator: each eval pass, each resume). torchdata's workers call
            ``torch.set_num_threads(1)``; in thread mode that lowers the default of threads
            started later, not of the training thread that built the loader.
        multiprocessing_context: start method for process workers; see DEFAULT_MP_CONTEXT.

    Ranks may see a different number of examples per pass (shard lengths differ by one, and
    unreadable items are dropped): reduce evaluation sums once at the end, not per batch.

    Raises:
        EmptyDatasetError: now if this rank's shard is empty, or while iterating if the first
            ``MAX_LEADING_FAILURES`` items tried are all unreadable.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if method not in ("thread", "process"):
        raise ValueError(f"method must be 'thread' or 'process'; got {method!r}")
    name = type(source).__name__
    num_items = len(source.items)
    items_per_epoch = len(range(rank, num_items, world_size))
    if items_per_epoch == 0:
        raise EmptyDatasetError(
            f"{name} has {num_items} items: none for rank {rank} of {world_size}.{_hint(source)}"
        )
    if method == "process" and num_workers > 0:
        try:
            pickle.dumps(source)
        except Exception as error:
            raise TypeError(
                f"{name} cannot be pickled for method='process' workers ({error}); "
                "keep gin-configured objects and open files out of the Source, or use "
                "method='thread'."
            ) from error

    sampler = _ShardSampler(
        num_items, seed=seed, rank=rank, world_size=world_size, shuffle=shuffle, repeat=repeat
    )
    node: tn.BaseNode[Any] = tn.ParallelMapper(
        sampler,
        _DecodeTask(source),
        num_workers=num_workers,
        in_order=True,
        method=method,
        multiprocessing_context=multiprocessing_context if method == "process" else None,
    )
    filter_node = _DropUnreadable(
        node, limit=min(MAX_LEADING_FAILURES, items_per_epoch), name=name, hint=_hint(source)
    )
    node = tn.Batcher(filter_node, batch_size=batch_size, drop_last=drop_last)
    node = tn.Mapper(node, collate)
    if prefetch > 0:
        node = tn.Prefetcher(node, prefetch_factor=prefetch)
    logger.info(
        "data: %s, %d items, rank %d of %d sees %d per epoch; batch %d, %d %s workers",
        name,
        num_items,
        rank,
        world_size,
        items_per_epoch,
        batch_size,
        num_workers,
        method,
    )
    return PipelineLoader(
        node, sampler=sampler, filter_node=filter_node, items_per_epoch=items_per_epoch
    )
