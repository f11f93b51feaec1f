"""ulframe.train.loop.train_step: the loop's body, one optimizer step (also what
benchmarks/overhead.py times)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from ulframe.train.distributed import World
from ulframe.train.loop import Trainer, seed_for, train_step
from ulframe.train.settings import TrainSettings


@dataclass(frozen=True)
class _Terms:
    nats: torch.Tensor

    def total_nats(self) -> torch.Tensor:
        return self.nats

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"total_nats": self.nats.mean()}


class _Model(torch.nn.Module):
    """forward(batch, noise) -> loss terms: a linear regression with noisy targets."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 1)

    def forward(self, batch, noise) -> _Terms:
        x = batch["x"]
        target = noise.randn((x.shape[0], 1), x.device)
        return _Terms((self.b(self.a(x)) - target).square().flatten(1).sum(1))


def _trainer(**kw) -> Trainer:
    torch.manual_seed(0)
    settings = TrainSettings(
        batch_size=8, train_samples=64, optimizer=partial(torch.optim.SGD), lr=0.1,
        warmup_samples=0, ema_halflife_samples=8,
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
