"""The toy stage model of the training-state tests (tests/unit/test_train_state.py,
tests/unit/test_posthoc_ema.py, tests/unit/test_train_step.py): the checkpoint fixtures in
tests/unit/data/ were written with `Model`, so its parameter and buffer names are fixed."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Terms:
    """The loss record a stage's module returns: `total_nats()` (B,) and logged `metrics()`."""

    nats: torch.Tensor

    def total_nats(self) -> torch.Tensor:
        return self.nats

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"total_nats": self.nats.mean()}


class Model(torch.nn.Module):
    """forward(batch, noise) -> Terms: a regression with noisy targets and a buffer (the number
    of forwards) that the EMA copies."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 1)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, batch: dict[str, torch.Tensor], noise: object) -> Terms:
        self.calls += 1
        x = batch["x"]
        target = noise.randn((x.shape[0], 1), x.device)  # type: ignore[attr-defined]
        return Terms((self.b(self.a(x)) - target).square().flatten(1).sum(1))
