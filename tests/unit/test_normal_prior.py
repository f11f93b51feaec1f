"""`priors.normal` (plugins/networks/normal_prior.py): the Normal prior of UL paper Table 5.

The Bayes-optimal denoiser of N(0, I) latents predicts v = alpha eps - sigma x = 0 (x_hat =
alpha z_t, eps_hat = sigma z_t), so with a network that returns zeros the stage-1 prior loss of
`stages.ul_joint` (diffusion ELBO over [λ_min, λ_z(0)] + KL_1) equals in expectation
KL(q(z_0 | x) || N(0, I)) = `kl_standard_normal_nats(z_clean, λ_z(0))`. Checked here:

(a) the plugin returns zeros of z_t's shape and dtype, takes labels and label=None, has no weights;
(b) v = 0 is the exact conditional mean for N(0, I) data: eps_hat = sigma z_t, x_hat = alpha z_t;
(c) the expected prior loss integrated by quadrature over the real schedule equals the closed-form
    KL at λ_z(0) (to 1e-5 relative), for λ_z(0) = 5 and 10;
(d) the Monte-Carlo prior loss of ULJointModel (training terms and the evaluation's bits/pixel)
    matches that KL within four standard errors;
(e) the prior term sends gradients to the encoder, and the plugin builds through the registry.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ulframe.diffusion import (
    CosineSchedule,
    ShiftedCosineSchedule,
    SigmoidWeighting,
    alpha_sigma,
    diffuse,
    eps_from_v,
    expand_like,
    kl_standard_normal_nats,
    x_from_v,
)
from ulframe.protocols import BuildContext, check_built
from ulframe.registry import Registry
from ulframe_plugins.networks.encoders import ResNetEncoder
from ulframe_plugins.networks.normal_prior import NormalPrior
from ulframe_plugins.stages.ul_joint import ULJointModel

LATENT_SHAPE = (4, 4, 4)  # (Cz, h, w)
IMAGE_SHAPE = (3, 16, 16)  # (C, H, W)
PIXELS = 16 * 16  # H·W
LATENT_MIN = -15.0  # λ_min of the prior (ul_joint's default)
PAPER_LATENT_LOGSNR_MAX = 5.0  # λ_z(0) (docs/method.md, "Stage 1")
ABLATION_LATENT_LOGSNR_MAX = 10.0  # UL paper ablation B
QUADRATURE_POINTS = 20001  # midpoint rule over t in [0, 1]
QUADRATURE_RTOL = 1e-5  # its error at λ_z(0) = 10, where -dλ/dt is steep near t = 0: ~1e-6
MC_STANDARD_ERRORS = 4.0
MC_DRAWS = 4096  # (t, eps) draws per example of the Monte-Carlo checks


class FixedLatent(nn.Module):
    """An 'encoder' whose z_clean is one fixed point z for every input."""

    latent_channels = LATENT_SHAPE[0]

    def __init__(self, z: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("z", z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.z.expand(x.shape[0], *self.z.shape)  # (B, Cz, h, w)


class ZeroDecoder(nn.Module):
    def forward(self, x_t: torch.Tensor, logsnr: torch.Tensor, z_0: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x_t)  # (B, C, H, W)


def fixed_point(seed: int = 0, scale: float = 1.3) -> torch.Tensor:
    """A z_clean of shape LATENT_SHAPE, not itself standard normal (scale != 1)."""
    return scale * torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(seed))


def normal_prior_model(encoder: nn.Module, latent_logsnr_max: float) -> ULJointModel:
    return ULJointModel(
        encoder, NormalPrior(LATENT_SHAPE), ZeroDecoder(),
        CosineSchedule(LATENT_MIN, latent_logsnr_max),
        ShiftedCosineSchedule(-15.0, 15.0, resolution=IMAGE_SHAPE[-1]),
        SigmoidWeighting(0.0), 1.5, latent_logsnr_max, PIXELS,
    )  # fmt: skip


def closed_form_kl(z: torch.Tensor, latent_logsnr_max: float) -> float:
    """KL(N(alpha_0 z, sigma_0² I) || N(0, I)) in nats, by the library's closed form."""
    logsnr_0 = torch.full((1,), latent_logsnr_max, dtype=torch.float64)
    return float(kl_standard_normal_nats(z[None].double(), logsnr_0)[0])


# ---------------------------------------------------------------------------- (a) the plugin


