"""The stage-1 objective of Unified Latents (plugins/stages/ul_joint.py) against docs/method.md.

Exact and structural checks of `ULJoint` / `ULJointModel` / `ULJointTerms` on a tiny model
(3x16x16 images, 4x4x4 latents):

(a) total = prior + decoder; bits/pixel = prior nats / (ln 2 · H · W);
(b) gradients reach the encoder through each loss term on its own;
(c) the prior weighting cannot be changed;
(d) the crossing point λ* = b + log(c_lf - 1) of c_lf · sigmoid(b - λ);
(e) z_0 = alpha(5) z_clean + sigma(5) eps_z, and λ_z(0) bound in gin is honoured;
(f) every term recomputed by hand from the tensors the model actually used;
(g) independent t and noise for the two terms;
(h) AdamW steps on real pixels lower the loss;
(i) with the Bayes-optimal prior for Gaussian latents the prior loss matches its closed form.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import gin
import pytest
import torch
from torch import nn

from ulframe import wiring
from ulframe.diffusion import (
    CosineSchedule,
    ELBOWeighting,
    LinearSchedule,
    ShiftedCosineSchedule,
    SigmoidWeighting,
    alpha_sigma,
    elbo_term_nats,
    eps_from_x,
    expand_like,
    v_from_x_eps,
)
from ulframe.errors import ConfigError
from ulframe.protocols import BuildContext, EvalReport
from ulframe.registry import Registry
from ulframe.train.settings import CONFIGURABLES, TrainSettings
from ulframe_plugins.datasets.photos import Photos
from ulframe_plugins.networks.decoders import UViTDecoder
from ulframe_plugins.networks.encoders import ResNetEncoder
from ulframe_plugins.networks.priors import ViT
from ulframe_plugins.stages import ul_joint
from ulframe_plugins.stages.ul_joint import ULJoint, ULJointModel, ULJointTerms

SHAPE = (3, 16, 16)  # (C, H, W)
LATENT_SHAPE = (4, 4, 4)  # (Cz, h, w)
PIXELS = 16 * 16  # H·W: the bits/pixel normaliser (docs/method.md, Conventions: not H·W·3)
BATCH = 4
ENCODER = dict(latent_channels=4, channels=(8, 16), blocks_per_stage=(1, 1), patch_size=2)
PRIOR = dict(widths=(32,), depths=(1,), heads=2, patch_size=1)
DECODER = dict(
    channels=(16,), blocks_per_stage=1, width=32, depth=1, heads=2, patch_size=2, dropout=0.0
)
PAPER_LATENT_LOGSNR_MAX = 5.0  # λ_z(0) (docs/method.md, "Stage 1")
PAPER_ALPHA_5, PAPER_SIGMA_5 = 0.99665, 0.08181  # λ = 5 (docs/method.md, Stage 1)
ABLATION_LATENT_LOGSNR_MAX = 10.0  # UL paper ablation B
PERTURB_STD = 0.05


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny networks run fastest on one thread (the CPU is small and shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------- helpers


def make_stage(**overrides: Any) -> ULJoint:
    """A ULJoint with tiny networks; keyword arguments override ULJoint's."""
    kwargs: dict[str, Any] = dict(
        encoder=partial(ResNetEncoder, **ENCODER),
        prior=partial(ViT, **PRIOR),
        decoder=partial(UViTDecoder, **DECODER),
        train=TrainSettings(batch_size=BATCH, warmup_samples=0),
    )
    return ULJoint(**(kwargs | overrides))


def build(stage: ULJoint, seed: int = 0) -> ULJointModel:
    torch.manual_seed(seed)
    example = {"x": torch.zeros(SHAPE), "label": torch.tensor(0)}
    ctx = BuildContext(example, 0, torch.device("cpu"), Path("unused-stage-dir"))
    return stage.build(ctx)


