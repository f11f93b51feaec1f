"""Learning-rate schedules counted in samples, and the EMA of the weights.

A schedule is a pure function `(samples_seen, total_samples, warmup_samples) -> multiplier` of the
peak learning rate. Counting samples instead of steps keeps a resume, or a change of batch size,
exact without saving scheduler state (torch's step-based schedulers would need both).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch


def warmup_constant(samples_seen: int, total_samples: int, warmup_samples: int) -> float:
    """Linear warm-up from 0 to 1 over `warmup_samples`, then constant."""
    del total_samples
    if warmup_samples <= 0:
        return 1.0
    return min(1.0, (samples_seen + 1) / warmup_samples)


def warmup_cosine(samples_seen: int, total_samples: int, warmup_samples: int) -> float:
    """Linear warm-up, then a cosine decay to 0 at `total_samples`."""
    if samples_seen < warmup_samples:
        return warmup_constant(samples_seen, total_samples, warmup_samples)
    span = max(1, total_samples - warmup_samples)
    progress = min(1.0, (samples_seen - warmup_samples) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def local_part(t: torch.Tensor) -> torch.Tensor:
    """A sharded DTensor's local shard (a view: in-place ops update the DTensor); else `t`."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


class EMA(torch.nn.Module):
    """Exponential moving average of a model's weights, with a half-life counted in samples.

    Per update of `batch_size` samples: beta = 0.5 ** (batch_size / halflife_samples)
    (EDM2's parameterisation by half-life, so the average does not depend on the batch size).
    Buffers (e.g. norm statistics) are copied, not averaged.

    `self.model` is a full, unsharded copy: evaluation and checkpoints use it. When the training
    model is sharded (FSDP2, `track_sharded`), the average is kept per local shard (no
    communication per step) and `sync()` all-gathers it into `self.model` when it is needed.
    """

    def __init__(self, model: torch.nn.Module, halflife_samples: int) -> None:
        super().__init__()
        self.halflife_samples = halflife_samples
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._shards: dict[str, Any] | None = None  # name -> DTensor

    def track_sharded(self, model: torch.nn.Module) -> None:
        """Average the local shards of `model`'s (sharded) parameters from now on."""
        full = dict(self.model.named_parameters())
        self._shards = {}
        for name, p in model.named_parameters():
            if p.is_floating_point():
                shard = p.detach().clone()
                self._shards[name] = shard
        self.load_full(full)

    def load_full(self, full: Mapping[str, torch.Tensor]) -> None:
        """Set the average (and its shards) from full tensors by name (after a restore)."""
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(full[name])
            if self._shards is not None:
                from ulframe.train.distributed import local_shard_of

                for name, shard in self._shards.items():
                    local_part(shard).copy_(local_shard_of(full[name], shard))

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """The average, full: `self.model`'s state dict (weights and buffers, its keys, no
        `model.` prefix); under a sharded model it is gathered first (`sync`: every rank must
        call it)."""
        self.sync()
        return self.model.state_dict(*args, **kwargs)

    def sharded_state_dict(self) -> dict[str, torch.Tensor]:
        """The average as this rank holds it, for DCP: `self.model`'s state dict with each
        averaged weight replaced by this rank's DTensor shard under a sharded model (nothing
        gathered). Its tensors are the average's own: loading into them in place, then `sync()`,
        restores it."""
        state = self.model.state_dict()
        if self._shards is not None:
            state.update(self._shards)
        return state

    def load_state_dict(  # type: ignore[override]
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """The inverse of `state_dict`: `self.model`'s weights and buffers, and the local
        shards of the average when it tracks a sharded model."""
        del assign  # the average's tensors stay the ones the optimizer step updates
        result = self.model.load_state_dict(state_dict, strict=strict)
        self.load_full(dict(self.model.named_parameters()))
        return result

    def targets(self) -> list[torch.Tensor]:
        """The tensors an update moves: this rank's shards of the averaged weights (sharded
        model), else the EMA copy's floating-point parameters."""
        if self._shards is not None:
            return [local_part(t) for t in self._shards.values()]
        return [p for p in self.model.parameters() if p.is_floating_point()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, batch_size: int) -> None:
        targets = self.targets()
        params = [local_part(p.detach()) for p in model.parameters() if p.is_floating_point()]
        if self.halflife_samples <= 0:
            torch._foreach_copy_(targets, params)
        else:
            beta = 0.5 ** (batch_size / self.halflife_samples)
            torch._foreach_lerp_(targets, params, 1.0 - beta)
        buffers = list(model.buffers())
        if buffers:
            torch._foreach_copy_(list(self.model.buffers()), [local_part(b) for b in buffers])

    @torch.no_grad()
    def sync(self) -> None:
        """Gather the sharded average into `self.model` (every rank must call it); no-op when
        the training model is not sharded."""
        if self._shards is None:
            return
        for name, p in self.model.named_parameters():
            p.copy_(self._shards[name].full_tensor())


COMPILE_PREFIX = "_orig_mod."  # what a module wrapped by torch.compile adds to its keys


def without_compile_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """`state` with every `_orig_mod.` of torch.compile's wrapper removed from its keys, so
    that checkpoints of compiled and eager runs hold the same keys and load into either. (The
    loop compiles in place and writes none; a state dict from a `torch.compile(module)` has
    them.)"""
    if not any(COMPILE_PREFIX in key for key in state):
        return state
    return {key.replace(COMPILE_PREFIX, ""): value for key, value in state.items()}
