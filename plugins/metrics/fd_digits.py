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
CPU in about 3.5 minutes (one thread, 30 epochs) by::

    python -m ulframe_plugins.metrics.fd_digits --out plugins/metrics/fd_digits.pt

which trains on the train digits with random shifts, rotations and scalings, reports accuracy on
the held-out eval digits and stores it in the file (``heldout_accuracy``; see
``ulframe plugins --kind metrics`` or :func:`load_digit_judge`'s metadata). Training is seeded;
bit-exact weights also need the same torch build and thread count.

Inputs (N, C, H, W) in [-1, 1], any C (channels are averaged to grey) and any size (resized to
:data:`RESOLUTION`, bilinear, antialiased when shrinking).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ulframe.errors import UserError
from ulframe.eval.frechet import FeatureFrechetMetric

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS = Path(__file__).with_name("fd_digits.pt")
WIDTHS = (32, 64, 128)
"""Conv widths: two 3x3 convs per width, then a 2x down (32 -> 16 -> 8 -> 4)."""
FEATURE_DIM = WIDTHS[-1]
RESOLUTION = 32
NUM_CLASSES = 10
MAX_SHIFT = 3
"""Augmentation: pixels of random shift (reflection-free: the digits lie on black)."""
MAX_ROTATION_DEGREES = 12.0
SCALE_RANGE = (0.85, 1.15)


def to_grey(x: Tensor, resolution: int = RESOLUTION) -> Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, 1, resolution, resolution) grey, float32, clamped."""
    x = x.float().clamp(-1, 1).mean(1, keepdim=True)
    if x.shape[-2:] != (resolution, resolution):
        shrink = x.shape[-1] > resolution
        x = F.interpolate(x, size=(resolution,) * 2, mode="bilinear", antialias=shrink)
    return x


class DigitJudge(nn.Module):
    """Conv-BN-ReLU stages, global average pool (the features), a linear classifier.

    ``features(x)`` -> (N, widths[-1]); ``forward(x)`` -> logits (N, num_classes); both take
    images (N, C, H, W) in [-1, 1] of any channel count and size (see :func:`to_grey`).
    """

    def __init__(self, widths: Sequence[int] = WIDTHS, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for width in widths:
            for stride in (1, 2):
                layers += [
                    nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                channels = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(to_grey(x)).mean((2, 3))  # (N, D)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # (N, num_classes)

    @torch.no_grad()
    def classify(self, x: Tensor, batch_size: int = 256) -> Tensor:
        """Predicted labels (N,) of images (N, C, H, W), in chunks."""
        self.to(x.device)
        return torch.cat([self(chunk).argmax(1) for chunk in x.split(batch_size)])


def load_digit_judge(
    weights_path: str | Path | None = None, parameter: str = "metrics.fd_digits.weights_path"
) -> tuple[DigitJudge, dict]:
    """The judge in eval mode and its file's metadata; ``UserError`` naming ``parameter``."""
    path = DEFAULT_WEIGHTS if weights_path is None else Path(weights_path).expanduser()
    shown = f"{parameter} = {str(path)!r}" if weights_path is not None else f"{path} (default)"
    if not path.is_file():
        hint = (
            "the shipped weights are missing from the installation; rebuild them with "
            "`python -m ulframe_plugins.metrics.fd_digits --out <file>`"
            if weights_path is None
            else "no such file"
        )
        raise UserError(f"{shown}: {hint}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        network = DigitJudge(tuple(int(w) for w in blob["widths"]), int(blob["num_classes"]))
        network.load_state_dict(blob["state_dict"])
    except Exception as error:
        raise UserError(
            f"{shown}: not an fd_digits weights file ({type(error).__name__}: {error})"
        ) from error
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    return network.eval().requires_grad_(False), meta


class FDDigits(FeatureFrechetMetric):
    """Fréchet distance on the digit judge's features, and the judge's class accuracy.

    ``metric(reference, estimate, labels=None)`` takes two batches (N, C, H, W) in [-1, 1]
    (N >= 2 each, any C) and returns ``{"fd_digits": value}``, plus ``"class_accuracy"`` (the
    fraction of ``estimate`` that the judge labels as ``labels``) when ``labels`` (N,) are given.

    Args:
        weights_path: a weights file made by ``python -m ulframe_plugins.metrics.fd_digits``;
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


# ---------------------------------------------------------------------------------- training


def _split(split: str) -> tuple[Tensor, Tensor]:
    """Every digit of ``datasets.digits`` ``split`` at RESOLUTION: (x (N, 1, R, R), labels)."""
    from ulframe_plugins.datasets.digits import Digits

    source = Digits(resolution=RESOLUTION).source(split)
    examples = [source.decode(item) for item in source.items]
    x = torch.stack([e["x"] for e in examples])
    return x, torch.tensor([int(e["label"]) for e in examples])


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random rotation, scaling and shift of a batch (N, 1, R, R); background stays black."""
    n = x.shape[0]

    def uniform(low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    angle = uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES) * math.pi / 180
    scale = uniform(*SCALE_RANGE)
    shift = uniform(-MAX_SHIFT, MAX_SHIFT), uniform(-MAX_SHIFT, MAX_SHIFT)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    size = x.shape[-1]
    theta = torch.stack(
        [
            torch.stack([cos, -sin, shift[0] * 2 / size], 1),
            torch.stack([sin, cos, shift[1] * 2 / size], 1),
        ],
        1,
    )  # (N, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # grid_sample pads with 0; shift to [0, 2] first so that padding is black (-1).
    return F.grid_sample(x + 1, grid, align_corners=False) - 1


@torch.no_grad()
def accuracy(network: DigitJudge, x: Tensor, labels: Tensor) -> float:
    network.eval()
    return float((network.classify(x) == labels).float().mean())


def train(
    epochs: int = 30, batch_size: int = 64, lr: float = 3e-3, seed: int = 0
) -> tuple[DigitJudge, dict[str, float | int]]:
    """Train the judge on the train digits; returns it (eval mode) and its held-out stats."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    x_train, y_train = _split("train")
    x_eval, y_eval = _split("eval")
    network = DigitJudge()
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=5e-4)
    steps_per_epoch = len(x_train) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch
    )
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        network.train()
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(steps_per_epoch):
            index = order[i * batch_size : (i + 1) * batch_size]
            loss = F.cross_entropy(network(augment(x_train[index], generator)), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if (epoch + 1) % 5 == 0 or epoch + 1 == epochs:
            logger.info(
                "epoch %d/%d: loss %.3f, held-out accuracy %.4f (%.0fs)",
                epoch + 1,
                epochs,
                float(loss.detach()),
                accuracy(network, x_eval, y_eval),
                time.perf_counter() - start,
            )
    stats = {
        "train_accuracy": accuracy(network, x_train, y_train),
        "heldout_accuracy": accuracy(network, x_eval, y_eval),
        "train_digits": len(x_train),
        "eval_digits": len(x_eval),
        "epochs": epochs,
        "seed": seed,
    }
    return network.eval(), stats


def save(network: DigitJudge, stats: dict[str, float | int], out: Path) -> None:
    """Write the weights file :func:`load_digit_judge` reads (tensors and plain values only)."""
    blob = {
        "state_dict": {k: v.detach().clone() for k, v in network.state_dict().items()},
        "widths": list(WIDTHS),
        "num_classes": NUM_CLASSES,
        "resolution": RESOLUTION,
        **stats,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(blob, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ulframe_plugins.metrics.fd_digits",
        description="Train the digit judge on the train split of datasets.digits (CPU, ~3.5 min on one thread).",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS, help="weights file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args(argv)
    network, stats = train(epochs=args.epochs, seed=args.seed)
    save(network, stats, args.out)
    logger.info(
        "wrote %s (%d bytes): held-out accuracy %.4f on %d eval digits, train accuracy %.4f",
        args.out,
        args.out.stat().st_size,
        stats["heldout_accuracy"],
        stats["eval_digits"],
        stats["train_accuracy"],
    )
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main())
