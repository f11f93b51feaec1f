"""Noise schedules λ(t): the schedule plugins of ulframe.

A schedule maps time ``t ∈ [0, 1]`` to a log-SNR λ(t), strictly decreasing from
``λ(0) = logsnr_max`` (least noisy) to ``λ(1) = logsnr_min`` (noisiest). The continuous-time
ELBO only depends on the endpoints (docs/method.md, "Schedules"); the schedule changes the variance
of its Monte-Carlo estimate and, with a weighting, the training objective.

Every schedule constructor has the same call signature
``(logsnr_min, logsnr_max, resolution)`` so the framework can build any of them from a
registry name; schedules that do not depend on the data resolution accept and ignore it.

All three methods work elementwise on tensors of any shape and are computed in float64
internally (the inputs are ``(B,)`` vectors, so this costs nothing), then cast back to the
input dtype. This keeps the endpoints exact to rounding and the analytic derivative accurate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ulframe.errors import ConfigError

__all__ = [
    "CosineSchedule",
    "LinearSchedule",
    "Schedule",
    "ShiftedCosineSchedule",
]

DEFAULT_LOGSNR_MIN = -15.0
"""Noisiest log-SNR of the default schedules (UL paper: latents and pixels start near -15)."""
DEFAULT_LOGSNR_MAX = 15.0
"""Least-noisy log-SNR of the default schedules (pixels: about 15)."""
DEFAULT_REFERENCE_RESOLUTION = 64
"""Resolution at which the shifted cosine schedule equals the plain cosine (simple diffusion)."""


@runtime_checkable
class Schedule(Protocol):
    """A noise schedule λ(t) on ``t ∈ [0, 1]``, decreasing from ``logsnr_max`` to ``logsnr_min``.

    Constructors share the signature ``(logsnr_min, logsnr_max, resolution)``.
    """

    @property
    def logsnr_min(self) -> float:
        """λ(1), the noisiest log-SNR."""
        ...

    @property
    def logsnr_max(self) -> float:
        """λ(0), the least noisy log-SNR."""
        ...

    def logsnr(self, t: Tensor) -> Tensor:
        """λ(t); ``λ(0) = logsnr_max``, ``λ(1) = logsnr_min``. Same shape as ``t``."""
        ...

    def neg_dlogsnr_dt(self, t: Tensor) -> Tensor:
        """Analytic ``-dλ/dt > 0``. Same shape as ``t``."""
        ...

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        """Inverse of :meth:`logsnr`: the ``t ∈ [0, 1]`` with ``λ(t) = logsnr``."""
        ...


def _validate_endpoints(logsnr_min: float, logsnr_max: float) -> None:
    """Raise ``ConfigError`` unless ``logsnr_min < logsnr_max`` are finite."""
    if not (math.isfinite(logsnr_min) and math.isfinite(logsnr_max)):
        raise ConfigError(
            f"schedule endpoints must be finite, got logsnr_min={logsnr_min}, "
            f"logsnr_max={logsnr_max}"
        )
    if not logsnr_min < logsnr_max:
        raise ConfigError(
            f"schedule needs logsnr_min < logsnr_max (λ(1) noisiest, λ(0) least noisy), "
            f"got logsnr_min={logsnr_min}, logsnr_max={logsnr_max}"
        )


def _validate_resolution(resolution: int | None, name: str = "resolution") -> None:
    """Raise ``ConfigError`` unless ``resolution`` is None or a positive integer."""
    if resolution is not None and (isinstance(resolution, bool) or resolution <= 0):
        raise ConfigError(f"{name} must be a positive integer or None, got {resolution!r}")


def _f64(t: Tensor) -> Tensor:
    """``t`` as float64 for the internal computation."""
    return t.to(torch.float64)


@dataclass(frozen=True)
class _Endpoints:
    """The fields every schedule shares, validated: ``λ(1) = logsnr_min < λ(0) = logsnr_max``,
    both finite, and the data's ``resolution`` (None or a positive number of pixels)."""

    logsnr_min: float = DEFAULT_LOGSNR_MIN
    logsnr_max: float = DEFAULT_LOGSNR_MAX
    resolution: int | None = None

    def __post_init__(self) -> None:
        _validate_endpoints(self.logsnr_min, self.logsnr_max)
        _validate_resolution(self.resolution)


