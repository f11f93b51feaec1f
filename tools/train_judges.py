"""Train the judges of the offline sample metrics: ``metrics.fd_digits`` and ``metrics.fd_photos``.

One script for both (the metric plugins only load and run a judge; training is no part of an
evaluation)::

    python tools/train_judges.py --judge digits --out plugins/metrics/fd_digits.pt
    python tools/train_judges.py --judge photos --out plugins/metrics/fd_photos.pt

- ``digits``: the digit judge (``ulframe_plugins.metrics.fd_digits.DigitJudge``), a classifier
  of the ten handwritten digits trained on the **train split of ``datasets.digits`` only**
  with random shifts, rotations and scalings (AdamW, one-cycle learning rate, 30 epochs by
  default: about 3.5 minutes on one CPU thread); the held-out accuracy on the eval digits is
  stored in the file (``heldout_accuracy``).
- ``photos``: the feature net of ``metrics.fd_photos``
  (``ulframe_plugins.metrics.fd_photos.PhotoFeatureNet``), a classifier of which of the 8
  photographs of ``datasets.photos`` a 32x32 crop came from, trained on crops of the train split
  (the left 85% of each photograph) with random shifts of up to 2 pixels (5 epochs by default:
  about 2 minutes on a busy 2-core machine, 15 s of it decoding crops); accuracy on crops of
  the held-out eval split (the right 15%) is stored in the file.

The file holds the weights, the network's shape (``widths``, ``num_classes``, ``resolution``)
and the training statistics; the plugins' loaders (``load_digit_judge``, ``load_photo_net``)
read it. Training is seeded (``--seed``); bit-exact weights also need the same torch build and
thread count. This script is not installed with ulframe: run it from a checkout (it imports the
installed ``ulframe_plugins``).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ulframe_plugins.metrics import fd_digits, fd_photos

logger = logging.getLogger("train_judges")

JUDGES = ("digits", "photos")
DEFAULT_EPOCHS = {"digits": 30, "photos": 5}

# ---- digits: augmentation of the train digits ---------------------------------------------------
MAX_SHIFT = 3
"""Pixels of random shift (reflection-free: the digits lie on black)."""
MAX_ROTATION_DEGREES = 12.0
SCALE_RANGE = (0.85, 1.15)

# ---- photos --------------------------------------------------------------------------------------
PHOTO_TRAIN_SCALE_RANGE = (0.05, 1.0)  # crop sides down to the narrow held-out strip's small crops
PHOTO_EVAL_SCALE_RANGE = (0.25, 1.0)
PHOTO_SHIFT = 2  # pixels of random shift (reflection padding)


@torch.no_grad()
def accuracy(network: nn.Module, x: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """The fraction of `x` that `network` (logits) labels as `labels`, in eval mode."""
    network.eval()
    predictions = torch.cat([network(chunk).argmax(1) for chunk in x.split(batch_size)])
    return float((predictions == labels).float().mean())


def save(
    network: nn.Module, shape: dict[str, object], stats: dict[str, float | int], out: Path
) -> None:
    """Write the weights file the plugins' loaders read (tensors and plain values only)."""
    blob = {
        "state_dict": {k: v.detach().clone() for k, v in network.state_dict().items()},
        **shape,
        **stats,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(blob, out)


# ---- digits ------------------------------------------------------------------------------------
def digit_split(split: str) -> tuple[Tensor, Tensor]:
    """Every digit of ``datasets.digits`` ``split`` at the judge's resolution: (x, labels)."""
    from ulframe_plugins.datasets.digits import Digits

    source = Digits(resolution=fd_digits.RESOLUTION).source(split)
    examples = [source.decode(item) for item in source.items]
    x = torch.stack([e["x"] for e in examples])
    return x, torch.tensor([int(e["label"]) for e in examples])


def augment_digits(x: Tensor, generator: torch.Generator) -> Tensor:
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


def train_digits(
    epochs: int = 30, batch_size: int = 64, lr: float = 3e-3, seed: int = 0
) -> tuple[fd_digits.DigitJudge, dict[str, float | int]]:
    """Train the digit judge on the train digits; returns it (eval mode) and its held-out stats."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    x_train, y_train = digit_split("train")
    x_eval, y_eval = digit_split("eval")
    network = fd_digits.DigitJudge()
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
            loss = F.cross_entropy(
                network(augment_digits(x_train[index], generator)), y_train[index]
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if (epoch + 1) % 5 == 0 or epoch + 1 == epochs:
            logger.info(
                "epoch %d/%d: loss %.3f, held-out accuracy %.4f (%.0fs)",
                epoch + 1, epochs, float(loss.detach()), accuracy(network, x_eval, y_eval),
                time.perf_counter() - start,
            )  # fmt: skip
    stats = {
        "train_accuracy": accuracy(network, x_train, y_train),
        "heldout_accuracy": accuracy(network, x_eval, y_eval),
        "train_digits": len(x_train),
        "eval_digits": len(x_eval),
        "epochs": epochs,
        "seed": seed,
    }
    return network.eval(), stats


# ---- photos ------------------------------------------------------------------------------------
def photo_crops(
    split: str, count: int, seed: int, scale_range: tuple[float, float] = PHOTO_EVAL_SCALE_RANGE
) -> tuple[Tensor, Tensor]:
    """``count`` crops of ``datasets.photos`` ``split`` at the net's resolution: (x, labels)."""
    from ulframe_plugins.datasets.photos import Photos

    photos = Photos(
        resolution=fd_photos.RESOLUTION, crops_per_epoch=count, eval_crops=count,
        scale_range=scale_range, seed=seed,
    )  # fmt: skip
    source = photos.source(split)
    examples = [source.decode(item) for item in source.items]
    x = torch.stack([e["x"] for e in examples])
    return x, torch.tensor([int(e["label"]) for e in examples])


def train_photos(
    train_crops: int = 6144,
    eval_crops: int = 512,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
) -> tuple[fd_photos.PhotoFeatureNet, dict[str, float | int]]:
    """Train the photo classifier on train-split crops; returns it (eval mode) and its held-out
    stats. Augmentation on top of the dataset's random crops and mirrors: random shifts of up to
    `PHOTO_SHIFT` pixels (reflection padding). AdamW with a one-cycle learning rate."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    x_train, y_train = photo_crops("train", train_crops, seed, PHOTO_TRAIN_SCALE_RANGE)
    x_eval, y_eval = photo_crops("eval", eval_crops, seed)
    logger.info(
        "decoded %d train / %d eval crops in %.1fs",
        len(x_train), len(x_eval), time.perf_counter() - start,
    )  # fmt: skip
    batch_size = min(batch_size, len(x_train))
    network = fd_photos.PhotoFeatureNet()
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * (len(x_train) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    pad, size = PHOTO_SHIFT, fd_photos.RESOLUTION
    for epoch in range(epochs):
        network.train()
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(len(x_train) // batch_size):
            index = order[i * batch_size : (i + 1) * batch_size]
            x = F.pad(x_train[index], (pad,) * 4, mode="reflect")
            dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
            x = x[..., dy : dy + size, dx : dx + size]
            loss = F.cross_entropy(network(x), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        logger.info(
            "epoch %d/%d: loss %.3f, held-out accuracy %.3f (%.0fs)",
            epoch + 1, epochs, float(loss.detach()), accuracy(network, x_eval, y_eval),
            time.perf_counter() - start,
        )  # fmt: skip
    stats = {
        "train_accuracy": accuracy(network, x_train, y_train),
        "heldout_accuracy": accuracy(network, x_eval, y_eval),
        "train_crops": train_crops,
        "eval_crops": eval_crops,
        "epochs": epochs,
        "seed": seed,
    }
    return network.eval(), stats


# ---- the command -------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python tools/train_judges.py",
        description="Train the judge of metrics.fd_digits (--judge digits) or metrics.fd_photos "
        "(--judge photos) on CPU and write its weights file.",
    )
    p.add_argument("--judge", choices=JUDGES, required=True, help="which judge to train")
    p.add_argument("--out", type=Path, required=True, help="weights file to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, help="default: 30 (digits), 5 (photos)")
    p.add_argument("--train-crops", type=int, default=6144, help="photos: train crops")
    p.add_argument("--eval-crops", type=int, default=512, help="photos: held-out crops")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    epochs = args.epochs if args.epochs is not None else DEFAULT_EPOCHS[args.judge]
    network: nn.Module
    if args.judge == "digits":
        network, stats = train_digits(epochs=epochs, seed=args.seed)
        shape = {"widths": list(fd_digits.WIDTHS), "num_classes": fd_digits.NUM_CLASSES,
                 "resolution": fd_digits.RESOLUTION}  # fmt: skip
    else:
        network, stats = train_photos(
            train_crops=args.train_crops, eval_crops=args.eval_crops, epochs=epochs,
            seed=args.seed,
        )  # fmt: skip
        shape = {"widths": list(fd_photos.WIDTHS), "num_classes": fd_photos.NUM_CLASSES,
                 "resolution": fd_photos.RESOLUTION}  # fmt: skip
    save(network, shape, stats, args.out)
    # the file loads as the metric loads it
    if args.judge == "digits":
        fd_digits.load_digit_judge(args.out, "--out")
    else:
        fd_photos.load_photo_net(args.out, "--out")
    logger.info(
        "wrote %s (%d bytes): held-out accuracy %.4f, train accuracy %.4f",
        args.out, args.out.stat().st_size, stats["heldout_accuracy"], stats["train_accuracy"],
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main())
