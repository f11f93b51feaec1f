"""A stage's training state in one place: what a checkpoint saves and a resume restores.

`TrainState` holds the networks (the training model and its EMA), the optimizer, the training
loader (its position) and the counters (`samples_seen`), and saves and restores itself through
one `state_dict()` / `load_state_dict()` pair in the checkpoint layout of
`ulframe.train.checkpoint` (`FORMAT`, `FORMAT_VERSION`); older checkpoints are upgraded on load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ulframe.train import checkpoint, distributed
from ulframe.train.optim import EMA


@dataclass
class TrainState:
    """Everything a resume restores. `loader`: anything with `state_dict()` and
    `load_state_dict()` (the training loader), or None (no position saved or restored)."""

    model: torch.nn.Module  # the stage's module (sharded in place under FSDP2)
    ema: EMA
    optimizer: torch.optim.Optimizer
    loader: Any = None
    samples_seen: int = 0
    stage: str = ""  # the stage's name
    config: str = ""  # the run's full gin config: saved, compared on resume

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint (`checkpoint.FORMAT`): full, unsharded tensors. Under a sharded
        model every rank must call it (it all-gathers)."""
        model_state, optimizer_state = distributed.training_state(self.model, self.optimizer)
        state = {
            "format": checkpoint.FORMAT_VERSION,
            "model": checkpoint.without_compile_prefix(model_state),
            "ema": checkpoint.without_compile_prefix(self.ema.state_dict()),
            "optimizer": optimizer_state,
            "loader": self.loader.state_dict() if self.loader is not None else None,
            "samples_seen": self.samples_seen,
            "stage": self.stage,
            "config": self.config,
            "config_sha256": checkpoint.config_digest(self.config),
        }
        assert state.keys() == checkpoint.FORMAT.keys(), "checkpoint.FORMAT lists every key"
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint of any known version (`checkpoint.upgrade`): model, optimizer,
        EMA (weights, buffers and shards), loader position and counters; every rank calls it
        with the full state. The config is not compared here (`checkpoint.check_config`)."""
        state = checkpoint.upgrade(state)
        distributed.load_training_state(
            self.model, self.optimizer, state["model"], state["optimizer"]
        )
        self.ema.load_state_dict(state["ema"])
        if self.loader is not None and state.get("loader") is not None:
            self.loader.load_state_dict(state["loader"])
        self.samples_seen = int(state["samples_seen"])
