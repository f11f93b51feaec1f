"""``metrics.fd_digits``: the digit judge, a classifier of ``datasets.digits`` shipped with ulframe.

A small convolutional classifier of the ten handwritten digits, trained on the **train split of
``datasets.digits`` only** (the eval digits are never seen), gives two judgements of generated
digits that a person would otherwise make by eye:

- a Fréchet distance on its penultimate features (``fd_digits``; like FID, but on a network that
  knows digits, not ImageNet; comparable only with other ``fd_digits`` values from the same
  weights file), and
- class accuracy: the fraction of samples drawn for label c that the judge labels c
  (``class_accuracy``, when the caller passes the labels the samples were drawn for).

The default weights ship next to this module (``fd_digits.pt``, package data). They were made on
CPU in about 3.5 minutes (one thread, 30 epochs) by the training script of a ulframe checkout::

    python tools/train_judges.py --judge digits --out plugins/metrics/fd_digits.pt

which trains on the train digits with random shifts, rotations and scalings, reports accuracy on
the held-out eval digits and stores it in the file (``heldout_accuracy``; see
:func:`load_digit_judge`'s metadata). Training is seeded; bit-exact weights also need the same
torch build and thread count. This module only loads and runs the judge.

Inputs (N, C, H, W) in [-1, 1], any C (channels are averaged to grey) and any size (resized to
:data:`RESOLUTION`, bilinear, antialiased when shrinking).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ulframe.eval.frechet import FeatureFrechetMetric, load_judge
from ulframe_plugins.metrics.fd_photos import ConvJudge

DEFAULT_WEIGHTS = Path(__file__).with_name("fd_digits.pt")
WIDTHS = (32, 64, 128)
"""Conv widths: two 3x3 convs per width, then a 2x down (32 -> 16 -> 8 -> 4)."""
FEATURE_DIM = WIDTHS[-1]
RESOLUTION = 32
NUM_CLASSES = 10


def to_grey(x: Tensor, resolution: int = RESOLUTION) -> Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, 1, resolution, resolution) grey, float32, clamped."""
    x = x.float().clamp(-1, 1).mean(1, keepdim=True)
    if x.shape[-2:] != (resolution, resolution):
        shrink = x.shape[-1] > resolution
        x = F.interpolate(x, size=(resolution,) * 2, mode="bilinear", antialias=shrink)
    return x


class DigitJudge(ConvJudge):
    """The digit judge (:class:`~ulframe_plugins.metrics.fd_photos.ConvJudge`): two convs per
    width (stride 1, then 2) on grey (N, 1, 32, 32) digits.

    ``features(x)`` -> (N, widths[-1]); ``forward(x)`` -> logits (N, num_classes); both take
    images (N, C, H, W) in [-1, 1] of any channel count and size (see :func:`to_grey`).
    """

    def __init__(self, widths: Sequence[int] = WIDTHS, num_classes: int = NUM_CLASSES) -> None:
        super().__init__(1, widths, (1, 2), num_classes)

    def features(self, x: Tensor) -> Tensor:
        return super().features(to_grey(x))  # (N, D)

    @torch.no_grad()
    def classify(self, x: Tensor, batch_size: int = 256) -> Tensor:
        """Predicted labels (N,) of images (N, C, H, W), in chunks."""
        self.to(x.device)
        return torch.cat([self(chunk).argmax(1) for chunk in x.split(batch_size)])


def load_digit_judge(
    weights_path: str | Path | None = None, parameter: str = "metrics.fd_digits.weights_path"
) -> tuple[DigitJudge, dict]:
    """The judge in eval mode and its file's metadata; ``UserError`` naming ``parameter``."""
    return load_judge(
        weights_path, DEFAULT_WEIGHTS, parameter, "digits",
        lambda blob: DigitJudge(tuple(int(w) for w in blob["widths"]), int(blob["num_classes"])),
    )  # fmt: skip


class FDDigits(FeatureFrechetMetric):
    """Fréchet distance on the digit judge's features, and the judge's class accuracy.

    ``metric(reference, estimate, labels=None)`` takes two batches (N, C, H, W) in [-1, 1]
    (N >= 2 each, any C) and returns ``{"fd_digits": value}``, plus ``"class_accuracy"`` (the
    fraction of ``estimate`` that the judge labels as ``labels``) when ``labels`` (N,) are given.

    Args:
        weights_path: a weights file made by ``tools/train_judges.py --judge digits``;
            ``None`` uses the one shipped with ulframe.
        batch_size: images per forward pass.
    """

    name = "fd_digits"
    in_channels = 0  # any: the judge averages channels to grey itself

    def __init__(self, weights_path: str | None = None, batch_size: int = 256) -> None:
        self.weights_path = weights_path
        self.batch_size = batch_size
        self.network: Any
        self.network, self.meta = load_digit_judge(weights_path)

    def embed(self, x: Tensor) -> Tensor:
        return self.network.features(x)

    def classify(self, x: Tensor) -> Tensor:
        return self.network.classify(x, self.batch_size)
