"""Analytic tests of the log-SNR conventions, parameterisation conversions and weightings."""

from __future__ import annotations

import math

import pytest
import torch

from ulframe.diffusion import (
    ELBOWeighting,
    SigmoidWeighting,
    Weighting,
    alpha_sigma,
    diffuse,
    eps_from_v,
    eps_from_x,
    expand_like,
    is_elbo_weighting,
    v_from_x_eps,
    x_from_eps,
    x_from_v,
)

WIDE_LOGSNR = torch.linspace(-30.0, 30.0, 601)  # includes both ±30 exactly
SHAPES = [(4, 3, 8, 8), (4, 3, 2, 8, 8)]  # image (B, C, H, W) and video (B, C, T, H, W)


def _data(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 data, noise and a (B,) log-SNR spread over [-8, 8]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    logsnr = torch.linspace(-8.0, 8.0, shape[0], dtype=torch.float64)
    return x, eps, logsnr


# ----------------------------------------------------------------------------- alpha, sigma


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_alpha_sigma_variance_preserving_over_wide_range(dtype: torch.dtype) -> None:
    logsnr = WIDE_LOGSNR.to(dtype)
    alpha, sigma = alpha_sigma(logsnr)
    assert torch.isfinite(alpha).all() and torch.isfinite(sigma).all()
    assert (alpha > 0).all() and (sigma > 0).all()
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(logsnr), atol=tol, rtol=0)


def test_alpha_sigma_ratio_is_exp_half_logsnr() -> None:
    logsnr = WIDE_LOGSNR.to(torch.float64)
    alpha, sigma = alpha_sigma(logsnr)
    torch.testing.assert_close(torch.log(alpha / sigma), logsnr / 2, atol=1e-12, rtol=0)
    # sigmoid(0) = 1/2: equal signal and noise at logsnr 0
    a0, s0 = alpha_sigma(torch.zeros((), dtype=torch.float64))
    assert a0.item() == pytest.approx(math.sqrt(0.5), abs=1e-15)
    assert s0.item() == pytest.approx(math.sqrt(0.5), abs=1e-15)


# ----------------------------------------------------------------------------- expand_like


@pytest.mark.parametrize("shape", SHAPES)
def test_expand_like_shapes(shape: tuple[int, ...]) -> None:
    x = torch.zeros(shape)
    v = torch.arange(shape[0], dtype=torch.float32)
    out = expand_like(v, x)
    assert out.shape == (shape[0],) + (1,) * (len(shape) - 1)
    torch.testing.assert_close((out + x)[:, 0].flatten(1).mean(1), v)


def test_expand_like_rejects_wrong_shape() -> None:
    x = torch.zeros(4, 3, 8, 8)
    with pytest.raises(ValueError, match="expand_like"):
        expand_like(torch.zeros(3), x)
    with pytest.raises(ValueError, match="expand_like"):
        expand_like(torch.zeros(4, 1), x)


# ----------------------------------------------------------------------------- conversions


