"""Samplers against closed forms: Gaussian data N(0, s² I) and a point mass, exact denoisers.

For Gaussian data the exact denoiser is linear, ``x_hat = c(λ) z`` with
``c = alpha s² / (alpha² s² + sigma²)``, so both samplers are linear maps of ``x_1`` (plus
independent noise for ancestral steps) and the variance of their output has a closed-form
recursion over the grid, written here with the raw VDM posterior formulas of the UL paper's
Algorithm 2 (not the library's rearranged ones). It tends to ``s²`` as the number of steps
grows.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch

from ulframe.diffusion import (
    CosineSchedule,
    EpsFn,
    LinearSchedule,
    Sampler,
    alpha_sigma,
    ancestral_step,
    ddim_step,
    eps_from_x,
    expand_like,
    logsnr_grid,
    sample_ancestral,
    sample_ddim,
    x_from_eps,
)
from ulframe.errors import ConfigError

DATA_STD = 0.5  # s
SCHEDULE = CosineSchedule(-15.0, 15.0)
STEPS = 200
NUM_SAMPLES_SHAPE = (1250, 1, 4, 4)  # 20 000 scalar samples per chunk, (B, C, H, W)
# Chunks stay below torch's intra-op grain size (32 768 elements): on a busy 2-core machine,
# multi-threaded elementwise ops cost ~20 ms each, which made one 80 000-sample run take 40 s.
NUM_CHUNKS = 4
F64 = torch.float64
SAMPLERS: list[Callable[..., torch.Tensor]] = [sample_ancestral, sample_ddim]


def gaussian_eps_fn(s: float) -> EpsFn:
    """Exact eps prediction for data N(0, s² I)."""

    def eps_fn(z_t: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        assert logsnr.shape == (z_t.shape[0],)
        alpha, sigma = alpha_sigma(expand_like(logsnr, z_t))
        x_hat = alpha * s**2 / (alpha**2 * s**2 + sigma**2) * z_t
        return eps_from_x(z_t, x_hat, logsnr)

    return eps_fn


def point_mass_eps_fn(c: float) -> EpsFn:
    """Exact eps prediction for data that is always the constant c: eps = (z - alpha c) / sigma."""

    def eps_fn(z_t: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        alpha, sigma = alpha_sigma(expand_like(logsnr, z_t))
        return (z_t - alpha * c) / sigma

    return eps_fn


def _scales(logsnr: float) -> tuple[float, float]:
    alpha2 = 1.0 / (1.0 + math.exp(-logsnr))
    return math.sqrt(alpha2), math.sqrt(1.0 - alpha2)


def _gain(logsnr: float, s: float) -> float:
    """c(λ) with x_hat = c z for N(0, s²) data."""
    alpha, sigma = _scales(logsnr)
    return alpha * s**2 / (alpha**2 * s**2 + sigma**2)


def ancestral_output_variance(grid: torch.Tensor, s: float, x_1_var: float = 1.0) -> float:
    """Var of the ancestral sampler's output, from the posterior of UL paper Algorithm 2."""
    return _gain(grid.tolist()[-1], s) ** 2 * ancestral_state_variance(grid, s, x_1_var)


def ancestral_state_variance(grid: torch.Tensor, s: float, x_1_var: float = 1.0) -> float:
    """Var of the ancestral chain's state z at the last grid point (`final="state"`)."""
    var = x_1_var
    values = grid.tolist()
    for logsnr_t, logsnr_s in itertools.pairwise(values):
        alpha_t, sigma_t = _scales(logsnr_t)
        alpha_s, sigma_s = _scales(logsnr_s)
        alpha_ts = alpha_t / alpha_s
        sigma2_ts = sigma_t**2 - alpha_ts**2 * sigma_s**2
        gain = alpha_ts * sigma_s**2 / sigma_t**2 + alpha_s * sigma2_ts / sigma_t**2 * _gain(
            logsnr_t, s
        )
        var = gain**2 * var + sigma2_ts * sigma_s**2 / sigma_t**2
    return var


