"""ulframe.eval.batches (the skeleton of a stage's evaluation) and metrics.bits_per_pixel."""

from __future__ import annotations

import math

import pytest
import torch

from ulframe.eval.batches import Measured, evaluate_batches
from ulframe.eval.metrics import bits_per_pixel, psnr, ssim


def test_bits_per_pixel_divides_by_ln2_and_pixels() -> None:
    nats = torch.tensor([math.log(2) * 64, 0.0])
    assert bits_per_pixel(nats, 64).tolist() == [1.0, 0.0]


def test_means_are_weighted_by_batch_size_and_reconstructions_scored() -> None:
    g = torch.Generator().manual_seed(0)
    batches = [{"x": torch.rand((b, 3, 8, 8), generator=g) * 2 - 1} for b in (3, 1)]
    recon = {id(b["x"]): (b["x"] * 0.5) for b in batches}

    def measure(batch):
        x = batch["x"]
        return Measured({"loss": float(x.shape[0])}, recon[id(x)], {"half": x * 0.5})

    result = evaluate_batches(batches, measure, pairs=2)
    assert result.scalars["loss"] == pytest.approx((3 * 3 + 1 * 1) / 4)
    expected_psnr = sum(
        float(psnr(b["x"], recon[id(b["x"])]).mean()) * len(b["x"]) for b in batches
    )
    assert result.scalars["psnr"] == pytest.approx(expected_psnr / 4)
    expected_ssim = sum(
        float(ssim(b["x"], recon[id(b["x"])]).mean()) * len(b["x"]) for b in batches
    )
    assert result.scalars["ssim"] == pytest.approx(expected_ssim / 4)
    x = batches[0]["x"]
    assert result.pairs is not None and result.pairs.shape == (4, 3, 8, 8)
    torch.testing.assert_close(result.pairs[0::2], x[:2])  # input, reconstruction, ...
    torch.testing.assert_close(result.pairs[1::2], (x[:2] * 0.5).clamp(-1, 1))
    torch.testing.assert_close(result.shown["half"], x[:2] * 0.5)


def test_without_reconstructions_no_scores_and_no_pairs() -> None:
    batches = [{"z": torch.zeros(2, 4)}, {"z": torch.zeros(6, 4)}]
    result = evaluate_batches(batches, lambda b: Measured({"n": float(len(b["z"]))}), pairs=4)
    assert result.scalars == {"n": pytest.approx((4 + 36) / 8)} and result.pairs is None
