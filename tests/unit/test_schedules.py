"""Analytic tests of the schedule plugins: endpoints, monotonicity, derivative, inverse, shift."""

from __future__ import annotations

import math

import pytest
import torch

from ulframe.diffusion import (
    CosineSchedule,
    LinearSchedule,
    Schedule,
    ShiftedCosineSchedule,
)

LOGSNR_MIN, LOGSNR_MAX = -15.0, 5.0  # the UL latent range (docs/method.md, "Schedules")

SCHEDULES = {
    "cosine": CosineSchedule(LOGSNR_MIN, LOGSNR_MAX),
    "linear": LinearSchedule(LOGSNR_MIN, LOGSNR_MAX),
    "shifted_none": ShiftedCosineSchedule(LOGSNR_MIN, LOGSNR_MAX),
    "shifted_256": ShiftedCosineSchedule(LOGSNR_MIN, LOGSNR_MAX, resolution=256),
    "shifted_16": ShiftedCosineSchedule(LOGSNR_MIN, LOGSNR_MAX, resolution=16),
    "cosine_wide": CosineSchedule(-30.0, 30.0),
}
CLASSES = [CosineSchedule, ShiftedCosineSchedule, LinearSchedule]


@pytest.fixture(params=sorted(SCHEDULES), name="schedule")
def _schedule(request: pytest.FixtureRequest) -> Schedule:
    return SCHEDULES[request.param]


def test_protocol(schedule: Schedule) -> None:
    assert isinstance(schedule, Schedule)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_endpoints_exact(schedule: Schedule, dtype: torch.dtype) -> None:
    t = torch.tensor([0.0, 1.0], dtype=dtype)
    logsnr = schedule.logsnr(t)
    assert logsnr.dtype == dtype
    atol = 0.0 if dtype == torch.float32 else 1e-12
    assert abs(logsnr[0].item() - schedule.logsnr_max) <= atol
    assert abs(logsnr[1].item() - schedule.logsnr_min) <= atol


def test_strictly_decreasing(schedule: Schedule) -> None:
    t = torch.linspace(0.0, 1.0, 10001, dtype=torch.float64)
    assert (schedule.logsnr(t).diff() < 0).all()


def test_derivative_matches_finite_differences(schedule: Schedule) -> None:
    t = torch.linspace(0.002, 0.998, 499, dtype=torch.float64)
    h = 1e-6
    fd = -(schedule.logsnr(t + h) - schedule.logsnr(t - h)) / (2 * h)  # central, O(h²)
    analytic = schedule.neg_dlogsnr_dt(t)
    assert analytic.shape == t.shape
    assert (analytic > 0).all()
    torch.testing.assert_close(analytic, fd, rtol=1e-6, atol=0)


def test_derivative_positive_at_endpoints(schedule: Schedule) -> None:
    value = schedule.neg_dlogsnr_dt(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.isfinite(value).all() and (value > 0).all()


def test_inverse(schedule: Schedule) -> None:
    t = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)
    torch.testing.assert_close(schedule.t_from_logsnr(schedule.logsnr(t)), t, atol=1e-9, rtol=0)
    logsnr = torch.linspace(schedule.logsnr_min, schedule.logsnr_max, 1001, dtype=torch.float64)
    torch.testing.assert_close(
        schedule.logsnr(schedule.t_from_logsnr(logsnr)), logsnr, atol=1e-9, rtol=0
    )


def test_float32_in_float32_out(schedule: Schedule) -> None:
    t = torch.rand(16)
    for out in (schedule.logsnr(t), schedule.neg_dlogsnr_dt(t), schedule.t_from_logsnr(t)):
        assert out.dtype == torch.float32 and out.shape == t.shape


def test_cosine_formula() -> None:
    schedule = CosineSchedule(-15.0, 15.0)
    t_min, t_max = math.atan(math.exp(-7.5)), math.atan(math.exp(7.5))
    for t in (0.1, 0.5, 0.9):
        expected = -2 * math.log(math.tan(t_min + t * (t_max - t_min)))
        got = schedule.logsnr(torch.tensor(t, dtype=torch.float64)).item()
        assert got == pytest.approx(expected, abs=1e-12)
    # symmetric endpoints: λ(1/2) = 0
    assert schedule.logsnr(torch.tensor(0.5, dtype=torch.float64)).item() == pytest.approx(
        0.0, abs=1e-12
    )


def test_linear_formula() -> None:
    schedule = LinearSchedule(-10.0, 6.0)
    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    torch.testing.assert_close(schedule.logsnr(t), torch.tensor([6.0, 2.0, -10.0]).double())
    torch.testing.assert_close(schedule.neg_dlogsnr_dt(t), torch.full((3,), 16.0).double())


def test_shifted_cosine_shift_sign_and_size() -> None:
    t_mid = torch.tensor(0.5, dtype=torch.float64)
    plain = ShiftedCosineSchedule(-15.0, 15.0, resolution=None)
    ref = ShiftedCosineSchedule(-15.0, 15.0, resolution=64, reference_resolution=64)
    high = ShiftedCosineSchedule(-15.0, 15.0, resolution=256)
    low = ShiftedCosineSchedule(-15.0, 15.0, resolution=16)
    cosine = CosineSchedule(-15.0, 15.0)
    assert plain.shift == 0.0 and ref.shift == 0.0
    assert high.shift == pytest.approx(2 * math.log(64 / 256))
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(plain.logsnr(t), cosine.logsnr(t), atol=1e-12, rtol=0)
    torch.testing.assert_close(ref.logsnr(t), cosine.logsnr(t), atol=1e-12, rtol=0)
    # higher resolution -> noisier (lower λ) at the same t, by about the shift mid-way
    lam_high, lam_cos, lam_low = (s.logsnr(t_mid).item() for s in (high, cosine, low))
    assert lam_high < lam_cos < lam_low
    assert lam_high - lam_cos == pytest.approx(high.shift, abs=0.01)
    assert lam_low - lam_cos == pytest.approx(low.shift, abs=0.01)
    # endpoints unchanged by the shift
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(high.logsnr(ends), cosine.logsnr(ends), atol=1e-12, rtol=0)


@pytest.mark.parametrize("cls", CLASSES)
def test_uniform_constructor_signature(cls: type) -> None:
    schedule = cls(logsnr_min=-10.0, logsnr_max=5.0, resolution=128)
    assert schedule.logsnr_min == -10.0 and schedule.logsnr_max == 5.0
    positional = cls(-10.0, 5.0, 128)
    assert positional == schedule
    default = cls()
    assert (default.logsnr_min, default.logsnr_max) == (-15.0, 15.0)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize(("lo", "hi"), [(5.0, 5.0), (5.0, -15.0), (-math.inf, 5.0)])
def test_invalid_endpoints_raise(cls: type, lo: float, hi: float) -> None:
    with pytest.raises(ValueError, match="logsnr_min"):
        cls(logsnr_min=lo, logsnr_max=hi)


@pytest.mark.parametrize("cls", CLASSES)
def test_invalid_resolution_raises(cls: type) -> None:
    with pytest.raises(ValueError, match="resolution"):
        cls(resolution=0)