@pytest.mark.parametrize("shape", SHAPES)
def test_diffuse_is_alpha_x_plus_sigma_eps(shape: tuple[int, ...]) -> None:
    x, eps, logsnr = _data(shape)
    x_t = diffuse(x, logsnr, eps)
    for i in range(shape[0]):
        a = math.sqrt(1 / (1 + math.exp(-logsnr[i].item())))
        s = math.sqrt(1 / (1 + math.exp(logsnr[i].item())))
        torch.testing.assert_close(x_t[i], a * x[i] + s * eps[i], atol=1e-13, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_conversion_round_trips(shape: tuple[int, ...]) -> None:
    x, eps, logsnr = _data(shape)
    x_t = diffuse(x, logsnr, eps)
    v = v_from_x_eps(x, eps, logsnr)
    close = {"atol": 1e-10, "rtol": 1e-10}
    torch.testing.assert_close(x_from_eps(x_t, eps, logsnr), x, **close)
    torch.testing.assert_close(eps_from_x(x_t, x, logsnr), eps, **close)
    torch.testing.assert_close(x_from_v(x_t, v, logsnr), x, **close)
    torch.testing.assert_close(eps_from_v(x_t, v, logsnr), eps, **close)
    # eps -> x -> eps and x -> eps -> x with arbitrary (wrong) predictions
    eps_hat = torch.randn_like(eps)
    x_hat = x_from_eps(x_t, eps_hat, logsnr)
    torch.testing.assert_close(eps_from_x(x_t, x_hat, logsnr), eps_hat, **close)
    v_hat = v_from_x_eps(x_hat, eps_hat, logsnr)
    torch.testing.assert_close(x_from_v(x_t, v_hat, logsnr), x_hat, **close)
    torch.testing.assert_close(eps_from_v(x_t, v_hat, logsnr), eps_hat, **close)


def test_v_definition() -> None:
    x, eps, logsnr = _data((3, 2, 4, 4))
    alpha, sigma = alpha_sigma(logsnr)
    expected = alpha[:, None, None, None] * eps - sigma[:, None, None, None] * x
    torch.testing.assert_close(v_from_x_eps(x, eps, logsnr), expected, atol=1e-14, rtol=0)


# ----------------------------------------------------------------------------- weightings


def test_elbo_weighting_is_one() -> None:
    w = ELBOWeighting()
    logsnr = WIDE_LOGSNR[:600].reshape(3, 200)
    out = w(logsnr)
    assert out.shape == logsnr.shape
    assert torch.equal(out, torch.ones_like(logsnr))
    assert isinstance(w, Weighting)


@pytest.mark.parametrize("bias", [-2.0, 0.0, 1.5])
def test_sigmoid_weighting_direction(bias: float) -> None:
    w = SigmoidWeighting(bias=bias)
    assert isinstance(w, Weighting)
    logsnr = torch.tensor([-40.0, bias, 40.0], dtype=torch.float64)
    out = w(logsnr)
    # noisy levels keep full weight, clean levels are discounted, half weight at the bias
    assert out[0].item() == pytest.approx(1.0, abs=1e-12)
    assert out[1].item() == pytest.approx(0.5, abs=1e-15)
    assert out[2].item() == pytest.approx(0.0, abs=1e-12)
    grid = torch.linspace(-10, 10, 101, dtype=torch.float64)
    assert (w(grid).diff() < 0).all()


@pytest.mark.parametrize(("bias", "loss_factor"), [(0.0, 1.5), (-1.0, 1.3), (2.0, 2.1)])
def test_sigmoid_crossing_point(bias: float, loss_factor: float) -> None:
    w = SigmoidWeighting(bias=bias)
    crossing = w.crossing_logsnr(loss_factor)
    assert crossing == pytest.approx(bias + math.log(loss_factor - 1.0), abs=1e-15)
    value = loss_factor * w(torch.tensor(crossing, dtype=torch.float64)).item()
    assert value == pytest.approx(1.0, abs=1e-12)
    # the scaled weight exceeds 1 below the crossing (coarse content) and is below 1 above it
    around = torch.tensor([crossing - 0.1, crossing + 0.1], dtype=torch.float64)
    scaled = loss_factor * w(around)
    assert scaled[0] > 1.0 > scaled[1]


@pytest.mark.parametrize("loss_factor", [1.0, 0.5])
def test_sigmoid_crossing_needs_loss_factor_above_one(loss_factor: float) -> None:
    with pytest.raises(ValueError, match="no crossing"):
        SigmoidWeighting(bias=0.0).crossing_logsnr(loss_factor)


def test_is_elbo_weighting() -> None:
    assert is_elbo_weighting(ELBOWeighting(), -15.0, 5.0)
    assert not is_elbo_weighting(SigmoidWeighting(bias=0.0), -15.0, 5.0)
    # a sigmoid with a huge bias is ~1 on the range: numerically the ELBO there
    assert is_elbo_weighting(SigmoidWeighting(bias=40.0), -15.0, 5.0)
    # a weighting that only deviates near one end of the range is caught
    assert not is_elbo_weighting(SigmoidWeighting(bias=10.0), -15.0, 5.0)
    # wrong output shape is not an ELBO weighting
    assert not is_elbo_weighting(lambda logsnr: torch.ones(()), -15.0, 5.0)
