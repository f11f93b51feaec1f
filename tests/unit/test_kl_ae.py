"""The KL autoencoder baseline (plugins/stages/kl_ae.py, plugins/networks/conv_decoder.py) and a
base model on its latents (plugins/stages/ul_base.py through the stage-1 latent interface).

On tiny networks (3x16x16 images, 4x4x4 latents):
(a) the conv decoder mirrors the encoder (images and clips) and refuses a mismatched latent grid;
(b) the loss record: (B,) terms, metric names, L1/L2 reconstruction and KL computed by hand,
    total = reconstruction + β·KL, the KL's gradient reaches the log-variance channels;
(c) the latent scale: a running variance of the posterior mean, updated only while training,
    encode_clean / decode_latents invert it;
(d) evaluation: scalars and reconstruction / latent grids;
(e) stage 2 on a finished KL stage: EMA weights and scale loaded and frozen, λ_max from kl_ae,
    end-to-end samples equal the base sampler followed by D(z / s), the latent cache keyed by
    the scale too, evaluation;
(f) end to end through the CLI: gin/quickstart_kl_ae.gin, both stages, `ulframe sample` (slow).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import NO_MFU, gin_args

from ulframe.diffusion import BatchNoise, logsnr_grid, sample_ddim
from ulframe.errors import ConfigError
from ulframe.protocols import BuildContext, LatentModel, check_built
from ulframe.train import checkpoint
from ulframe.train.settings import TrainSettings
from ulframe_plugins.datasets.photos import Photos
from ulframe_plugins.networks.conv_decoder import ConvDecoder
from ulframe_plugins.networks.decoders import UViTDecoder
from ulframe_plugins.networks.encoders import ResNetEncoder
from ulframe_plugins.networks.priors import ViT
from ulframe_plugins.stages import latent_cache, ul_base
from ulframe_plugins.stages.kl_ae import KLAEModel, KLAETerms, KLAutoencoder
from ulframe_plugins.stages.ul_base import ULBase, ULBaseModel
from ulframe_plugins.stages.ul_joint import ULJoint

NUM_CLASSES = 3
NET = dict(channels=(8, 16), blocks_per_stage=(1, 1), patch_size=2)
BASE = dict(widths=(16,), depths=(1,), heads=2, patch_size=1)
EMA_LATENT_VAR = 4.0  # the finished stage's latent variance: scale s = 0.5


def _stage1(**kw) -> KLAutoencoder:
    defaults = dict(
        encoder=lambda shape: ResNetEncoder(shape, latent_channels=8, **NET),
        decoder=lambda shape, latent_shape: ConvDecoder(shape, latent_shape, **NET),
        train=TrainSettings(batch_size=4, train_samples=4),
        eval_images=2,
    )
    return KLAutoencoder(**(defaults | kw))


def _example() -> dict[str, torch.Tensor]:
    return {"x": torch.rand(3, 16, 16) * 2 - 1, "label": torch.tensor(0)}


def _batch(b: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.rand((b, 3, 16, 16), generator=g) * 2 - 1,
        "label": torch.arange(b) % NUM_CLASSES,
    }


def _built(tmp_path: Path, **kw) -> tuple[KLAutoencoder, KLAEModel]:
    torch.manual_seed(0)
    stage = _stage1(**kw)
    model = stage.build(BuildContext(_example(), NUM_CLASSES, torch.device("cpu"), tmp_path))
    return stage, model


# ------------------------------------------------------------------------------ (a) decoder


def test_conv_decoder_mirrors_the_encoder() -> None:
    encoder = ResNetEncoder((3, 16, 16), latent_channels=4, **NET)
    decoder = check_built("ae_decoders", ConvDecoder((3, 16, 16), (4, 4, 4), **NET), "test")
    z = encoder(torch.randn(2, 3, 16, 16))
    assert z.shape == (2, 4, 4, 4)
    assert decoder(z).shape == (2, 3, 16, 16)
    assert decoder.downsample == encoder.downsample == (4, 4)

    video = dict(channels=(8, 16), blocks_per_stage=1, patch_size=(1, 2, 2))
    clips = ConvDecoder((3, 4, 16, 16), (4, 2, 4, 4), stage_downsample=((2, 2, 2),), **video)
    assert clips(torch.randn(2, 4, 2, 4, 4)).shape == (2, 3, 4, 16, 16)

    with pytest.raises(ValueError, match="latent grid"):
        ConvDecoder((3, 16, 16), (4, 8, 8), **NET)


# ------------------------------------------------------------------------------ (b) the loss


def test_stage_satisfies_protocol_and_checks_its_config(tmp_path: Path) -> None:
    check_built("stages", _stage1(), "kl_ae")
    with pytest.raises(ConfigError, match="reconstruction"):
        _stage1(reconstruction="l3")
    with pytest.raises(ConfigError, match="kl_weight"):
        _stage1(kl_weight=-1.0)
    odd = _stage1(encoder=lambda shape: ResNetEncoder(shape, latent_channels=5, **NET))
    with pytest.raises(ConfigError, match="2·Cz"):
        odd.build(BuildContext(_example(), NUM_CLASSES, torch.device("cpu"), tmp_path))
    stage, model = _built(tmp_path)
    assert stage.latent_shape == (4, 4, 4)
    assert isinstance(model, LatentModel)  # implements the stage-1 latent interface itself


@pytest.mark.parametrize("reconstruction", ["l1", "l2"])
def test_loss_terms_by_hand(tmp_path: Path, reconstruction: str) -> None:
    _, model = _built(tmp_path, reconstruction=reconstruction, kl_weight=0.25)
    batch = _batch()
    terms = model(batch, torch.Generator().manual_seed(1))
    assert isinstance(terms, KLAETerms)
    for t in (terms.reconstruction_nats, terms.kl_nats, terms.total_nats()):
        assert t.shape == (4,)
    assert set(terms.metrics()) == {
        "reconstruction_nats", "kl_nats", "total_nats", "bits_per_pixel", "psnr",
    }  # fmt: skip

    x = batch["x"]
    moments = model.encoder(x)
    mean, logvar = moments[:, :4], moments[:, 4:].clamp(-30, 20)
    eps = BatchNoise.of(torch.Generator().manual_seed(1)).randn(mean.shape, x.device, x.dtype)
    x_hat = model.decoder(mean + (0.5 * logvar).exp() * eps)
    diff = (x - x_hat).flatten(1)
    rec = diff.abs().sum(1) if reconstruction == "l1" else diff.pow(2).sum(1)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    kl = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    torch.testing.assert_close(terms.reconstruction_nats, rec)
    torch.testing.assert_close(terms.kl_nats, kl)
    torch.testing.assert_close(terms.total_nats(), rec + 0.25 * kl)
    bpp = terms.metrics()["bits_per_pixel"]
    torch.testing.assert_close(bpp, kl.mean() / (math.log(2) * 16 * 16))


def test_kl_gradient_reaches_the_log_variance(tmp_path: Path) -> None:
    _, model = _built(tmp_path, kl_weight=1.0)
    model(_batch(), torch.Generator().manual_seed(1)).kl_nats.sum().backward()
    grad = model.encoder.out_conv.weight.grad  # (8, C, 3, 3): mean channels, then log-variance
    assert grad is not None and grad[4:].abs().sum() > 0


# ------------------------------------------------------------------------------ (c) the scale


def test_latent_scale_is_a_running_variance_of_the_posterior_mean(tmp_path: Path) -> None:
    _, model = _built(tmp_path, latent_stats_halflife_samples=4)
    assert float(model.latent_scale()) == 1.0  # before any training batch
    a, b = _batch(seed=0), _batch(seed=1)
    model.train()
    model(a, torch.Generator().manual_seed(0))
    var_a = model.posterior(a["x"])[0].var()
    torch.testing.assert_close(model.latent_var, var_a.detach())  # the first batch's
    model(b, torch.Generator().manual_seed(0))
    var_b = model.posterior(b["x"])[0].var()
    torch.testing.assert_close(model.latent_var, (0.5 * var_a + 0.5 * var_b).detach())
    before = model.latent_var.clone()
    model.eval()
    model(a, torch.Generator().manual_seed(0))
    assert torch.equal(model.latent_var, before)  # evaluation does not move it
    assert int(model.latent_stats_samples) == 8

    x = a["x"]
    mean = model.posterior(x)[0]
    z = model.encode_clean(x)
    torch.testing.assert_close(z, mean * before.rsqrt())
    with torch.no_grad():
        expected = model.decoder(mean).clamp(-1, 1)
    torch.testing.assert_close(model.decode_latents(z), expected)
    assert "latent_var" in model.latent_state() and "latent_var" in model.state_dict()


# ------------------------------------------------------------------------------ (d) evaluation


def test_evaluate_reports_reconstruction_quality_and_grids(tmp_path: Path) -> None:
    stage, model = _built(tmp_path)
    model.eval()
    report = stage.evaluate(model, [_batch(seed=0), _batch(seed=1)], torch.Generator())
    expected = {"reconstruction_nats", "kl_nats", "total_nats", "bits_per_pixel", "psnr", "ssim"}
    assert expected | {"latent_std", "posterior_logsnr", "latent_scale"} == set(report.scalars)
    assert all(math.isfinite(v) for v in report.scalars.values())
    assert report.images["reconstructions"].shape == (4, 3, 16, 16)  # input, recon, ...
    assert report.images["latents"].shape == (2, 4, 4, 4)


# ------------------------------------------------------------------------------ (e) stage 2


def _finished_stage1(root: Path) -> Path:
    """A KL stage-1 folder with one checkpoint whose EMA differs from its training weights."""
    stage_dir = root / "stages" / "stage1"
    torch.manual_seed(0)
    model = _stage1().build(BuildContext(_example(), NUM_CLASSES, torch.device("cpu"), stage_dir))
    ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    ema["latent_var"] = torch.tensor(EMA_LATENT_VAR)
    checkpoint.save(
        stage_dir / "checkpoints", 4, {"model": model.state_dict(), "ema": ema, "samples_seen": 4}
    )
    return stage_dir


def _stage2(**kw) -> ULBase:
    defaults = dict(
        stage1=_stage1(latent_logsnr_max=7.0),
        base=lambda shape, num_classes: ViT(shape, num_classes=num_classes, **BASE),
        train=TrainSettings(batch_size=4, train_samples=4),
        sample_steps=3,
        eval_t_per_example=2,
        eval_images=2,
    )
    return ULBase(**(defaults | kw))


@pytest.fixture
def stage2(tmp_path: Path) -> tuple[ULBase, ULBaseModel, Path]:
    stage1_dir = _finished_stage1(tmp_path)
    stage = _stage2()
    ctx = BuildContext(
        _example(), NUM_CLASSES, torch.device("cpu"), tmp_path / "stages" / "stage2",
        {"stage1": stage1_dir},
    )  # fmt: skip
    return stage, stage.build(ctx), stage1_dir


def test_base_model_on_kl_latents_loads_and_freezes_stage1(stage2) -> None:
    _, model, stage1_dir = stage2
    assert isinstance(model.stage1, KLAEModel)
    assert model.latents() is model.stage1  # no adapter: kl_ae implements the interface
    ema = checkpoint.load_latest(stage1_dir / "checkpoints")["ema"]
    for k, v in model.stage1.state_dict().items():
        assert torch.equal(v, ema[k]), k
    assert float(model.stage1.latent_scale()) == pytest.approx(0.5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("base.") for n in trainable)
    model.train()
    assert model.base.training and not any(m.training for m in model.stage1.modules())
    before = model.stage1.latent_var.clone()
    model(_batch(), torch.Generator().manual_seed(0)).total_nats().mean().backward()
    assert torch.equal(model.stage1.latent_var, before)  # frozen: no statistics update

    assert model.latent_logsnr_max == 7.0 and model.schedule.logsnr_max == 7.0
    assert model.latent_shape == (4, 4, 4)
    x = _batch()["x"]
    torch.testing.assert_close(model.encode_clean(x), model.stage1.posterior(x)[0] * 0.5)


def test_kl_samples_are_the_base_sampler_then_the_decoder(stage2) -> None:
    _, model, _ = stage2
    for p in model.base.final.parameters():  # a non-trivial network (zero-init output)
        torch.nn.init.normal_(p, std=0.1)
    model.eval()
    labels = torch.tensor([0, 1])
    x = model.sample(2, torch.Generator().manual_seed(0), labels, steps=3, guidance=1.0)
    assert x.shape == (2, 3, 16, 16) and x.abs().max() <= 1.0

    g = torch.Generator().manual_seed(0)
    z_1 = torch.randn((2, *model.latent_shape), generator=g)
    grid = logsnr_grid(model.schedule, 3).float()
    assert float(grid[-1]) == pytest.approx(7.0)
    z = sample_ddim(lambda z_t, lam: model.base_eps(z_t, lam, labels), z_1, grid)
    with torch.no_grad():
        expected = model.stage1.decoder(z / 0.5).clamp(-1, 1)
    torch.testing.assert_close(x, expected)


def test_latent_cache_of_kl_latents_is_keyed_by_the_scale(stage2, monkeypatch) -> None:
    stage, model, _ = stage2
    calls: list[int] = []
    real = latent_cache.encode_source

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(latent_cache, "encode_source", counting)
    source = Photos(resolution=16, crops_per_epoch=6, eval_crops=2, seed=0).source("train")
    latents = stage.train_source(source)
    example = latents.decode(latents.items[0])
    x = source.decode(source.items[0])["x"][None]
    torch.testing.assert_close(example["z"], model.encode_clean(x)[0])
    stage.train_source(source)
    assert len(calls) == 1  # reused
    with torch.no_grad():
        model.stage1.latent_var.fill_(1.0)  # another scale: other latents, rebuilt
    stage.train_source(source)
    assert len(calls) == 2


def test_stage2_evaluation_on_kl_latents(stage2) -> None:
    stage, model, _ = stage2
    model.eval()
    report = stage.evaluate(model, [_batch()], torch.Generator().manual_seed(0))
    assert {"base_nats", "bits_per_pixel_base"} == set(report.scalars)
    assert report.images["samples"].shape == (2, 3, 16, 16)


def test_ul_stage1_implements_the_hand_off() -> None:
    """A UL stage-1 model is a LatentModel itself; a model that is not is a ConfigError."""
    uvit = dict(channels=(8,), blocks_per_stage=1, width=16, depth=1, heads=2, patch_size=2)
    stage = ULJoint(
        encoder=lambda shape: ResNetEncoder(shape, latent_channels=4, **NET),
        prior=lambda shape: ViT(shape, **BASE),
        decoder=lambda shape, latent_shape: UViTDecoder(shape, latent_shape, **uvit),
        train=TrainSettings(batch_size=4, train_samples=4),
    )
    torch.manual_seed(0)
    ul = stage.build(BuildContext(_example(), NUM_CLASSES, torch.device("cpu"), Path("unused")))
    assert ul_base.latent_model(ul) is ul and isinstance(ul, LatentModel)
    assert ul.latent_logsnr_max == 5.0 and ul.noisy_latent and ul.latent_shape == (4, 4, 4)
    assert ul.latent_state().keys() == ul.encoder.state_dict().keys()
    with pytest.raises(ConfigError, match="LatentModel"):
        ul_base.latent_model(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------ (f) the CLI

TINY_KL_RUN = (
    NO_MFU,
    "TRAIN_SAMPLES = 8",
    "BASE_TRAIN_SAMPLES = 8",
    "datasets.photos.resolution = 16",
    "datasets.photos.crops_per_epoch = 64",
    "datasets.photos.eval_crops = 8",
    "Experiment.num_workers = 0",
    "Experiment.hooks = [@hooks.console()]",
    "stage1/TrainSettings.batch_size = 4",
    "stage1/TrainSettings.warmup_samples = 4",
    "stage1/TrainSettings.log_every_samples = 4",
    "stage1/TrainSettings.eval_every_samples = 0",
    "stage1/TrainSettings.eval_batches = 1",
    "stage1/TrainSettings.checkpoint_every_samples = 8",
    "stage1/stages.kl_ae.eval_images = 2",
    "encoders.resnet.channels = (8, 16)",
    "ae_decoders.conv.channels = (8, 16)",
    "stage2/TrainSettings.batch_size = 4",
    "stage2/TrainSettings.warmup_samples = 4",
    "stage2/TrainSettings.log_every_samples = 4",
    "stage2/TrainSettings.eval_every_samples = 0",
    "stage2/TrainSettings.eval_batches = 1",
    "stage2/TrainSettings.checkpoint_every_samples = 8",
    "stage2/stages.ul_base.sample_steps = 2",
    "stage2/stages.ul_base.eval_t_per_example = 1",
    "stage2/stages.ul_base.eval_images = 2",
    "base/priors.vit.widths = (16, 32)",
    "base/priors.vit.depths = (1, 1)",
    "base/priors.vit.heads = 2",
)


@pytest.mark.slow
def test_quickstart_kl_ae_runs_both_stages_and_samples(cli: Any, tmp_path: Path) -> None:
    workdir = tmp_path / "run"
    config = ["gin/quickstart_kl_ae.gin", "--workdir", str(workdir), *gin_args(TINY_KL_RUN)]
    done = cli("run", *config)
    assert done.returncode == 0, done.stderr[-3000:]
    stage1 = json.loads((workdir / "stages" / "stage1" / "DONE.json").read_text())["scalars"]
    assert {"bits_per_pixel", "psnr", "ssim", "latent_scale"} <= set(stage1)
    assert (workdir / "stages" / "stage2" / "DONE.json").is_file()
    assert any((workdir / "stages" / "stage2" / "latent_cache").glob("latents-*.pt"))
    sample = cli("sample", *config, "-n", "2", "--steps", "2")
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert (workdir / "samples" / "samples.png").is_file()
