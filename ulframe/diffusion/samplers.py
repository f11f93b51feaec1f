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

Grids. A sampler may declare the grid it is meant to step on with a ``grid`` attribute (one of
:data:`GRIDS`); callers build it with :func:`sampler_grid`. ``"time"`` (the default, and
``ddim``, ``ancestral`` and ``dpmpp_2m_sde``): :func:`logsnr_grid`, λ(t) at t evenly spaced.
``"logsnr"`` (the higher-order ODE solvers): :func:`logsnr_uniform_grid`, evenly spaced in λ
between the schedule's λ(1) and λ(0), where their step sizes ``h = (λ_s - λ_t) / 2`` are all
equal. Every sampler accepts any strictly increasing grid; the attribute only says which one its
callers build.

:func:`sample_dpmpp_2m_sde` solves the reverse SDE instead: every step adds fresh noise, and its
first-order step is the ancestral step.

The higher-order solvers (:func:`sample_dpmpp_2m`, :func:`sample_heun`, :func:`sample_unipc`)
integrate the probability-flow ODE. In half log-SNR ``ℓ = λ / 2`` its exact solution from t to
s is ``z_s = (sigma_s / sigma_t) z_t + alpha_s ∫_{ℓ_t}^{ℓ_s} e^{-(ℓ_s - ℓ)} x_hat(ℓ) dℓ``
(Lu et al. 2022, data prediction), and with ``x_hat`` constant it is the DDIM step. Each takes
a lower order on its last step (its first-order step there is DDIM's), so that the step which
lands on the least noisy level uses only the model's newest estimate.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

from ulframe.diffusion.logsnr import alpha_sigma, eps_from_x, expand_like, x_from_eps
from ulframe.diffusion.schedules import Schedule
from ulframe.errors import ConfigError

__all__ = [
    "FINALS",
    "GRIDS",
    "EpsFn",
    "Sampler",
    "ancestral_step",
    "ddim_step",
    "denoise",
    "logsnr_grid",
    "logsnr_uniform_grid",
    "sample_ancestral",
    "sample_ddim",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_heun",
    "sample_unipc",
    "sampler_grid",
]

_F = TypeVar("_F", bound=Callable[..., Tensor])

EpsFn = Callable[[Tensor, Tensor], Tensor]
"""``eps_fn(x_t (B, C, *spatial), logsnr (B,)) -> eps_hat (B, C, *spatial)``."""

FINALS = ("x_hat", "state")
"""What a sampler returns: the clean estimate at the last grid point, or the chain's state there."""

GRIDS = ("time", "logsnr")
"""The grids a sampler's ``grid`` attribute may name: even in t, or even in λ."""


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


def logsnr_uniform_grid(
    schedule: Schedule, steps: int, *, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Sampling grid even in λ from the schedule's ``λ(1)`` (noisiest) to ``λ(0)``.

    Args:
        schedule: any schedule; only its endpoints ``λ(1)`` and ``λ(0)`` are used.
        steps: N >= 1, number of sampler steps.
        dtype: dtype of the grid (float64 by default; samplers cast to the data dtype).

    Returns:
        ``logsnrs``, ``(N + 1,)``, ``λ(1) + i (λ(0) - λ(1)) / N`` for ``i = 0 .. N``.
    """
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps} (sample_steps)")
    ends = schedule.logsnr(torch.tensor([1.0, 0.0], dtype=torch.float64))  # (2,)
    return torch.linspace(float(ends[0]), float(ends[1]), steps + 1, dtype=dtype)


def sampler_grid(
    sampler: object, schedule: Schedule, steps: int, *, dtype: torch.dtype = torch.float64
) -> Tensor:
    """The grid ``sampler`` steps on: the one its ``grid`` attribute names (default ``"time"``).

    Args:
        sampler: any sampler; ``getattr(sampler, "grid", "time")`` must be one of :data:`GRIDS`.
        schedule: the chain's schedule.
        steps: N >= 1, number of sampler steps.
        dtype: dtype of the grid.

    Returns:
        ``logsnrs``, ``(N + 1,)``, increasing: :func:`logsnr_grid` for ``"time"``,
        :func:`logsnr_uniform_grid` for ``"logsnr"``.
    """
    kind = getattr(sampler, "grid", "time")
    if kind == "time":
        return logsnr_grid(schedule, steps, dtype=dtype)
    if kind == "logsnr":
        return logsnr_uniform_grid(schedule, steps, dtype=dtype)
    name = getattr(sampler, "__name__", repr(sampler))
    raise ConfigError(f"sampler {name} declares grid {kind!r}; a grid must be one of {GRIDS}")


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


def _per_example(logsnr: Tensor, x: Tensor) -> Tensor:
    """Broadcast a 0-d grid value to the ``(B,)`` log-SNR that models receive."""
    return logsnr.expand(x.shape[0])  # (B,)


class _Chain:
    """What every sampler shares: the checked grid, the model on it, and what to return.

    ``grid`` is the grid in ``x_1``'s dtype and device, ``(N + 1,)`` (what the model receives,
    and the ``λ`` of :func:`ancestral_step` and :func:`ddim_step`); ``values`` is the same grid
    in float64 on the host (the step coefficients of the higher-order solvers); ``steps`` is N.

    Raises:
        ConfigError: ``final`` is not one of :data:`FINALS`.
        ValueError: ``logsnrs`` is not a strictly increasing ``(N + 1,)`` grid with N >= 1.
    """

    def __init__(
        self, eps_fn: EpsFn, x_1: Tensor, logsnrs: Tensor, clip_x: float | None, final: str
    ) -> None:
        if final not in FINALS:
            raise ConfigError(f"a sampler's final must be one of {FINALS}, got {final!r}")
        self.grid = _check_grid(x_1, logsnrs)  # (N + 1,)
        self.values: list[float] = logsnrs.detach().to("cpu", torch.float64).tolist()
        self.steps = len(self.values) - 1
        self.eps_fn, self.clip_x, self.final = eps_fn, clip_x, final

    def logsnr(self, i: int, z: Tensor) -> Tensor:
        """``λ_i`` as the model receives it, ``(B,)`` for the batch of ``z``."""
        return _per_example(self.grid[i], z)

    def denoise(self, z: Tensor, i: int) -> tuple[Tensor, Tensor]:
        """The model's ``(x_hat, eps_hat)`` at state ``z`` on grid point ``i`` (:func:`denoise`)."""
        return denoise(self.eps_fn, z, self.logsnr(i, z), self.clip_x)

    def intervals(self) -> Iterator[tuple[int, float, float]]:
        """``(i, λ_t, λ_s)`` of step i, from ``λ_t = λ_i`` to ``λ_s = λ_{i+1}``, in float64."""
        for i, (logsnr_t, logsnr_s) in enumerate(itertools.pairwise(self.values)):
            yield i, logsnr_t, logsnr_s

    def last(self, i: int) -> bool:
        """Whether step ``i`` lands on the last grid point (the solvers' first-order step)."""
        return i == self.steps - 1

    def result(self, z: Tensor) -> Tensor:
        """What the sampler returns from its state ``z`` at the last grid point: ``z`` itself
        (``final="state"``), or the model's clean estimate there (``"x_hat"``: one more call)."""
        if self.final == "state":
            return z
        x_hat, _ = self.denoise(z, self.steps)
        return x_hat


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
    chain = _Chain(eps_fn, x_1, logsnrs, clip_x, final)
    z = x_1
    for i in range(chain.steps):
        x_hat, _ = chain.denoise(z, i)
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        z = ancestral_step(z, x_hat, chain.logsnr(i, z), chain.logsnr(i + 1, z), noise)
    return chain.result(z)


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
    chain = _Chain(eps_fn, x_1, logsnrs, clip_x, final)
    z = x_1
    for i in range(chain.steps):
        x_hat, eps_hat = chain.denoise(z, i)
        z = ddim_step(x_hat, eps_hat, chain.logsnr(i + 1, z))
    return chain.result(z)


# ---- higher-order solvers of the probability-flow ODE, on a grid even in λ ---------------------
def _on_grid(kind: str) -> Callable[[_F], _F]:
    """Declare the grid a sampler steps on (its ``grid`` attribute; see the module docstring)."""

    def mark(sampler: _F) -> _F:
        sampler.__dict__["grid"] = kind
        return sampler

    return mark


def _scales(logsnr: float) -> tuple[float, float]:
    """``(alpha, sigma)`` of a grid value, in float64: the step coefficients of the solvers.

    ``alpha² = sigmoid(λ)`` and ``sigma² = sigmoid(-λ)``, each from the form that neither
    overflows nor cancels, so both keep their relative precision at either end of the grid.
    """

    def sigmoid(v: float) -> float:
        return 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))

    return math.sqrt(sigmoid(logsnr)), math.sqrt(sigmoid(-logsnr))


