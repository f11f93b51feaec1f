"""The data engine: sources in, resumable batches out, on ``torchdata.nodes``.

A dataset plugin hands the engine a :class:`Source`: a plain, picklable object with a sequence
of cheap ``items`` (file paths, crop parameters) and a ``decode(item)`` that turns one item into
an example ``{"x": float32 (C, *S) in [-1, 1], "label": int}`` (``S`` the spatial axes: (H, W)
for images, (T, H, W) for videos), or ``None`` when the item is unreadable. The engine owns
everything else, as one chain of nodes::

    _ShardSampler        (seed, epoch, index) triples: a seeded permutation per epoch, this
                         rank's slice of it, epochs repeated forever when ``repeat``
    ParallelMapper       _DecodeTask: source.decode(source.items[index]) in worker threads
                         (or processes), in order, with the per-sample RNG of sample_rng()
    _DropUnreadable      drops the ``None`` examples and counts them
    Batcher + Mapper     lists of examples -> {"x": (B, C, *S), "label": (B,)}
    Prefetcher           a background thread keeps ``prefetch`` batches ready
    PipelineLoader       a torchdata Loader: state_dict() / load_state_dict() resume exactly

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


# ---- sharding and shuffling --------------------------------------------------------------------


def shard_indices(
    num_items: int,
    *,
    epoch: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
) -> np.ndarray:
    """The item indices ``rank`` visits in ``epoch``, in order.

    All ranks draw the same permutation (seeded from (seed, epoch)) and take every
    ``world_size``-th entry from position ``rank``: within an epoch the ranks' indices are
    disjoint and together cover every item once. Shards differ in length by at most one.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}); got {rank}")
    if shuffle:
        order = np.random.default_rng((seed, epoch)).permutation(num_items)
    else:
        order = np.arange(num_items)
    return order[rank::world_size]


class _ShardSampler(tn.BaseNode[tuple[int, int, int]]):
    """Yields (seed, epoch, index) for this rank; state is (epoch, offset), restored in O(1).

    With ``repeat`` the epochs follow one another forever. Without it, one epoch per iterator;
    like torchdata's SamplerWrapper, a fresh iterator after a started one moves to the next epoch.
    """

    EPOCH_KEY = "epoch"
    OFFSET_KEY = "offset"

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
        self._epoch = 0
        self._offset = 0
        self._started = False
        self._order = np.empty(0, dtype=np.int64)

    def _shard(self) -> np.ndarray:
        return shard_indices(
            self.num_items,
            epoch=self._epoch,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            shuffle=self.shuffle,
        )

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        if initial_state is not None:
            self._epoch = initial_state[self.EPOCH_KEY]
            self._offset = initial_state[self.OFFSET_KEY]
        else:
            if self._started:
                self._epoch += 1
            self._offset = 0
        self._started = False
        self._order = self._shard()

    def next(self) -> tuple[int, int, int]:
        while self._offset >= len(self._order):
            if not self.repeat or len(self._order) == 0:
                raise StopIteration()
            self._epoch += 1
            self._offset = 0
            self._order = self._shard()
        index = int(self._order[self._offset])
        self._offset += 1
        self._started = True
        return (self.seed, self._epoch, index)

    def get_state(self) -> dict[str, Any]:
        return {self.EPOCH_KEY: self._epoch, self.OFFSET_KEY: self._offset}


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

    ``state_dict()`` / ``load_state_dict()`` (inherited) resume at exactly the next batch; the
    state is plain ints and tensors-free dicts, safe for ``torch.save`` / ``weights_only`` loads.
    """

    def __init__(
        self,
        root: tn.BaseNode[Batch],
        *,
        filter_node: _DropUnreadable,
        items_per_epoch: int,
    ) -> None:
        super().__init__(root)
        self._filter = filter_node
        self.items_per_epoch = items_per_epoch

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
        rank, world_size: this process's slice of every epoch (see :func:`shard_indices`).
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

    node: tn.BaseNode[Any] = _ShardSampler(
        num_items, seed=seed, rank=rank, world_size=world_size, shuffle=shuffle, repeat=repeat
    )
    node = tn.ParallelMapper(
        node,
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
    return PipelineLoader(node, filter_node=filter_node, items_per_epoch=items_per_epoch)