def perturb_zero_init_(module: nn.Module, seed: int = 1) -> nn.Module:
    """Give every all-zero parameter small random values. The prior's and decoder's zero-init
    output layers make v_hat ≡ 0 at init, so no gradient would reach their inputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(PERTURB_STD * torch.randn(p.shape, generator=gen))
    return module


def images(seed: int = 0, batch: int = BATCH) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1]."""
    return torch.rand((batch, *SHAPE), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def alpha_sigma_of(logsnr: float) -> tuple[float, float]:
    """By hand: alpha² = sigmoid(λ), sigma² = sigmoid(-λ)."""
    return math.sqrt(1 / (1 + math.exp(-logsnr))), math.sqrt(1 / (1 + math.exp(logsnr)))


def sum_dims(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).sum(1)  # (B,)


@dataclass
class Recorded:
    """What one forward pass used: every `diffuse` call and every network call."""

    diffuse: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = field(
        default_factory=list
    )  # (x, logsnr, eps, x_t)
    prior: list[tuple[tuple[torch.Tensor, ...], torch.Tensor]] = field(default_factory=list)
    decoder: list[tuple[tuple[torch.Tensor, ...], torch.Tensor]] = field(default_factory=list)

    def diffusion_producing(self, x_t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The (x, logsnr, eps, x_t) whose output is `x_t`."""
        (match,) = [d for d in self.diffuse if d[3] is x_t]
        return match


@pytest.fixture
def record(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """record(model) -> Recorded, filled by the model's forward passes."""
    rec = Recorded()
    real_diffuse = ul_joint.diffuse

    def diffuse(x: torch.Tensor, logsnr: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        x_t = real_diffuse(x, logsnr, eps)
        rec.diffuse.append((x.detach(), logsnr.detach(), eps.detach(), x_t))
        return x_t

    monkeypatch.setattr(ul_joint, "diffuse", diffuse)
    handles = []

    def attach(model: ULJointModel) -> Recorded:
        for name in ("prior", "decoder"):
            target = getattr(rec, name)
            hook = getattr(model, name).register_forward_hook(
                lambda _m, args, out, target=target: target.append((args, out.detach()))
            )
            handles.append(hook)
        return rec

    yield attach
    for h in handles:
        h.remove()


# ---------------------------------------------------------------------- (a) the terms record


def test_terms_total_and_bits_per_pixel_exact():
    terms = ULJointTerms(
        prior_diffusion_nats=torch.tensor([1.0, 2.0]),
        prior_kl1_nats=torch.tensor([0.5, 0.25]),
        decoder_nats=torch.tensor([3.0, 4.0]),
        pixels=PIXELS,
    )
    assert torch.equal(terms.prior_nats, torch.tensor([1.5, 2.25]))
    assert torch.equal(terms.total_nats(), torch.tensor([4.5, 6.25]))
    metrics = terms.metrics()
    assert float(metrics["total_nats"]) == 5.375
    assert float(metrics["prior_nats"]) == 1.875
    assert float(metrics["bits_per_pixel"]) == pytest.approx(1.875 / (math.log(2) * PIXELS))


def test_model_terms_are_per_example_and_consistent():
    model = build(make_stage())
    terms = model({"x": images()}, torch.Generator().manual_seed(0))
    assert terms.pixels == PIXELS
    for value in (terms.prior_diffusion_nats, terms.prior_kl1_nats, terms.decoder_nats):
        assert value.shape == (BATCH,) and value.dtype == torch.float32
    assert torch.equal(terms.total_nats(), terms.prior_nats + terms.decoder_nats)
    assert (terms.prior_diffusion_nats >= 0).all() and (terms.decoder_nats >= 0).all()
    # KL_1 >= 0 in exact arithmetic; float32 rounding of sigma_1² - 1 - log sigma_1² at
    # λ_min = -15 leaves an absolute error of order 1e-6 nats.
    assert (terms.prior_kl1_nats >= -1e-5).all()
    m = terms.metrics()
    bpp = terms.prior_nats.mean() / (math.log(2) * PIXELS)
    torch.testing.assert_close(m["bits_per_pixel"], bpp)


# --------------------------------------------------------------------- (b) gradients


@pytest.mark.parametrize("term", ["prior_diffusion_nats", "prior_kl1_nats", "decoder_nats"])
def test_each_term_alone_sends_gradients_to_the_encoder(term: str):
    model = build(make_stage())
    perturb_zero_init_(model.prior)
    perturb_zero_init_(model.decoder)
    model.zero_grad(set_to_none=True)
    terms = model({"x": images()}, torch.Generator().manual_seed(0))
    getattr(terms, term).mean().backward()

    def grad_norm(module: nn.Module) -> float:
        grads = [p.grad.norm() for p in module.parameters() if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    assert grad_norm(model.encoder) > 0
    # each network only receives the gradient of its own term
    assert (grad_norm(model.prior) > 0) == (term == "prior_diffusion_nats")
    assert (grad_norm(model.decoder) > 0) == (term == "decoder_nats")


# --------------------------------------------------------------------- (c) prior weighting


def test_prior_weighting_cannot_be_changed():
    with pytest.raises(ConfigError) as err:
        make_stage(prior_weighting=SigmoidWeighting(0.0))
    message = str(err.value)
    assert "prior_weighting" in message and "ELBO" in message
    assert "hide information" in message and "bitrate" in message
    with pytest.raises(ConfigError):
        make_stage(prior_weighting=lambda logsnr: 2.0 * torch.ones_like(logsnr))
    make_stage(prior_weighting=ELBOWeighting())  # w ≡ 1 is accepted, whoever supplies it
    make_stage(prior_weighting=lambda logsnr: torch.ones_like(logsnr))


# --------------------------------------------------------------------- (d) crossing point


@pytest.mark.parametrize(("bias", "loss_factor"), [(0.0, 1.5), (1.0, 1.3), (-2.0, 2.1)])
def test_crossing_logsnr(bias: float, loss_factor: float):
    stage = make_stage(decoder_weighting=SigmoidWeighting(bias), loss_factor=loss_factor)
    crossing = stage.crossing_logsnr()
    assert crossing == pytest.approx(bias + math.log(loss_factor - 1), abs=1e-12)
    w = stage.decoder_weighting
    logsnr = torch.tensor([crossing - 1, crossing, crossing + 1], dtype=torch.float64)
    scaled = loss_factor * w(logsnr)
    assert float(scaled[1]) == pytest.approx(1.0, abs=1e-12)
    assert scaled[0] > 1 > scaled[2]  # coarser than λ* goes to the latent


def test_no_crossing_without_loss_factor_above_one():
    assert make_stage(loss_factor=1.0).crossing_logsnr() is None


# --------------------------------------------------------------------- (e) encoding noise


def check_encoding_noise(model: ULJointModel, logsnr_0: float) -> None:
    """z_0 - alpha(λ) z_clean == sigma(λ) eps_z, eps_z the generator's first draw in encode."""
    x = images()
    z_clean, z_0 = model.encode(x, torch.Generator().manual_seed(7))
    eps_z = torch.randn(z_clean.shape, generator=torch.Generator().manual_seed(7))
    alpha, sigma = alpha_sigma_of(logsnr_0)
    torch.testing.assert_close(z_clean, model.encoder(x), rtol=0, atol=0)
    torch.testing.assert_close(z_0 - alpha * z_clean, sigma * eps_z, rtol=1e-5, atol=1e-6)


def test_z0_uses_alpha_and_sigma_of_five():
    alpha, sigma = alpha_sigma_of(PAPER_LATENT_LOGSNR_MAX)
    assert alpha == pytest.approx(PAPER_ALPHA_5, abs=1e-5)
    assert sigma == pytest.approx(PAPER_SIGMA_5, abs=1e-5)
    model = build(make_stage())
    assert model.latent_logsnr_max == PAPER_LATENT_LOGSNR_MAX
    assert model.prior_schedule.logsnr_max == PAPER_LATENT_LOGSNR_MAX  # prior stops at λ_z(0)
    check_encoding_noise(model, PAPER_LATENT_LOGSNR_MAX)


def test_latent_logsnr_max_bound_in_gin_is_honoured(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(wiring, "_bnb_optimizers", dict)  # ~6 s import, irrelevant here
    wiring.register(Registry(), engine=CONFIGURABLES)
    try:
        gin.parse_config(
            [f"stage1/stages.ul_joint.latent_logsnr_max = {ABLATION_LATENT_LOGSNR_MAX}"]
        )
        with gin.config_scope("stage1"):
            stage = gin.get_configurable("stages.ul_joint")(
                encoder=partial(ResNetEncoder, **ENCODER),
                prior=partial(ViT, **PRIOR),
                decoder=partial(UViTDecoder, **DECODER),
                train=TrainSettings(batch_size=BATCH),
            )
    finally:
        gin.clear_config()
    model = build(stage)
    assert model.latent_logsnr_max == ABLATION_LATENT_LOGSNR_MAX
    assert model.prior_schedule.logsnr_max == ABLATION_LATENT_LOGSNR_MAX
    check_encoding_noise(model, ABLATION_LATENT_LOGSNR_MAX)


# --------------------------------------------------------------------- (f) by hand


def test_every_term_recomputed_by_hand(record):
    """Linear schedules (constant -dλ/dt) so that every factor is known by hand."""
    bias, loss_factor = 0.7, 1.4
    latent_min, decoder_min, decoder_max = -15.0, -12.0, 14.0
    stage = make_stage(
        decoder_weighting=SigmoidWeighting(bias),
        loss_factor=loss_factor,
        latent_logsnr_min=latent_min,
        decoder_logsnr_min=decoder_min,
        decoder_logsnr_max=decoder_max,
        prior_schedule=LinearSchedule,
        decoder_schedule=LinearSchedule,
    )
    model = build(stage)
    perturb_zero_init_(model.prior)
    perturb_zero_init_(model.decoder)
    rec = record(model)
    x = images()
    with torch.no_grad():
        terms = model({"x": x}, torch.Generator().manual_seed(3))

    (((x_t, logsnr_x, z_0), v_hat_x),) = rec.decoder
    (((z_t, logsnr_z), v_hat_z),) = rec.prior
    # The networks predict v; eps_hat = sigma z_t + alpha v (ul_joint.py, docs/method.md).
    eps_hat_x = (
        torch.sigmoid(-logsnr_x).sqrt()[:, None, None, None] * x_t
        + torch.sigmoid(logsnr_x).sqrt()[:, None, None, None] * v_hat_x
    )
    eps_hat_z = (
        torch.sigmoid(-logsnr_z).sqrt()[:, None, None, None] * z_t
        + torch.sigmoid(logsnr_z).sqrt()[:, None, None, None] * v_hat_z
    )
    x_in, logsnr_x_used, eps_x, _ = rec.diffusion_producing(x_t)
    z_clean, logsnr_z_used, eps_z, _ = rec.diffusion_producing(z_t)
    z_clean_0, logsnr_0, _, _ = rec.diffusion_producing(z_0)
    assert torch.equal(x_in, x) and torch.equal(logsnr_x_used, logsnr_x)
    assert torch.equal(logsnr_z_used, logsnr_z) and torch.equal(z_clean_0, z_clean)
    assert torch.equal(logsnr_0, torch.full((BATCH,), PAPER_LATENT_LOGSNR_MAX))

    # decoder: L_x = c_lf · (-dλ/dt) · ½ · sigmoid(b - λ) · Σ (eps - eps_hat)²
    neg_dlogsnr_dt_x = decoder_max - decoder_min
    sq_x = sum_dims((eps_x - eps_hat_x) ** 2)
    by_hand = loss_factor * neg_dlogsnr_dt_x * 0.5 * torch.sigmoid(bias - logsnr_x) * sq_x
    torch.testing.assert_close(terms.decoder_nats, by_hand, rtol=1e-5, atol=0)
    elbo = elbo_term_nats(eps_x, eps_hat_x, torch.full((BATCH,), neg_dlogsnr_dt_x))
    torch.testing.assert_close(
        terms.decoder_nats, loss_factor * SigmoidWeighting(bias)(logsnr_x) * elbo, rtol=1e-5, atol=0
    )

    # prior: w ≡ 1 between λ_min and λ_z(0) = 5, plus KL_1 at λ_min
    neg_dlogsnr_dt_z = PAPER_LATENT_LOGSNR_MAX - latent_min
    sq_z = sum_dims((eps_z - eps_hat_z) ** 2)
    torch.testing.assert_close(
        terms.prior_diffusion_nats, neg_dlogsnr_dt_z * 0.5 * sq_z, rtol=1e-5, atol=0
    )
    alpha2_1 = 1 / (1 + math.exp(-latent_min))
    # 0.5 Σ (alpha_1² z² + sigma_1² - 1 - log sigma_1²), with sigma_1² - 1 = -alpha_1² and
    # -log sigma_1² = log(1 + e^λ_1), in float64 without cancellation
    kl_by_hand = 0.5 * sum_dims(
        alpha2_1 * (z_clean.double() ** 2 - 1) + math.log1p(math.exp(latent_min))
    )
    torch.testing.assert_close(terms.prior_kl1_nats.double(), kl_by_hand, rtol=0, atol=1e-5)
    assert (logsnr_x <= decoder_max).all() and (logsnr_x >= decoder_min).all()
    assert (logsnr_z <= PAPER_LATENT_LOGSNR_MAX).all() and (logsnr_z >= latent_min).all()


def test_decoder_term_with_the_default_schedule_by_hand():
    """decoder_term at chosen t: c_lf · sigmoid(b - λ(t)) · (-dλ/dt)(t) · ½ Σ (eps - eps_hat)²."""
    model = build(make_stage(loss_factor=1.5))
    perturb_zero_init_(model.decoder)
    schedule = model.decoder_schedule
    assert isinstance(schedule, ShiftedCosineSchedule) and schedule.resolution == SHAPE[-1]
    x = images()
    _, z_0 = model.encode(x, torch.Generator().manual_seed(0))
    t = torch.tensor([0.05, 0.3, 0.6, 0.95])
    with torch.no_grad():
        got = model.decoder_term(x, z_0, t, torch.Generator().manual_seed(1))
        eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        logsnr = schedule.logsnr(t)
        alpha, sigma = alpha_sigma(expand_like(logsnr, x))
        x_t = alpha * x + sigma * eps
        eps_hat = sigma * x_t + alpha * model.decoder(x_t, logsnr, z_0)  # the network predicts v
    by_hand = 1.5 * torch.sigmoid(-logsnr) * schedule.neg_dlogsnr_dt(t) * 0.5
    by_hand = by_hand * sum_dims((eps - eps_hat) ** 2)
    torch.testing.assert_close(got, by_hand, rtol=1e-5, atol=0)


# --------------------------------------------------------------------- (g) independence


def test_terms_draw_independent_noise(record):
    model = build(make_stage())
    rec = record(model)
    with torch.no_grad():
        model({"x": images(batch=16)}, torch.Generator().manual_seed(0))
    (((x_t, logsnr_x, z_0), _),) = rec.decoder
    (((z_t, logsnr_z), _),) = rec.prior
    eps_x = rec.diffusion_producing(x_t)[2]
    eps_prior = rec.diffusion_producing(z_t)[2]
    eps_encode = rec.diffusion_producing(z_0)[2]
    n = eps_prior.numel()
    flat = [eps_encode.flatten(), eps_prior.flatten(), eps_x.flatten()[:n]]
    for i in range(3):
        for j in range(i + 1, 3):
            corr = torch.corrcoef(torch.stack([flat[i], flat[j]]))[0, 1]
            assert abs(float(corr)) < 0.15, (i, j)
    t_z = model.prior_schedule.t_from_logsnr(logsnr_z)
    t_x = model.decoder_schedule.t_from_logsnr(logsnr_x)
    assert not torch.allclose(t_z, t_x, atol=1e-3)


def test_terms_draw_independent_times(monkeypatch: pytest.MonkeyPatch):
    """Over many steps the prior's and the decoder's t are uncorrelated (Algorithm 1)."""
    model = build(make_stage())
    times: dict[str, list[torch.Tensor]] = {"prior": [], "decoder": []}
    zeros = torch.zeros(2)

    def prior_terms(z_clean, t, generator):
        times["prior"].append(t)
        return zeros, zeros

    def decoder_term(x, z_0, t, generator):
        times["decoder"].append(t)
        return zeros

    monkeypatch.setattr(model, "prior_terms", prior_terms)
    monkeypatch.setattr(model, "decoder_term", decoder_term)
    x = images(batch=2)
    with torch.no_grad():
        for seed in range(300):
            model({"x": x}, torch.Generator().manual_seed(seed))
    t_z, t_x = torch.stack(times["prior"]), torch.stack(times["decoder"])  # (steps, B)
    assert ((t_z >= 0) & (t_z < 1)).all() and ((t_x >= 0) & (t_x < 1)).all()
    corr = torch.corrcoef(torch.stack([t_z[:, 0], t_x[:, 0]]))[0, 1]
    assert abs(float(corr)) < 0.2  # 300 pairs: |corr| of independent draws is ~0.06


# --------------------------------------------------------------------- (h) training


def test_adamw_steps_on_real_pixels_lower_the_loss():
    torch.manual_seed(0)
    model = build(make_stage())
    source = Photos(resolution=SHAPE[-1], crops_per_epoch=8).source("train")
    x = torch.stack([source.decode(item)["x"] for item in source.items])  # (8, C, H, W)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0)

    def eval_loss() -> float:  # the same t and noise at every evaluation
        with torch.no_grad():
            return float(model({"x": x}, torch.Generator().manual_seed(1234)).total_nats().mean())

    losses = []
    for step in range(30):
        losses.append(eval_loss())
        loss = model({"x": x}, torch.Generator().manual_seed(step)).total_nats().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    losses.append(eval_loss())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert math.isfinite(last) and last < 0.95 * first, (first, last)


def test_evaluate_reports_bitrate_psnr_and_crossing():
    stage = make_stage(sample_steps=2, eval_t_per_example=2, eval_images=2)
    model = build(stage).eval()
    batches = [{"x": images(), "label": torch.zeros(BATCH, dtype=torch.long)}]
    with torch.no_grad():  # as the loop's evaluator calls it
        report = stage.evaluate(model, batches, torch.Generator().manual_seed(0))
    assert isinstance(report, EvalReport)
    assert {"bits_per_pixel", "psnr", "total_nats", "crossing_logsnr"} <= report.scalars.keys()
    assert report.scalars["crossing_logsnr"] == pytest.approx(math.log(0.5))
    assert report.images["reconstructions"].shape == (4, *SHAPE)
    assert report.images["prior_samples"].shape == (2, *SHAPE)


# --------------------------------------------------------------------- (i) closed form

LATENT_STD = 0.5  # s: latents z_clean ~ N(0, s² I)
LATENT_MIN = -15.0
MC_STANDARD_ERRORS = 4.0


class FixedLatent(nn.Module):
    """An 'encoder' whose z_clean is one fixed point z0 for every input."""

    latent_channels = LATENT_SHAPE[0]

    def __init__(self, z0: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("z0", z0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.z0.expand(x.shape[0], *self.z0.shape)  # (B, Cz, h, w)


class OptimalGaussianPrior(nn.Module):
    """The exact denoiser of N(0, s² I) data: x_hat = alpha s² / (alpha² s² + sigma²) z_t.

    Returned as v = alpha eps_hat - sigma x_hat, the parameterisation ul_joint's networks predict.
    """

    num_classes = 0

    def forward(self, z_t: torch.Tensor, logsnr: torch.Tensor, label: Any = None) -> torch.Tensor:
        alpha, sigma = alpha_sigma(expand_like(logsnr, z_t))
        x_hat = alpha * LATENT_STD**2 / (alpha**2 * LATENT_STD**2 + sigma**2) * z_t
        return v_from_x_eps(x_hat, eps_from_x(z_t, x_hat, logsnr), logsnr)


class ZeroDecoder(nn.Module):
    def forward(self, x_t: torch.Tensor, logsnr: torch.Tensor, z_0: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x_t)


def exact_prior_nats(z0: torch.Tensor, logsnr_min: float, logsnr_max: float) -> float:
    """Diffusion term + KL_1 for the fixed point z0 under the optimal N(0, s²) denoiser.

    Diffusion term: Σ_d F(λ_max) - F(λ_min), F(λ) = ½ [log u + (1 - z0²/s²) / u],
    u = 1 + s² e^λ (derived in tests/unit/test_elbo_gaussian.py). KL_1 per dimension:
    ½ (alpha_1² z0² + sigma_1² - 1 - log sigma_1²) = ½ (alpha_1² (z0² - 1) + log(1 + e^λ_1)).
    """
    z0 = z0.double()
    s2 = LATENT_STD**2

    def antiderivative(logsnr: float) -> torch.Tensor:
        u = 1.0 + s2 * math.exp(logsnr)
        return 0.5 * (math.log(u) + (1.0 - z0**2 / s2) / u)

    diffusion = (antiderivative(logsnr_max) - antiderivative(logsnr_min)).sum()
    alpha2_1 = 1 / (1 + math.exp(-logsnr_min))
    kl = (0.5 * (alpha2_1 * (z0**2 - 1) + math.log1p(math.exp(logsnr_min)))).sum()
    return float(diffusion + kl)


def gaussian_latent_model() -> tuple[ULJointModel, float]:
    z0 = LATENT_STD * torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(0))
    model = ULJointModel(
        FixedLatent(z0), OptimalGaussianPrior(), ZeroDecoder(),
        CosineSchedule(LATENT_MIN, PAPER_LATENT_LOGSNR_MAX),
        ShiftedCosineSchedule(-15.0, 15.0, resolution=SHAPE[-1]),
        SigmoidWeighting(0.0), 1.5, PAPER_LATENT_LOGSNR_MAX, PIXELS,
    )  # fmt: skip
    return model, exact_prior_nats(z0, LATENT_MIN, PAPER_LATENT_LOGSNR_MAX)


def assert_matches(samples: torch.Tensor, exact: float) -> None:
    mean = float(samples.double().mean())
    standard_error = float(samples.double().std()) / math.sqrt(samples.numel())
    assert abs(mean - exact) < MC_STANDARD_ERRORS * standard_error, (mean, exact, standard_error)
    assert abs(mean - exact) < 0.03 * exact


def test_bitrate_estimate_matches_closed_form_for_gaussian_latents():
    """bits_per_pixel (many stratified t per example) · ln 2 · H·W ≈ exact prior nats."""
    model, exact = gaussian_latent_model()
    bits = model.bits_per_pixel(torch.zeros(256, *SHAPE), torch.Generator().manual_seed(1), 64)
    assert_matches(bits * math.log(2) * PIXELS, exact)


def test_training_prior_nats_match_closed_form_for_gaussian_latents():
    """The training forward's prior_nats (one antithetic t per example) is unbiased too."""
    model, exact = gaussian_latent_model()
    x = torch.zeros(256, *SHAPE)
    with torch.no_grad():
        samples = torch.cat(
            [model({"x": x}, torch.Generator().manual_seed(s)).prior_nats for s in range(40)]
        )
    assert_matches(samples, exact)