def _exponential_step(z_t: Tensor, d: Tensor, logsnr_t: float, logsnr_s: float) -> Tensor:
    """First-order step of the data-prediction ODE with the estimate ``d`` held constant.

    ``z_s = (sigma_s / sigma_t) z_t + alpha_s (1 - e^{-h}) d``, ``h = (λ_s - λ_t) / 2``: with
    ``d = x_hat`` this is exactly :func:`ddim_step` (DPM-Solver++ 1 = DDIM).
    """
    _, sigma_t = _scales(logsnr_t)
    alpha_s, sigma_s = _scales(logsnr_s)
    return (sigma_s / sigma_t) * z_t - alpha_s * math.expm1(-(logsnr_s - logsnr_t) / 2) * d


def _two_m_estimate(
    x_hat: Tensor,
    earlier: tuple[float, Tensor] | None,
    logsnr_t: float,
    logsnr_s: float,
    last: bool,
) -> Tensor:
    """The estimate ``d`` a DPM-Solver++ 2M step holds constant: ``(1 + 1 / 2r) x_hat_t -
    (1 / 2r) x_hat_r`` with ``r = h' / h`` (``earlier = (λ_r, x_hat_r)``, the previous grid
    point); ``x_hat`` itself (first order) without an earlier estimate and on the last step."""
    if earlier is None or last:
        return x_hat
    r = (logsnr_t - earlier[0]) / (logsnr_s - logsnr_t)
    return (1.0 + 0.5 / r) * x_hat - (0.5 / r) * earlier[1]