@dataclass(frozen=True)
class CosineSchedule(_Endpoints):
    """Cosine log-SNR schedule between fixed endpoints (Nichol & Dhariwal 2021; Kingma et al. 2021).

    ``λ(t) = -2 log tan(t_min + t (t_max - t_min))`` with
    ``t_min = atan(exp(-λ_max / 2))`` and ``t_max = atan(exp(-λ_min / 2))``, so
    ``λ(0) = λ_max`` and ``λ(1) = λ_min``.

    Derivative: with ``u = t_min + t (t_max - t_min)``,
    ``-dλ/dt = 2 (t_max - t_min) / (sin u cos u) = 4 (t_max - t_min) / sin(2u) > 0``.

    Inverse: ``t = (atan(exp(-λ / 2)) - t_min) / (t_max - t_min)``.

    Args:
        logsnr_min: λ(1), noisiest log-SNR (nats of SNR).
        logsnr_max: λ(0), least-noisy log-SNR.
        resolution: data resolution in pixels; accepted for the uniform signature, ignored.
    """

    @property
    def t_min(self) -> float:
        """Angle at t = 0: ``atan(exp(-λ_max / 2))``."""
        return math.atan(math.exp(-self.logsnr_max / 2))

    @property
    def t_max(self) -> float:
        """Angle at t = 1: ``atan(exp(-λ_min / 2)) = π/2 - atan(exp(λ_min / 2))``."""
        return math.pi / 2 - self._complement_t_max

    @property
    def _complement_t_max(self) -> float:
        """``π/2 - t_max = atan(exp(λ_min / 2))``, computed without cancellation."""
        return math.atan(math.exp(self.logsnr_min / 2))

    def _angles(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``u = t_min + t (t_max - t_min)`` and ``π/2 - u``, each from the endpoint it is near.

        Near t = 1 the angle u approaches π/2 and ``tan u`` loses digits; the complement
        ``π/2 - u = (π/2 - t_max) + (1 - t)(t_max - t_min)`` keeps them, so both endpoints
        are exact to rounding even for λ_min = -30 (float64).
        """
        width = self.t_max - self.t_min
        u = self.t_min + t * width  # accurate for u <= π/4
        u_comp = self._complement_t_max + (1.0 - t) * width  # accurate for u >= π/4
        return u, u_comp

    def logsnr(self, t: Tensor) -> Tensor:
        """``λ(t) = -2 log tan(u) = 2 log tan(π/2 - u)``, ``u = t_min + t (t_max - t_min)``."""
        u, u_comp = self._angles(_f64(t))
        logsnr = torch.where(
            u <= math.pi / 4, -2.0 * torch.log(torch.tan(u)), 2.0 * torch.log(torch.tan(u_comp))
        )
        return logsnr.to(t.dtype)

    def neg_dlogsnr_dt(self, t: Tensor) -> Tensor:
        """``-dλ/dt = 4 (t_max - t_min) / sin(2u) = 4 (t_max - t_min) / sin(2 (π/2 - u))``."""
        u, u_comp = self._angles(_f64(t))
        sin_2u = torch.where(u <= math.pi / 4, torch.sin(2.0 * u), torch.sin(2.0 * u_comp))
        return (4.0 * (self.t_max - self.t_min) / sin_2u).to(t.dtype)

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        """``t = (atan(exp(-λ / 2)) - t_min) / (t_max - t_min)``.

        For λ < 0 the equivalent ``t = 1 - (atan(exp(λ / 2)) - (π/2 - t_max)) / (t_max - t_min)``
        is used (same value, no cancellation near t = 1).
        """
        logsnr64 = _f64(logsnr)
        width = self.t_max - self.t_min
        t_high_snr = (torch.atan(torch.exp(-0.5 * logsnr64)) - self.t_min) / width
        t_low_snr = 1.0 - (torch.atan(torch.exp(0.5 * logsnr64)) - self._complement_t_max) / width
        return torch.where(logsnr64 >= 0, t_high_snr, t_low_snr).to(logsnr.dtype)


@dataclass(frozen=True)
class ShiftedCosineSchedule(_Endpoints):
    """Resolution-shifted cosine schedule (Hoogeboom et al. 2023, "simple diffusion").

    ``λ(t) = λ_cos(t) + shift`` with ``shift = 2 log(reference_resolution / resolution)``,
    where ``λ_cos`` is the :class:`CosineSchedule` between ``λ_min - shift`` and
    ``λ_max - shift``; the outer endpoints are therefore exactly ``λ(0) = λ_max`` and
    ``λ(1) = λ_min``. Higher resolution means a negative shift: noisier at the same ``t``.
    ``resolution=None`` means no shift (the plain cosine schedule).

    Derivative and inverse follow from the inner cosine:
    ``-dλ/dt = -dλ_cos/dt`` and ``t(λ) = t_cos(λ - shift)``.

    Args:
        logsnr_min: λ(1), noisiest log-SNR.
        logsnr_max: λ(0), least-noisy log-SNR.
        resolution: data resolution in pixels (side length); None disables the shift.
        reference_resolution: resolution at which the shift is zero (pixels).
    """

    reference_resolution: int = DEFAULT_REFERENCE_RESOLUTION

    def __post_init__(self) -> None:
        super().__post_init__()
        _validate_resolution(self.reference_resolution, "reference_resolution")

    @property
    def shift(self) -> float:
        """``2 log(reference_resolution / resolution)``; 0 when ``resolution`` is None."""
        if self.resolution is None:
            return 0.0
        return 2.0 * math.log(self.reference_resolution / self.resolution)

    @property
    def inner(self) -> CosineSchedule:
        """The unshifted cosine schedule between ``λ_min - shift`` and ``λ_max - shift``."""
        return CosineSchedule(self.logsnr_min - self.shift, self.logsnr_max - self.shift)

    def logsnr(self, t: Tensor) -> Tensor:
        """``λ(t) = λ_cos(t) + shift``."""
        return (self.inner.logsnr(_f64(t)) + self.shift).to(t.dtype)

    def neg_dlogsnr_dt(self, t: Tensor) -> Tensor:
        """``-dλ/dt = -dλ_cos/dt`` (the shift is constant in t)."""
        return self.inner.neg_dlogsnr_dt(t)

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        """``t = t_cos(λ - shift)``."""
        return self.inner.t_from_logsnr(_f64(logsnr) - self.shift).to(logsnr.dtype)


@dataclass(frozen=True)
class LinearSchedule(_Endpoints):
    """Schedule linear in log-SNR: ``λ(t) = λ_max + t (λ_min - λ_max)``.

    ``-dλ/dt = λ_max - λ_min`` (constant), ``t(λ) = (λ_max - λ) / (λ_max - λ_min)``.
    Sampling t uniformly samples λ uniformly, the importance distribution of a flat
    integrand in λ.

    Args:
        logsnr_min: λ(1), noisiest log-SNR.
        logsnr_max: λ(0), least-noisy log-SNR.
        resolution: accepted for the uniform signature, ignored.
    """

    def logsnr(self, t: Tensor) -> Tensor:
        """``λ(t) = λ_max + t (λ_min - λ_max)``."""
        return (self.logsnr_max + _f64(t) * (self.logsnr_min - self.logsnr_max)).to(t.dtype)

    def neg_dlogsnr_dt(self, t: Tensor) -> Tensor:
        """``-dλ/dt = λ_max - λ_min``, broadcast to the shape of ``t``."""
        return torch.full_like(t, self.logsnr_max - self.logsnr_min)

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        """``t = (λ_max - λ) / (λ_max - λ_min)``."""
        t = (self.logsnr_max - _f64(logsnr)) / (self.logsnr_max - self.logsnr_min)
        return t.to(logsnr.dtype)
