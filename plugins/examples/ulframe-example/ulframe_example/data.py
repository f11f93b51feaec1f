"""A dataset plugin: stripes, a synthetic image dataset of two classes (no files, no download).

Example ``i`` of a split is a grey-level stripe pattern, horizontal (label 0) or vertical
(label 1), at a phase and frequency drawn from a generator seeded by (split, i): the same item
always decodes to the same image, and the two splits draw from different seeds, so no eval
image is a train image (``disjoint_splits = True``, which the contract kit checks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ulframe.data import Example
from ulframe.errors import ConfigError

SPLIT_SEEDS = {"train": 0, "eval": 1}


@dataclass(frozen=True)
class StripesSource:
    """The `Source` of one split: plain and picklable (it goes to worker processes)."""

    items: tuple[int, ...]  # seeds, one per example
    resolution: int
    channels: int

    def decode(self, item: int) -> Example:
        """``{"x": float32 (C, H, W) in [-1, 1], "label": int}``."""
        rng = np.random.default_rng(item)
        label = int(rng.integers(2))
        frequency = rng.uniform(1.0, 4.0)
        phase = rng.uniform(0.0, 2.0 * math.pi)
        axis = torch.linspace(0.0, 2.0 * math.pi, self.resolution)
        wave = torch.sin(frequency * axis + phase)  # (R,) in [-1, 1]
        image = wave[:, None].expand(-1, self.resolution)  # horizontal stripes: rows vary
        if label == 1:
            image = image.T
        x = image.expand(self.channels, -1, -1).contiguous().float()  # (C, H, W)
        return {"x": x, "label": label}


class Stripes:
    """Horizontal (0) or vertical (1) stripes, ``channels``×``resolution``² in [-1, 1].

    Args:
        resolution: image side in pixels.
        channels: 1 (grey) or 3 (the grey level in every channel).
        train_examples: examples in the train split.
        eval_examples: examples in the eval split.
    """

    num_classes = 2
    disjoint_splits = True  # eval items are never train items (checked by the contract kit)

    def __init__(
        self,
        resolution: int = 32,
        channels: int = 1,
        train_examples: int = 1024,
        eval_examples: int = 128,
    ) -> None:
        if resolution < 2:
            raise ConfigError(f"datasets.stripes.resolution must be >= 2; got {resolution}")
        if channels not in (1, 3):
            raise ConfigError(f"datasets.stripes.channels must be 1 or 3; got {channels}")
        self.resolution = resolution
        self.channels = channels
        self.counts = {"train": train_examples, "eval": eval_examples}

    def source(self, split: str) -> StripesSource:
        """The split's `Source`; item seeds differ between splits."""
        base = SPLIT_SEEDS[split] * 1_000_000
        items = tuple(range(base, base + self.counts[split]))
        return StripesSource(items, self.resolution, self.channels)