# Each sampler below spells out the Sampler signature and its arguments again, deliberately: a
# sampler's docstring stands alone in `ulframe plugins` and docs/gin_reference.md.
@_on_grid("logsnr")
def sample_dpmpp_2m(
    eps_fn: EpsFn,
    x_1: Tensor,
    logsnrs: Tensor,
    generator: torch.Generator | None = None,
    clip_x: float | None = None,
    final: str = "x_hat",
) -> Tensor:
    """DPM-Solver++ (2M): the second-order multistep solver in data prediction (Lu et al. 2022).

    Step i from ``λ_t`` to ``λ_s`` with ``h = (λ_s - λ_t) / 2`` and the previous step's
    ``h' = (λ_t - λ_r) / 2``, ``r = h' / h``: ``d = (1 + 1 / 2r) x_hat_t - (1 / 2r) x_hat_r``,
    then :func:`_exponential_step` with ``d``. The first step (no earlier estimate) and the last
    are first order (``d = x_hat_t``, a DDIM step). One model call per step.

    Args:
        eps_fn: noise-prediction model.
        x_1: starting noise, ``(B, C, *spatial)``.
        logsnrs: increasing grid ``(N + 1,)`` (callers build it even in λ: ``grid = "logsnr"``).
        generator: accepted for the common signature and ignored (deterministic).
        clip_x: optional bound on ``|x_hat|`` at every step.
        final: ``"x_hat"`` (N + 1 model calls) or ``"state"`` (N calls).

    Returns:
        ``x_hat`` at ``logsnrs[-1]`` (or the state ``z`` there), shape of ``x_1``.
    """
    del generator  # deterministic
    chain = _Chain(eps_fn, x_1, logsnrs, clip_x, final)
    z = x_1
    earlier: tuple[float, Tensor] | None = None  # (λ_r, x_hat_r) of the previous step
    for i, logsnr_t, logsnr_s in chain.intervals():
        x_hat, _ = chain.denoise(z, i)
        d = _two_m_estimate(x_hat, earlier, logsnr_t, logsnr_s, chain.last(i))
        z = _exponential_step(z, d, logsnr_t, logsnr_s)
        earlier = (logsnr_t, x_hat)
    return chain.result(z)


