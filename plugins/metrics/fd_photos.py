"""``metrics.fd_photos``: a Fréchet distance on features of a small net trained on ``datasets.photos``.

This is **not FID**. FID uses Inception-v3 features learned on ImageNet; offline, with no such
weights, this metric uses the penultimate features (global average pool, :data:`FEATURE_DIM`-d)
of a small convolutional classifier trained to tell which of the 8 photographs of
``datasets.photos`` a 32x32 crop came from. Its values are comparable only with other
``fd_photos`` values from the same weights file, and they measure what that classifier sees
(colour, texture, content of those 8 photographs), not general image quality.

The default weights ship next to this module (``fd_photos.pt``, package data, 311 KB). They were
made on CPU (about 2 minutes on a busy 2-core machine: 15 s decoding crops, 90 s training) by::

    python -m ulframe_plugins.metrics.fd_photos --out plugins/metrics/fd_photos.pt

which trains on crops of the train split (the left 85% of each photograph), reports accuracy on
crops of the held-out eval split (the right 15%) and stores it in the file
(``heldout_accuracy``: 0.662 on 512 crops, chance 0.125; the misses are mostly astronaut,
cat and coffee crops whose right-hand strip shows content absent from the left part). Training is seeded (``--seed``); bit-exact weights also need the same
torch build and thread count.

Inputs (N, 3, H, W) in [-1, 1] are clamped and resized to the training resolution (bilinear,
antialiased when shrinking) if they are not already at it.
"""

from __future__ import annotations

import argparse
import logging
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

DEFAULT_WEIGHTS = Path(__file__).with_name("fd_photos.pt")
WIDTHS = (32, 64, 96)  # conv widths; each 3x3 conv halves the grid (32 -> 16 -> 8 -> 4)
FEATURE_DIM = WIDTHS[-1]
TRAIN_SCALE_RANGE = (0.05, 1.0)  # crop sides down to the narrow held-out strip's small crops
RESOLUTION = 32
NUM_CLASSES = 8


