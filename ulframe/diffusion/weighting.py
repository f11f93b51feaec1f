"""Loss weightings w(λ) of the diffusion loss: the weighting plugins of ulframe.

A weighting multiplies the per-t ELBO integrand (Kingma & Gao 2023):
``L_w = (-dλ/dt) * 0.5 * w(λ) * Σ (eps - eps_hat)**2``. ``w ≡ 1`` is the ELBO, which the
UL prior must use (docs/method.md, "Stage 1"); the decoder and the stage-2 base model use the
sigmoid weighting ``w = sigmoid(b - λ)``, which discounts low-noise (high λ) levels.

Every weighting is a callable object ``w(logsnr) -> Tensor`` returning a tensor of the same
shape as ``logsnr``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ulframe.errors import ContractError

__all__ = [
    "ELBOWeighting",
    "SigmoidWeighting",
    "Weighting",
    "check_weighting",
    "is_elbo_weighting",
    "weighting_problem",
]

ELBO_CHECK_POINTS = 257
"""Number of log-SNR grid points on which :func:`is_elbo_weighting` tests w == 1."""
ELBO_CHECK_ATOL = 1e-6
"""Absolute tolerance of :func:`is_elbo_weighting` (float64 evaluation)."""
CHECK_RANGE = (-20.0, 20.0)
"""The log-SNR range on which :func:`check_weighting` asks for finite weights >= 0, where the
caller does not give the stage's own."""
CHECK_POINTS = 81


@runtime_checkable
class Weighting(Protocol):
    """A loss weighting ``w(λ)``: elementwise, same shape in and out."""

    def __call__(self, logsnr: Tensor) -> Tensor:
        """``w(logsnr)``, same shape as ``logsnr``."""
        ...


@dataclass(frozen=True)
class ELBOWeighting:
    """The unweighted ELBO: ``w(λ) ≡ 1``."""

    def __call__(self, logsnr: Tensor) -> Tensor:
        """Ones, shape of ``logsnr``."""
        return torch.ones_like(logsnr)


@dataclass(frozen=True)
class SigmoidWeighting:
    """Sigmoid weighting ``w(λ) = sigmoid(bias - λ)`` (Kingma & Gao 2023; docs/method.md, typo 2).

    ``w -> 1`` as ``λ -> -inf`` (noisy levels count fully, as in the ELBO) and ``w -> 0`` as
    ``λ -> +inf`` (fine detail is discounted); ``w(bias) = 1/2``.

    Args:
        bias: b, the log-SNR at which the weight is one half.
    """

    bias: float = 0.0

    def __call__(self, logsnr: Tensor) -> Tensor:
        """``sigmoid(bias - logsnr)``, shape of ``logsnr``."""
        return torch.sigmoid(self.bias - logsnr)

    def crossing_logsnr(self, loss_factor: float) -> float:
        """Log-SNR where the scaled weight ``loss_factor * w(λ)`` crosses 1.

        ``c / (1 + exp(λ - b)) = 1  <=>  λ* = b + log(c - 1)``. Below λ* the scaled decoder
        weight exceeds the ELBO weight of the prior (coarse content goes to the latent).

        Args:
            loss_factor: c_lf > 1 (UL paper: 1.3-1.7, 1.5 for ImageNet).

        Returns:
            λ* in nats.
        """
        if not loss_factor > 1.0:
            raise ValueError(
                f"loss_factor * sigmoid(bias - logsnr) stays below 1 for loss_factor <= 1, "
                f"so there is no crossing; got loss_factor={loss_factor}"
            )
        return self.bias + math.log(loss_factor - 1.0)


def is_elbo_weighting(w: Weighting, logsnr_min: float, logsnr_max: float) -> bool:
    """Whether ``w(λ) == 1`` on a grid over ``[logsnr_min, logsnr_max]`` (float64).

    Used to refuse a non-ELBO weighting where the ELBO is required (the UL prior), whatever
    plugin supplies it.

    Args:
        w: the weighting to check.
        logsnr_min: lower end of the checked range.
        logsnr_max: upper end of the checked range.

    Returns:
        True when every grid value is within ``ELBO_CHECK_ATOL`` of 1.
    """
    grid = torch.linspace(logsnr_min, logsnr_max, ELBO_CHECK_POINTS, dtype=torch.float64)
    with torch.no_grad():
        values = torch.as_tensor(w(grid), dtype=torch.float64)
    if values.shape != grid.shape:
        return False
    return bool(torch.all((values - 1.0).abs() <= ELBO_CHECK_ATOL))


def weighting_problem(
    w: Any,
    logsnr_min: float = CHECK_RANGE[0],
    logsnr_max: float = CHECK_RANGE[1],
    points: int = CHECK_POINTS,
    dtype: torch.dtype = torch.float32,
) -> str | None:
    """What is wrong with `w`'s output on a `dtype` grid of `points` log-SNRs over
    [logsnr_min, logsnr_max], in one line (None: a tensor of the grid's shape holding finite
    values >= 0)."""
    grid = torch.linspace(logsnr_min, logsnr_max, points, dtype=dtype)
    with torch.no_grad():
        try:
            out = w(grid)
        except Exception as err:
            return (
                f"w(λ) of a {dtype} tensor of shape {tuple(grid.shape)} raised "
                f"{type(err).__name__}: {err}"
            )
    if not isinstance(out, Tensor) or out.shape != grid.shape:
        shown = f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}"
        return f"w(λ) returned {shown}; expected a tensor of λ's shape {tuple(grid.shape)}"
    bad = ~torch.isfinite(out) | (out < 0)
    if not bad.any():
        return None
    i = int(bad.nonzero()[0])
    return (
        f"w(λ) = {float(out[i])} at λ = {float(grid[i]):g} ({int(bad.sum())} of {points} "
        f"points of λ ∈ [{logsnr_min:g}, {logsnr_max:g}], {dtype}); expected finite weights >= 0"
    )


def check_weighting(
    w: Any,
    where: str = "",
    logsnr_min: float | None = None,
    logsnr_max: float | None = None,
) -> Any:
    """`w` if its output on a float32 log-SNR grid over [logsnr_min, logsnr_max] (the stage's
    range, where the caller knows it; each end :data:`CHECK_RANGE`'s otherwise) is a tensor of
    the grid's shape holding finite values >= 0 (`weighting_problem`); else `ContractError` in
    one line naming the weighting by its class (the engine names the plugin instead,
    `ulframe.registry.naming_plugins`), what it returned and what is expected. Call it where a
    stage takes a weighting (`where`: the parameter, e.g. ``ul_joint.decoder_weighting``) so
    that a NaN weighting fails before training, not as a NaN loss."""
    low = CHECK_RANGE[0] if logsnr_min is None else logsnr_min
    high = CHECK_RANGE[1] if logsnr_max is None else logsnr_max
    problem = weighting_problem(w, low, high)
    if problem is not None:
        klass = type(w)
        who = f"the weighting {klass.__qualname__} ({klass.__module__})"
        at = f" (as {where})" if where else ""
        raise ContractError(who, f"{at}: {problem}", "weightings", w)
    return w
