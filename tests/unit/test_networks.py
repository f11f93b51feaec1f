"""Unit tests of the built-in networks (plugins/networks) on tiny 2-D and 3-D presets.

Run with ``ulframe_plugins`` importable, e.g.
``mkdir -p /tmp/pp && ln -sfn $PWD/plugins /tmp/pp/ulframe_plugins &&
PYTHONPATH=/tmp/pp .venv/bin/python -m pytest tests/unit/test_networks.py -q``.
"""

import itertools
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from ulframe.errors import ConfigError
from ulframe_plugins.networks.blocks import (
    Downsample,
    PatchEmbed,
    PatchUnembed,
    ResBlock,
    Upsample,
    count_parameters,
    depth_to_space,
    from_tokens,
    patchify_pattern,
    sincos_position_embedding,
    space_to_depth,
    to_tokens,
    unpatchify_pattern,
)
from ulframe_plugins.networks.decoders import UViTDecoder
from ulframe_plugins.networks.encoders import ResNetEncoder
from ulframe_plugins.networks.priors import ConvViT, ViT

BATCH = 2
# Fixed encoding noise level lambda_z(0) = 5 (docs/method.md, "Stage 1").
LOGSNR_Z0 = 5.0
# Step size of the hand-written SGD step in the training-step test.
SGD_LEARNING_RATE = 0.1


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny networks run fastest on one thread (no spin-waiting on a shared, busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class Preset:
    """Tiny constructor arguments for one input kind (image or video)."""

    shape: tuple[int, ...]
    encoder: dict
    prior: dict
    decoder: dict


# Image 3x16x16: encoder 2 stages, patch 2 -> 4x4x4 latent; decoder 2 stages, patch 1 -> 4x4.
IMAGE = Preset(
    shape=(3, 16, 16),
    encoder=dict(latent_channels=4, channels=(8, 16), blocks_per_stage=(1, 1)),
    prior=dict(widths=(32,), depths=(2,), heads=2),
    decoder=dict(channels=(8, 16), width=32, depth=1, heads=2, patch_size=1),
)
# Video 3x4x16x16: 2x4x4 (T x H x W) down-sampling with per-axis factors -> 4x2x4x4 latent.
VIDEO = Preset(
    shape=(3, 4, 16, 16),
    encoder=dict(
        latent_channels=4,
        channels=(8, 16),
        blocks_per_stage=1,
        patch_size=(1, 2, 2),
        stage_downsample=((2, 2, 2),),
    ),
    prior=dict(widths=(32,), depths=(2,), heads=2),
    decoder=dict(
        channels=(8, 16),
        width=32,
        depth=1,
        heads=2,
        patch_size=(1, 2, 2),
        stage_downsample=((1, 2, 2), (2, 1, 1)),
    ),
)
PRESETS = {"image": IMAGE, "video": VIDEO}
TWO_LEVEL = dict(widths=(16, 32), depths=(1, 2), heads=2)


def build(preset: Preset, seed: int = 0, prior: dict | None = None):
    """Encoder, prior and decoder of a preset, seeded."""
    torch.manual_seed(seed)
    encoder = ResNetEncoder(preset.shape, **preset.encoder)
    prior = ViT(encoder.latent_shape, **(prior or preset.prior))
    decoder = UViTDecoder(preset.shape, encoder.latent_shape, **preset.decoder)
    return encoder, prior, decoder


def inputs(preset: Preset, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of inputs x and noise levels logsnr in [-10, 10]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, *preset.shape, generator=gen)
    logsnr = 20 * torch.rand(BATCH, generator=gen) - 10
    return x, logsnr


def perturb_zero_init_(module: nn.Module, seed: int = 2, std: float = 0.1) -> None:
    """Give every zero-initialised parameter small random values (undo the zero init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(std * torch.randn(p.shape, generator=gen))


def ul_loss(encoder, prior, decoder, x, logsnr) -> torch.Tensor:
    """A UL-shaped loss: prior eps-MSE + KL-like term on z_clean + decoder eps-MSE."""
    alpha_z = math.sqrt(1 / (1 + math.exp(-LOGSNR_Z0)))  # sqrt(sigmoid(5)) ~ 0.99665
    sigma_z = math.sqrt(1 / (1 + math.exp(LOGSNR_Z0)))  # sqrt(sigmoid(-5)) ~ 0.08181
    z_clean = encoder(x)  # (B, C_z, *grid)
    z_0 = alpha_z * z_clean + sigma_z * torch.randn_like(z_clean)
    alpha, sigma = torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()
    expand = (slice(None),) + (None,) * (x.ndim - 1)
    eps_z = torch.randn_like(z_clean)
    z_t = alpha[expand] * z_clean + sigma[expand] * eps_z
    loss_z = ((eps_z - prior(z_t, logsnr)) ** 2).sum() + 0.5 * (z_clean**2).sum()
    eps_x = torch.randn_like(x)
    x_t = alpha[expand] * x + sigma[expand] * eps_x
    loss_x = ((eps_x - decoder(x_t, logsnr, z_0)) ** 2).sum()
    return loss_z + loss_x


# ---------------------------------------------------------------------------------------------
# blocks
# ---------------------------------------------------------------------------------------------


def test_patch_patterns_read_as_shapes():
    assert patchify_pattern(2) == "b c (h ph) (w pw) -> b (h w) (ph pw c)"
    assert patchify_pattern(3) == "b c (t pt) (h ph) (w pw) -> b (t h w) (pt ph pw c)"
    assert unpatchify_pattern(2) == "b (h w) (ph pw c) -> b c (h ph) (w pw)"


@pytest.mark.parametrize("shape,patch", [((3, 8, 8), (2, 2)), ((3, 4, 8, 8), (1, 2, 2))])
def test_patch_round_trips(shape, patch):
    x = torch.randn(BATCH, *shape)
    grid = tuple(s // p for s, p in zip(shape[1:], patch, strict=True))
    folded = space_to_depth(x, patch)
    assert folded.shape == (BATCH, shape[0] * math.prod(patch), *grid)
    assert torch.equal(depth_to_space(folded, patch), x)
    assert torch.equal(from_tokens(to_tokens(x), shape[1:]), x)
    embed, unembed = PatchEmbed(len(patch), 3, 16, patch), PatchUnembed(len(patch), 16, 3, patch)
    tokens = embed(x)
    assert tokens.shape == (BATCH, math.prod(grid), 16)
    assert unembed(tokens, grid).shape == x.shape


def test_per_axis_down_and_up_sampling():
    x = torch.randn(BATCH, 4, 4, 8, 8)
    down = Downsample(3, 4, 6, (1, 2, 2))
    assert down(x).shape == (BATCH, 6, 4, 4, 4)
    assert Downsample(2, 4, 4, 4)(x[:, :, 0]).shape == (BATCH, 4, 2, 2)
    assert Upsample(3, 6, 4, (2, 1, 2))(down(x)).shape == (BATCH, 4, 8, 4, 8)


def test_subpixel_upsampling_gives_every_output_frame_its_own_weights():
    # A 4x up-sampling in time: nearest repeats one input 4 times and its 3-tap conv sees the
    # same window at the two middle copies, so they are identical; subpixel keeps them apart.
    torch.manual_seed(0)
    x = torch.randn(BATCH, 6, 2, 3, 3)
    nearest = Upsample(3, 6, 4, (4, 1, 1))(x)
    subpixel = Upsample(3, 6, 4, (4, 1, 1), mode="subpixel")(x)
    assert nearest.shape == subpixel.shape == (BATCH, 4, 8, 3, 3)
    assert torch.equal(nearest[:, :, 1], nearest[:, :, 2])
    for a, b in itertools.combinations(range(4), 2):
        assert not torch.allclose(subpixel[:, :, a], subpixel[:, :, b])
    with pytest.raises(ConfigError, match="upsample mode"):
        Upsample(3, 6, 4, 2, mode="bilinear")


def test_frame_wise_resblock_kernel_convolves_each_frame_on_its_own():
    block = ResBlock(3, 4, 4, kernel_size=(1, 3, 3))
    x = torch.randn(1, 4, 5, 6, 6)
    y = x.clone()
    y[:, :, 3] += 1.0  # change one frame: its convolution alone changes
    changed = (block.conv1(x) - block.conv1(y)).abs().sum((0, 1, 3, 4))  # per frame
    assert changed[3] > 0 and torch.count_nonzero(changed) == 1
    assert block(x).shape == x.shape
    with pytest.raises(ConfigError, match="odd"):
        ResBlock(3, 4, 4, kernel_size=(2, 3, 3))


def test_sincos_position_embedding_shape_and_distinct_rows():
    emb = sincos_position_embedding((2, 3, 4), 20)
    assert emb.shape == (24, 20)
    assert torch.unique(emb, dim=0).shape[0] == 24


def test_count_parameters():
    assert count_parameters(nn.Linear(3, 4)) == 16


# ---------------------------------------------------------------------------------------------
# networks: contract over the image and video presets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", PRESETS)
@pytest.mark.parametrize("prior_kwargs", [None, TWO_LEVEL], ids=["1-level", "2-level"])
def test_shapes_and_dtype(kind, prior_kwargs):
    preset = PRESETS[kind]
    encoder, prior, decoder = build(preset, prior=prior_kwargs)
    x, logsnr = inputs(preset)
    z_clean = encoder(x)
    grid = tuple(s // d for s, d in zip(preset.shape[1:], encoder.downsample, strict=True))
    assert z_clean.shape == (BATCH, encoder.latent_channels, *grid)
    assert encoder.latent_shape == (encoder.latent_channels, *grid)
    eps_hat_z = prior(z_clean, logsnr)
    eps_hat_x = decoder(x, logsnr, z_clean)
    assert eps_hat_z.shape == z_clean.shape
    assert eps_hat_x.shape == x.shape
    for out in (z_clean, eps_hat_z, eps_hat_x):
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all()


def test_video_downsample_attribute():
    encoder, _, decoder = build(VIDEO)
    assert encoder.downsample == (2, 4, 4)
    assert decoder.downsample == (2, 4, 4)
    assert encoder.latent_shape == (4, 2, 4, 4)


@pytest.mark.parametrize("kind", PRESETS)
def test_denoisers_predict_zero_at_init_and_encoder_does_not(kind):
    preset = PRESETS[kind]
    encoder, prior, decoder = build(preset, prior=TWO_LEVEL)
    x, logsnr = inputs(preset)
    z_clean = encoder(x)
    assert z_clean.abs().max() > 0
    assert torch.equal(prior(z_clean, logsnr), torch.zeros_like(z_clean))
    assert torch.equal(decoder(x, logsnr, z_clean), torch.zeros_like(x))


@pytest.mark.parametrize("kind", PRESETS)
def test_gradients_reach_every_parameter(kind):
    preset = PRESETS[kind]
    encoder, prior, decoder = build(preset, prior=TWO_LEVEL)
    # Residual branches and output layers start at zero (identity blocks, v_hat = 0), which
    # zeroes the gradient of the layers before them at step 0; undo that to test the wiring.
    for net in (encoder, prior, decoder):
        perturb_zero_init_(net)
    x, logsnr = inputs(preset)
    ul_loss(encoder, prior, decoder, x, logsnr).backward()
    # No documented exceptions: the unconditional prior has no class embedding.
    for name, net in [("encoder", encoder), ("prior", prior), ("decoder", decoder)]:
        for param_name, p in net.named_parameters():
            assert p.grad is not None, f"{name}.{param_name} has no gradient"
            assert torch.isfinite(p.grad).all(), f"{name}.{param_name}"
    for param_name, p in encoder.named_parameters():
        assert p.grad.abs().max() > 0, f"encoder.{param_name} has a zero gradient"


def test_gradients_at_init_are_defined():
    """At init (zero output layers) every parameter still gets a (possibly zero) gradient."""
    encoder, prior, decoder = build(IMAGE)
    x, logsnr = inputs(IMAGE)
    ul_loss(encoder, prior, decoder, x, logsnr).backward()
    for net in (encoder, prior, decoder):
        assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("kind", PRESETS)
def test_seeded_determinism(kind):
    preset = PRESETS[kind]
    x, logsnr = inputs(preset)
    outputs = []
    for _ in range(2):
        encoder, prior, decoder = build(preset, seed=3, prior=TWO_LEVEL)
        for net in (prior, decoder):
            perturb_zero_init_(net)
            net.eval()
        z = encoder(x)
        outputs.append((z, prior(z, logsnr), decoder(x, logsnr, z)))
    for a, b in zip(*outputs, strict=True):
        assert torch.equal(a, b)
    other = build(preset, seed=4)[0](x)
    assert not torch.equal(other, outputs[0][0])


@pytest.mark.parametrize("kind", PRESETS)
def test_state_dict_round_trip(kind):
    preset = PRESETS[kind]
    x, logsnr = inputs(preset)
    source = build(preset, seed=5, prior=TWO_LEVEL)
    target = build(preset, seed=6, prior=TWO_LEVEL)
    for net in source[1:]:
        perturb_zero_init_(net)
    for src, dst in zip(source, target, strict=True):
        dst.load_state_dict(src.state_dict())
        src.eval()
        dst.eval()
    z = source[0](x)
    assert torch.equal(z, target[0](x))
    assert torch.equal(source[1](z, logsnr), target[1](z, logsnr))
    assert torch.equal(source[2](x, logsnr, z), target[2](x, logsnr, z))


# ---------------------------------------------------------------------------------------------
# class-conditional ViT
# ---------------------------------------------------------------------------------------------


def test_class_conditional_vit():
    num_classes = 5
    torch.manual_seed(7)
    vit = ViT((4, 4, 4), num_classes=num_classes, **TWO_LEVEL)
    assert vit.num_classes == num_classes
    z_t, logsnr = torch.randn(BATCH, 4, 4, 4), torch.zeros(BATCH)
    labels = torch.tensor([0, 1])
    null = torch.full((BATCH,), num_classes)
    # Zero-initialised output: v_hat = 0 whatever the label.
    assert torch.equal(vit(z_t, logsnr, labels), torch.zeros_like(z_t))
    perturb_zero_init_(vit)
    vit.eval()
    assert not torch.allclose(vit(z_t, logsnr, labels), vit(z_t, logsnr, labels.flip(0)))
    assert not torch.allclose(vit(z_t, logsnr, labels), vit(z_t, logsnr, null))
    # label=None is the null label (classifier-free guidance).
    assert torch.equal(vit(z_t, logsnr), vit(z_t, logsnr, null))


def test_one_training_step_makes_vit_label_dependent():
    torch.manual_seed(8)
    vit = ViT((4, 4, 4), widths=(16,), depths=(1,), heads=2, num_classes=3)
    z_t, logsnr, labels = torch.randn(BATCH, 4, 4, 4), torch.zeros(BATCH), torch.tensor([0, 1])
    for _ in range(2):  # step 1 moves the zero output layer, step 2 the adaLN gates
        vit.zero_grad()
        ((vit(z_t, logsnr, labels) - z_t) ** 2).sum().backward()
        with torch.no_grad():  # plain SGD; torch.optim's first step imports torch._dynamo (s)
            for p in vit.parameters():
                p -= SGD_LEARNING_RATE * p.grad
    assert vit(z_t, logsnr, labels).abs().max() > 0
    assert not torch.allclose(vit(z_t, logsnr, labels), vit(z_t, logsnr, labels.flip(0)))


# ---------------------------------------------------------------------------------------------
# ConvViT: the U-ViT latent denoiser (priors.conv_vit)
# ---------------------------------------------------------------------------------------------

# A clip's latent 2x4x8x8 (C, T, H, W): 3x3x3 convs at 4x8x8, the Transformer at 4x4x4 tokens.
CONV_VIT = dict(channels=(8,), width=16, depth=1, heads=2, stage_downsample=((1, 2, 2),))


def test_conv_vit_contract():
    """Zero at init; shape kept; labels, the null label and a context all reach the output;
    every parameter gets a gradient; a state dict round-trips."""
    torch.manual_seed(9)
    shape = (2, 4, 8, 8)
    net = ConvViT(shape, num_classes=3, context_channels=2, **CONV_VIT)
    z_t, context = torch.randn(BATCH, *shape), torch.randn(BATCH, *shape)
    logsnr, labels = torch.tensor([-3.0, 4.0]), torch.tensor([0, 2])
    assert torch.equal(net(z_t, logsnr, labels, context), torch.zeros_like(z_t))
    perturb_zero_init_(net)
    net.eval()
    out = net(z_t, logsnr, labels, context)
    assert out.shape == z_t.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, net(z_t, logsnr, labels.flip(0), context))
    assert not torch.allclose(out, net(z_t, logsnr, labels, context.flip(0)))
    null = torch.full((BATCH,), 3)
    assert torch.equal(net(z_t, logsnr, None, context), net(z_t, logsnr, null, context))
    net(z_t, logsnr, labels, context).square().sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
    copy = ConvViT(shape, num_classes=3, context_channels=2, **CONV_VIT)
    copy.load_state_dict(net.state_dict())
    copy.eval()
    assert torch.equal(copy(z_t, logsnr, labels, context), out)
    with pytest.raises(ValueError, match="context_channels=2 got no context"):
        net(z_t, logsnr, labels)


def test_conv_vit_grid_must_divide():
    with pytest.raises(ConfigError, match="ConvViT patch_size times stage_downsample"):
        ConvViT((2, 4, 6, 6), **{**CONV_VIT, "stage_downsample": ((1, 4, 4),)})


def test_uvit_decoder_keeps_its_parameter_names_and_order():
    """The decoder's body moved into UViTBody; its state-dict keys (checkpoints of earlier runs)
    and parameter order (the optimizer state of format-2 checkpoint files) are unchanged."""
    decoder = UViTDecoder((3, 16, 16), (4, 4, 4), channels=(8,), width=16, depth=1, heads=2,
                          patch_size=2)  # fmt: skip
    names = [name.split(".")[0] for name, _ in decoder.named_parameters()]
    assert list(dict.fromkeys(names)) == [
        "logsnr_emb", "stem", "down_stages", "downsamplers", "mid_in", "latent_proj",
        "mid_blocks", "mid_norm", "mid_out", "upsamplers", "up_stages", "out_norm", "out_conv",
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# construction errors and paper presets
# ---------------------------------------------------------------------------------------------


def test_decoder_latent_grid_mismatch_message():
    with pytest.raises(ValueError) as info:
        UViTDecoder((3, 16, 16), (4, 4, 4), channels=(8, 16), width=32, depth=1, heads=2)
    message = str(info.value)
    assert "(16, 16)" in message
    assert "(4, 4)" in message
    assert "(8, 8)" in message
    assert "channels" in message and "patch_size" in message


# Parameter counts of this implementation at the paper's ImageNet-512 sizes (measured on the
# meta device when the networks were written): encoder 28,511,264; stage-1 prior ViT
# 154,597,408; stage-2 base ViT 347,150,752; decoder 197,390,732. The ranges are plausibility
# bounds, not golden numbers.
PAPER_RANGES = {
    "encoder": (10e6, 60e6),
    "prior": (100e6, 250e6),
    "base": (250e6, 500e6),
    "decoder": (100e6, 300e6),
}


def test_paper_presets_build_on_meta():
    with torch.device("meta"):
        encoder = ResNetEncoder((3, 512, 512))
        nets = {
            "encoder": encoder,
            "prior": ViT(encoder.latent_shape),
            "base": ViT(encoder.latent_shape, widths=(512, 1024), depths=(6, 16), dropout=0.1),
            "decoder": UViTDecoder((3, 512, 512), encoder.latent_shape),
        }
    assert encoder.latent_shape == (32, 32, 32)
    assert encoder.downsample == (16, 16)
    for name, net in nets.items():
        low, high = PAPER_RANGES[name]
        assert low < count_parameters(net) < high, (name, count_parameters(net))


def test_kinetics_conv_vit_base_builds_on_meta():
    """gin/presets/kinetics600.gin's base model on its 16x16x16x8 latent: 1024 tokens, as the
    paper's base ViT on 1x2x2 patches, and of the same order of parameters."""
    with torch.device("meta"):
        base = ConvViT((8, 16, 16, 16), channels=(256,), blocks_per_stage=2, width=1024,
                       depth=16, heads=16, stage_downsample=((1, 2, 2),), dropout=0.1,
                       context_channels=8)  # fmt: skip
    assert 150e6 < count_parameters(base) < PAPER_RANGES["base"][1], count_parameters(base)
