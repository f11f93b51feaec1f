"""The Fréchet distance between Gaussians fitted to features (FID, FVD, ``fd_photos``).

For features ``f`` of two sets, fitted by Gaussians ``N(mu1, S1)`` and ``N(mu2, S2)``::

    FD = |mu1 - mu2|² + tr S1 + tr S2 - 2 tr (S1^½ S2 S1^½)^½

(``tr (S1^½ S2 S1^½)^½`` equals the ``tr (S1 S2)^½`` of the FID paper: ``S1 S2`` is similar to
the symmetric PSD matrix ``S1^½ S2 S1^½``, so its eigenvalues are real and non-negative.)

Numerics, all in float64:

- :func:`frechet_distance` (from statistics): one symmetric eigendecomposition ``S1 = U Λ Uᵀ``,
  ``L = U Λ^½``, then the eigenvalues of the symmetric ``Lᵀ S2 L`` (same non-zero spectrum as
  ``S1^½ S2 S1^½``), square rooted and summed. Both spectra are cleaned of round-off first:
  eigenvalues below ``D·eps·λ_max`` are set to 0 (a covariance from fewer samples than dimensions
  is singular; its zero eigenvalues come out as ±1e-16·λ_max, whose square roots would add
  ~1e-8 relative error each). No general (non-symmetric) matrix square root, so no complex parts and no
  ``eps`` offset as in pytorch-fid's ``scipy.linalg.sqrtm`` path; a singular ``S1`` or ``S2``
  gives a finite answer. The result is clipped at 0 (a set against itself can round to -1e-12).
- :func:`frechet_distance_features` (from two feature sets): when a set has fewer samples than
  dimensions the covariances are low rank, ``S1 = AᵀA / (n1-1)`` and ``S2 = BᵀB / (n2-1)`` with
  ``A``, ``B`` the centred features, and ``tr (S1 S2)^½`` is exactly the nuclear norm of
  ``A Bᵀ / ((n1-1)(n2-1))^½`` (an ``n1 x n2`` SVD instead of a ``D x D`` eigendecomposition;
  2048-d Inception features on a small batch: milliseconds instead of seconds).
- :class:`FrechetStats` streams statistics: float64 sums of features and of their outer products
  and a count. Two accumulators merge by adding those three, so ranks combine by an all-reduce
  (SUM) of :meth:`FrechetStats.packed`. The covariance is ``(Σ f fᵀ - n mu muᵀ) / (n - 1)``; in
  float64 the cancellation costs about ``|mu|² / var`` ulps, negligible for network features.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from ulframe.errors import UserError

__all__ = [
    "FrechetStats",
    "frechet_distance",
    "frechet_distance_features",
    "gaussian_stats",
    "trace_sqrt_product",
]


def _features64(features: Tensor) -> Tensor:
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D); got shape {tuple(features.shape)}")
    if features.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 samples; got {features.shape[0]}")
    return features.detach().to(torch.float64)


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (D,) and unbiased covariance (D, D), float64, of features (N, D), N >= 2."""
    f = _features64(features)
    mu = f.mean(0)
    centred = f - mu
    sigma = centred.T @ centred / (f.shape[0] - 1)
    return mu, sigma


def _symmetric(matrix: Tensor) -> Tensor:
    return (matrix + matrix.T) / 2


def trace_sqrt_product(sigma1: Tensor, sigma2: Tensor) -> Tensor:
    """``tr (S1^½ S2 S1^½)^½`` of two symmetric PSD (D, D) matrices, in float64 (a 0-d tensor)."""
    s1 = _symmetric(sigma1.to(torch.float64))
    s2 = _symmetric(sigma2.to(torch.float64))
    eigvals, eigvecs = torch.linalg.eigh(s1)
    root = eigvecs * _nonnegative(eigvals).sqrt()  # (D, D): root @ root.T = S1
    inner = _symmetric(root.T @ s2 @ root)  # same non-zero spectrum as S1^½ S2 S1^½
    return _nonnegative(torch.linalg.eigvalsh(inner)).sqrt().sum()