def _sde_step(
    z_t: Tensor, d: Tensor, logsnr_t: float, logsnr_s: float, eta: float, noise: Tensor
) -> Tensor:
    """One step of the data-prediction reverse SDE with the estimate ``d`` held constant.

    With ``h = (λ_s - λ_t) / 2``: ``z_s = alpha_s (e^{-(1+η)h} z_t / alpha_t + (1 - e^{-(1+η)h})
    d) + sigma_s sqrt(1 - e^{-2ηh}) noise``. ``η = 0`` is :func:`_exponential_step` (the ODE,
    DDIM with ``d = x_hat``); ``η = 1`` is :func:`ancestral_step` (the posterior
    ``q(z_s | z_t, x = d)``); in between, the noise the step adds is ``η``'s share of the way.
    """
    alpha_t, _ = _scales(logsnr_t)
    alpha_s, sigma_s = _scales(logsnr_s)
    h = (logsnr_s - logsnr_t) / 2
    keep = math.exp(-(1.0 + eta) * h)
    std = sigma_s * math.sqrt(-math.expm1(-2.0 * eta * h))
    return (
        (alpha_s * keep / alpha_t) * z_t - alpha_s * math.expm1(-(1.0 + eta) * h) * d + std * noise
    )


# On the time grid (the schedule's own spacing): on the digits quickstart at 8 steps it gave fd
# 1.205 and speckle 1.109 where the grid even in λ gave 1.421 and 1.127 (docs/samplers.md).
@_on_grid("time")
def sample_dpmpp_2m_sde(
    eps_fn: EpsFn,
    x_1: Tensor,
    logsnrs: Tensor,
    generator: torch.Generator | None = None,
    clip_x: float | None = None,
    final: str = "x_hat",
    eta: float = 1.0,
) -> Tensor:
    """DPM-Solver++ (2M) SDE: the second-order multistep solver of the reverse SDE (Lu et al. 2022).

    Each step is :func:`_sde_step` with 2M's estimate ``d = (1 + 1 / 2r) x_hat_t - (1 / 2r)
    x_hat_r`` (``r = h' / h``, the "midpoint" form); first order (``d = x_hat_t``) on the first
    step and on the last. With ``eta = 1`` a first-order step is the ancestral step and the chain
    forgets part of its own error at every step, where the ODE carries it; ``eta = 0`` is
    :func:`sample_dpmpp_2m`. One model call per step.

    Args:
        eps_fn: noise-prediction model.
        x_1: starting noise, ``(B, C, *spatial)``.
        logsnrs: increasing grid ``(N + 1,)`` (callers build λ(t) at t evenly spaced:
            ``grid = "time"``).
        generator: torch generator for the step noise (on ``x_1``'s device).
        clip_x: optional bound on ``|x_hat|`` at every step.
        final: ``"x_hat"`` (N + 1 model calls) or ``"state"`` (N calls).
        eta: the share of fresh noise, ``[0, 1]`` (0: the ODE; 1: the reverse SDE).

    Returns:
        ``x_hat`` at ``logsnrs[-1]`` (or the state ``z`` there), shape of ``x_1``.
    """
    if not 0.0 <= eta <= 1.0:
        raise ConfigError(f"samplers.dpmpp_2m_sde.eta must be in [0, 1], got {eta}")
    chain = _Chain(eps_fn, x_1, logsnrs, clip_x, final)
    z = x_1
    earlier: tuple[float, Tensor] | None = None  # (λ_r, x_hat_r) of the previous step
    for i, logsnr_t, logsnr_s in chain.intervals():
        x_hat, _ = chain.denoise(z, i)
        d = _two_m_estimate(x_hat, earlier, logsnr_t, logsnr_s, chain.last(i))
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        z = _sde_step(z, d, logsnr_t, logsnr_s, eta, noise)
        earlier = (logsnr_t, x_hat)
    return chain.result(z)


