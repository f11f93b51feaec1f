"""Variance-preserving diffusion in log-SNR coordinates: the conventions of ulframe.

Conventions (stated once, used by every module in ``ulframe.diffusion``):

- ``logsnr`` (λ) is the only noise-level currency. λ = log(alpha**2 / sigma**2).
  VDM's negated log-SNR is not used under any name.
- Variance preserving: ``alpha**2 = sigmoid(logsnr)``, ``sigma**2 = sigmoid(-logsnr)``,
  so ``alpha**2 + sigma**2 = 1`` and ``alpha / sigma = exp(logsnr / 2)``.
- Forward process: ``x_t = alpha * x + sigma * eps`` with ``eps ~ N(0, I)``.
- Time ``t ∈ [0, 1]``; t = 0 is the least noisy end. A schedule λ(t) is strictly decreasing,
  so ``neg_dlogsnr_dt = -dλ/dt > 0``.
- Shapes: ``logsnr`` is ``(B,)`` (one noise level per example); data ``x`` is
  ``(B, C, *spatial)`` (images ``(B, C, H, W)``, videos ``(B, C, T, H, W)``). The one helper
  that broadcasts a per-example value against data is :func:`expand_like`.
- Losses are nats per example, summed over all non-batch dimensions.
- Parameterisations: ``eps`` (noise), ``x`` (clean data), ``v = alpha * eps - sigma * x``
  (Salimans & Ho 2022). The conversions below are exact inverses of each other.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "alpha_sigma",
    "diffuse",
    "eps_from_v",
    "eps_from_x",
    "expand_like",
    "v_from_x_eps",
    "x_from_eps",
    "x_from_v",
]


def expand_like(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-example value ``v`` of shape ``(B,)`` to ``(B, 1, ..., 1)`` to match ``x``.

    A 0-d tensor is returned unchanged (it already broadcasts against anything).

    Args:
        v: per-example values, shape ``(B,)`` (or 0-d).
        x: data tensor, shape ``(B, C, *spatial)``.

    Returns:
        ``v`` viewed as ``(B,) + (1,) * (x.ndim - 1)``.
    """
    if v.ndim == 0:
        return v
    if v.ndim != 1 or v.shape[0] not in (x.shape[0], 1):
        raise ValueError(
            f"expand_like expects a (B,) tensor with B = {x.shape[0]} (x has shape "
            f"{tuple(x.shape)}); got shape {tuple(v.shape)}"
        )
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1)))


def alpha_sigma(logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """Signal and noise scales of the variance-preserving process.

    ``alpha = sqrt(sigmoid(λ))``, ``sigma = sqrt(sigmoid(-λ))``. Computing the squares with
    ``sigmoid`` first keeps both finite and in ``[0, 1]`` for any finite λ (no ``exp``
    overflow), and ``alpha**2 + sigma**2 = 1`` to rounding.

    Args:
        logsnr: λ, any shape.

    Returns:
        ``(alpha, sigma)``, each the shape of ``logsnr``.
    """
    alpha = torch.sigmoid(logsnr).sqrt()
    sigma = torch.sigmoid(-logsnr).sqrt()
    return alpha, sigma


def _scales(logsnr: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """``alpha_sigma`` of a ``(B,)`` log-SNR, broadcast against ``x`` ``(B, C, *spatial)``."""
    return alpha_sigma(expand_like(logsnr, x))


def diffuse(x: Tensor, logsnr: Tensor, eps: Tensor) -> Tensor:
    """Sample the forward process: ``x_t = alpha * x + sigma * eps``.

    Args:
        x: clean data, ``(B, C, *spatial)``.
        logsnr: λ_t, ``(B,)``.
        eps: standard normal noise, shape of ``x``.

    Returns:
        ``x_t``, shape of ``x``.
    """
    alpha, sigma = _scales(logsnr, x)  # (B, 1, ..., 1) each
    return alpha * x + sigma * eps


def x_from_eps(x_t: Tensor, eps_hat: Tensor, logsnr: Tensor) -> Tensor:
    """Clean-data estimate from a noise prediction: ``x_hat = (x_t - sigma * eps_hat) / alpha``."""
    alpha, sigma = _scales(logsnr, x_t)
    return (x_t - sigma * eps_hat) / alpha


def eps_from_x(x_t: Tensor, x_hat: Tensor, logsnr: Tensor) -> Tensor:
    """Noise estimate from a clean-data prediction: ``eps_hat = (x_t - alpha * x_hat) / sigma``."""
    alpha, sigma = _scales(logsnr, x_t)
    return (x_t - alpha * x_hat) / sigma


def v_from_x_eps(x: Tensor, eps: Tensor, logsnr: Tensor) -> Tensor:
    """Velocity target: ``v = alpha * eps - sigma * x``."""
    alpha, sigma = _scales(logsnr, x)
    return alpha * eps - sigma * x


def x_from_v(x_t: Tensor, v: Tensor, logsnr: Tensor) -> Tensor:
    """Clean data from velocity: ``x = alpha * x_t - sigma * v`` (uses alpha² + sigma² = 1)."""
    alpha, sigma = _scales(logsnr, x_t)
    return alpha * x_t - sigma * v


def eps_from_v(x_t: Tensor, v: Tensor, logsnr: Tensor) -> Tensor:
    """Noise from velocity: ``eps = sigma * x_t + alpha * v`` (uses alpha² + sigma² = 1)."""
    alpha, sigma = _scales(logsnr, x_t)
    return sigma * x_t + alpha * v