def _nonnegative(eigvals: Tensor) -> Tensor:
    """Eigenvalues of a PSD matrix with round-off removed: those below ``D·eps·λ_max`` are 0.

    (Their square roots, ~1e-8 relative, would otherwise add up in a rank-deficient trace.)
    """
    tolerance = eigvals.numel() * torch.finfo(eigvals.dtype).eps * eigvals.abs().max()
    return torch.where(eigvals > tolerance, eigvals, torch.zeros_like(eigvals))


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (float64 math).

    Args:
        mu1, mu2: means, (D,).
        sigma1, sigma2: covariances, (D, D), symmetric positive semi-definite (may be singular).
    """
    mu1, mu2 = mu1.to(torch.float64), mu2.to(torch.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (*mu1.shape,) * 2:
        raise ValueError(
            "frechet_distance needs mu (D,) and sigma (D, D) of one D; got "
            f"{tuple(mu1.shape)}, {tuple(sigma1.shape)}, {tuple(mu2.shape)}, {tuple(sigma2.shape)}"
        )
    s1, s2 = sigma1.to(torch.float64), sigma2.to(torch.float64)
    value = (mu1 - mu2).square().sum() + s1.trace() + s2.trace()
    value = value - 2 * trace_sqrt_product(s1, s2)
    return max(float(value), 0.0)


def frechet_distance_features(features1: Tensor, features2: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N1, D) and (N2, D).

    Equal to ``frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))``; computed through
    the ``N1 x N2`` cross-Gram matrix when ``max(N1, N2) <= D`` (see the module docstring).
    """
    f1, f2 = _features64(features1), _features64(features2)
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature dimensions differ: {f1.shape[1]} and {f2.shape[1]}")
    (n1, dim), n2 = f1.shape, f2.shape[0]
    if max(n1, n2) > dim:
        return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))
    mu1, mu2 = f1.mean(0), f2.mean(0)
    a, b = f1 - mu1, f2 - mu2
    cross = a @ b.T / ((n1 - 1) * (n2 - 1)) ** 0.5  # (n1, n2)
    trace_sqrt = torch.linalg.svdvals(cross).sum()
    value = (mu1 - mu2).square().sum() + a.square().sum() / (n1 - 1)
    value = value + b.square().sum() / (n2 - 1) - 2 * trace_sqrt
    return max(float(value), 0.0)


