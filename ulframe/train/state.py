"""A stage's training state in one place: what a checkpoint saves and a resume restores.

`TrainState` holds the networks (the training model and its EMA), the optimizer, the training
loader (its position) and the counters (`samples_seen`), in the checkpoint layout of
`ulframe.train.checkpoint` (`FORMAT`, `FORMAT_VERSION`). It saves and restores itself as a
checkpoint directory (`save` / `load`: every rank its own part, through DCP, resharded to
the number of processes that loads it), and as one full state (`state_dict` /
`load_state_dict`: older checkpoint files, tests, tools).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ulframe.data.pipeline import merge_positions
from ulframe.train import checkpoint, distributed
from ulframe.train.optim import EMA
from ulframe.train.posthoc_ema import PowerEMAs

log = logging.getLogger(__name__)


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

    def sharded_state(self) -> dict[str, Any]:
        """The checkpoint as DCP writes it (`checkpoint.FORMAT` without "loader": each rank
        writes its own file): model, optimizer, EMA and power EMAs as this rank holds them
        (DTensor shards under FSDP2, nothing gathered), in tensors that loading in place
        restores (`load`)."""
        model_state, optimizer_state = distributed.training_state(
            self.model, self.optimizer, full=False
        )
        power = None
        if self.power_ema is not None:
            power = {
                key: checkpoint.without_compile_prefix(profile.sharded_state_dict())
                for key, profile in self.power_ema.profiles_by_key().items()
            }
        return {
            "format": checkpoint.FORMAT_VERSION,
            "model": checkpoint.without_compile_prefix(model_state),
            "ema": checkpoint.without_compile_prefix(self.ema.sharded_state_dict()),
            "power_ema": power,
            "optimizer": optimizer_state,
            "samples_seen": self.samples_seen,
            "stage": self.stage,
            "config": self.config,
            "config_sha256": checkpoint.config_digest(self.config),
        }

    def save(
        self,
        directory: Path,
        world: distributed.World,
        keep: int = 3,
        background: bool = False,
    ) -> checkpoint.Saving:
        """Write the checkpoint directory of `samples_seen` (every rank calls it): each rank's
        part once, rank 0 completes it (`checkpoint.write`). `background`: written by a thread
        after the tensors are copied (`wait()` the result before the next save)."""
        state = self.sharded_state()
        mine_finite = checkpoint.all_finite(state)
        finite = not distributed.any_over_ranks([not mine_finite], world)[0]
        return checkpoint.write(
            directory, self.samples_seen, state, keep=keep, rank=world.rank,
            world_size=world.world_size, finite=finite,
            loader=self.loader.state_dict() if self.loader is not None else None,
            process_group=distributed.checkpoint_group(world) if background else None,
            background=background,
        )  # fmt: skip

    def load(self, path: Path, world: distributed.World) -> None:
        """Restore checkpoint `path` (every rank, the same one; verified: `newest_agreed`).

        A directory is read through DCP into the tensors this rank holds, whatever number of
        processes and wrapping (DDP, FSDP2) wrote it; the loader resumes at its own position
        under the same number of processes, else at the global sample position the old ranks
        reached (`PipelineLoader.seek`). A file (version <= 2) is loaded whole
        (`load_state_dict`). Raises ConfigError when the checkpoint does not fit the model."""
        if path.is_file():
            self.load_state_dict(checkpoint.load(path, map_location=world.device))
            return
        record = checkpoint.manifest(path)
        tensors, _ = checkpoint.flatten(self.sharded_state())
        saved_keys = checkpoint.tensor_keys(path)
        restart = []  # power-EMA profiles the checkpoint lacks: they restart from the weights
        if self.power_ema is not None:
            for key in self.power_ema.profiles_by_key():
                prefix = f"power_ema{checkpoint.SEP}{key}{checkpoint.SEP}"
                if not any(k.startswith(prefix) for k in saved_keys):
                    restart.append(key)
                    tensors = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
        checkpoint.read_into(path, tensors)
        saved = checkpoint.unflatten(tensors, record["plain"])
        distributed.load_training_state(
            self.model, self.optimizer, saved["model"], saved["optimizer"], full=False
        )
        self.ema.sync()  # (loaded in place: the full copy from the shards)
        if self.power_ema is not None:
            for key, profile in self.power_ema.profiles_by_key().items():
                if key in restart:
                    log.warning(
                        "the checkpoint holds no power-function EMA of sigma_rel %s: it restarts "
                        "from the current weights (its post-hoc EMA covers only the training "
                        "from here)", key,
                    )  # fmt: skip
                    profile.update(self.model, 0)  # (half-life 0: a copy of the weights)
                profile.sync()
        self.samples_seen = int(saved["samples_seen"])
        if self.loader is not None:
            self._load_loader(path, int(record.get("world_size", 1)), world)

    def _load_loader(self, path: Path, written_by: int, world: distributed.World) -> None:
        """The loader's position: its own under the same number of processes, else the global
        sample position every old rank reached."""
        if written_by == world.world_size:
            own = checkpoint.loader_state(path, world.rank)
            if own is not None:
                self.loader.load_state_dict(own)
            return
        olds = [checkpoint.loader_state(path, r) for r in range(written_by)]
        if any(old is None for old in olds):
            return  # (a checkpoint written without a loader position)
        positions = [self.loader.global_position(old, r, written_by) for r, old in enumerate(olds)]
        position, skipped = merge_positions(positions)
        self.loader.seek(position)
        log.info(
            "data: %d process(es) wrote the checkpoint, %d resume it: at sample %d of the "
            "data's order%s", written_by, world.world_size, position,
            f" ({skipped} examples skipped: the old ranks had dropped different numbers of "
            "unreadable items)" if skipped else "",
        )  # fmt: skip

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


@dataclass
class Checkpointer:
    """Saves a stage's checkpoints into `directory` (every rank takes part) and calls
    `on_saved(path)` when one is complete. `background` (`TrainSettings.async_checkpoint`): a save
    is written by a thread; the next save (or `wait()`) waits for it, `poll()` completes it once
    done."""

    state: TrainState
    directory: Path
    world: distributed.World
    keep: int = 3
    background: bool = False
    on_saved: Callable[[Path], None] = lambda path: None
    pending: checkpoint.Saving | None = None

    def save(self) -> None:
        self.wait()
        self.pending = self.state.save(self.directory, self.world, self.keep, self.background)
        if not self.background:
            self.wait()

    def poll(self) -> None:
        if self.pending is not None and self.pending.done():
            self.wait()

    def wait(self) -> None:
        if self.pending is not None:
            path, self.pending = self.pending.wait(), None
            self.on_saved(path)


def newest_agreed(candidates: list[Path], world: distributed.World) -> Path | None:
    """The newest of `candidates` (oldest first; `checkpoint.resume_candidates`) that is valid
    on every rank, or None. A rank that cannot read the newest (killed mid-save, a damaged file
    on its node) makes every rank step back to the newest they all can."""
    limit = None
    while True:
        path = checkpoint.newest_valid(candidates, at_most=limit)
        mine = checkpoint.samples_of(path) if path is not None else -1
        lowest, highest = distributed.min_max_over_ranks(mine, world)
        if lowest == highest:
            return path
        limit = lowest
