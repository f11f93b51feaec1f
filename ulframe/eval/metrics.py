"""Metrics between references and estimates (metric plugins) and their pure functions."""

from __future__ import annotations

import torch


def psnr(reference: torch.Tensor, estimate: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per example, (B,). Data in [-1, 1] has range 2."""
    mse = (reference.float() - estimate.float().clamp(-1, 1)).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


class PSNR:
    """Peak signal-to-noise ratio (dB) of estimates in [-1, 1], averaged over the batch."""

    name = "psnr"

    def __init__(self, data_range: float = 2.0) -> None:
        self.data_range = data_range

    def __call__(self, reference: torch.Tensor, estimate: torch.Tensor) -> dict[str, float]:
        return {self.name: float(psnr(reference, estimate, self.data_range).mean())}