def test_returns_zeros_of_the_input_shape_and_dtype():
    prior = NormalPrior(LATENT_SHAPE, num_classes=3)
    z_t = torch.randn(2, *LATENT_SHAPE)
    logsnr = torch.tensor([-3.0, 4.0])
    for label in (None, torch.tensor([0, 2])):
        out = prior(z_t, logsnr, label)
        assert out.shape == z_t.shape and out.dtype == torch.float32
        assert not out.any()
    assert prior(z_t.double(), logsnr).dtype == torch.float64
    assert prior.num_classes == 3
    assert list(prior.parameters()) == [] and prior.state_dict() == {}
    check_built("priors", prior, "priors.normal")


def test_rejects_a_shape_without_spatial_axes():
    with pytest.raises(ValueError, match="latent shape"):
        NormalPrior((4,))


def test_registered_and_built_like_every_prior():
    entry = Registry().get("priors", "normal")
    prior = entry.factory(shape=LATENT_SHAPE, num_classes=0)
    assert isinstance(prior, NormalPrior)


# ------------------------------------------------------------- (b) the Bayes-optimal denoiser


@pytest.mark.parametrize("logsnr_value", [-12.0, -2.0, 0.0, 3.0, 9.0])
def test_v_zero_means_eps_hat_sigma_z_t_and_x_hat_alpha_z_t(logsnr_value: float):
    z_t = torch.randn(3, *LATENT_SHAPE, dtype=torch.float64)
    logsnr = torch.full((3,), logsnr_value, dtype=torch.float64)
    v = NormalPrior(LATENT_SHAPE)(z_t, logsnr)
    alpha, sigma = alpha_sigma(expand_like(logsnr, z_t))
    torch.testing.assert_close(eps_from_v(z_t, v, logsnr), sigma * z_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_from_v(z_t, v, logsnr), alpha * z_t, rtol=1e-12, atol=1e-12)


def test_v_target_is_uncorrelated_with_z_t_for_standard_normal_data():
    """For z ~ N(0, I): v = alpha eps - sigma z and z_t are jointly Gaussian and uncorrelated,
    so E[v | z_t] = 0 (the plugin's prediction) — by sampling."""
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    z, eps = (
        torch.randn(n, generator=gen, dtype=torch.float64),
        torch.randn(n, generator=gen, dtype=torch.float64),
    )
    for logsnr_value in (-4.0, 0.0, 4.0):
        logsnr = torch.full((n,), logsnr_value, dtype=torch.float64)
        alpha, sigma = alpha_sigma(logsnr)
        z_t, v = alpha * z + sigma * eps, alpha * eps - sigma * z
        covariance = float((z_t * v).mean())
        assert abs(covariance) < 4.0 / math.sqrt(n) * 2, covariance  # Var(z_t v) <= 2 here


# ------------------------------------------------------- (c) expected loss = closed-form KL


@pytest.mark.parametrize("latent_logsnr_max", [PAPER_LATENT_LOGSNR_MAX, ABLATION_LATENT_LOGSNR_MAX])
def test_expected_prior_loss_equals_kl_at_latent_logsnr_max(latent_logsnr_max: float):
    """E_eps[(-dλ/dt) ½ Σ (eps - sigma z_t)²] = (-dλ/dt) ½ Σ (alpha⁴ + alpha² sigma² z²) per t
    (eps - eps_hat = alpha² eps - alpha sigma z); its integral over t plus KL_1 is the KL at
    λ_z(0), here by a midpoint rule over the real cosine schedule."""
    z = fixed_point().double()
    schedule = CosineSchedule(LATENT_MIN, latent_logsnr_max)
    t = (torch.arange(QUADRATURE_POINTS, dtype=torch.float64) + 0.5) / QUADRATURE_POINTS
    alpha2 = torch.sigmoid(schedule.logsnr(t))  # (N,)
    sigma2 = 1.0 - alpha2
    per_t = 0.5 * (alpha2**2 * z.numel() + alpha2 * sigma2 * (z**2).sum())  # (N,)
    diffusion = float((schedule.neg_dlogsnr_dt(t) * per_t).mean())
    kl1 = float(kl_standard_normal_nats(z[None], torch.full((1,), LATENT_MIN).double())[0])
    exact = closed_form_kl(z, latent_logsnr_max)
    assert diffusion + kl1 == pytest.approx(exact, rel=QUADRATURE_RTOL)


def test_kl_floor_of_a_silent_encoder():
    """z_clean = 0 still costs ½ (sigma_0² - 1 - log sigma_0²) ≈ 2.006 nats per latent dimension at
    λ_z(0) = 5: the fixed encoder noise does not match N(0, I) (why the Normal prior's bitrate
    has a floor; docs/results.md, claim 4)."""
    per_dim = closed_form_kl(torch.zeros(LATENT_SHAPE), PAPER_LATENT_LOGSNR_MAX) / math.prod(
        LATENT_SHAPE
    )
    sigma2 = 1 / (1 + math.exp(PAPER_LATENT_LOGSNR_MAX))
    assert per_dim == pytest.approx(0.5 * (sigma2 - 1 - math.log(sigma2)), rel=1e-9)
    assert per_dim == pytest.approx(2.006, abs=1e-3)


