"""Stage 2 of Unified Latents (plugins/stages/ul_base.py, plugins/stages/sampling.py).

On a tiny stage-1 model (3x16x16 images, 4x4x4 latents) saved as a finished stage:
(a) only the base model trains; frozen networks stay in eval mode and bit-identical;
(b) the loss record: (B,) terms, metric names, λ_max = stage 1's λ_z(0), hand-computed loss;
(c) label dropout only while training;
(d) the latent cache: reused, rebuilt for other encoder weights, rebuilt when half-written;
(e) guidance: scale 1 is the conditional model; a Gaussian toy reproduces the guided mean;
(f) evaluation: scalars and a grid of end-to-end samples.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ulframe.diffusion import (
    CosineSchedule,
    alpha_sigma,
    elbo_term_nats,
    expand_like,
    logsnr_grid,
    sample_ddim,
)
from ulframe.errors import ConfigError
from ulframe.protocols import BuildContext, check_built
from ulframe.train import checkpoint
from ulframe.train.settings import TrainSettings
from ulframe_plugins.datasets.photos import Photos
from ulframe_plugins.networks.decoders import UViTDecoder
from ulframe_plugins.networks.encoders import ResNetEncoder
from ulframe_plugins.networks.priors import ViT
from ulframe_plugins.stages import latent_cache, ul_base
from ulframe_plugins.stages.sampling import guided_eps_fn
from ulframe_plugins.stages.ul_base import ULBase, ULBaseModel, ULBaseTerms
from ulframe_plugins.stages.ul_joint import ULJoint

NUM_CLASSES = 3
ENCODER = dict(latent_channels=4, channels=(8, 16), blocks_per_stage=(1, 1), patch_size=2)
PRIOR = dict(widths=(16,), depths=(1,), heads=2, patch_size=1)
DECODER = dict(
    channels=(8,), blocks_per_stage=1, width=16, depth=1, heads=2, patch_size=2, dropout=0.0
)
BASE = dict(widths=(16,), depths=(1,), heads=2, patch_size=1)


def _stage1() -> ULJoint:
    return ULJoint(
        encoder=lambda shape: ResNetEncoder(shape, **ENCODER),
        prior=lambda shape: ViT(shape, **PRIOR),
        decoder=lambda shape, latent_shape: UViTDecoder(shape, latent_shape, **DECODER),
        train=TrainSettings(batch_size=4, train_samples=4),
    )


def _stage2(**kw) -> ULBase:
    defaults = dict(
        stage1=_stage1(),
        base=lambda shape, num_classes: ViT(shape, num_classes=num_classes, **BASE),
        train=TrainSettings(batch_size=4, train_samples=4),
        sample_steps=2,
        eval_t_per_example=2,
        eval_images=2,
    )
    return ULBase(**(defaults | kw))


def _example() -> dict[str, torch.Tensor]:
    return {"x": torch.rand(3, 16, 16) * 2 - 1, "label": torch.tensor(0)}


def _finished_stage1(root: Path) -> Path:
    """A stage-1 folder with one checkpoint whose EMA differs from its training weights."""
    stage_dir = root / "stages" / "stage1"
    torch.manual_seed(0)
    ctx = BuildContext(_example(), NUM_CLASSES, torch.device("cpu"), stage_dir)
    model = _stage1().build(ctx)
    ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    checkpoint.save(
        stage_dir / "checkpoints", 4, {"model": model.state_dict(), "ema": ema, "samples_seen": 4}
    )
    return stage_dir


@pytest.fixture
def built(tmp_path: Path) -> tuple[ULBase, ULBaseModel, Path]:
    stage1_dir = _finished_stage1(tmp_path)
    stage = _stage2()
    ctx = BuildContext(
        _example(), NUM_CLASSES, torch.device("cpu"), tmp_path / "stages" / "stage2",
        {"stage1": stage1_dir},
    )  # fmt: skip
    return stage, stage.build(ctx), stage1_dir


def _batch(b: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.rand((b, 3, 16, 16), generator=g) * 2 - 1,
        "label": torch.arange(b) % NUM_CLASSES,
    }


def test_stage_satisfies_protocol_and_needs_the_source_stage(tmp_path: Path) -> None:
    stage = check_built("stages", _stage2(), "ul_base")
    ctx = BuildContext(_example(), NUM_CLASSES, torch.device("cpu"), tmp_path)
    with pytest.raises(ConfigError, match="source_stage='stage1'"):
        stage.build(ctx)
    with pytest.raises(ConfigError, match="label_dropout"):
        _stage2(label_dropout=1.0)
    with pytest.raises(ConfigError, match=r"ul_base\.sample_steps must be >= 1"):
        _stage2(sample_steps=0)
    with pytest.raises(ConfigError, match=r"ul_base\.decoder_sample_steps must be >= 1"):
        _stage2(decoder_sample_steps=0)
    with pytest.raises(ConfigError, match=r"ul_joint\.sample_steps must be >= 1"):
        _stage2(stage1=ULJoint(
            encoder=_stage1().encoder, prior=_stage1().prior,
            decoder=_stage1().decoder, train=TrainSettings(batch_size=4, train_samples=4),
            sample_steps=0,
        ))  # fmt: skip
    with pytest.raises(ConfigError, match=r"ul_base\.context_frames=5"):
        ul_base.context_clip(torch.zeros(2, 3, 16, 16), 5)


def test_loads_stage1_ema_and_only_the_base_model_trains(built) -> None:
    _, model, stage1_dir = built
    ema = checkpoint.load_latest(stage1_dir / "checkpoints")["ema"]
    for k, v in model.stage1.state_dict().items():
        assert torch.equal(v, ema[k]), k  # EMA weights, not the training weights
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("base.") for n in trainable)
    assert trainable == {f"base.{n}" for n, _ in model.base.named_parameters()}
    model.train()
    assert model.base.training and not model.stage1.training
    assert not any(m.training for m in model.stage1.modules())


def test_frozen_networks_bit_identical_after_training_steps(built) -> None:
    _, model, _ = built
    before = {k: v.clone() for k, v in model.stage1.state_dict().items()}
    base_before = [p.detach().clone() for p in model.base.parameters()]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        loss = model(_batch(seed=step), torch.Generator().manual_seed(step)).total_nats().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in model.stage1.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(a, b) for a, b in zip(base_before, model.base.parameters()))


def test_loss_record_and_hand_computed_loss(built) -> None:
    _, model, _ = built
    assert float(model.schedule.logsnr(torch.zeros(()))) == pytest.approx(5.0)
    assert model.latent_logsnr_max == 5.0
    model.eval()
    batch = _batch()
    terms = model(batch, torch.Generator().manual_seed(3))
    assert isinstance(terms, ULBaseTerms)
    assert terms.base_nats.shape == terms.elbo_nats.shape == (4,)
    metrics = terms.metrics()
    assert {"base_nats", "bits_per_pixel_base", "total_nats"} <= metrics.keys()
    assert float(metrics["bits_per_pixel_base"]) == pytest.approx(
        float(terms.elbo_nats.mean()) / (math.log(2) * 16 * 16)
    )
    # Recompute from the same random draws: antithetic t, then eps.
    g = torch.Generator().manual_seed(3)
    z = model.encode_clean(batch["x"])
    from ulframe.diffusion import antithetic_t, diffuse, eps_from_v

    t = antithetic_t(4, g, z.device)
    logsnr = model.schedule.logsnr(t)
    eps = torch.randn(z.shape, generator=g)
    z_t = diffuse(z, logsnr, eps)
    eps_hat = eps_from_v(z_t, model.base(z_t, logsnr, batch["label"]).float(), logsnr)
    expected = elbo_term_nats(
        eps, eps_hat, model.schedule.neg_dlogsnr_dt(t), torch.sigmoid(0.0 - logsnr)
    )
    torch.testing.assert_close(terms.base_nats, expected)


def test_label_dropout_only_while_training(built) -> None:
    _, model, _ = built
    model.label_dropout = 0.5
    batch = {"label": torch.zeros(1000, dtype=torch.long)}
    model.train()
    labels = model._labels(batch, 1000, torch.Generator().manual_seed(0))
    dropped = float((labels == NUM_CLASSES).float().mean())
    assert 0.4 < dropped < 0.6
    model.eval()
    assert torch.equal(model._labels(batch, 1000, torch.Generator()), batch["label"])


def _small_source(resolution: int = 16):
    return Photos(resolution=resolution, crops_per_epoch=6, eval_crops=2).source("train")


def test_latent_cache_reused_keyed_and_rebuilt(built, monkeypatch) -> None:
    stage, model, _ = built
    calls = []
    real = latent_cache.encode_source
    monkeypatch.setattr(
        latent_cache, "encode_source", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    source = _small_source()
    cached = stage.train_source(source)
    assert len(calls) == 1 and len(cached.items) == 6
    example = cached.decode(0)
    assert example["z"].shape == model.latent_shape
    torch.testing.assert_close(
        example["z"], model.encode_clean(source.decode(source.items[0])["x"][None])[0]
    )
    files = sorted(p.name for p in (stage._stage_dir / "latent_cache").iterdir())
    assert len(files) == 2  # data + completion marker, no temporaries

    stage.train_source(source)
    assert len(calls) == 1  # reused

    stage.train_source(_small_source(resolution=8))  # another dataset config: rebuilt
    assert len(calls) == 2
    stage.train_source(source)
    assert len(calls) == 3

    with torch.no_grad():  # other encoder weights: rebuilt
        next(model.stage1.encoder.parameters()).add_(0.1)
    stage.train_source(source)
    assert len(calls) == 4
    stage.train_source(source)
    assert len(calls) == 4

    data = next((stage._stage_dir / "latent_cache").glob("*.pt"))
    data.write_bytes(data.read_bytes()[:100])  # killed mid-write: truncated file
    stage.train_source(source)
    assert len(calls) == 5
    marker = next((stage._stage_dir / "latent_cache").glob("*.json"))
    marker.unlink()  # data renamed into place, marker never written
    stage.train_source(source)
    assert len(calls) == 6

    stage.cache_latents = False
    assert stage.train_source(source) is source


def test_training_on_cached_latents_equals_encoding(built) -> None:
    _, model, _ = built
    model.eval()
    batch = _batch()
    cached = {"z": model.encode_clean(batch["x"]), "label": batch["label"]}
    a = model(batch, torch.Generator().manual_seed(1)).base_nats
    b = model(cached, torch.Generator().manual_seed(1)).base_nats
    torch.testing.assert_close(a, b)


def test_guidance_scale_one_is_the_conditional_model(built) -> None:
    _, model, _ = built
    for p in model.base.final.parameters():  # a non-trivial network (zero-init output)
        torch.nn.init.normal_(p, std=0.1)
    model.eval()
    labels = torch.tensor([0, 1])
    a = model.sample(2, torch.Generator().manual_seed(0), labels, steps=3, guidance=1.0)
    b = model.sample(2, torch.Generator().manual_seed(0), labels, steps=3, guidance=2.0)
    assert a.shape == (2, 3, 16, 16)
    assert not torch.equal(a, b)

    # The same sampling path by hand, with the conditional base model only.
    g = torch.Generator().manual_seed(0)
    z_1 = torch.randn((2, *model.latent_shape), generator=g)
    grid = logsnr_grid(model.schedule, 3).float()
    # Algorithm 2: the chain's own state at λ_z(0) = 5 is z_0, handed to the decoder as it is.
    z_0 = sample_ddim(lambda z_t, lam: model.base_eps(z_t, lam, labels), z_1, grid, final="state")
    x_1 = torch.randn((2, 3, 16, 16), generator=g)
    grid_x = logsnr_grid(model.stage1.decoder_schedule, 3).float()
    x = sample_ddim(lambda x_t, lam: model.stage1.decoder_eps(x_t, lam, z_0), x_1, grid_x, clip_x=1)
    torch.testing.assert_close(a, x)

    cond = lambda z_t, lam: z_t * 0.3  # noqa: E731
    uncond = lambda z_t, lam: z_t * -0.7  # noqa: E731
    z_t, lam = torch.randn(5, 2), torch.zeros(5)
    assert guided_eps_fn(cond, uncond, 1.0) is cond
    torch.testing.assert_close(guided_eps_fn(cond, uncond, 0.0)(z_t, lam), uncond(z_t, lam))


class _ZeroV(torch.nn.Module):
    """A v-predictor that outputs 0: eps_hat = sigma z_t, the exact denoiser of N(0, I) data."""

    num_classes = 0

    def forward(self, z_t, logsnr, label=None, context=None):
        return torch.zeros_like(z_t)


class _RecordingLatents(torch.nn.Module):
    """A stage-1 model (LatentModel) that records what its decoder is handed."""

    noisy_latent = True

    def __init__(self, latent_logsnr_max: float, latent_shape=(4, 4, 4)) -> None:
        super().__init__()
        self.latent_logsnr_max = latent_logsnr_max
        self.latent_shape = tuple(latent_shape)
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.decoded: list[torch.Tensor] = []

    def encode_clean(self, x):
        return torch.zeros((x.shape[0], *self.latent_shape))

    def decode_latents(self, z, generator, sampler, steps):
        self.decoded.append(z)
        return torch.zeros((z.shape[0], 3, 16, 16))

    def latent_state(self):
        return {}


def _chain_variance(grid: torch.Tensor) -> float:
    """Var of the ancestral chain's state at the last grid point, from z_1 ~ N(0, I), for N(0, I)
    data with the exact denoiser x̂ = α z (UL paper Algorithm 2's posterior step)."""
    var = 1.0
    for lt, ls in zip(grid.tolist(), grid.tolist()[1:]):
        alpha_t, alpha_s = math.sqrt(1 / (1 + math.exp(-lt))), math.sqrt(1 / (1 + math.exp(-ls)))
        r = -math.expm1(lt - ls)  # σ²_ts / σ_t²
        gain = alpha_s * ((1 - r) / alpha_t + r * alpha_t)
        var = gain**2 * var + r * (1 - alpha_s**2)
    return var


@pytest.mark.parametrize(
    ("latent_logsnr_max", "steps", "n"), [(0.0, 4, 4000), (0.0, 200, 2000), (5.0, 200, 40000)]
)
def test_decoder_is_handed_the_chain_state_at_latent_logsnr_max(latent_logsnr_max, steps, n):
    """UL paper Algorithm 2: end-to-end sampling hands the decoder the base model's chain state
    at λ = λ_z(0). With the exact denoiser of N(0, I) latents (v ≡ 0) the z_0 the decoder gets
    has the chain's variance (→ α²·1 + σ² = 1 with many steps), not α²·Var(x̂) + σ² (the clean
    estimate x̂ = α z noised again: → α⁴ + σ², 0.75 at λ = 0, 0.9933 at λ = 5)."""
    from ulframe.diffusion import sample_ancestral

    latents = _RecordingLatents(latent_logsnr_max)
    schedule = CosineSchedule(logsnr_min=-15.0, logsnr_max=latent_logsnr_max)
    model = ULBaseModel(
        latents, _ZeroV(), schedule, lambda lam: torch.ones_like(lam), 0.0, 0,
        latents.latent_shape, (3, 16, 16),
    )  # fmt: skip
    model.sample(n, torch.Generator().manual_seed(0), None, sample_ancestral, steps=steps)
    (z_0,) = latents.decoded
    assert z_0.shape == (n, *latents.latent_shape)
    chain = _chain_variance(logsnr_grid(schedule, steps))
    alpha2 = 1 / (1 + math.exp(-latent_logsnr_max))
    renoised = alpha2 * (alpha2 * chain) + (1 - alpha2)
    var = float(z_0.double().var())
    standard_error = chain * math.sqrt(2 / z_0.numel())
    assert abs(var - chain) < 4 * standard_error, (var, chain, standard_error)
    assert abs(var - renoised) > 5 * standard_error, (var, renoised)
    if steps >= 200:
        assert chain == pytest.approx(1.0, abs=0.025)


def test_stage1_prior_samples_are_the_prior_chain_state() -> None:
    """The stage-1 prior's samples z_0 are its chain's state at λ_z(0) too: with the exact
    denoiser of N(0, I) latents (`priors.normal`) their variance is 1."""
    from ulframe.diffusion import ShiftedCosineSchedule, SigmoidWeighting, sample_ancestral
    from ulframe.protocols import LatentModel
    from ulframe_plugins.networks.normal_prior import NormalPrior
    from ulframe_plugins.stages.ul_joint import ULJointModel

    shape = (4, 4, 4)
    model = ULJointModel(
        torch.nn.Conv2d(3, 4, 4, stride=4), NormalPrior(shape), torch.nn.Identity(),
        CosineSchedule(-15.0, 0.0), ShiftedCosineSchedule(-15.0, 15.0, resolution=16),
        SigmoidWeighting(0.0), 1.5, 0.0, 256, (3, 16, 16), shape,
    )  # fmt: skip
    assert isinstance(model, LatentModel) and model.noisy_latent
    z_0 = model.sample_latents(4000, torch.Generator().manual_seed(0), sample_ancestral, 4)
    assert z_0.shape == (4000, *shape)
    expected = _chain_variance(logsnr_grid(model.prior_schedule, 4))
    assert float(z_0.double().var()) == pytest.approx(expected, abs=4 * math.sqrt(2 / z_0.numel()))
    alpha2 = 0.5  # λ_z(0) = 0: the clean estimate noised again would have variance ≈ 0.70
    assert abs(float(z_0.double().var()) - (alpha2**2 * expected + alpha2)) > 0.05


def _gaussian_eps(mean: float, std: float):
    """Bayes-optimal eps for data N(mean, std²): E[eps | z_t]."""

    def eps_fn(z_t: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        alpha, sigma = alpha_sigma(expand_like(logsnr, z_t))
        return sigma * (z_t - alpha * mean) / (alpha**2 * std**2 + sigma**2)

    return eps_fn


@pytest.mark.parametrize(
    ("scale", "interval", "expected_mean"),
    [(1.0, None, 1.0), (0.0, None, -1.0), (2.5, None, 4.0), (2.5, (50.0, 60.0), 1.0)],
)
def test_guidance_on_a_gaussian_toy(scale, interval, expected_mean) -> None:
    """Conditional N(1, 0.5²), unconditional N(-1, 0.5²): guided mean = -1 + w·2, std 0.5."""
    from ulframe_plugins.stages.sampling import sample_latents

    std = 0.5
    z_1 = torch.randn((20000, 1), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    schedule = CosineSchedule(logsnr_min=-15.0, logsnr_max=15.0)
    z = sample_latents(
        _gaussian_eps(1.0, std), _gaussian_eps(-1.0, std), z_1, schedule, sample_ddim, 200,
        None, scale, interval,
    )  # fmt: skip
    assert float(z.mean()) == pytest.approx(expected_mean, abs=0.03)
    assert float(z.std()) == pytest.approx(std, rel=0.03)


def test_evaluate_reports_scalars_and_samples(built) -> None:
    stage, model, _ = built
    model.eval()
    report = stage.evaluate(model, [_batch()], torch.Generator().manual_seed(0))
    assert {"base_nats", "bits_per_pixel_base"} <= report.scalars.keys()
    assert all(math.isfinite(v) for v in report.scalars.values())
    assert report.images["samples"].shape == (2, 3, 16, 16)
    assert float(report.images["samples"].abs().max()) <= 1.0


# ---- SSIM (ulframe/eval/metrics.py), reported by stage 1's evaluation and `ulframe eval` ----
def test_ssim_matches_skimage() -> None:
    from skimage.metrics import structural_similarity

    from ulframe.eval.metrics import ssim

    g = torch.Generator().manual_seed(0)
    x = torch.rand((2, 3, 24, 20), generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert torch.allclose(ssim(x, x), torch.ones(2))
    ours = ssim(x, y)
    for i in range(2):
        ref = structural_similarity(
            x[i].numpy(), y[i].numpy(), data_range=2.0, channel_axis=0,
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        )  # fmt: skip
        assert float(ours[i]) == pytest.approx(ref, abs=1e-4)


def test_eval_fd_uses_end_to_end_samples(built) -> None:
    """`ulframe eval`'s "fd": the metric compares eval images with as many samples, drawn for
    labels that cover the classes; "fd_real" is the same metric on real images."""
    from ulframe.eval.samples import draw_samples, judge_samples

    stage, model, _ = built
    model.eval()
    seen = []

    def metric(reference: torch.Tensor, estimate: torch.Tensor) -> dict[str, float]:
        seen.append((reference.shape, estimate.shape))
        return {"fd_photos": 1.25 * len(seen)}

    reference = _batch(3)["x"]
    samples, labels = draw_samples(stage, model, 3, NUM_CLASSES, torch.device("cpu"), 0)
    assert samples.shape == reference.shape
    assert labels.tolist() == [i * NUM_CLASSES // 3 for i in range(3)]
    out = judge_samples(metric, reference, samples, labels, real=reference.flip(0))
    assert out["fd"] == 1.25 and out["fd_real"] == 2.5 and out["fd_metric"] == "fd_photos"
    assert out["fd_samples"] == 3 and out["speckle"] > 0
    assert seen == [(reference.shape, reference.shape)] * 2


def test_the_stage_samples_through_the_sampling_protocol(built) -> None:
    """`ulframe sample` and `ulframe eval` reach sampling only through protocols.SamplingStage:
    the stage's defaults (sampler, steps, guidance), overridden per call."""
    from ulframe.protocols import SamplingStage

    stage, model, _ = built
    model.eval()
    assert isinstance(stage, SamplingStage)
    settings = stage.sample_settings(model)
    assert (settings.guidance, settings.steps, settings.continues) == (1.0, 2, False)
    assert stage.sample_settings(model, guidance=3.0, steps=5).guidance == 3.0
    labels = torch.tensor([0, 2])
    x = stage.sample(model, 2, labels, None, torch.Generator().manual_seed(0))
    y = model.sample(2, torch.Generator().manual_seed(0), labels, stage.sampler, 2, None, 1.0)
    torch.testing.assert_close(x, y)
    x = stage.sample(model, 2, labels, 2.0, torch.Generator().manual_seed(0), steps=3)
    y = model.sample(2, torch.Generator().manual_seed(0), labels, stage.sampler, 3, 3, 2.0)
    torch.testing.assert_close(x, y)


def test_latent_cache_on_a_full_disk_leaves_no_temporary_file(tmp_path, monkeypatch) -> None:
    """The cache is written through the engine's atomic writer: ENOSPC removes the temporary
    file and names the cache file (rundir.DiskFullError)."""
    import errno
    import os

    from ulframe import rundir

    real_replace = os.replace

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(os, "replace", full)
    latents = {"z": torch.zeros(3, 4, 4, 4), "label": torch.zeros(3, dtype=torch.long)}
    with pytest.raises(rundir.DiskFullError, match=r"latents-k\.pt"):
        latent_cache.write_cache(tmp_path, "k", latents)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(os, "replace", real_replace)
    latent_cache.write_cache(tmp_path, "k", latents)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latents-k.json", "latents-k.pt"]
    assert latent_cache.read_cache(tmp_path, "k")["z"].shape == (3, 4, 4, 4)
