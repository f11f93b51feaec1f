"""Learning-rate schedules counted in samples, and the EMA of the weights.

A schedule is a pure function `(samples_seen, total_samples, warmup_samples) -> multiplier` of the
peak learning rate. Counting samples instead of steps keeps a resume, or a change of batch size,
exact without saving scheduler state (torch's step-based schedulers would need both).
"""

from __future__ import annotations

import copy
import math

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


class EMA(torch.nn.Module):
    """Exponential moving average of a model's weights, with a half-life counted in samples.

    Per update of `batch_size` samples: beta = 0.5 ** (batch_size / halflife_samples)
    (EDM2's parameterisation by half-life, so the average does not depend on the batch size).
    Buffers (e.g. norm statistics) are copied, not averaged.
    """

    def __init__(self, model: torch.nn.Module, halflife_samples: int) -> None:
        super().__init__()
        self.halflife_samples = halflife_samples
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._ema_params: list[torch.Tensor] = [
            p for p in self.model.parameters() if p.is_floating_point()
        ]
        self._ema_buffers = list(self.model.buffers())

    @torch.no_grad()
    def update(self, model: torch.nn.Module, batch_size: int) -> None:
        params = [p.detach() for p in model.parameters() if p.is_floating_point()]
        buffers = list(model.buffers())
        if self.halflife_samples <= 0:
            torch._foreach_copy_(self._ema_params, params)
        else:
            beta = 0.5 ** (batch_size / self.halflife_samples)
            torch._foreach_lerp_(self._ema_params, params, 1.0 - beta)
        if buffers:
            torch._foreach_copy_(self._ema_buffers, buffers)