# -------------------------------------------------- (d) the code path of ul_joint, Monte Carlo


def assert_matches(samples: torch.Tensor, exact: float) -> None:
    mean = float(samples.double().mean())
    standard_error = float(samples.double().std()) / math.sqrt(samples.numel())
    assert abs(mean - exact) < MC_STANDARD_ERRORS * standard_error, (mean, exact, standard_error)
    assert abs(mean - exact) < 0.03 * exact


@pytest.mark.parametrize("latent_logsnr_max", [PAPER_LATENT_LOGSNR_MAX, ABLATION_LATENT_LOGSNR_MAX])
def test_training_prior_nats_match_the_normal_prior_kl(latent_logsnr_max: float):
    z = fixed_point()
    model = normal_prior_model(FixedLatent(z), latent_logsnr_max)
    x = torch.zeros(MC_DRAWS, *IMAGE_SHAPE)
    with torch.no_grad():
        terms = model({"x": x}, torch.Generator().manual_seed(1))
    assert_matches(terms.prior_nats, closed_form_kl(z, latent_logsnr_max))


def test_evaluation_bits_per_pixel_match_the_normal_prior_kl():
    z = fixed_point(seed=3, scale=0.7)
    model = normal_prior_model(FixedLatent(z), PAPER_LATENT_LOGSNR_MAX)
    x = torch.zeros(256, *IMAGE_SHAPE)
    bpp = model.bits_per_pixel(x, torch.Generator().manual_seed(2), num_t=16)  # (B,)
    exact = closed_form_kl(z, PAPER_LATENT_LOGSNR_MAX) / (math.log(2) * PIXELS)
    assert_matches(bpp, exact)


def test_z0_draw_matches_the_kl_it_is_charged_for():
    """The z_0 the decoder sees is alpha_0 z + sigma_0 eps: the q(z_0 | x) of the KL above."""
    z = fixed_point()
    model = normal_prior_model(FixedLatent(z), PAPER_LATENT_LOGSNR_MAX)
    gen = torch.Generator().manual_seed(0)
    _, z_0 = model.encode(torch.zeros(1, *IMAGE_SHAPE), gen)
    eps = torch.randn((1, *LATENT_SHAPE), generator=torch.Generator().manual_seed(0))
    expected = diffuse(z[None], torch.full((1,), PAPER_LATENT_LOGSNR_MAX), eps)
    torch.testing.assert_close(z_0, expected)


# ------------------------------------------------------------------ (e) gradients and build


def test_prior_loss_sends_gradients_to_the_encoder():
    torch.manual_seed(0)
    encoder = ResNetEncoder(
        IMAGE_SHAPE, latent_channels=4, channels=(8, 16), blocks_per_stage=(1, 1), patch_size=2
    )
    model = normal_prior_model(encoder, PAPER_LATENT_LOGSNR_MAX)
    x = torch.rand(4, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    terms = model({"x": x}, torch.Generator().manual_seed(0))
    terms.prior_nats.mean().backward()
    grads = [p.grad for p in encoder.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


def test_ul_joint_builds_with_the_normal_prior():
    from functools import partial

    from ulframe.train.settings import TrainSettings
    from ulframe_plugins.networks.decoders import UViTDecoder
    from ulframe_plugins.stages.ul_joint import ULJoint

    stage = ULJoint(
        encoder=partial(
            ResNetEncoder, latent_channels=4, channels=(8, 16), blocks_per_stage=(1, 1),
            patch_size=2,
        ),
        prior=NormalPrior,
        decoder=partial(
            UViTDecoder, channels=(16,), blocks_per_stage=1, width=32, depth=1, heads=2,
            patch_size=2,
        ),
        train=TrainSettings(batch_size=2, warmup_samples=0),
    )  # fmt: skip
    example: dict[str, Any] = {"x": torch.zeros(IMAGE_SHAPE), "label": torch.tensor(0)}
    model = stage.build(BuildContext(example, 0, torch.device("cpu"), Path("unused")))
    assert isinstance(model.prior, NormalPrior) and model.prior.shape == LATENT_SHAPE
    terms = model({"x": torch.rand(2, *IMAGE_SHAPE) * 2 - 1}, torch.Generator().manual_seed(0))
    assert torch.isfinite(terms.total_nats()).all()
