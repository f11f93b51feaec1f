"""The Fréchet distance (ulframe/eval/frechet.py) against closed forms and its invariances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from ulframe.eval.frechet import (
    FrechetStats,
    frechet_distance,
    frechet_distance_features,
    gaussian_stats,
    trace_sqrt_product,
)

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_orthogonal(dim: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen(seed), dtype=F64))
    return q * torch.sign(torch.diagonal(r))  # (D, D), Haar-distributed


def random_spd(dim: int, seed: int, rank: int | None = None) -> torch.Tensor:
    a = torch.randn(dim, rank or 2 * dim, generator=gen(seed), dtype=F64)
    return a @ a.T / a.shape[1]


def features(n: int, dim: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    mix = torch.randn(dim, dim, generator=gen(seed + 100), dtype=F64) / math.sqrt(dim)
    return torch.randn(n, dim, generator=gen(seed), dtype=F64) @ mix + shift  # (N, D)


def test_gaussian_stats_match_numpy():
    f = features(50, 6, 0, shift=3.0)
    mu, sigma = gaussian_stats(f.float())
    assert mu.dtype == sigma.dtype == F64
    np.testing.assert_allclose(mu.numpy(), f.float().double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(f.float().double().numpy().T), atol=1e-12)


def test_set_with_itself_is_zero():
    f = features(200, 16, 1, shift=2.0)
    stats = gaussian_stats(f)
    assert frechet_distance(*stats, *stats) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance_features(f, f) == pytest.approx(0.0, abs=1e-9)
    small = f[:10]  # N < D: the low-rank path
    assert frechet_distance_features(small, small) == pytest.approx(0.0, abs=1e-9)


def test_diagonal_closed_form():
    g = gen(2)
    mu1, mu2 = torch.randn(8, generator=g, dtype=F64), torch.randn(8, generator=g, dtype=F64)
    s1, s2 = torch.rand(8, generator=g, dtype=F64) + 0.1, torch.rand(8, generator=g, dtype=F64)
    expected = float((mu1 - mu2).square().sum() + (s1.sqrt() - s2.sqrt()).square().sum())
    got = frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_full_covariance_commuting_closed_form():
    """S1 = Q diag(a) Qᵀ, S2 = Q diag(b) Qᵀ commute: tr (S1 S2)^½ = Σ sqrt(a b)."""
    dim = 12
    q = random_orthogonal(dim, 3)
    g = gen(4)
    a, b = torch.rand(dim, generator=g, dtype=F64) * 3, torch.rand(dim, generator=g, dtype=F64)
    s1, s2 = q @ torch.diag(a) @ q.T, q @ torch.diag(b) @ q.T
    mu1, mu2 = torch.randn(dim, generator=g, dtype=F64), torch.zeros(dim, dtype=F64)
    expected = float(mu1.square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def test_general_case_matches_scipy_sqrtm():
    """Non-commuting covariances: the pytorch-fid formula with scipy's general sqrtm."""
    dim = 7
    s1, s2 = random_spd(dim, 5), random_spd(dim, 6)
    mu1 = torch.randn(dim, generator=gen(7), dtype=F64)
    mu2 = torch.randn(dim, generator=gen(8), dtype=F64)
    root = scipy.linalg.sqrtm(s1.numpy() @ s2.numpy())
    expected = float((mu1 - mu2).square().sum()) + float(
        np.trace(s1.numpy()) + np.trace(s2.numpy()) - 2 * np.trace(root).real
    )
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_symmetric_and_rotation_invariant():
    dim = 10
    f1, f2 = features(300, dim, 9), features(250, dim, 10, shift=0.5)
    d12 = frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))
    d21 = frechet_distance(*gaussian_stats(f2), *gaussian_stats(f1))
    assert d12 > 0.1
    assert d21 == pytest.approx(d12, rel=1e-10)
    q = random_orthogonal(dim, 11)
    rotated = frechet_distance(*gaussian_stats(f1 @ q.T), *gaussian_stats(f2 @ q.T))
    assert rotated == pytest.approx(d12, rel=1e-10)


@pytest.mark.parametrize(
    ("n1", "n2"), [(5, 9), (40, 3), (60, 80)], ids=["lowrank", "mixed", "full"]
)
def test_feature_path_equals_stats_path(n1: int, n2: int):
    dim = 32
    f1, f2 = features(n1, dim, 12), features(n2, dim, 13, shift=0.3)
    expected = frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))
    assert frechet_distance_features(f1, f2) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_near_singular_covariances_are_finite():
    """N < D (rank-deficient covariances) and exactly singular ones give finite values."""
    dim = 64
    f1, f2 = features(10, dim, 14), features(12, dim, 15, shift=0.1)
    value = frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))
    assert math.isfinite(value) and value > 0
    assert value == pytest.approx(frechet_distance_features(f1, f2), rel=1e-8)
    zero = torch.zeros(dim, dim, dtype=F64)
    assert frechet_distance(torch.zeros(dim), zero, torch.zeros(dim), zero) == 0.0
    s = random_spd(dim, 16, rank=3)
    assert math.isfinite(frechet_distance(torch.zeros(dim), s, torch.ones(dim), zero))
    assert math.isfinite(float(trace_sqrt_product(s.float(), s.float())))
    # float32 features with a large common offset: still no NaN, still ≈ 0 against itself
    big = (features(20, dim, 17) + 1e3).float()
    assert frechet_distance_features(big, big) == pytest.approx(0.0, abs=1e-6)


def test_streaming_equals_batch_and_merges():
    dim = 9
    f = features(123, dim, 18, shift=1.5)
    mu, sigma = gaussian_stats(f)

    whole = FrechetStats(dim)
    for chunk in f.float().split(17):
        whole.update(chunk)
    rank0, rank1 = FrechetStats(dim).update(f[:50]), FrechetStats(dim).update(f[50:])
    merged = FrechetStats(dim).merge(rank0).merge(rank1)
    reduced = FrechetStats.from_packed(rank0.packed() + rank1.packed(), dim)  # an all-reduce SUM
    for stats in (merged, reduced):
        assert stats.count == 123
        s_mu, s_sigma = stats.mean_cov()
        torch.testing.assert_close(s_mu, mu, rtol=0, atol=1e-12)
        torch.testing.assert_close(s_sigma, sigma, rtol=0, atol=1e-12)
    f32_mu, f32_sigma = whole.mean_cov()  # fed in float32: float32 rounding of the inputs only
    torch.testing.assert_close(f32_mu, mu, rtol=0, atol=1e-6)
    torch.testing.assert_close(f32_sigma, sigma, rtol=0, atol=1e-6)

    other = FrechetStats(dim).update(features(80, dim, 19))
    expected = frechet_distance(mu, sigma, *gaussian_stats(features(80, dim, 19)))
    assert merged.distance(other) == pytest.approx(expected, rel=1e-10)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_stats(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        FrechetStats(4).update(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="one D"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(2), torch.eye(2))
    with pytest.raises(ValueError, match="at least 2"):
        FrechetStats(3).update(torch.zeros(1, 3)).mean_cov()
