"""Metrics between references and estimates (metric plugins) and their pure functions."""

from __future__ import annotations

import math

import torch


def bits_per_pixel(nats: torch.Tensor, pixels: int) -> torch.Tensor:
    """Nats (of one example, or any tensor of them) as bits per pixel: nats / (ln 2 · pixels),
    `pixels` = H·W of an image (T·H·W of a clip), not counting channels."""
    return nats / (math.log(2) * pixels)


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


def _gaussian_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()  # (size,)


def ssim(
    reference: torch.Tensor,
    estimate: torch.Tensor,
    data_range: float = 2.0,
    window: int = 11,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Structural similarity per example, (B,), of (B, C, H, W) images (Wang et al. 2004).

    Gaussian window (11 taps, sigma 1.5, shrunk to the largest odd size that fits small images),
    statistics per channel over the valid region, K1 = 0.01, K2 = 0.03; the mean over channels
    and positions. Matches `skimage.metrics.structural_similarity(..., gaussian_weights=True,
    use_sample_covariance=False)`. Estimates are clamped to [-1, 1] like `psnr`.
    """
    x = reference.double()
    y = estimate.double().clamp(-1, 1)
    _, c, h, w = x.shape
    size = min(window, h, w)
    size -= 1 - size % 2  # odd
    g = _gaussian_window(size, sigma, x.device)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, size, size)  # (C, 1, k, k)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, kernel, groups=c)  # valid

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return s.flatten(1).mean(1).float()  # (B,)


LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))
"""The 5-point discrete Laplacian: the high-frequency energy that speckle adds."""


def laplacian_energy(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute Laplacian per example, (B,), of images (B, C, H, W) clamped to [-1, 1].

    Over the valid region and every channel. Speckle (isolated bright or dark pixels) raises it;
    a clean stroke or a smooth gradient barely does.
    """
    x = x.float().clamp(-1, 1)
    c = x.shape[1]
    kernel = torch.tensor(LAPLACIAN, device=x.device).expand(c, 1, 3, 3)
    return torch.nn.functional.conv2d(x, kernel, groups=c).abs().flatten(1).mean(1)


def speckle(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    """Mean absolute Laplacian of `estimate` over that of `reference` (1: as clean as the data)."""
    return float(laplacian_energy(estimate).mean() / laplacian_energy(reference).mean())