def ddim_output_gain(grid: torch.Tensor, s: float) -> float:
    """k with DDIM output = k x_1 for N(0, s²) data."""
    gain = 1.0
    values = grid.tolist()
    for logsnr_t, logsnr_s in itertools.pairwise(values):
        alpha_t, sigma_t = _scales(logsnr_t)
        alpha_s, sigma_s = _scales(logsnr_s)
        c = _gain(logsnr_t, s)
        eps_gain = (1.0 - alpha_t * c) / sigma_t  # eps_hat = eps_gain z_t
        gain *= alpha_s * c + sigma_s * eps_gain
    return gain * _gain(values[-1], s)


def _x_1(shape: tuple[int, ...] = NUM_SAMPLES_SHAPE, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ----------------------------------------------------------------------------- grid


def test_logsnr_grid() -> None:
    grid = logsnr_grid(SCHEDULE, 10)
    assert grid.shape == (11,) and grid.dtype == F64
    assert grid[0].item() == pytest.approx(-15.0, abs=1e-12)
    assert grid[-1].item() == pytest.approx(15.0, abs=1e-12)
    assert (grid.diff() > 0).all()
    t = torch.linspace(1, 0, 11, dtype=F64)
    torch.testing.assert_close(grid, SCHEDULE.logsnr(t))
    with pytest.raises(ValueError, match="steps"):
        logsnr_grid(SCHEDULE, 0)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_rejects_decreasing_grid(sampler: Sampler) -> None:
    grid = logsnr_grid(SCHEDULE, 4)
    with pytest.raises(ValueError, match="increase"):
        sampler(gaussian_eps_fn(DATA_STD), _x_1((2, 1, 2, 2)), grid.flip(0))


def test_samplers_satisfy_protocol() -> None:
    for sampler in SAMPLERS:
        assert isinstance(sampler, Sampler)


# ----------------------------------------------------------------------------- steps


def test_ancestral_step_matches_paper_formula() -> None:
    """The stable rearrangement equals the alpha_ts / sigma2_ts posterior of UL paper Alg. 2."""
    g = torch.Generator().manual_seed(0)
    shape = (6, 2, 3, 3)
    z_t = torch.randn(shape, generator=g, dtype=F64)
    x_hat = torch.randn(shape, generator=g, dtype=F64)
    noise = torch.randn(shape, generator=g, dtype=F64)
    logsnr_t = torch.tensor([-15.0, -5.0, -1.0, 0.0, 3.0, 10.0], dtype=F64)
    logsnr_s = logsnr_t + torch.tensor([0.01, 0.5, 2.0, 1.0, 7.0, 5.0], dtype=F64)
    alpha_t, sigma_t = (expand_like(v, z_t) for v in alpha_sigma(logsnr_t))
    alpha_s, sigma_s = (expand_like(v, z_t) for v in alpha_sigma(logsnr_s))
    alpha_ts = alpha_t / alpha_s
    sigma2_ts = sigma_t**2 - alpha_ts**2 * sigma_s**2
    mean = alpha_ts * sigma_s**2 / sigma_t**2 * z_t + alpha_s * sigma2_ts / sigma_t**2 * x_hat
    var = sigma2_ts * sigma_s**2 / sigma_t**2
    expected = mean + var.sqrt() * noise
    got = ancestral_step(z_t, x_hat, logsnr_t, logsnr_s, noise)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)


def test_ddim_step_formula() -> None:
    g = torch.Generator().manual_seed(0)
    x_hat, eps_hat = torch.randn(2, 3, 1, 5, generator=g, dtype=F64)
    logsnr_s = torch.tensor([-2.0, 0.0, 4.0], dtype=F64)
    alpha_s, sigma_s = alpha_sigma(logsnr_s)
    expected = alpha_s[:, None, None] * x_hat + sigma_s[:, None, None] * eps_hat
    torch.testing.assert_close(ddim_step(x_hat, eps_hat, logsnr_s), expected, atol=1e-14, rtol=0)


# ----------------------------------------------------------------------------- Gaussian data


