"""Samplers: pure functions with one signature (k-diffusion style; UL paper Algorithm 2).

Every sampler is ``sampler(eps_fn, x_1, logsnrs, generator=None, clip_x=None, final="x_hat") -> x``:

- ``eps_fn(x_t, logsnr) -> eps_hat`` is any noise-prediction model, ``logsnr`` of shape ``(B,)``
  (condition it with ``functools.partial`` or a closure);
- ``x_1`` is the starting noise, ``(B, C, *spatial)``, normally ``N(0, I)``;
- ``logsnrs`` is an increasing grid ``(N + 1,)`` from the noisiest level to the least noisy
  (see :func:`logsnr_grid`). The sampler takes N steps ``λ_i -> λ_{i+1}``;
- ``final`` says what it returns: ``"x_hat"`` (default) the model's clean estimate at the last
  grid point (no noise added at the end; ``eps_fn`` is called N + 1 times), ``"state"`` the
  chain's own state ``z`` at the last grid point, a sample of the noisy variable at that λ
  (``eps_fn`` is called N times). UL's end-to-end sampling (Algorithm 2) hands the decoder the
  base model's state at λ_z(0), not the clean estimate noised again (docs/method.md, "Stage 2").

In a step from t to s, s is the LESS noisy time: ``λ_s > λ_t``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ulframe.diffusion.logsnr import alpha_sigma, eps_from_x, expand_like, x_from_eps
from ulframe.diffusion.schedules import Schedule
from ulframe.errors import ConfigError

__all__ = [
    "FINALS",
    "EpsFn",
    "Sampler",
    "ancestral_step",
    "ddim_step",
    "denoise",
    "logsnr_grid",
    "sample_ancestral",
    "sample_ddim",
]

EpsFn = Callable[[Tensor, Tensor], Tensor]
"""``eps_fn(x_t (B, C, *spatial), logsnr (B,)) -> eps_hat (B, C, *spatial)``."""

FINALS = ("x_hat", "state")
"""What a sampler returns: the clean estimate at the last grid point, or the chain's state there."""


@runtime_checkable
class Sampler(Protocol):
    """The one sampler signature; see the module docstring."""

    def __call__(
        self,
        eps_fn: EpsFn,
        x_1: Tensor,
        logsnrs: Tensor,
        generator: torch.Generator | None = None,
        clip_x: float | None = None,
        final: str = "x_hat",
    ) -> Tensor:
        """Sample from ``x_1`` along ``logsnrs``; return ``x_hat`` at the last grid point, or
        (``final="state"``) the chain's state there."""
        ...


def logsnr_grid(schedule: Schedule, steps: int, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """Sampling grid ``λ(t)`` at ``t = linspace(1, 0, steps + 1)``: noisiest first.

    Args:
        schedule: any schedule.
        steps: N >= 1, number of sampler steps.
        dtype: dtype of the grid (float64 by default; samplers cast to the data dtype).

    Returns:
        ``logsnrs``, ``(N + 1,)``, from ``λ(1) = logsnr_min`` up to ``λ(0) = logsnr_max``.
    """
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps} (sample_steps)")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=dtype)  # (N + 1,)
    return schedule.logsnr(t)


def denoise(
    eps_fn: EpsFn, z_t: Tensor, logsnr_t: Tensor, clip_x: float | None = None
) -> tuple[Tensor, Tensor]:
    """Call the model and return ``(x_hat, eps_hat)``, consistent with each other.

    ``x_hat = (z_t - sigma_t eps_hat) / alpha_t``. With ``clip_x``, ``x_hat`` is clamped to
    ``[-clip_x, clip_x]`` and ``eps_hat`` recomputed from the clamped ``x_hat``.

    Args:
        eps_fn: noise-prediction model.
        z_t: noisy state, ``(B, C, *spatial)``.
        logsnr_t: λ_t, ``(B,)``.
        clip_x: optional bound on ``|x_hat|``.

    Returns:
        ``x_hat`` and ``eps_hat``, each the shape of ``z_t``.
    """
    eps_hat = eps_fn(z_t, logsnr_t)  # (B, C, *spatial)
    x_hat = x_from_eps(z_t, eps_hat, logsnr_t)
    if clip_x is not None:
        x_hat = x_hat.clamp(-clip_x, clip_x)
        eps_hat = eps_from_x(z_t, x_hat, logsnr_t)
    return x_hat, eps_hat


def ancestral_step(
    z_t: Tensor, x_hat: Tensor, logsnr_t: Tensor, logsnr_s: Tensor, noise: Tensor
) -> Tensor:
    """One ancestral step from ``t`` to the less noisy ``s``: a sample of ``q(z_s | z_t, x_hat)``.

    VDM posterior (UL paper, Algorithm 2): ``alpha_ts = alpha_t / alpha_s``,
    ``sigma2_ts = sigma_t² - alpha_ts² sigma_s²``,
    ``mean = alpha_ts sigma_s² / sigma_t² z_t + alpha_s sigma2_ts / sigma_t² x_hat``,
    ``var = sigma2_ts sigma_s² / sigma_t²``.

    Computed stably with ``r = sigma2_ts / sigma_t² = -expm1(λ_t - λ_s) ∈ [0, 1]``:
    ``mean = alpha_s ((1 - r) z_t / alpha_t + r x_hat)`` and ``var = r sigma_s²``
    (``alpha_ts sigma_s² / sigma_t² = alpha_s (1 - r) / alpha_t`` since
    ``1 - r = exp(λ_t - λ_s)``).

    Args:
        z_t: current state, ``(B, C, *spatial)``.
        x_hat: model estimate of the clean data at t, same shape.
        logsnr_t: λ_t, ``(B,)``.
        logsnr_s: λ_s > λ_t, ``(B,)``.
        noise: standard normal, same shape as ``z_t``.

    Returns:
        ``z_s``, shape of ``z_t``.
    """
    alpha_t, _ = alpha_sigma(expand_like(logsnr_t, z_t))  # (B, 1, ..., 1)
    alpha_s, sigma_s = alpha_sigma(expand_like(logsnr_s, z_t))  # (B, 1, ..., 1)
    r = -torch.expm1(expand_like(logsnr_t - logsnr_s, z_t))  # (B, 1, ..., 1)
    mean = alpha_s * ((1.0 - r) * z_t / alpha_t + r * x_hat)
    std = (r * sigma_s**2).clamp_min(0.0).sqrt()
    return mean + std * noise


