"""Two plugins that break their contracts, each in one way.

- `datasets.hwc_uint8`: decodes to H×W×C uint8 numpy arrays (what an image file holds), not the
  float32 C×H×W tensor in [-1, 1] a Source must return;
- `weightings.nan`: returns NaN where λ > 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class HWCSource:
    items: tuple[int, ...]
    resolution: int

    def decode(self, item: int) -> dict[str, Any]:
        rng = np.random.default_rng(item)
        pixels = rng.integers(0, 256, size=(self.resolution, self.resolution, 3), dtype=np.uint8)
        return {"x": pixels, "label": item % 2}


class HWCDataset:
    """Random pixels as an image file holds them: (H, W, 3) uint8."""

    num_classes = 2

    def __init__(self, resolution: int = 64) -> None:
        self.resolution = resolution

    def source(self, split: str) -> HWCSource:
        start = 0 if split == "train" else 100
        return HWCSource(tuple(range(start, start + 8)), self.resolution)


class NaNWeighting:
    """w(λ) = 1 for λ <= 0, NaN above."""

    def __call__(self, logsnr: torch.Tensor) -> torch.Tensor:
        return torch.where(
            logsnr > 0, torch.full_like(logsnr, float("nan")), torch.ones_like(logsnr)
        )