def test_chain_variance_tends_to_data_variance() -> None:
    """The closed-form recursions converge to s² with the number of steps (refinement check)."""
    errors_anc, errors_ddim = [], []
    for steps in (50, 200, 1000):
        grid = logsnr_grid(SCHEDULE, steps)
        errors_anc.append(abs(ancestral_output_variance(grid, DATA_STD) / DATA_STD**2 - 1))
        errors_ddim.append(abs(ddim_output_gain(grid, DATA_STD) ** 2 / DATA_STD**2 - 1))
    assert errors_anc == sorted(errors_anc, reverse=True) and errors_anc[-1] < 0.01
    assert errors_ddim == sorted(errors_ddim, reverse=True) and errors_ddim[-1] < 0.005


def test_ancestral_gaussian_variance() -> None:
    grid = logsnr_grid(SCHEDULE, STEPS)
    generator = torch.Generator().manual_seed(1)
    x_1 = torch.stack([_x_1(seed=k) for k in range(NUM_CHUNKS)])  # (chunks, B, C, H, W)
    samples = torch.stack(
        [
            sample_ancestral(gaussian_eps_fn(DATA_STD), chunk, grid, generator=generator)
            for chunk in x_1
        ]
    )
    assert samples.shape == x_1.shape and samples.dtype == F64
    n = samples.numel()
    var = samples.var().item()
    assert abs(samples.mean().item()) < 4 * DATA_STD / math.sqrt(n)
    expected = ancestral_output_variance(grid, DATA_STD, x_1.var().item())
    # sample variance of n Gaussians has relative standard error sqrt(2 / (n - 1))
    assert abs(var / expected - 1) < 4 * math.sqrt(2 / (n - 1))
    assert abs(var / DATA_STD**2 - 1) < 0.05


def test_ancestral_float32_and_linear_schedule() -> None:
    """Same sampler in float32 on another schedule; variance within a few percent of s²."""
    grid = logsnr_grid(LinearSchedule(-15.0, 15.0), STEPS)
    x_1 = _x_1((1250, 1, 4, 4)).float()
    samples = sample_ancestral(
        gaussian_eps_fn(DATA_STD), x_1, grid, generator=torch.Generator().manual_seed(2)
    )
    assert samples.dtype == torch.float32 and torch.isfinite(samples).all()
    expected = ancestral_output_variance(grid, DATA_STD, x_1.double().var().item())
    assert abs(samples.var().item() / expected - 1) < 4 * math.sqrt(2 / (samples.numel() - 1))
    assert abs(samples.var().item() / DATA_STD**2 - 1) < 0.1


def test_ddim_gaussian_is_exact_linear_map() -> None:
    grid = logsnr_grid(SCHEDULE, STEPS)
    x_1 = _x_1((500, 1, 4, 4))
    samples = sample_ddim(gaussian_eps_fn(DATA_STD), x_1, grid)
    gain = ddim_output_gain(grid, DATA_STD)
    torch.testing.assert_close(samples, gain * x_1, atol=1e-10, rtol=1e-10)
    assert abs(gain**2 / DATA_STD**2 - 1) < 0.03