def ddim_step(x_hat: Tensor, eps_hat: Tensor, logsnr_s: Tensor) -> Tensor:
    """One deterministic DDIM step to ``s`` (Song et al. 2021): ``z_s = alpha_s x_hat + sigma_s eps_hat``.

    Args:
        x_hat: model estimate of the clean data at t, ``(B, C, *spatial)``.
        eps_hat: the matching noise estimate, same shape.
        logsnr_s: λ_s, ``(B,)``.

    Returns:
        ``z_s``, shape of ``x_hat``.
    """
    alpha_s, sigma_s = alpha_sigma(expand_like(logsnr_s, x_hat))  # (B, 1, ..., 1)
    return alpha_s * x_hat + sigma_s * eps_hat


def _check_grid(x_1: Tensor, logsnrs: Tensor) -> Tensor:
    """Validate an increasing ``(N + 1,)`` grid and cast it to ``x_1``'s dtype and device."""
    if logsnrs.ndim != 1 or logsnrs.shape[0] < 2:
        raise ValueError(
            f"logsnrs must have shape (N + 1,) with N >= 1, got {tuple(logsnrs.shape)}"
        )
    if not bool(torch.all(logsnrs[1:] > logsnrs[:-1])):
        raise ValueError("logsnrs must increase strictly (noisiest first, as logsnr_grid returns)")
    return logsnrs.to(device=x_1.device, dtype=x_1.dtype)


def _check_final(final: str) -> None:
    if final not in FINALS:
        raise ConfigError(f"a sampler's final must be one of {FINALS}, got {final!r}")


def _per_example(logsnr: Tensor, x: Tensor) -> Tensor:
    """Broadcast a 0-d grid value to the ``(B,)`` log-SNR that models receive."""
    return logsnr.expand(x.shape[0])  # (B,)


def sample_ancestral(
    eps_fn: EpsFn,
    x_1: Tensor,
    logsnrs: Tensor,
    generator: torch.Generator | None = None,
    clip_x: float | None = None,
    final: str = "x_hat",
) -> Tensor:
    """Ancestral sampling along ``logsnrs`` with :func:`ancestral_step`.

    Args:
        eps_fn: noise-prediction model.
        x_1: starting noise, ``(B, C, *spatial)``.
        logsnrs: increasing grid ``(N + 1,)``.
        generator: torch generator for the step noise (on ``x_1``'s device).
        clip_x: optional bound on ``|x_hat|`` at every step.
        final: ``"x_hat"`` or ``"state"`` (see the module docstring).

    Returns:
        ``x_hat`` at ``logsnrs[-1]`` (or the state ``z`` there), shape of ``x_1``.
    """
    _check_final(final)
    grid = _check_grid(x_1, logsnrs)  # (N + 1,)
    z = x_1
    for logsnr_t, logsnr_s in itertools.pairwise(grid):
        lt, ls = _per_example(logsnr_t, z), _per_example(logsnr_s, z)  # (B,)
        x_hat, _ = denoise(eps_fn, z, lt, clip_x)
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        z = ancestral_step(z, x_hat, lt, ls, noise)
    if final == "state":
        return z
    x_hat, _ = denoise(eps_fn, z, _per_example(grid[-1], z), clip_x)
    return x_hat


def sample_ddim(
    eps_fn: EpsFn,
    x_1: Tensor,
    logsnrs: Tensor,
    generator: torch.Generator | None = None,
    clip_x: float | None = None,
    final: str = "x_hat",
) -> Tensor:
    """Deterministic DDIM sampling along ``logsnrs`` with :func:`ddim_step`.

    Args:
        eps_fn: noise-prediction model.
        x_1: starting noise, ``(B, C, *spatial)``.
        logsnrs: increasing grid ``(N + 1,)``.
        generator: accepted for the common signature and ignored (DDIM draws no noise).
        clip_x: optional bound on ``|x_hat|`` at every step.
        final: ``"x_hat"`` or ``"state"`` (see the module docstring).

    Returns:
        ``x_hat`` at ``logsnrs[-1]`` (or the state ``z`` there), shape of ``x_1``.
    """
    del generator  # deterministic
    _check_final(final)
    grid = _check_grid(x_1, logsnrs)  # (N + 1,)
    z = x_1
    for logsnr_t, logsnr_s in itertools.pairwise(grid):
        x_hat, eps_hat = denoise(eps_fn, z, _per_example(logsnr_t, z), clip_x)
        z = ddim_step(x_hat, eps_hat, _per_example(logsnr_s, z))
    if final == "state":
        return z
    x_hat, _ = denoise(eps_fn, z, _per_example(grid[-1], z), clip_x)
    return x_hat
