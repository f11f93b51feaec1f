"""What the training loop does to a stage's model before training, in one place and one order.

`parallelize(model, world, settings)` applies, in place and in this order (written once, here):

1. wrapping for several processes (`distributed.wrap`: DDP, or FSDP2's sharding of `model`'s
   repeated blocks) — the EMA's eager copy is taken before (`Trainer.build`);
2. activation checkpointing of the repeated blocks (`checkpoint_activations`,
   `TrainSettings.activation_checkpointing`): after sharding, so FSDP2's hooks stay outside the
   checkpointed region;
3. torch.compile (`compile_model`, `TrainSettings.compile`): last, so it traces the checkpointed
   forwards (and, under FSDP2, compiles each sharded block).

Each step replaces only `forward`s: the modules, their parameters (shared with the optimizer
and the EMA) and their state-dict keys stay as they are, so checkpoints of every combination
hold the same keys. `autocast` is the step's mixed precision (`TrainSettings.precision`), built
once per stage. (The model FLOPs of MFU are counted on the eager model, before any of this:
`ulframe.train.perf`.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from ulframe.train import distributed
from ulframe.train.distributed import World
from ulframe.train.settings import TrainSettings

log = logging.getLogger(__name__)


def parallelize(model: torch.nn.Module, world: World, settings: TrainSettings) -> torch.nn.Module:
    """Wrap (`settings.parallelism`), checkpoint activations
    (`settings.activation_checkpointing`) and compile (`settings.compile`) `model` in place, in
    that order; what the training step calls (the DDP wrapper, or `model` itself)."""
    wrapped = distributed.wrap(model, world, settings.parallelism)
    checkpoint_activations(model, settings.activation_checkpointing)
    compile_model(model, settings.compile)
    return wrapped


def autocast(settings: TrainSettings, device: torch.device) -> torch.autocast:
    """The step's autocast: bfloat16 when `settings.precision` is "bf16", else disabled."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.precision == "bf16")


_CHECKPOINTED: dict[Callable[..., Any], Callable[..., Any]] = {}


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    """`forward` (a block class's forward function) under non-reentrant activation
    checkpointing: only the block's inputs are saved, its forward runs again in backward.

    One function per block class, each with its own code object: torch.compile caches (and
    limits recompilations) per code object, so compiled blocks (FSDP) are cached per class as
    without checkpointing, not all in one cache of a shared wrapper."""
    if forward not in _CHECKPOINTED:
        from torch.utils.checkpoint import checkpoint

        def checkpointed(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            return checkpoint(forward.__get__(self), *args, use_reentrant=False, **kwargs)

        name = f"{forward.__qualname__}_checkpointed".replace(".", "_")
        code = checkpointed.__code__.replace(co_name=name, co_qualname=name)
        checkpointed.__code__ = code
        checkpointed.__name__ = checkpointed.__qualname__ = name
        _CHECKPOINTED[forward] = checkpointed
    return _CHECKPOINTED[forward]


def checkpoint_activations(model: torch.nn.Module, mode: str) -> list[str]:
    """Activation checkpointing of `model`'s repeated blocks in place; the names checkpointed.

    "blocks": every block `distributed.repeated_blocks` finds (the FSDP2 units: each block of
    an nn.ModuleList) that has a trainable parameter and holds no other such block (frozen
    networks, e.g. stage 2's stage-1 networks, are left alone) runs under
    `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`: the forward keeps only the
    block's inputs for backward, and backward runs the block's forward again. Only the block's
    `forward` is replaced (by a method bound to it, which a deep copy rebinds to the copy): the
    modules, their parameters and their state-dict keys stay as they are, FSDP2's hooks (on
    the module's call) stay outside the checkpointed region, and torch.compile traces the
    checkpoint (after this: `compile_model`). Call it after copying the model for the EMA,
    which stays plain."""
    if mode == "off":
        return []
    inner = checkpointed_blocks(model)
    for _, block in inner:
        forward = _checkpointed(type(block).forward).__get__(block)  # a deep copy rebinds it
        block.forward = forward  # type: ignore[method-assign]
    names = [name for name, _ in inner]
    log.info("activation checkpointing (%s): %d blocks", mode, len(names))
    return names


def checkpointed_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The blocks `checkpoint_activations` checkpoints, with their names: the repeated blocks
    (`distributed.repeated_blocks`) with a trainable parameter that hold no other such block."""
    trainable = [
        (name, block)
        for name, block in distributed.repeated_blocks(model)
        if any(p.requires_grad for p in block.parameters())
    ]
    return [
        (name, block)
        for name, block in trainable
        if not any(other is not block and _contains(block, other) for _, other in trainable)
    ]


def _contains(outer: torch.nn.Module, inner: torch.nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def compile_model(model: torch.nn.Module, mode: str) -> list[str]:
    """torch.compile the forward of `model`'s networks in place; the names compiled.

    "networks": every top-level child module with parameters (encoder, prior, decoder...);
    "step": `model` itself (the stage's whole forward, its loss included). Under FSDP both
    compile each sharded block instead (`distributed.sharded_blocks`, torchtitan's recipe): FSDP's
    hooks (all-gather, reduce-scatter) stay outside the compiled code. Only `forward` is
    replaced: the modules, their parameters (shared with the optimizer and the EMA) and their
    state-dict keys stay as they are. Call it after `distributed.wrap` and after copying the
    model (a copy would share the compiled forward of the original)."""
    if mode == "off":
        return []
    if distributed.is_sharded(model):
        units = distributed.sharded_blocks(model)
    elif mode == "step":
        units = [("", model)]
    else:
        units = [(n, m) for n, m in model.named_children() if any(True for _ in m.parameters())]
    # Blocks of one class share their forward's code, and dynamo counts each differently shaped
    # block as a recompile of it: without room for one graph per block, the blocks past the
    # limit (8 by default) would silently run eager. (`recompile_limit` is torch >= 2.7's name of
    # `cache_size_limit`.)
    import torch._dynamo.config as dynamo_config

    key = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, key, max(getattr(dynamo_config, key), len(units)))
    for _, module in units:
        module.forward = torch.compile(module.forward)  # type: ignore[method-assign]
    names = [name or type(model).__name__ for name, _ in units]
    shown = ", ".join(names) if len(names) <= 8 else f"{len(names)} sharded blocks"
    log.info("torch.compile (%s): %s", mode, shown)
    return names
