"""The continuous-time ELBO against closed forms for Gaussian data x ~ N(0, s² I_D).

Derivation (per dimension; SNR S = exp(λ), alpha² = S / (1 + S), sigma² = 1 / (1 + S)).

Optimal denoiser of N(0, s²) data: ``x_hat = E[x | z] = c z``, ``c = alpha s² / (alpha² s² + sigma²)``,
and ``eps_hat = (z - alpha x_hat) / sigma``.

For a FIXED point x0 and ``z = alpha x0 + sigma eps``:
``x0 - x_hat = r x0 - c alpha sigma eps`` with ``r = 1 - c alpha² = 1 / (1 + s² S)``, so
``E_eps (x0 - x_hat)² = x0² / (1 + s² S)² + s⁴ S / (1 + s² S)²``.

The diffusion term is ``∫_{λ_min}^{λ_max} 0.5 S E(x0 - x_hat)² dλ`` (``dλ = dS / S``)
``= ∫ 0.5 (x0² + s⁴ S) / (1 + s² S)² dS``. With ``u = 1 + s² S`` the antiderivative is

    F(λ) = 0.5 [ log u + (1 - x0² / s²) / u ],   u = 1 + s² exp(λ)

(check: dF/dS = 0.5 s² (u - 1 + x0²/s²) / u² = 0.5 (s⁴ S + x0²) / u²). Summed over dimensions:
``L_diff(x0) = Σ_d F_d(λ_max) - F_d(λ_min)``. Averaged over x0 ~ N(0, s²) (x0² -> s²) this is
``0.5 D log((1 + s² e^λmax) / (1 + s² e^λmin))``, the familiar data-averaged form.

With the prior term ``KL(q(z_1 | x0) || N(0, I))`` at λ_min and the Gaussian reconstruction
``-log N(x0; z_0 / alpha_0, sigma_0² / alpha_0²)`` at λ_max (expected value
``0.5 D (log 2π - λ_max + 1)``), the total tends to the exact NLL
``0.5 D log(2π s²) + 0.5 |x0|² / s²`` as λ_min -> -inf and λ_max -> +inf: the continuous-time
ELBO with the optimal denoiser is tight. The tests below check F by quadrature of the library's
own integrand, then check the Monte-Carlo estimator against F.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from scipy import integrate

from ulframe.diffusion import (
    CosineSchedule,
    LinearSchedule,
    Schedule,
    ShiftedCosineSchedule,
    alpha_sigma,
    antithetic_t,
    diffuse,
    elbo_term_nats,
    eps_from_x,
    expand_like,
    kl_standard_normal_nats,
    stratified_t,
)

DATA_STD = 0.5  # s
DIMS = 16  # D
MC_BATCHES, MC_BATCH = 256, 256  # independent antithetic batches x batch size
MC_STANDARD_ERRORS = 4.0
F64 = torch.float64


# ----------------------------------------------------------------------------- closed forms


def optimal_eps_hat(z_t: torch.Tensor, logsnr: torch.Tensor, s: float) -> torch.Tensor:
    """eps_hat of the exact denoiser for N(0, s² I) data."""
    alpha, sigma = alpha_sigma(expand_like(logsnr, z_t))
    x_hat = alpha * s**2 / (alpha**2 * s**2 + sigma**2) * z_t
    return eps_from_x(z_t, x_hat, logsnr)


def diffusion_nats_exact(x0: torch.Tensor, s: float, logsnr_min: float, logsnr_max: float) -> float:
    """Σ_d F_d(λ_max) - F_d(λ_min) for one point x0 (see module docstring)."""

    def antiderivative(logsnr: float) -> torch.Tensor:
        u = 1.0 + s**2 * math.exp(logsnr)
        return 0.5 * (math.log(u) + (1.0 - x0**2 / s**2) / u)

    return float((antiderivative(logsnr_max) - antiderivative(logsnr_min)).sum())


def reconstruction_nats(dims: int, logsnr_max: float) -> float:
    """E_eps -log N(x0; z_0 / alpha_0, sigma_0² / alpha_0²) = 0.5 D (log 2π - λ_max + 1)."""
    return 0.5 * dims * (math.log(2 * math.pi) - logsnr_max + 1.0)


def exact_nll_nats(x0: torch.Tensor, s: float) -> float:
    """-log N(x0; 0, s² I)."""
    return float(0.5 * x0.numel() * math.log(2 * math.pi * s**2) + 0.5 * (x0**2).sum() / s**2)


def expected_integrand_in_logsnr(x0: torch.Tensor, logsnr: float, s: float) -> float:
    """E_eps 0.5 Σ (eps - eps_hat)² at one λ, through the library's own functions.

    The loss is Σ_d (a_d + b_d eps_d)², so its expectation over eps ~ N(0, I) is exactly the
    mean of its values at eps = +1 and eps = -1 (all dimensions at once).
    """
    lam = torch.full((1,), logsnr, dtype=F64)
    values = []
    for sign in (1.0, -1.0):
        eps = torch.full_like(x0, sign)[None]  # (1, D)
        z_t = diffuse(x0[None], lam, eps)
        values.append(elbo_term_nats(eps, optimal_eps_hat(z_t, lam, s), torch.ones(1, dtype=F64)))
    return float((values[0] + values[1]) / 2)


@pytest.fixture(name="x0")
def _x0() -> torch.Tensor:
    return DATA_STD * torch.randn(DIMS, generator=torch.Generator().manual_seed(0), dtype=F64)


# ----------------------------------------------------------------------------- analytic checks


@pytest.mark.parametrize(("logsnr_min", "logsnr_max"), [(-10.0, 10.0), (-15.0, 5.0), (-4.0, 3.0)])
def test_closed_form_matches_quadrature(
    x0: torch.Tensor, logsnr_min: float, logsnr_max: float
) -> None:
    """Verify the derivation: quadrature over λ of the library integrand equals F."""
    value, _err = integrate.quad(
        lambda lam: expected_integrand_in_logsnr(x0, lam, DATA_STD),
        logsnr_min,
        logsnr_max,
        epsabs=1e-10,
        epsrel=1e-10,
        limit=200,
    )
    exact = diffusion_nats_exact(x0, DATA_STD, logsnr_min, logsnr_max)
    assert value == pytest.approx(exact, rel=1e-8)


def test_data_averaged_closed_form() -> None:
    """x0² -> s² in F gives 0.5 D log((1 + s² e^λmax) / (1 + s² e^λmin))."""
    x0 = torch.full((DIMS,), DATA_STD, dtype=F64)  # x0² = s² in every dimension
    expected = (
        0.5
        * DIMS
        * math.log((1 + DATA_STD**2 * math.exp(8.0)) / (1 + DATA_STD**2 * math.exp(-8.0)))
    )
    assert diffusion_nats_exact(x0, DATA_STD, -8.0, 8.0) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "schedule",
    [
        CosineSchedule(-10.0, 10.0),
        LinearSchedule(-10.0, 10.0),
        ShiftedCosineSchedule(-10.0, 10.0, resolution=256),
    ],
    ids=["cosine", "linear", "shifted_cosine"],
)
def test_time_integral_is_schedule_invariant(x0: torch.Tensor, schedule: Schedule) -> None:
    """∫_0^1 (-dλ/dt) E[0.5 Σ (eps - eps_hat)²](λ(t)) dt is the same F for every schedule."""

    def integrand(t: float) -> float:
        t_tensor = torch.tensor(t, dtype=F64)
        logsnr = schedule.logsnr(t_tensor).item()
        return schedule.neg_dlogsnr_dt(t_tensor).item() * expected_integrand_in_logsnr(
            x0, logsnr, DATA_STD
        )

    # the cosine integrand peaks near t = 0, within about t_min = atan(exp(-5)) ≈ 7e-3
    value, _ = integrate.quad(
        integrand, 0.0, 1.0, epsabs=1e-10, epsrel=1e-10, limit=400, points=[1e-3, 1e-2, 0.1]
    )
    exact = diffusion_nats_exact(x0, DATA_STD, -10.0, 10.0)
    assert value == pytest.approx(exact, rel=1e-8)


def test_elbo_is_tight_at_wide_endpoints(x0: torch.Tensor) -> None:
    """Diffusion + prior KL + reconstruction -> -log p(x0) as the endpoints widen."""
    gaps = []
    for half_range in (5.0, 10.0, 20.0, 30.0):
        logsnr_min, logsnr_max = -half_range, half_range
        kl = kl_standard_normal_nats(x0[None], torch.tensor([logsnr_min], dtype=F64)).item()
        total = (
            diffusion_nats_exact(x0, DATA_STD, logsnr_min, logsnr_max)
            + kl
            + reconstruction_nats(DIMS, logsnr_max)
        )
        gaps.append(total - exact_nll_nats(x0, DATA_STD))
    assert all(abs(a) > abs(b) for a, b in itertools.pairwise(gaps))
    assert abs(gaps[-1]) < 1e-9
    assert abs(gaps[0]) > 1e-3  # the finite-range terms matter: the check is not vacuous


def test_data_averaged_elbo_bounds_entropy() -> None:
    """E_x0 of the ELBO is >= the entropy 0.5 D log(2π e s²) and approaches it."""
    entropy = 0.5 * DIMS * math.log(2 * math.pi * math.e * DATA_STD**2)
    x0_avg = torch.full((DIMS,), DATA_STD, dtype=F64)  # everything is linear in x0²
    for half_range in (3.0, 8.0, 20.0):
        kl = kl_standard_normal_nats(x0_avg[None], torch.tensor([-half_range], dtype=F64)).item()
        total = (
            diffusion_nats_exact(x0_avg, DATA_STD, -half_range, half_range)
            + kl
            + reconstruction_nats(DIMS, half_range)
        )
        assert total >= entropy
    assert total - entropy < 1e-6


# ----------------------------------------------------------------------------- prior KL


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_kl_standard_normal_matches_torch(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    x = 2.0 * torch.randn(6, 3, 4, 4, generator=g, dtype=dtype)  # (B, C, H, W)
    logsnr_1 = torch.tensor([-15.0, -8.0, -3.0, 0.0, 2.0, 5.0], dtype=dtype)  # (B,)
    alpha, sigma = alpha_sigma(expand_like(logsnr_1, x))
    q = torch.distributions.Normal(alpha * x, sigma.expand_as(x))
    p = torch.distributions.Normal(torch.zeros_like(x), torch.ones_like(x))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)  # (B,)
    got = kl_standard_normal_nats(x, logsnr_1)
    assert got.shape == (6,)
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-10}
    torch.testing.assert_close(got, expected, **tol)


def test_kl_standard_normal_video_and_limits() -> None:
    x = torch.ones(2, 3, 2, 4, 4, dtype=F64)  # (B, C, T, H, W)
    kl = kl_standard_normal_nats(x, torch.tensor([-30.0, 0.0], dtype=F64))
    assert kl.shape == (2,) and (kl >= 0).all()
    assert kl[0].item() < 1e-10  # q(x_1) = N(0, I) when alpha_1 -> 0
    # logsnr 0, x = 1: alpha² = sigma² = 1/2 -> 0.5 (1/2 + 1/2 - 1 + log 2) per dim
    assert kl[1].item() == pytest.approx(0.5 * math.log(2) * x[1].numel(), rel=1e-12)


# ----------------------------------------------------------------------------- elbo term


def test_elbo_term_exact_value() -> None:
    eps = torch.zeros(3, 2, 4, 4, dtype=F64)
    eps_hat = torch.full_like(eps, 2.0)  # (eps - eps_hat)² = 4 in each of 32 dims
    neg_dlogsnr_dt = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    weight = torch.tensor([1.0, 0.5, 0.0], dtype=F64)
    torch.testing.assert_close(
        elbo_term_nats(eps, eps_hat, neg_dlogsnr_dt), torch.tensor([64.0, 128.0, 192.0], dtype=F64)
    )
    torch.testing.assert_close(
        elbo_term_nats(eps, eps_hat, neg_dlogsnr_dt, weight),
        torch.tensor([64.0, 64.0, 0.0], dtype=F64),
    )
    with pytest.raises(ValueError, match="same shape"):
        elbo_term_nats(eps, eps_hat[:, :1], neg_dlogsnr_dt)


# ----------------------------------------------------------------------------- time samplers


def test_antithetic_t() -> None:
    batch = 64
    t = antithetic_t(batch, generator=torch.Generator().manual_seed(0))
    assert t.shape == (batch,) and t.dtype == torch.float32
    assert ((t >= 0) & (t < 1)).all()
    spacing = torch.sort(t.double()).values.diff()
    torch.testing.assert_close(spacing, torch.full_like(spacing, 1 / batch), atol=1e-6, rtol=0)
    again = antithetic_t(batch, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
    # every t_i is marginally uniform: the shift u0 is
    draws = torch.stack(
        [
            antithetic_t(4, generator=torch.Generator().manual_seed(k), dtype=F64)
            for k in range(2000)
        ]
    )
    first = draws[:, 0]
    assert first.mean().item() == pytest.approx(0.5, abs=4 * math.sqrt(1 / 12 / 2000))
    with pytest.raises(ValueError):
        antithetic_t(0)


def test_stratified_t() -> None:
    t = stratified_t(5, 32, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert t.shape == (5, 32)
    assert ((t >= 0) & (t < 1)).all()
    spacing = torch.sort(t, dim=1).values.diff(dim=1)
    torch.testing.assert_close(spacing, torch.full_like(spacing, 1 / 32), atol=1e-12, rtol=0)
    assert t[:, 0].unique().numel() == 5  # independent shift per example


# ----------------------------------------------------------------------------- Monte Carlo


def mc_diffusion_nats(
    schedule: Schedule,
    x0: torch.Tensor,
    seed: int,
    iid_t: bool = False,
    batches: int = MC_BATCHES,
) -> torch.Tensor:
    """One-sample losses ``(batches, MC_BATCH)`` of the diffusion term at x0.

    Each row is one batch of antithetic times (``iid_t``: independent uniform times).
    """
    g = torch.Generator().manual_seed(seed)
    n = batches * MC_BATCH
    if iid_t:
        t = torch.rand(n, generator=g, dtype=F64)
    else:
        t = torch.cat([antithetic_t(MC_BATCH, generator=g, dtype=F64) for _ in range(batches)])
    logsnr = schedule.logsnr(t)  # (n,)
    x = x0.expand(n, DIMS)  # (n, D)
    eps = torch.randn(n, DIMS, generator=g, dtype=F64)
    z_t = diffuse(x, logsnr, eps)
    loss = elbo_term_nats(eps, optimal_eps_hat(z_t, logsnr, DATA_STD), schedule.neg_dlogsnr_dt(t))
    return loss.reshape(batches, MC_BATCH)


def _mean_and_standard_error(losses: torch.Tensor) -> tuple[float, float]:
    """Mean and its standard error from independent batch means (rows)."""
    batch_means = losses.mean(dim=1)
    return batch_means.mean().item(), batch_means.std().item() / math.sqrt(batch_means.numel())


@pytest.mark.parametrize(
    "schedule", [CosineSchedule(-10.0, 10.0), LinearSchedule(-10.0, 10.0)], ids=["cosine", "linear"]
)
def test_monte_carlo_matches_closed_form(x0: torch.Tensor, schedule: Schedule) -> None:
    mean, standard_error = _mean_and_standard_error(mc_diffusion_nats(schedule, x0, seed=1))
    exact = diffusion_nats_exact(x0, DATA_STD, -10.0, 10.0)
    assert abs(mean - exact) < MC_STANDARD_ERRORS * standard_error
    assert standard_error < 0.02 * exact  # power to see a few-percent error


def test_monte_carlo_schedule_invariance_and_variance(x0: torch.Tensor) -> None:
    """Same ELBO under cosine and linear schedules (same endpoints); different variance."""
    cosine, linear = CosineSchedule(-10.0, 10.0), LinearSchedule(-10.0, 10.0)
    mean_cos, se_cos = _mean_and_standard_error(mc_diffusion_nats(cosine, x0, seed=2))
    mean_lin, se_lin = _mean_and_standard_error(mc_diffusion_nats(linear, x0, seed=3))
    assert abs(mean_cos - mean_lin) < MC_STANDARD_ERRORS * math.hypot(se_cos, se_lin)
    # per-example variance with independent t: the cosine schedule spends few samples at the
    # high-λ end where -dλ/dt is large, so its estimator is much noisier here (~10x)
    iid_cos = mc_diffusion_nats(cosine, x0, seed=4, iid_t=True, batches=MC_BATCHES // 4)
    iid_lin = mc_diffusion_nats(linear, x0, seed=5, iid_t=True, batches=MC_BATCHES // 4)
    assert iid_cos.var().item() > 3.0 * iid_lin.var().item()
    # antithetic times reduce the variance of a batch mean against independent times
    assert se_lin * math.sqrt(MC_BATCHES) < iid_lin.mean(dim=1).std().item()