@_on_grid("logsnr")
def sample_heun(
    eps_fn: EpsFn,
    x_1: Tensor,
    logsnrs: Tensor,
    generator: torch.Generator | None = None,
    clip_x: float | None = None,
    final: str = "x_hat",
) -> Tensor:
    """EDM's second-order Heun sampler (Karras et al. 2022, Algorithm 1) on a grid in λ.

    EDM integrates ``dx̃ / dσ̃ = eps_hat`` in the scaled state ``x̃ = z / alpha`` against
    ``σ̃ = sigma / alpha = e^{-λ/2}``. Its Euler step is the DDIM step
    ``z' = alpha_s x_hat_t + sigma_s eps_t``; Heun's correction averages the slopes at both ends:
    ``z_s = z' + alpha_s (σ̃_s - σ̃_t) (eps_s' - eps_t) / 2`` with ``eps_s'`` the model at
    ``(z', λ_s)``. Two model calls per step; the last step is the Euler step alone (one call).

    Args:
        eps_fn: noise-prediction model.
        x_1: starting noise, ``(B, C, *spatial)``.
        logsnrs: increasing grid ``(N + 1,)`` (callers build it even in λ: ``grid = "logsnr"``).
        generator: accepted for the common signature and ignored (deterministic).
        clip_x: optional bound on ``|x_hat|`` at every model call.
        final: ``"x_hat"`` (2N model calls) or ``"state"`` (2N - 1 calls).

    Returns:
        ``x_hat`` at ``logsnrs[-1]`` (or the state ``z`` there), shape of ``x_1``.
    """
    del generator  # deterministic
    chain = _Chain(eps_fn, x_1, logsnrs, clip_x, final)
    z = x_1
    for i, logsnr_t, logsnr_s in chain.intervals():
        x_hat, eps_t = chain.denoise(z, i)
        alpha_s, sigma_s = _scales(logsnr_s)
        euler = alpha_s * x_hat + sigma_s * eps_t  # ddim_step
        if chain.last(i):
            z = euler
            break
        _, eps_s = chain.denoise(euler, i + 1)
        dsigma = math.exp(-logsnr_s / 2) - math.exp(-logsnr_t / 2)  # σ̃_s - σ̃_t < 0
        z = euler + (alpha_s * dsigma / 2) * (eps_s - eps_t)
    return chain.result(z)