def test_ddim_deterministic_and_ignores_generator() -> None:
    grid = logsnr_grid(SCHEDULE, 20)
    x_1 = _x_1((8, 2, 3, 3))
    eps_fn = gaussian_eps_fn(DATA_STD)
    a = sample_ddim(eps_fn, x_1, grid, generator=torch.Generator().manual_seed(0))
    b = sample_ddim(eps_fn, x_1, grid, generator=torch.Generator().manual_seed(1))
    c = sample_ddim(eps_fn, x_1, grid)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_ancestral_seeded() -> None:
    grid = logsnr_grid(SCHEDULE, 20)
    x_1 = _x_1((8, 2, 3, 3))
    eps_fn = gaussian_eps_fn(DATA_STD)
    a = sample_ancestral(eps_fn, x_1, grid, generator=torch.Generator().manual_seed(0))
    b = sample_ancestral(eps_fn, x_1, grid, generator=torch.Generator().manual_seed(0))
    c = sample_ancestral(eps_fn, x_1, grid, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


# ----------------------------------------------------------------------------- point mass


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("shape", [(64, 1), (4, 3, 2, 5, 5)], ids=["1d", "video"])
def test_point_mass_returns_the_point(sampler: Sampler, shape: tuple[int, ...]) -> None:
    c = 0.7
    grid = logsnr_grid(SCHEDULE, 25)
    out = sampler(
        point_mass_eps_fn(c), _x_1(shape), grid, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(out, torch.full(shape, c, dtype=F64), atol=1e-9, rtol=0)


def test_ddim_point_mass_trajectory_keeps_initial_noise() -> None:
    """For a point mass, one DDIM step lands exactly on alpha_s c + sigma_s eps_1."""
    c = -1.3
    x_1 = _x_1((16, 1))
    logsnr_t = torch.full((16,), -4.0, dtype=F64)
    logsnr_s = torch.full((16,), 2.0, dtype=F64)
    alpha_t, sigma_t = alpha_sigma(logsnr_t[0])
    eps_1 = (x_1 - alpha_t * c) / sigma_t
    eps_hat = point_mass_eps_fn(c)(x_1, logsnr_t)
    z_s = ddim_step(torch.full_like(x_1, c), eps_hat, logsnr_s)
    alpha_s, sigma_s = alpha_sigma(logsnr_s[0])
    torch.testing.assert_close(z_s, alpha_s * c + sigma_s * eps_1, atol=1e-12, rtol=0)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_clip_x(sampler: Sampler) -> None:
    grid = logsnr_grid(SCHEDULE, 10)
    out = sampler(
        point_mass_eps_fn(3.0),
        _x_1((32, 1)),
        grid,
        generator=torch.Generator().manual_seed(0),
        clip_x=1.0,
    )
    torch.testing.assert_close(out, torch.ones(32, 1, dtype=F64))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_final_state_is_the_chain_state_before_the_last_denoise(sampler: Sampler) -> None:
    """`final="state"` returns the chain's z at the last grid point (N model calls); the default
    `final="x_hat"` is one more model call there: denoise(z)."""
    grid = logsnr_grid(CosineSchedule(-15.0, 0.0), 6)
    calls: list[float] = []
    eps = gaussian_eps_fn(DATA_STD)

    def counting(z_t: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        calls.append(float(logsnr[0]))
        return eps(z_t, logsnr)

    x_1 = _x_1((64, 1))
    z = sampler(counting, x_1, grid, generator=torch.Generator().manual_seed(0), final="state")
    assert len(calls) == 6
    x_hat = sampler(eps, x_1, grid, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x_hat, x_from_eps(z, eps(z, grid[-1].expand(64)), grid[-1]))
    with pytest.raises(ConfigError, match="final"):
        sampler(eps, x_1, grid, final="z")


def test_ancestral_final_state_variance() -> None:
    """For data N(0, s²) with the exact denoiser, the ancestral chain's state at the last grid
    point has the variance of the closed-form recursion (the marginal α² s² + σ² in the limit of
    many steps), and the default output x_hat = c(λ) z."""
    grid = logsnr_grid(CosineSchedule(-15.0, 0.0), 3)
    g = torch.Generator().manual_seed(3)
    x_1 = torch.randn((20000, 1), generator=g, dtype=F64)
    z = sample_ancestral(gaussian_eps_fn(DATA_STD), x_1, grid, generator=g, final="state")
    expected = ancestral_state_variance(grid, DATA_STD)
    assert float(z.var()) == pytest.approx(expected, abs=4 * expected * math.sqrt(2 / 20000))
    many = logsnr_grid(CosineSchedule(-15.0, 0.0), 2000)
    alpha, sigma = _scales(0.0)
    marginal = alpha**2 * DATA_STD**2 + sigma**2
    assert ancestral_state_variance(many, DATA_STD) == pytest.approx(marginal, rel=2e-3)
