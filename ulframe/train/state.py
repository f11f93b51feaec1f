"""A stage's training state in one place: what a checkpoint saves and a resume restores.

`TrainState` holds the networks (the training model and its EMA), the optimizer, the training
loader (its position) and the counters (`samples_seen`), and saves and restores itself through
one `state_dict()` / `load_state_dict()` pair in the checkpoint layout of
`ulframe.train.checkpoint` (`FORMAT`, `FORMAT_VERSION`); older checkpoints are upgraded on load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ulframe.train import checkpoint, distributed
from ulframe.train.optim import EMA
from ulframe.train.posthoc_ema import PowerEMAs


@dataclass
class TrainState:
    """Everything a resume restores. `loader`: anything with `state_dict()` and
    `load_state_dict()` (the training loader), or None (no position saved or restored);
    `power_ema`: the post-hoc EMA's profiles, or None (none tracked)."""

    model: torch.nn.Module  # the stage's module (sharded in place under FSDP2)
    ema: EMA
    optimizer: torch.optim.Optimizer
    loader: Any = None
    samples_seen: int = 0
    stage: str = ""  # the stage's name
    config: str = ""  # the run's full gin config: saved, compared on resume
    power_ema: PowerEMAs | None = None

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint (`checkpoint.FORMAT`): full, unsharded tensors. Under a sharded
        model every rank must call it (it all-gathers)."""
        model_state, optimizer_state = distributed.training_state(self.model, self.optimizer)
        state = {
            "format": checkpoint.FORMAT_VERSION,
            "model": checkpoint.without_compile_prefix(model_state),
            "ema": checkpoint.without_compile_prefix(self.ema.state_dict()),
            "power_ema": None if self.power_ema is None else self._power_ema_state(),
            "optimizer": optimizer_state,
            "loader": self.loader.state_dict() if self.loader is not None else None,
            "samples_seen": self.samples_seen,
            "stage": self.stage,
            "config": self.config,
            "config_sha256": checkpoint.config_digest(self.config),
        }
        assert state.keys() == checkpoint.FORMAT.keys(), "checkpoint.FORMAT lists every key"
        return state

    def _power_ema_state(self) -> dict[str, Any]:
        assert self.power_ema is not None
        saved = self.power_ema.state_dict()
        return {key: checkpoint.without_compile_prefix(value) for key, value in saved.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint of any known version (`checkpoint.upgrade`): model, optimizer,
        EMA (weights, buffers and shards), the power-function EMAs (a profile the checkpoint
        lacks restarts from its model weights, `PowerEMAs.load_state_dict`), loader position
        and counters; every rank calls it with the full state. The config is not compared here
        (`checkpoint.check_config`)."""
        state = checkpoint.upgrade(state)
        distributed.load_training_state(
            self.model, self.optimizer, state["model"], state["optimizer"]
        )
        self.ema.load_state_dict(state["ema"])
        if self.power_ema is not None:
            self.power_ema.load_state_dict(state["power_ema"], model_state=state["model"])
        if self.loader is not None and state.get("loader") is not None:
            self.loader.load_state_dict(state["loader"])
        self.samples_seen = int(state["samples_seen"])


def newest_agreed(ckpt_dir: Path, world: distributed.World) -> dict[str, Any] | None:
    """The newest checkpoint in `ckpt_dir` valid on every rank (each rank keeps its own loader
    position, so each reads its own folder); None when there is none. A rank that lost its newest
    checkpoint (killed mid-save) makes every rank step back to the newest they all have."""
    limit = None
    while True:
        state = checkpoint.load_latest(ckpt_dir, map_location=world.device, at_most=limit)
        mine = int(state["samples_seen"]) if state is not None else -1
        lowest, highest = distributed.min_max_over_ranks(mine, world)
        if lowest == highest:
            return state
        limit = lowest