def _unipc_update(
    z_t: Tensor,
    x_hat_t: Tensor,
    logsnr_t: float,
    logsnr_s: float,
    earlier: tuple[float, Tensor] | None,
    x_hat_s: Tensor | None = None,
) -> Tensor:
    """One UniPC update from t to s (Zhao et al. 2023, the B(h) = e^{-h} - 1 variant "bh2").

    Predictor UniP (``x_hat_s`` None): order 1 without ``earlier`` (DDIM), order 2 with it
    (``rho = 1/2``; the same step as DPM-Solver++ 2M). Corrector UniC (``x_hat_s``, the model's
    estimate at the predicted state): recomputes the step with ``x_hat_s`` as one more point,
    ``rho`` solving ``R rho = b`` for ``R = [[1, 1], [r, 1]]`` (``r = (λ_r - λ_t) / (λ_s - λ_t)``)
    and ``b_k = h φ_k(h) k! / B(h)``; without ``earlier``, ``rho = 1/2`` (the trapezoidal rule).

    Args:
        z_t: state at λ_t, ``(B, C, *spatial)``.
        x_hat_t: model estimate at ``(z_t, λ_t)``.
        logsnr_t, logsnr_s: the step's ends, ``λ_s > λ_t``.
        earlier: ``(λ_r, x_hat_r)`` one grid point before t, or None (a first-order step).
        x_hat_s: the estimate at the predicted state at λ_s (corrector), or None (predictor).

    Returns:
        ``z_s``, shape of ``z_t``.
    """
    h = (logsnr_s - logsnr_t) / 2
    b_h = math.expm1(-h)  # B(h) = e^{-h} - 1 = h φ_1(h) with hh = -h
    alpha_s, _ = _scales(logsnr_s)
    z = _exponential_step(z_t, x_hat_t, logsnr_t, logsnr_s)
    if earlier is None and x_hat_s is None:
        return z
    d_r = r = None
    if earlier is not None:
        r = (earlier[0] - logsnr_t) / (2 * h)  # < 0: the earlier point lies behind t
        d_r = (earlier[1] - x_hat_t) / r
    if x_hat_s is None:
        assert d_r is not None
        return z - (alpha_s * b_h * 0.5) * d_r
    d_s = x_hat_s - x_hat_t
    if d_r is None or r is None:
        return z - (alpha_s * b_h * 0.5) * d_s
    phi = b_h / -h - 1.0  # h φ_2 / h
    b_1 = phi / b_h
    phi = phi / -h - 0.5
    b_2 = 2.0 * phi / b_h
    rho_r = (b_1 - b_2) / (1.0 - r)
    rho_s = b_1 - rho_r
    return z - alpha_s * b_h * (rho_r * d_r + rho_s * d_s)


@_on_grid("logsnr")
def sample_unipc(
    eps_fn: EpsFn,
    x_1: Tensor,
    logsnrs: Tensor,
    generator: torch.Generator | None = None,
    clip_x: float | None = None,
    final: str = "x_hat",
) -> Tensor:
    """UniPC (Zhao et al. 2023): the 2M predictor plus a corrector at no extra model call.

    Each model call at a newly predicted state first corrects that state (UniC, of the order of
    the step that made it, plus one), then the next step is predicted from the corrected state
    (UniP-2; first order on the first step and on the last, whose state is not corrected: no
    model call follows it). One model call per step, as DPM-Solver++ 2M.

    Args:
        eps_fn: noise-prediction model.
        x_1: starting noise, ``(B, C, *spatial)``.
        logsnrs: increasing grid ``(N + 1,)`` (callers build it even in λ: ``grid = "logsnr"``).
        generator: accepted for the common signature and ignored (deterministic).
        clip_x: optional bound on ``|x_hat|`` at every step.
        final: ``"x_hat"`` (N + 1 model calls) or ``"state"`` (N calls).

    Returns:
        ``x_hat`` at ``logsnrs[-1]`` (or the state ``z`` there), shape of ``x_1``.
    """
    del generator  # deterministic
    chain = _Chain(eps_fn, x_1, logsnrs, clip_x, final)
    z = x_1
    earlier: tuple[float, Tensor] | None = None  # (λ, x_hat) one grid point back
    made: tuple[Tensor, Tensor, float, tuple[float, Tensor] | None] | None = None
    for i, logsnr_t, logsnr_s in chain.intervals():
        x_hat, _ = chain.denoise(z, i)
        if made is not None:  # UniC: correct z (predicted by the last step) with x_hat there
            z = _unipc_update(made[0], made[1], made[2], logsnr_t, made[3], x_hat)
        using = earlier if i > 0 and not chain.last(i) else None
        made = (z, x_hat, logsnr_t, using)
        earlier = (logsnr_t, x_hat)
        z = _unipc_update(z, x_hat, logsnr_t, logsnr_s, using)
    return chain.result(z)
