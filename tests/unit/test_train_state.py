"""ulframe.train.state.TrainState: one state_dict()/load_state_dict() pair for everything a
resume restores, in the checkpoint format defined once (`ulframe.train.state`); checkpoints
written before TrainState (tests/unit/data/legacy_stage/) still load."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from toy_training import Model

from ulframe.data.pipeline import build_loader
from ulframe.protocols import BuildContext
from ulframe.train import checkpoint
from ulframe.train.distributed import World
from ulframe.train.optim import EMA
from ulframe.train.settings import TrainSettings
from ulframe.train.state import TrainState
from ulframe.train.step import Trainer, train_step


class _Source:
    """64 examples of 4 numbers, a pure function of their index."""

    items = tuple(range(64))

    def decode(self, item: int) -> dict[str, object]:
        return {"x": torch.randn(4, generator=torch.Generator().manual_seed(item)), "label": 0}


def _settings(optimizer: Any = None) -> TrainSettings:
    return TrainSettings(
        batch_size=8, train_samples=64, optimizer=optimizer or partial(torch.optim.Adam),
        lr=0.01, warmup_samples=0, ema_halflife_samples=8,
    )  # fmt: skip


CPU = World(0, 1, 0, torch.device("cpu"))
LEGACY = Path(__file__).resolve().parent / "data" / "legacy_stage"  # see its README.md


def _state(
    steps: int = 2, optimizer: Any = None
) -> tuple[TrainState, Trainer, Iterator[dict[str, torch.Tensor]]]:
    """A TrainState after `steps` steps (as the fixture's was written), and its batches."""
    torch.manual_seed(0)
    trainer = Trainer.build(Model(), _settings(optimizer), CPU, seed=3)
    loader = build_loader(_Source(), batch_size=8, seed=5)
    state = TrainState(trainer.model, trainer.ema, trainer.opt, loader, stage="s", config="c\n")
    batches = iter(loader)
    for _ in range(steps):
        train_step(trainer, next(batches), state.samples_seen)
        state.samples_seen += 8
    return state, trainer, batches


def _fresh(optimizer: Any = None) -> tuple[TrainState, Trainer]:
    torch.manual_seed(1)  # other initial weights
    trainer = Trainer.build(Model(), _settings(optimizer), CPU, seed=3)
    loader = build_loader(_Source(), batch_size=8, seed=5)
    return TrainState(trainer.model, trainer.ema, trainer.opt, loader), trainer


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _assert_next_step_alike(
    state: TrainState, trainer: Trainer, batches: Iterator[dict[str, torch.Tensor]],
    fresh: TrainState, fresh_trainer: Trainer,
) -> None:  # fmt: skip
    """The next batch and the next step of `fresh` are the ones `state` would have taken."""
    batch, again = next(batches), next(iter(fresh.loader))
    assert torch.equal(batch["x"], again["x"])
    a = train_step(trainer, batch, state.samples_seen)
    b = train_step(fresh_trainer, again, fresh.samples_seen)
    assert torch.equal(a.scalars["loss_nats"], b.scalars["loss_nats"])
    assert _equal(fresh.model.state_dict(), state.model.state_dict())


def test_a_saved_state_loads_into_a_fresh_one_exactly(tmp_path: Path) -> None:
    state, trainer, batches = _state()
    saved = state.state_dict()
    assert saved.keys() == checkpoint.FORMAT.keys()
    assert saved["format"] == checkpoint.FORMAT_VERSION and saved["samples_seen"] == 16
    checkpoint.save(tmp_path, state.samples_seen, saved)
    loaded = checkpoint.load_latest(tmp_path)
    assert loaded is not None
    fresh, fresh_trainer = _fresh()
    fresh.load_state_dict(loaded)
    assert fresh.samples_seen == 16
    # (the stage's name and the config are the run's own, not restored)
    unnamed = {"stage": "", "config": "", "config_sha256": checkpoint.config_digest("")}
    assert _equal(fresh.state_dict(), saved | unnamed)
    assert int(fresh.ema.model.calls) == int(state.ema.model.calls) == 2  # buffers too
    _assert_next_step_alike(state, trainer, batches, fresh, fresh_trainer)
    assert _equal(fresh.ema.state_dict(), state.ema.state_dict())


def test_the_ema_saves_and_restores_itself() -> None:
    state, _, _ = _state()
    ema = EMA(Model(), halflife_samples=8)
    saved = state.ema.state_dict()
    assert saved.keys() == state.model.state_dict().keys()  # the model's keys: no prefix
    ema.load_state_dict(saved)
    assert _equal(ema.state_dict(), saved)


def test_a_checkpoint_written_before_train_state_resumes() -> None:
    """tests/unit/data/legacy_stage/: written by the loop before TrainState and a format
    version (version 0), after two steps of `_state`'s training."""
    path = LEGACY / "checkpoints" / "ckpt-000000000016.pt"
    raw = torch.load(path, weights_only=True)
    assert "format" not in raw  # the old layout
    loaded = checkpoint.load_latest(LEGACY / "checkpoints")
    assert loaded is not None and loaded["format"] == checkpoint.FORMAT_VERSION
    fresh, _ = _fresh()
    fresh.load_state_dict(raw)
    assert fresh.samples_seen == 16
    assert _equal(fresh.model.state_dict(), raw["model"])
    assert _equal(fresh.ema.state_dict(), raw["ema"])
    assert int(fresh.ema.model.calls) == 2
    assert _equal(fresh.optimizer.state_dict(), raw["optimizer"])
    expected = torch.load(LEGACY / "next_batch.pt", weights_only=True)["next_x"]
    assert torch.equal(next(iter(fresh.loader))["x"], expected)  # the loader's position
    # Today's code, trained the same way, saves the same tensors.
    state, _, _ = _state()
    assert _equal(state.state_dict()["model"], raw["model"])


class _Stage:
    name = "legacy"

    def build(self, ctx: BuildContext) -> torch.nn.Module:
        return Model()


def test_load_stage_ema_reads_a_checkpoint_written_before_train_state() -> None:
    ctx = BuildContext({"x": torch.zeros(4), "label": 0}, 1, torch.device("cpu"), LEGACY)
    model = checkpoint.load_stage_ema(_Stage(), ctx, LEGACY)
    raw = torch.load(LEGACY / "checkpoints" / "ckpt-000000000016.pt", weights_only=True)
    assert _equal(model.state_dict(), raw["ema"])


def test_a_newer_format_is_refused() -> None:
    with pytest.raises(ValueError, match="newer than this ulframe"):
        checkpoint.upgrade({"samples_seen": 0, "format": checkpoint.FORMAT_VERSION + 1})
    old = {"samples_seen": 0, "ema": {"_orig_mod.w": torch.ones(1)}}
    assert checkpoint.upgrade(old)["ema"].keys() == {"w"}


def _adamw_8bit() -> Any:
    import bitsandbytes.optim  # (seconds to import: only this case pays)

    return partial(bitsandbytes.optim.AdamW8bit, min_8bit_size=1)


@pytest.mark.parametrize("optimizer", ["adam", "adamw_8bit"])
def test_a_checkpoint_directory_resumes_the_next_step_exactly(
    tmp_path: Path, optimizer: str
) -> None:
    """`save` / `load`: the directory DCP writes (each rank's part; here one) restores the
    weights, optimizer (bitsandbytes' 8-bit state too: its uint8 tensors through DCP, its int
    step as a value), EMA (buffers too), counters and the loader's position, so the next batch
    and step are the ones the saved state would have taken."""
    make = _adamw_8bit() if optimizer == "adamw_8bit" else None
    state, trainer, batches = _state(optimizer=make)
    path = state.save(tmp_path, CPU).wait()
    assert path == tmp_path / "ckpt-000000000016"
    whole = checkpoint.load(path)  # read whole, by a reader without processes
    assert _equal(whole["model"], dict(state.model.state_dict()))
    assert whole["samples_seen"] == 16 and whole["config"] == "c\n"
    fresh, fresh_trainer = _fresh(make)
    fresh.load(path, CPU)
    assert fresh.samples_seen == 16
    assert _equal(fresh.model.state_dict(), state.model.state_dict())
    assert _equal(fresh.ema.state_dict(), state.ema.state_dict())
    assert int(fresh.ema.model.calls) == 2
    saved_opt, loaded_opt = state.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert _equal(loaded_opt["state"], saved_opt["state"])
    _assert_next_step_alike(state, trainer, batches, fresh, fresh_trainer)


class _Wider(Model):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 8)
        self.b = torch.nn.Linear(8, 1)


def test_a_checkpoint_of_another_model_is_one_line_before_any_tensor_is_read(
    tmp_path: Path,
) -> None:
    from ulframe.errors import ConfigError

    state, _, _ = _state()
    path = state.save(tmp_path, CPU).wait()
    trainer = Trainer.build(_Wider(), _settings(), CPU, seed=3)
    other = TrainState(trainer.model, trainer.ema, trainer.opt)
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(ConfigError) as refused:
        other.load(path, CPU)
    message = str(refused.value)
    assert "\n" not in message and "does not fit this model" in message
    assert "model/a.weight: (4, 4) in the checkpoint, (8, 4) here" in message
    assert _equal(other.model.state_dict(), before)  # nothing was read into it