class FrechetStats:
    """Streaming Gaussian statistics of features: float64 sum, sum of outer products, count.

    ``update(features)`` with (N, D) batches, ``merge(other)`` to combine accumulators (e.g.
    per-rank ones), ``mean_cov()`` for ``(mu, sigma)`` as :func:`gaussian_stats` gives them, and
    ``distance(other)`` for the Fréchet distance. Across ranks: all-reduce (SUM) the tensor of
    :meth:`packed` and rebuild with :meth:`from_packed`.
    """

    def __init__(self, dim: int, device: torch.device | str | None = None) -> None:
        self.dim = dim
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.count = 0

    def update(self, features: Tensor) -> FrechetStats:
        """Add a batch of features (N, D); returns self."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be (N, {self.dim}); got {tuple(features.shape)}")
        f = features.detach().to(device=self.sum.device, dtype=torch.float64)
        self.sum += f.sum(0)
        self.outer += f.T @ f
        self.count += f.shape[0]
        return self

    def merge(self, other: FrechetStats) -> FrechetStats:
        """Add another accumulator's statistics (same D); returns self."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of D={other.dim} into D={self.dim}")
        self.sum += other.sum.to(self.sum.device)
        self.outer += other.outer.to(self.outer.device)
        self.count += other.count
        return self

    def packed(self) -> Tensor:
        """One float64 tensor (D*D + D + 1,): outer products, sum, count (all-reduce with SUM)."""
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.sum.device)
        return torch.cat([self.outer.flatten(), self.sum, count])

    @classmethod
    def from_packed(cls, packed: Tensor, dim: int) -> FrechetStats:
        """Inverse of :meth:`packed`."""
        if packed.shape != (dim * dim + dim + 1,):
            raise ValueError(f"packed statistics of D={dim} have {dim * dim + dim + 1} entries")
        stats = cls(dim, device=packed.device)
        packed = packed.to(torch.float64)
        stats.outer = packed[: dim * dim].reshape(dim, dim).clone()
        stats.sum = packed[dim * dim : dim * dim + dim].clone()
        stats.count = round(float(packed[-1]))
        return stats

    def mean_cov(self) -> tuple[Tensor, Tensor]:
        """Mean (D,) and unbiased covariance (D, D), float64."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples; got {self.count}")
        mu = self.sum / self.count
        sigma = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return mu, _symmetric(sigma)

    def distance(self, other: FrechetStats) -> float:
        """Fréchet distance between the Gaussians of two accumulators."""
        mu1, sigma1 = self.mean_cov()
        mu2, sigma2 = other.mean_cov()
        return frechet_distance(mu1.cpu(), sigma1.cpu(), mu2.cpu(), sigma2.cpu())


class FeatureFrechetMetric:
    """Base of Fréchet-distance metric plugins: a feature network, the distance, one signature.

    A subclass sets `name`, `batch_size` and `network` and defines `embed(x)`: the features of
    one chunk of images already clamped to [-1, 1] (its own resizing, quantisation...). Calling
    the metric returns `{name: FD(features(reference), features(estimate))}`.

    `in_channels` is the channel count the network takes (0: any). Other inputs are adapted
    (grey repeated to RGB, RGB averaged to grey), once with a log line, never a crash. A
    subclass that also defines `classify(x) -> labels (N,)` (a classifier of the data's
    classes) adds `class_accuracy` when the caller passes the labels the estimates were drawn for.
    """

    name: str
    batch_size: int
    network: torch.nn.Module
    in_channels: int = 3
    _adapted: bool = False

    def embed(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def adapt_channels(self, images: Tensor) -> Tensor:
        """Images (N, C, H, W) with the channel count the network takes."""
        channels = images.shape[1]
        if self.in_channels in (0, channels):
            return images
        if not self._adapted:
            self._adapted = True
            how = "repeated" if channels == 1 else "averaged"
            logging.getLogger(__name__).info(
                "%s: %d-channel images, the network takes %d: channels %s",
                self.name, channels, self.in_channels, how,
            )  # fmt: skip
        if channels == 1:
            return images.expand(-1, self.in_channels, -1, -1)
        grey = images.mean(1, keepdim=True)
        return grey if self.in_channels == 1 else grey.expand(-1, self.in_channels, -1, -1)

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Features (N, D), float32, of images (N, C, H, W) in [-1, 1], in chunks of batch_size."""
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W); got {tuple(images.shape)}")
        images = self.adapt_channels(images)
        self.network.to(images.device)
        return torch.cat(
            [self.embed(c.float().clamp(-1, 1)).float() for c in images.split(self.batch_size)]
        )

    def __call__(
        self, reference: Tensor, estimate: Tensor, labels: Tensor | None = None
    ) -> dict[str, float]:
        value = frechet_distance_features(self.features(reference), self.features(estimate))
        out = {self.name: value}
        classify = getattr(self, "classify", None)
        if labels is not None and classify is not None:
            predicted = classify(self.adapt_channels(estimate)).cpu()
            out["class_accuracy"] = float((predicted == labels.cpu()).float().mean())
        return out


Net = TypeVar("Net", bound=nn.Module)


def load_judge(
    weights_path: str | Path | None,
    default: Path,
    parameter: str,
    judge: str,
    build: Callable[[dict[str, Any]], Net],
) -> tuple[Net, dict[str, Any]]:
    """A shipped feature network (a "judge"), in eval mode without gradients, and its file's
    metadata (every key but ``state_dict``).

    The file is a ``torch.save`` dict read without unpickling code: ``state_dict`` and the
    values ``build(blob)`` needs to make the network. A missing or unreadable file is one
    ``UserError`` naming ``parameter`` (or the default path) and how to rebuild the shipped one
    (``tools/train_judges.py --judge JUDGE``).
    """
    path = default if weights_path is None else Path(weights_path).expanduser()
    shown = f"{parameter} = {str(path)!r}" if weights_path is not None else f"{path} (default)"
    if not path.is_file():
        hint = (
            "the shipped weights are missing from the installation; rebuild them with "
            f"`python tools/train_judges.py --judge {judge} --out <file>` (in a ulframe checkout)"
            if weights_path is None
            else "no such file"
        )
        raise UserError(f"{shown}: {hint}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        network = build(blob)
        network.load_state_dict(blob["state_dict"])
    except Exception as error:
        raise UserError(
            f"{shown}: not an fd_{judge} weights file ({type(error).__name__}: {error})"
        ) from error
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    return network.eval().requires_grad_(False), meta