class PhotoFeatureNet(nn.Module):
    """Conv-BN-ReLU stack, global average pool (the features), linear classifier.

    ``features(x)`` -> (N, widths[-1]); ``forward(x)`` -> logits (N, num_classes).
    """

    def __init__(self, widths: Sequence[int] = WIDTHS, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in widths:
            layers += [
                nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x).mean((2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def load_photo_net(weights_path: str | Path | None, parameter: str) -> tuple[PhotoFeatureNet, dict]:
    """The network in eval mode and the file's metadata; ``UserError`` naming ``parameter``."""
    path = DEFAULT_WEIGHTS if weights_path is None else Path(weights_path).expanduser()
    shown = f"{parameter} = {str(path)!r}" if weights_path is not None else f"{path} (default)"
    if not path.is_file():
        hint = (
            "the shipped weights are missing from the installation; rebuild them with "
            "`python -m ulframe_plugins.metrics.fd_photos --out <file>`"
            if weights_path is None
            else "no such file"
        )
        raise UserError(f"{shown}: {hint}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        widths = tuple(int(w) for w in blob["widths"])
        network = PhotoFeatureNet(widths, int(blob["num_classes"]))
        network.load_state_dict(blob["state_dict"])
    except Exception as error:
        raise UserError(
            f"{shown}: not an fd_photos weights file ({type(error).__name__}: {error})"
        ) from error
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    return network.eval().requires_grad_(False), meta


class FDPhotos(FeatureFrechetMetric):
    """Fréchet distance on features of a classifier of the 8 ``datasets.photos`` photographs.

    Not FID (see the module docstring). ``metric(reference, estimate)`` takes two (N, 3, H, W)
    batches in [-1, 1] (N >= 2 each) and returns ``{"fd_photos": value}``.

    Args:
        weights_path: a weights file made by ``python -m ulframe_plugins.metrics.fd_photos``;
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


# ---------------------------------------------------------------------------------- training


def _decode_split(
    split: str, count: int, seed: int, scale_range: tuple[float, float] = (0.25, 1.0)
) -> tuple[Tensor, Tensor]:
    """``count`` crops of ``datasets.photos`` ``split`` at RESOLUTION: (x (N, 3, R, R), labels)."""
    from ulframe_plugins.datasets.photos import Photos

    photos = Photos(
        resolution=RESOLUTION,
        crops_per_epoch=count,
        eval_crops=count,
        scale_range=scale_range,
        seed=seed,
    )
    source = photos.source(split)
    examples = [source.decode(item) for item in source.items]
    x = torch.stack([e["x"] for e in examples])
    labels = torch.tensor([int(e["label"]) for e in examples])
    return x, labels


@torch.no_grad()
def accuracy(network: PhotoFeatureNet, x: Tensor, labels: Tensor) -> float:
    network.eval()
    predictions = torch.cat([network(chunk).argmax(1) for chunk in x.split(512)])
    return float((predictions == labels).float().mean())


def train(
    train_crops: int = 6144,
    eval_crops: int = 512,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
) -> tuple[PhotoFeatureNet, dict[str, float | int]]:
    """Train the classifier on train-split crops; returns it (eval mode) and its held-out stats.

    Augmentation on top of the dataset's random crops and mirrors: random shifts of up to 2
    pixels (reflection padding). AdamW with a one-cycle cosine learning rate.
    """
    torch.manual_seed(seed)
    start = time.perf_counter()
    x_train, y_train = _decode_split("train", train_crops, seed, TRAIN_SCALE_RANGE)
    x_eval, y_eval = _decode_split("eval", eval_crops, seed)
    logger.info(
        "decoded %d train / %d eval crops in %.1fs",
        len(x_train),
        len(x_eval),
        time.perf_counter() - start,
    )
    batch_size = min(batch_size, len(x_train))
    network = PhotoFeatureNet()
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * (len(x_train) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    pad = 2
    for epoch in range(epochs):
        network.train()
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(len(x_train) // batch_size):
            index = order[i * batch_size : (i + 1) * batch_size]
            x = F.pad(x_train[index], (pad,) * 4, mode="reflect")
            dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
            x = x[..., dy : dy + RESOLUTION, dx : dx + RESOLUTION]
            loss = F.cross_entropy(network(x), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        logger.info(
            "epoch %d/%d: loss %.3f, held-out accuracy %.3f (%.0fs)",
            epoch + 1,
            epochs,
            float(loss.detach()),
            accuracy(network, x_eval, y_eval),
            time.perf_counter() - start,
        )
    stats = {
        "train_accuracy": accuracy(network, x_train, y_train),
        "heldout_accuracy": accuracy(network, x_eval, y_eval),
        "train_crops": train_crops,
        "eval_crops": eval_crops,
        "epochs": epochs,
        "seed": seed,
    }
    return network.eval(), stats


def save(network: PhotoFeatureNet, stats: dict[str, float | int], out: Path) -> None:
    """Write the weights file :func:`load_photo_net` reads (tensors and plain values only)."""
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
        prog="python -m ulframe_plugins.metrics.fd_photos",
        description="Train the fd_photos feature network on datasets.photos (CPU, ~1 minute).",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS, help="weights file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-crops", type=int, default=6144)
    parser.add_argument("--eval-crops", type=int, default=512)
    args = parser.parse_args(argv)
    network, stats = train(
        train_crops=args.train_crops,
        eval_crops=args.eval_crops,
        epochs=args.epochs,
        seed=args.seed,
    )
    save(network, stats, args.out)
    logger.info(
        "wrote %s (%d bytes): held-out accuracy %.3f, train accuracy %.3f",
        args.out,
        args.out.stat().st_size,
        stats["heldout_accuracy"],
        stats["train_accuracy"],
    )
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main())
