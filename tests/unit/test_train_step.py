"""ulframe.train.step.train_step: the loop's body, one optimizer step (also what
benchmarks/overhead.py times)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from toy_training import Terms

from ulframe.errors import ConfigError
from ulframe.hookspecs import StopTraining
from ulframe.train import distributed
from ulframe.train.distributed import World
from ulframe.train.settings import TrainSettings
from ulframe.train.step import Trainer, seed_for, train_step


class _Model(torch.nn.Module):
    """forward(batch, noise) -> loss terms: a linear regression with noisy targets."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 1)

    def forward(self, batch, noise) -> Terms:
        x = batch["x"]
        target = noise.randn((x.shape[0], 1), x.device)
        return Terms((self.b(self.a(x)) - target).square().flatten(1).sum(1))


def _trainer(nan_policy: str = "skip", max_nonfinite_steps: int = 3, **kw) -> Trainer:
    torch.manual_seed(0)
    settings = TrainSettings(
        batch_size=8, train_samples=64, optimizer=partial(torch.optim.SGD), lr=0.1,
        warmup_samples=0, ema_halflife_samples=8, nan_policy=nan_policy,  # type: ignore[arg-type]
        max_nonfinite_steps=max_nonfinite_steps,
    )  # fmt: skip
    return Trainer.build(_Model(), settings, World(0, 1, 0, torch.device("cpu")), seed=3, **kw)


def _batch() -> dict[str, torch.Tensor]:
    return {"x": torch.randn((8, 4), generator=torch.Generator().manual_seed(1))}


def test_a_step_changes_the_weights_and_the_ema() -> None:
    trainer = _trainer()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    ema_before = {k: v.clone() for k, v in trainer.ema.model.state_dict().items()}
    result = train_step(trainer, _batch(), samples_seen=16)
    assert result.skipped is None and not result.stopping and result.module_norms == {}
    assert {"total_nats", "loss_nats", "grad_norm"} <= result.scalars.keys()
    assert not any(v.requires_grad for v in result.scalars.values())
    after = trainer.model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)
    ema = trainer.ema.model.state_dict()
    assert all(not torch.equal(ema_before[k], ema[k]) for k in ema)
    assert trainer.opt.param_groups[0]["lr"] == trainer.settings.lr_at(16)


def test_the_step_is_a_pure_function_of_seed_and_samples_seen() -> None:
    a, b = _trainer(), _trainer()
    torch.manual_seed(123)  # the global stream is reseeded by the step itself
    ra = train_step(a, _batch(), samples_seen=24)
    rb = train_step(b, _batch(), samples_seen=24)
    assert torch.equal(ra.scalars["loss_nats"], rb.scalars["loss_nats"])
    rc = train_step(_trainer(), _batch(), samples_seen=32)  # other noise
    assert not torch.equal(ra.scalars["loss_nats"], rc.scalars["loss_nats"])
    assert seed_for(3, 0, 24) != seed_for(3, 0, 32)


def test_a_skipped_step_changes_nothing_and_says_why() -> None:
    seen = []

    def check(step: int, scalars: dict[str, torch.Tensor]) -> str | None:
        seen.append(step)
        return "loss is not finite"

    trainer = _trainer(check_step=check)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    ema_before = {k: v.clone() for k, v in trainer.ema.model.state_dict().items()}
    result = train_step(trainer, _batch(), samples_seen=16, log_due=True)
    assert result.skipped == "loss is not finite" and seen == [16 // 8 + 1]
    assert result.module_norms  # measured when the step logs
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k])
    for k, v in trainer.ema.model.state_dict().items():
        assert torch.equal(v, ema_before[k])


def test_a_signal_stops_after_the_step() -> None:
    trainer = _trainer(stop=[15])
    result = train_step(trainer, _batch(), samples_seen=0)
    assert result.stopping and result.skipped is None


def _nan_batch() -> dict[str, torch.Tensor]:
    return {"x": _batch()["x"] * float("nan")}


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {
        **{f"model.{k}": v.clone() for k, v in trainer.model.state_dict().items()},
        **{f"ema.{k}": v.clone() for k, v in trainer.ema.model.state_dict().items()},
    }


def _unchanged(trainer: Trainer, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(before[k], v) for k, v in _state(trainer).items())


def test_a_non_finite_step_is_skipped_and_k_in_a_row_stop_the_run() -> None:
    trainer = _trainer(max_nonfinite_steps=2, name="stage1")
    before = _state(trainer)
    result = train_step(trainer, _nan_batch(), samples_seen=16)
    assert result.skipped == "non-finite total_nats, loss_nats, grad_norm at step 3 of stage stage1"
    assert _unchanged(trainer, before) and trainer.opt.state == {}  # no optimizer state either
    assert train_step(trainer, _batch(), samples_seen=16).skipped is None  # resets the count
    assert train_step(trainer, _nan_batch(), samples_seen=24).skipped is not None
    before = _state(trainer)
    with pytest.raises(StopTraining) as stop:
        train_step(trainer, _nan_batch(), samples_seen=24)
    assert str(stop.value) == (
        "non-finite total_nats, loss_nats, grad_norm at step 4 of stage stage1: 2 consecutive "
        "steps skipped (TrainSettings.max_nonfinite_steps = 2)"
    )
    assert _unchanged(trainer, before)  # the stop checkpoint holds the last good weights


def test_nan_policy_stop_stops_at_the_first_non_finite_step() -> None:
    trainer = _trainer(nan_policy="stop")
    before = _state(trainer)
    with pytest.raises(StopTraining, match=r"at step 1 \(TrainSettings.nan_policy = 'stop'\)$"):
        train_step(trainer, _nan_batch(), samples_seen=0)
    assert _unchanged(trainer, before)


def test_the_finite_check_is_read_in_the_steps_one_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether the step is finite reaches the host with the ranks' agreement (one read of one
    device tensor), not in a read of its own."""
    calls = []
    agree = distributed.any_over_ranks

    def spy(flags, world):
        calls.append([type(f) for f in flags])
        return agree(flags, world)

    monkeypatch.setattr(distributed, "any_over_ranks", spy)
    reads = []
    tolist, item, as_bool = torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append("tolist") or tolist(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append("item") or item(t))
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append("bool") or as_bool(t))
    assert train_step(_trainer(), _batch(), samples_seen=0).skipped is None
    assert calls == [[torch.Tensor, bool, bool]] and reads == ["tolist"]


def test_nan_policy_values_are_checked() -> None:
    with pytest.raises(ConfigError, match="nan_policy"):
        TrainSettings(nan_policy="ignore")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_nonfinite_steps must be positive"):
        TrainSettings(max_nonfinite_steps=0)
