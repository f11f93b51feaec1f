"""``metrics.fd_photos``: a Fréchet distance on features of a small net trained on ``datasets.photos``.

This is **not FID**. FID uses Inception-v3 features learned on ImageNet; offline, with no such
weights, this metric uses the penultimate features (global average pool, :data:`FEATURE_DIM`-d)
of a small convolutional classifier trained to tell which of the 8 photographs of
``datasets.photos`` a 32x32 crop came from. Its values are comparable only with other
``fd_photos`` values from the same weights file, and they measure what that classifier sees
(colour, texture, content of those 8 photographs), not general image quality.

The default weights ship next to this module (``fd_photos.pt``, package data, 311 KB). They were
made on CPU (about 2 minutes on a busy 2-core machine: 15 s decoding crops, 90 s training) by
the training script of a ulframe checkout (this module only loads and runs the network)::

    python tools/train_judges.py --judge photos --out plugins/metrics/fd_photos.pt

which trains on crops of the train split (the left 85% of each photograph), reports accuracy on
crops of the held-out eval split (the right 15%) and stores it in the file
(``heldout_accuracy``: 0.662 on 512 crops, chance 0.125; the misses are mostly astronaut,
cat and coffee crops whose right-hand strip shows content absent from the left part). Training is seeded (``--seed``); bit-exact weights also need the same
torch build and thread count.

Inputs (N, 3, H, W) in [-1, 1] are clamped and resized to the training resolution (bilinear,
antialiased when shrinking) if they are not already at it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ulframe.eval.frechet import FeatureFrechetMetric, load_judge

DEFAULT_WEIGHTS = Path(__file__).with_name("fd_photos.pt")
WIDTHS = (32, 64, 96)  # conv widths; each 3x3 conv halves the grid (32 -> 16 -> 8 -> 4)
FEATURE_DIM = WIDTHS[-1]
RESOLUTION = 32
NUM_CLASSES = 8


class ConvJudge(nn.Module):
    """The shipped judges' network: Conv-BN-ReLU stages, global average pool (the features), a
    linear classifier (``metrics.fd_photos`` and ``metrics.fd_digits`` each ship their weights).

    Each width in ``widths`` is one 3x3 conv (no bias; padding 1) per stride in ``strides``, each
    followed by BatchNorm and ReLU. ``features(x)`` -> (N, widths[-1]); ``forward(x)`` -> logits
    (N, num_classes); both take images (N, in_channels, H, W).
    """

    def __init__(
        self, in_channels: int, widths: Sequence[int], strides: Sequence[int], num_classes: int
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            for stride in strides:
                layers += [
                    nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                channels = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x).mean((2, 3))  # (N, D)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # (N, num_classes)


class PhotoFeatureNet(ConvJudge):
    """The photo judge: a stride-2 conv per width on (N, 3, 32, 32) crops (:class:`ConvJudge`)."""

    def __init__(self, widths: Sequence[int] = WIDTHS, num_classes: int = NUM_CLASSES) -> None:
        super().__init__(3, widths, (2,), num_classes)


def load_photo_net(weights_path: str | Path | None, parameter: str) -> tuple[PhotoFeatureNet, dict]:
    """The network in eval mode and the file's metadata; ``UserError`` naming ``parameter``."""
    return load_judge(
        weights_path, DEFAULT_WEIGHTS, parameter, "photos",
        lambda blob: PhotoFeatureNet(tuple(int(w) for w in blob["widths"]), int(blob["num_classes"])),
    )  # fmt: skip


class FDPhotos(FeatureFrechetMetric):
    """Fréchet distance on features of a classifier of the 8 ``datasets.photos`` photographs.

    Not FID (see the module docstring). ``metric(reference, estimate)`` takes two (N, 3, H, W)
    batches in [-1, 1] (N >= 2 each) and returns ``{"fd_photos": value}``.

    Args:
        weights_path: a weights file made by ``tools/train_judges.py --judge photos``;
            ``None`` uses the one shipped with ulframe.
        batch_size: images per forward pass.
    """

    name = "fd_photos"

    def __init__(self, weights_path: str | None = None, batch_size: int = 256) -> None:
        self.weights_path = weights_path
        self.batch_size = batch_size
        self.network: Any
        self.network, self.meta = load_photo_net(weights_path, "metrics.fd_photos.weights_path")
        self.resolution = int(self.meta.get("resolution", RESOLUTION))

    def embed(self, x: Tensor) -> Tensor:
        """Penultimate features of a chunk, resized to the network's resolution if needed."""
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution,) * 2, mode="bilinear", antialias=True)
        return self.network.features(x)
