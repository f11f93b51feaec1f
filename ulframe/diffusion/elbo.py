"""Continuous-time diffusion ELBO terms (Kingma et al. 2021, VDM; UL paper Eq. 3-4).

For a schedule λ(t) between ``λ_min = λ(1)`` and ``λ_max = λ(0)``, the negative ELBO of a
variational diffusion model, in nats per example, is

    -log p(x) <= E_{t ~ U[0,1], eps}[ (-dλ/dt) * 0.5 * Σ (eps - eps_hat(x_t, λ_t))**2 ]
                 + KL(q(x_1 | x) || N(0, I))            (prior term at λ_min)
                 + E[-log p(x | x_0)]                    (reconstruction at λ_max)

The first (diffusion) term equals ``∫_{λ_min}^{λ_max} 0.5 * exp(λ) * E||x - x_hat||² dλ``
because ``eps - eps_hat = -(alpha / sigma) (x - x_hat)`` and ``(alpha / sigma)² = exp(λ)``;
it depends on the schedule only through its endpoints. A weighting ``w(λ)`` turns it into the
weighted loss of Kingma & Gao (2023); ``w ≡ 1`` is the ELBO.

Time samplers for the Monte-Carlo estimate live here too: :func:`antithetic_t` (one
low-discrepancy batch, VDM) and :func:`stratified_t` (many t per example, for evaluation).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from ulframe.diffusion.logsnr import expand_like

__all__ = [
    "antithetic_t",
    "elbo_term_nats",
    "kl_standard_normal_nats",
    "stratified_t",
]


def _sum_non_batch(x: Tensor) -> Tensor:
    """Sum over every dimension but the first: ``(B, ...) -> (B,)``."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def elbo_term_nats(
    eps: Tensor,
    eps_hat: Tensor,
    neg_dlogsnr_dt: Tensor,
    weight: Tensor | None = None,
) -> Tensor:
    """One-sample diffusion loss in nats per example (UL paper Eq. 3-4, with ``-dλ/dt``).

    ``L(t) = (-dλ/dt) * 0.5 * w(λ_t) * Σ_dims (eps - eps_hat)**2``.

    With ``t ~ U[0, 1]`` and ``weight=None`` (w ≡ 1) its expectation is the diffusion term of
    the negative ELBO.

    Args:
        eps: noise used to make ``x_t``, ``(B, C, *spatial)``.
        eps_hat: model prediction of ``eps``, same shape.
        neg_dlogsnr_dt: ``-dλ/dt`` at each example's t, ``(B,)``, positive.
        weight: ``w(λ_t)``, ``(B,)``; None means 1 (the ELBO).

    Returns:
        Loss per example in nats, ``(B,)``.
    """
    if eps.shape != eps_hat.shape:
        raise ValueError(
            f"eps and eps_hat must have the same shape, got {tuple(eps.shape)} and "
            f"{tuple(eps_hat.shape)}"
        )
    sq_err = _sum_non_batch((eps - eps_hat) ** 2)  # (B,)
    loss = 0.5 * neg_dlogsnr_dt * sq_err  # (B,)
    if weight is not None:
        loss = weight * loss  # (B,)
    return loss


def kl_standard_normal_nats(x: Tensor, logsnr_1: Tensor) -> Tensor:
    """Prior term ``KL(q(x_1 | x) || N(0, I))`` in nats per example.

    ``q(x_1 | x) = N(alpha_1 x, sigma_1² I)``, so per dimension
    ``KL = 0.5 (alpha_1² x² + sigma_1² - 1 - log sigma_1²)``; summed over all non-batch
    dimensions. Written as ``0.5 (alpha_1² (x² - 1) + softplus(λ_1))`` (using ``sigma² = 1 -
    alpha²`` and ``-log sigma² = softplus(λ)``), so it stays accurate and non-negative in float32
    when λ_1 is very negative.

    Args:
        x: clean data (or ``z_clean``), ``(B, C, *spatial)``.
        logsnr_1: λ at t = 1, ``(B,)`` or 0-d.

    Returns:
        KL per example in nats, ``(B,)``.
    """
    logsnr_1 = expand_like(torch.as_tensor(logsnr_1, dtype=x.dtype, device=x.device), x)
    # sigma² - 1 - log sigma² = -alpha² + softplus(λ): no cancellation of O(1) terms in float32.
    alpha2 = torch.sigmoid(logsnr_1)  # (B, 1, ..., 1)
    kl = 0.5 * (alpha2 * (x**2 - 1.0) + F.softplus(logsnr_1))  # (B, C, *spatial)
    return _sum_non_batch(kl)


def antithetic_t(
    batch: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Low-discrepancy times for one batch (VDM): ``t_i = (u_0 + i / B) mod 1``.

    One ``u_0 ~ U[0, 1)`` shifts an evenly spaced grid, so every ``t_i`` is marginally
    ``U[0, 1)`` (the estimate stays unbiased) while the batch covers ``[0, 1)`` evenly
    (lower variance of the batch mean).

    Args:
        batch: B, number of times.
        generator: torch generator for ``u_0``; its device must match ``device``.
        device: device of the result.
        dtype: floating dtype of the result.

    Returns:
        ``t``, ``(B,)`` in ``[0, 1)``.
    """
    if batch <= 0:
        raise ValueError(f"batch must be positive, got {batch}")
    u0 = torch.rand((), generator=generator, device=device, dtype=torch.float64)  # ()
    grid = torch.arange(batch, device=device, dtype=torch.float64) / batch  # (B,)
    return torch.remainder(u0 + grid, 1.0).to(dtype)


def stratified_t(
    batch: int,
    num_t: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Many times per example for evaluation: ``t_{i,k} = (u_i + k / K) mod 1``.

    Each example ``i`` gets its own shift ``u_i ~ U[0, 1)`` of a K-point grid: every ``t`` is
    marginally uniform (unbiased) and each example's K times cover ``[0, 1)`` evenly.
    Average a per-(example, t) loss over the last axis to estimate the per-example ELBO.

    Args:
        batch: B, number of examples.
        num_t: K, number of times per example.
        generator: torch generator for the shifts.
        device: device of the result.
        dtype: floating dtype of the result.

    Returns:
        ``t``, ``(B, K)`` in ``[0, 1)``.
    """
    if batch <= 0 or num_t <= 0:
        raise ValueError(f"batch and num_t must be positive, got {batch} and {num_t}")
    u = torch.rand((batch, 1), generator=generator, device=device, dtype=torch.float64)
    grid = torch.arange(num_t, device=device, dtype=torch.float64) / num_t  # (K,)
    return torch.remainder(u + grid, 1.0).to(dtype)  # (B, K)
