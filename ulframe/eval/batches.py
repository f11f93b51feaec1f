"""The skeleton of a stage's evaluation: batch-weighted means, input/reconstruction pairs.

A stage measures one batch at a time (:class:`Measured`: scalars, optionally the batch's
reconstructions and per-example images to show); :func:`evaluate_batches` weights each batch's
scalars by its size, adds PSNR (and SSIM, for images) of the reconstructions, and keeps the first
`pairs` inputs beside their reconstructions (interleaved: input, reconstruction, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ulframe.eval.metrics import psnr, ssim
from ulframe.progress import progress


@dataclass
class Measured:
    """What a stage measured on one batch."""

    scalars: dict[str, float]
    x_hat: Tensor | None = None  # reconstructions of batch["x"]: PSNR, SSIM and the pairs shown
    shown: dict[str, Tensor] = field(default_factory=dict)  # per-example images, (B, ...) each


@dataclass
class Evaluated:
    """Batch-weighted means of the scalars, and the images kept."""

    scalars: dict[str, float]
    pairs: Tensor | None = None  # (2 k, C, *S): input, reconstruction, ... (k <= `pairs`)
    shown: dict[str, Tensor] = field(default_factory=dict)  # the first `pairs` of each image


def evaluate_batches(
    batches: Sequence[dict[str, Tensor]],
    measure: Callable[[dict[str, Tensor]], Measured],
    pairs: int = 0,
) -> Evaluated:
    """Run `measure` on every batch; means weighted by batch size, and up to `pairs` pairs."""
    sums: dict[str, float] = {}
    n = 0
    kept: list[Tensor] = []
    shown: dict[str, list[Tensor]] = {}
    for batch in progress(batches, phase="evaluation", unit="batches", leave=False):
        x = batch.get("x")
        b = next(iter(batch.values())).shape[0]
        measured = measure(batch)
        values = dict(measured.scalars)
        if measured.x_hat is not None and x is not None:
            values["psnr"] = float(psnr(x, measured.x_hat).mean())
            if x.dim() == 4:  # images: structural similarity too
                values["ssim"] = float(ssim(x, measured.x_hat).mean())
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v * b
        n += b
        if pairs > 0 and sum(len(t) for t in kept) < 2 * pairs:
            count = min(b, pairs)
            if measured.x_hat is not None and x is not None:
                x_hat = measured.x_hat[:count].clamp(-1, 1)
                kept.append(torch.stack([x[:count], x_hat], 1).flatten(0, 1))  # input, recon, ...
            for name, images in measured.shown.items():
                shown.setdefault(name, []).append(images[:count])
    scalars = {k: v / max(n, 1) for k, v in sums.items()}
    return Evaluated(
        scalars,
        torch.cat(kept)[: 2 * pairs] if kept else None,
        {name: torch.cat(images)[:pairs] for name, images in shown.items()},
    )
