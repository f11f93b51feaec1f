"""How the context frames of a clip reach a continuation (docs/method.md, "Video").

On tiny video networks of the video quickstart's design (a frame-wise encoder, one latent step
per frame) with weights that are not at their zero initialisation:
(a) latent step t is a function of frame t alone, so the latent of the context clip's first k
    steps is the clip's own;
(b) a continuation changes when only the context changes, and not when nothing changes;
(c) the decoder is handed the context's own first k latent steps (noised to λ_z(0)), the rest
    from the base model;
(d) a context that does not fit the clips or the latent steps stops with one line;
(e) a continuation in rounds (`rollout_steps`) conditions each round on the steps before it;
(f) a base model trained on windows (`window_steps`) sees consecutive steps of the clip at every
    offset, with the window's own first steps as its context, and samples in rounds of windows;
(g) noise augmentation of the context (`context_noise`) noises it and tells the base model how
    much, in training and in every round; a null context (`context_dropout`) is trained and
    guided on;
(h) training on the model's own rounds (`rollout_training`) conditions a window on the steps
    the base model generated from the true steps before it;
(i) a base model with the context along its channels (`stack_context`) denoises only the steps
    after the context and reads the last k known steps stacked, in training and every round;
(j) the chains start at the stage's `temperature`, and the decoder runs `decoder_sampler`;
(k) after a short training, the first generated step of a continuation is nearer its own clip's
    last context step than any other clip's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ulframe.diffusion import alpha_sigma
from ulframe.errors import ConfigError
from ulframe.protocols import BuildContext
from ulframe.train import checkpoint
from ulframe.train.settings import TrainSettings
from ulframe_plugins.networks.decoders import UViTDecoder
from ulframe_plugins.networks.encoders import ResNetEncoder
from ulframe_plugins.networks.priors import ViT
from ulframe_plugins.stages import ul_base
from ulframe_plugins.stages.ul_base import ULBase, ULBaseModel
from ulframe_plugins.stages.ul_joint import ULJoint

SHAPE = (1, 8, 16, 16)  # (C, T, H, W)
CONTEXT = 3
ENCODER = dict(
    latent_channels=2, channels=(8, 16), blocks_per_stage=(1, 1), patch_size=4,
    stage_downsample=(1,), frame_wise=True,
)  # fmt: skip
DECODER = dict(
    channels=(8,), blocks_per_stage=1, width=16, depth=1, heads=2, patch_size=(1, 4, 4),
    stage_downsample=((1, 2, 2),), latent_patch=(1, 2, 2), conv_kernel=(1, 3, 3),
    upsample="subpixel", dropout=0.0,
)  # fmt: skip
VIT = dict(widths=(16,), depths=(1,), heads=2, patch_size=(1, 2, 2))


def _stage1() -> ULJoint:
    return ULJoint(
        encoder=lambda shape: ResNetEncoder(shape, **ENCODER),
        prior=lambda shape: ViT(shape, **VIT),
        decoder=lambda shape, latent_shape: UViTDecoder(shape, latent_shape, **DECODER),
        train=TrainSettings(batch_size=2, train_samples=2),
    )


def _stage2(**kw) -> ULBase:
    defaults = dict(
        stage1=_stage1(),
        base=lambda shape, num_classes, context_channels: ViT(
            shape, num_classes=num_classes, context_channels=context_channels, **VIT
        ),
        train=TrainSettings(batch_size=2, train_samples=2),
        sample_steps=2,
        context_frames=CONTEXT,
        context_latent_steps=CONTEXT,
        class_conditional=False,
    )
    return ULBase(**(defaults | kw))


def _clips(n: int, seed: int) -> torch.Tensor:
    return torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _latents_decoded(model: ULBaseModel, monkeypatch) -> list[torch.Tensor]:
    """The z_0 that the decoder of `model` will be handed, in order (a spy)."""
    handed: list[torch.Tensor] = []
    decode = model.latents().decode_latents

    def spy(z_0, *args, **kwargs):
        handed.append(z_0)
        return decode(z_0, *args, **kwargs)

    monkeypatch.setattr(model.stage1, "decode_latents", spy)
    return handed


def _contexts_seen(model: ULBaseModel, monkeypatch) -> list[torch.Tensor]:
    """The distinct contexts the base model of `model` is called with, in order (a spy: one
    entry per chain, since a chain's calls share their context)."""
    seen: list[torch.Tensor] = []
    base_eps = model.base_eps

    def spy_eps(z_t, logsnr, label, z_context):
        if not seen or not torch.equal(seen[-1], z_context):
            seen.append(z_context.clone())
        return base_eps(z_t, logsnr, label, z_context)

    monkeypatch.setattr(model, "base_eps", spy_eps)
    return seen


def _spied_continuation(stage: ULBase, model: ULBaseModel, x: torch.Tensor, monkeypatch):
    """A continuation of clips `x` (seed 0) with spies: (the continuation, every base-model
    chain's output, the context of each chain, the z_0 the decoder was handed)."""
    outputs: list[torch.Tensor] = []
    chains = ul_base.sample_latents

    def spy_chain(*args, **kwargs):
        outputs.append(chains(*args, **kwargs))
        return outputs[-1]

    handed = _latents_decoded(model, monkeypatch)
    contexts = _contexts_seen(model, monkeypatch)
    monkeypatch.setattr(ul_base, "sample_latents", spy_chain)
    out = stage.sample(model, len(x), None, None, torch.Generator().manual_seed(0), context=x)
    return out, outputs, contexts, handed


@pytest.fixture
def built(tmp_path: Path) -> tuple[ULBase, ULBaseModel]:
    return _built(tmp_path)


def _built(tmp_path: Path, **stage2) -> tuple[ULBase, ULBaseModel]:
    """Stage 2 (`stage2`: its settings over `_stage2`'s) on a finished stage 1 whose EMA weights
    are all moved off their initial values (zero-initialised output layers included), and a
    base model moved off them too."""
    stage1_dir = tmp_path / "stages" / "stage1"
    example = {"x": _clips(1, 0)[0], "label": torch.tensor(0)}
    torch.manual_seed(0)
    model = _stage1().build(BuildContext(example, 10, torch.device("cpu"), stage1_dir))
    ema = {k: v + 0.05 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    checkpoint.save(
        stage1_dir / "checkpoints", 2, {"model": model.state_dict(), "ema": ema, "samples_seen": 2}
    )
    stage = _stage2(**stage2)
    ctx = BuildContext(
        example, 10, torch.device("cpu"), tmp_path / "stages" / "stage2", {"stage1": stage1_dir}
    )
    base_model = stage.build(ctx)
    with torch.no_grad():
        for p in base_model.base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return stage, base_model.eval()


def test_latent_step_t_is_a_function_of_frame_t_alone(built) -> None:
    _, model = built
    x = _clips(2, 1)
    z = model.encode_clean(x)
    assert z.shape[2] == SHAPE[1]  # one latent step per frame
    for t in range(SHAPE[1]):
        y = x.clone()
        y[:, :, t] = -y[:, :, t]
        changed = (model.encode_clean(y) - z).abs().sum((0, 1, 3, 4))  # per latent step
        assert changed[t] > 0 and torch.count_nonzero(changed) == 1, (t, changed)
    # the context clip (first k frames, the last repeated) has the clip's first k steps
    assert torch.equal(model.encode_context(x)[:, :, :CONTEXT], z[:, :, :CONTEXT])


def test_a_continuation_changes_when_only_the_context_changes(built) -> None:
    stage, model = built
    a, b = _clips(2, 2), _clips(2, 3)

    def continue_(context: torch.Tensor) -> torch.Tensor:
        return stage.sample(model, 2, None, None, torch.Generator().manual_seed(7), context=context)

    first, again, other = continue_(a), continue_(a), continue_(b)
    assert torch.equal(first, again)  # the same context and seed: the same continuation
    assert torch.equal(first[:, :, :CONTEXT], a[:, :, :CONTEXT])  # the given frames, as given
    assert not torch.allclose(first[:, :, CONTEXT:], other[:, :, CONTEXT:], atol=1e-3)
    # and the base model itself reads the context (not only the kept latent steps): its
    # prediction for the same noisy latent differs between the two contexts
    z_t = torch.randn((2, *model.latent_shape), generator=torch.Generator().manual_seed(1))
    logsnr = torch.zeros(2)
    eps_a = model.base_eps(z_t, logsnr, None, model.encode_context(a))
    eps_b = model.base_eps(z_t, logsnr, None, model.encode_context(b))
    assert not torch.allclose(eps_a[:, :, CONTEXT:], eps_b[:, :, CONTEXT:], atol=1e-4)


def test_the_decoder_gets_the_context_latent_steps_noised_to_the_latent_logsnr(
    built, monkeypatch
) -> None:
    stage, model = built
    x = _clips(64, 4)
    handed = _latents_decoded(model, monkeypatch)
    stage.sample(model, 64, None, None, torch.Generator().manual_seed(0), context=x)
    z_0 = handed[0]
    alpha, sigma = alpha_sigma(torch.tensor(model.latent_logsnr_max))
    eps = (z_0[:, :, :CONTEXT] - alpha * model.encode_clean(x)[:, :, :CONTEXT]) / sigma
    assert abs(float(eps.mean())) < 0.05 and abs(float(eps.std()) - 1) < 0.05
    # the later steps are the base model's: far from the clip's own latent
    rest = (z_0[:, :, CONTEXT:] - alpha * model.encode_clean(x)[:, :, CONTEXT:]) / sigma
    assert float(rest.std()) > 2


def test_a_context_that_does_not_fit_stops_with_one_line() -> None:
    example = {"x": _clips(1, 0)[0], "label": torch.tensor(0)}
    with pytest.raises(ConfigError, match=r"ul_base\.context_frames=8 needs video clips"):
        _stage2(context_frames=8, context_latent_steps=8).check_data(example)
    with pytest.raises(ConfigError, match=r"context_latent_steps=2 does not fit"):
        _stage2(context_latent_steps=2).check_data(example)
    with pytest.raises(ConfigError, match=r"context_latent_steps=3 needs context_frames > 0"):
        _stage2(context_frames=0)
    with pytest.raises(ConfigError, match=r"needs video clips"):
        _stage2().check_data({"x": torch.zeros(1, 16, 16), "label": torch.tensor(0)})
    _stage2().check_data(example)  # fits
    assert ul_base.context_clip(_clips(1, 0), CONTEXT).shape == (1, *SHAPE)


# ---- continuations in rounds (`ul_base.rollout_steps`) ---------------------------------------
def test_a_rollout_conditions_each_round_on_the_steps_before_it(built, monkeypatch) -> None:
    """With rollout_steps r each chain is conditioned on the last k known latent steps (the
    context's own in the first round, then the ones generated before), the k-th repeated; the
    continuation keeps r steps of each round, and the decoder gets them in order."""
    stage, model = built
    model.rollout_steps = 2
    x = _clips(2, 5)
    length = model.latent_shape[1]  # 8 steps; k = 3: rounds keep 2, 2, 1
    out, outputs, contexts, handed = _spied_continuation(stage, model, x, monkeypatch)
    assert len(outputs) == len(contexts) == 3  # ceil((8 - 3) / 2) chains
    known = model.encode_clean(x)[:, :, :CONTEXT]
    for i, (context, z) in enumerate(zip(contexts, outputs, strict=True)):
        window = known[:, :, -CONTEXT:]
        assert torch.equal(context[:, :, :CONTEXT], window), i
        assert torch.equal(
            context[:, :, CONTEXT:], window[:, :, -1:].expand_as(context[:, :, CONTEXT:])
        )
        known = torch.cat([known, z[:, :, CONTEXT : CONTEXT + 2]], 2)
    assert torch.equal(handed[0][:, :, CONTEXT:], known[:, :, CONTEXT:length])
    assert torch.equal(out[:, :, :CONTEXT], x[:, :, :CONTEXT])
    model.rollout_steps = 0
    once = stage.sample(model, 2, None, None, torch.Generator().manual_seed(0), context=x)
    assert not torch.allclose(once, out)  # one chain for the whole clip differs


def test_a_noisy_context_is_the_context_z0_for_the_base_model_and_the_decoder(
    built, monkeypatch
) -> None:
    """`noisy_context`: the base model reads the context's latent noised to λ_z(0), and the
    decoder gets those same first k steps (one draw, not two); training noises it too."""
    stage, model = built
    model.noisy_context = True
    x = _clips(64, 6)
    seen: list[torch.Tensor] = []
    base_eps = model.base_eps

    def spy_eps(z_t, logsnr, label, z_context):
        seen.append(z_context)
        return base_eps(z_t, logsnr, label, z_context)

    handed = _latents_decoded(model, monkeypatch)
    monkeypatch.setattr(model, "base_eps", spy_eps)
    stage.sample(model, 64, None, None, torch.Generator().manual_seed(0), context=x)
    alpha, sigma = alpha_sigma(torch.tensor(model.latent_logsnr_max))
    eps = (seen[0] - alpha * model.encode_context(x)) / sigma
    assert abs(float(eps.mean())) < 0.05 and abs(float(eps.std()) - 1) < 0.05
    assert torch.equal(handed[0][:, :, :CONTEXT], seen[0][:, :, :CONTEXT])
    batch = {"x": x[:4]}
    clean = model._context(batch)
    noised = model.noised_context(clean, torch.Generator().manual_seed(1))
    assert noised is not None and clean is not None and not torch.allclose(noised, clean)
    model.noisy_context = False
    assert model.noised_context(clean, torch.Generator()) is clean


# ---- a base model on windows of the clip's latent (`ul_base.window_steps`) --------------------
def test_a_windowed_base_model_trains_on_consecutive_steps_at_every_offset(tmp_path) -> None:
    """Each training window is W consecutive latent steps of its clip at an offset in
    [0, T - W] (every offset drawn), its context the window's first k steps, the k-th repeated;
    the loss and the bitrate are over the window (bits/pixel divide by its frames)."""
    _, model = _built(tmp_path, window_steps=5, rollout_steps=1)
    assert model.base_shape == (2, 5, 4, 4) and model.pixels == 5 * 16 * 16
    z = torch.arange(8.0)[None, None, :, None, None].expand(64, 2, 8, 4, 4).contiguous()
    z = z + torch.arange(64.0)[:, None, None, None, None] * 100  # step t of clip i: 100 i + t
    windows, context, drawn = model._windows(z, torch.Generator().manual_seed(0))
    offsets = windows[:, 0, 0, 0, 0] - torch.arange(64.0) * 100
    assert set(offsets.long().tolist()) == {0, 1, 2, 3}  # T - W = 3
    assert torch.equal(drawn, offsets.long())
    for i, o in enumerate(offsets.long().tolist()):
        assert torch.equal(windows[i], z[i, :, o : o + 5])
        assert torch.equal(context[i, :, :CONTEXT], z[i, :, o : o + CONTEXT])
        last = z[i, :, o + CONTEXT - 1 : o + CONTEXT].expand(-1, 5 - CONTEXT, -1, -1)
        assert torch.equal(context[i, :, CONTEXT:], last)
    model.train()
    terms = model({"x": _clips(4, 8)}, torch.Generator().manual_seed(0))
    assert terms.base_nats.shape == (4,) and torch.isfinite(terms.base_nats).all()
    bits = model.bits_per_pixel({"x": _clips(4, 8)}, torch.Generator().manual_seed(0), 2)
    assert bits.shape == (4,) and torch.isfinite(bits).all()


def test_a_windowed_base_model_continues_in_rounds_of_windows(tmp_path, monkeypatch) -> None:
    """Sampling: one chain of W steps per round, conditioned on the last k known steps, keeping
    the step after them; the decoder gets the clip's whole latent."""
    stage, model = _built(tmp_path, window_steps=5, rollout_steps=1)
    x = _clips(2, 9)
    shapes: list[tuple[int, ...]] = []
    chains = ul_base.sample_latents

    def spy_chain(eps_cond, eps_uncond, z_1, *args, **kwargs):
        shapes.append(tuple(z_1.shape))
        return chains(eps_cond, eps_uncond, z_1, *args, **kwargs)

    handed = _latents_decoded(model, monkeypatch)
    monkeypatch.setattr(ul_base, "sample_latents", spy_chain)
    out = stage.sample(model, 2, None, None, torch.Generator().manual_seed(0), context=x)
    assert shapes == [(2, 2, 5, 4, 4)] * (SHAPE[1] - CONTEXT)  # 5 rounds of one step
    assert handed[0].shape == (2, 2, SHAPE[1], 4, 4) and out.shape == x.shape
    assert torch.equal(out[:, :, :CONTEXT], x[:, :, :CONTEXT])
    other = stage.sample(model, 2, None, None, torch.Generator().manual_seed(0), context=-x)
    assert not torch.allclose(out[:, :, CONTEXT:], other[:, :, CONTEXT:], atol=1e-3)


def test_an_anchored_window_sees_the_clips_own_context_and_its_offset(
    tmp_path, monkeypatch
) -> None:
    """`anchor_context`: every window is conditioned on its own first k steps, then the clip's
    first k steps (the true context's, in every round of a continuation) and the window's
    offset from them (offset / T); with `context_noise` the anchor stays clean."""
    stage, model = _built(
        tmp_path, window_steps=5, rollout_steps=1, anchor_context=True, context_noise=(1.0, 3.0)
    )
    z = torch.randn((64, 2, 8, 4, 4), generator=torch.Generator().manual_seed(0))
    model.train()
    windows, context = model._inputs({"z": z}, torch.Generator().manual_seed(1))
    assert context is not None and context.shape == (64, 2 + 1 + 2 + 1, 5, 4, 4)
    anchor = torch.cat(
        [z[:, :, :CONTEXT], z[:, :, CONTEXT - 1 : CONTEXT].expand(-1, -1, 2, -1, -1)], 2
    )
    assert torch.equal(context[:, 3:5], anchor)  # clean, whatever the window's noise
    offsets = (context[:, 5, 0, 0, 0] * 8).round().long()
    for i, o in enumerate(offsets.tolist()):
        assert torch.equal(windows[i], z[i, :, o : o + 5])
    assert set(offsets.tolist()) == {0, 1, 2, 3}
    model.eval()
    seen = _contexts_seen(model, monkeypatch)
    x = _clips(2, 11)
    stage.sample(model, 2, None, None, torch.Generator().manual_seed(0), context=x)
    true = model.encode_context(x)[:, :, :CONTEXT]
    assert len(seen) == SHAPE[1] - CONTEXT
    for k, c in enumerate(seen):  # round k: the true context, offset k
        assert torch.equal(c[:, 3:5, :CONTEXT], true), k
        assert torch.allclose(c[:, 5], torch.full_like(c[:, 5], k / 8)), k
    with pytest.raises(ConfigError, match=r"anchor_context=True needs window_steps > 0"):
        _stage2(anchor_context=True, rollout_steps=1)


def test_a_window_that_does_not_fit_stops_with_one_line(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"window_steps=5 needs rollout_steps > 0"):
        _stage2(window_steps=5)
    with pytest.raises(ConfigError, match=r"context_latent_steps \+ rollout_steps <= window"):
        _stage2(window_steps=4, rollout_steps=2)
    with pytest.raises(ConfigError, match=r"window_steps=9 is longer than the latent's 8 steps"):
        _built(tmp_path, window_steps=9, rollout_steps=1)


def test_context_noise_augments_the_context_and_tells_the_level(tmp_path, monkeypatch) -> None:
    """`context_noise`: in training the context is noised to a log-SNR drawn in [lo, hi] per
    example and the level is one more channel (λ / 10); when sampling every round's context
    (true and generated steps) is noised to `context_noise_sample`."""
    stage, model = _built(
        tmp_path, window_steps=5, rollout_steps=1, context_noise=(1.0, 3.0),
        context_noise_sample=2.0,
    )  # fmt: skip
    clean = torch.randn((256, 2, 5, 4, 4), generator=torch.Generator().manual_seed(0))
    model.train()
    noised = model.augmented_context(clean, torch.Generator().manual_seed(1))
    assert noised.shape == (256, 3, 5, 4, 4)
    level = noised[:, 2, 0, 0, 0] * 10
    assert torch.equal(noised[:, 2], noised[:, 2, :1, :1, :1].expand(-1, 5, 4, 4))
    assert float(level.min()) >= 1.0 and float(level.max()) <= 3.0
    assert float(level.max() - level.min()) > 1.5  # drawn, not fixed
    alpha, sigma = alpha_sigma(level)
    eps = (noised[:, :2] - alpha[:, None, None, None, None] * clean) / sigma[
        :, None, None, None, None
    ]
    assert abs(float(eps.mean())) < 0.02 and abs(float(eps.std()) - 1) < 0.02
    model.eval()
    fixed = model.augmented_context(clean, torch.Generator().manual_seed(1))
    assert torch.allclose(fixed[:, 2], torch.full_like(fixed[:, 2], 0.2))
    seen = _contexts_seen(model, monkeypatch)
    x = _clips(2, 10)
    stage.sample(model, 2, None, None, torch.Generator().manual_seed(0), context=x)
    assert len(seen) == SHAPE[1] - CONTEXT and all(c.shape[1] == 3 for c in seen)
    true = model.encode_clean(x)[:, :, :CONTEXT]
    alpha, sigma = alpha_sigma(torch.tensor(2.0))
    assert not torch.allclose(seen[0][:, :2, :CONTEXT], true)  # noised ...
    assert float(((seen[0][:, :2, :CONTEXT] - alpha * true) / sigma).std()) < 2  # ... to λ = 2
    with pytest.raises(ConfigError, match=r"context_noise=\(3.0, 1.0\) must be"):
        _stage2(context_noise=(3.0, 1.0))
    with pytest.raises(ConfigError, match=r"context_noise=.* context_frames > 0"):
        _stage2(context_noise=(1.0, 3.0), context_frames=0, context_latent_steps=0)


def test_context_dropout_trains_a_null_context_and_guides_on_the_context(
    tmp_path, monkeypatch
) -> None:
    """`context_dropout` p: in training a fraction p of the contexts is zeroed and flagged in
    one more channel; sampling with guidance w calls the model with the context and with the
    null context and combines them eps_null + w (eps_context - eps_null)."""
    stage, model = _built(tmp_path, window_steps=5, rollout_steps=1, context_dropout=0.25)
    model.train()
    _, context = model._inputs({"x": _clips(400, 11)}, torch.Generator().manual_seed(0))
    assert context is not None and context.shape[1] == 3
    flag = context[:, 2, 0, 0, 0]
    assert set(flag.tolist()) == {0.0, 1.0} and 0.18 < float(flag.mean()) < 0.32
    assert torch.equal(context[:, 2], flag[:, None, None, None].expand(-1, 5, 4, 4))
    assert float(context[flag == 1, :2].abs().sum()) == 0.0
    assert float(context[flag == 0, :2].abs().min(1).values.sum()) > 0.0
    model.eval()
    calls: list[float] = []
    base_eps = model.base_eps

    def spy_eps(z_t, logsnr, label, z_context):
        calls.append(float(z_context[:, 2].mean()))
        return base_eps(z_t, logsnr, label, z_context)

    monkeypatch.setattr(model, "base_eps", spy_eps)
    x = _clips(2, 12)
    one = stage.sample(model, 2, None, 1.0, torch.Generator().manual_seed(0), context=x)
    assert set(calls) == {0.0}  # guidance 1: the conditional model alone
    calls.clear()
    guided = stage.sample(model, 2, None, 3.0, torch.Generator().manual_seed(0), context=x)
    assert calls.count(0.0) == calls.count(1.0) > 0  # with and without the context
    assert not torch.allclose(one, guided)
    with pytest.raises(ConfigError, match=r"context_dropout=1.5 must be in \[0, 1\)"):
        _stage2(context_dropout=1.5)


def test_rollout_steps_without_a_latent_context_stop_with_one_line() -> None:
    with pytest.raises(ConfigError, match=r"rollout_steps=2 needs context_latent_steps > 0"):
        _stage2(context_latent_steps=0, rollout_steps=2)
    with pytest.raises(ConfigError, match=r"rollout_steps=-1"):
        _stage2(rollout_steps=-1)


# ---- the decoder conditioned on the context frames (`ul_joint.decoder_context_frames`) ---------
def _stage1_with_decoder_context(frames: int = CONTEXT) -> ULJoint:
    return ULJoint(
        encoder=lambda shape: ResNetEncoder(shape, **ENCODER),
        prior=lambda shape: ViT(shape, **VIT),
        decoder=lambda shape, latent_shape, **kw: UViTDecoder(shape, latent_shape, **DECODER, **kw),
        train=TrainSettings(batch_size=2, train_samples=2),
        decoder_context_frames=frames,
    )


def test_a_decoder_given_the_context_frames_reads_them_and_nothing_later(tmp_path: Path) -> None:
    """The decoder's output for the same z_0 and noise changes with the first k frames of the
    clip it continues, not with its later frames (what a continuation cannot know); decoding
    without the clips is one line."""
    from ulframe.diffusion.samplers import sample_ddim

    example = {"x": _clips(1, 0)[0], "label": torch.tensor(0)}
    torch.manual_seed(0)
    model = _stage1_with_decoder_context().build(
        BuildContext(example, 10, torch.device("cpu"), tmp_path)
    )
    assert model.decoder.context_channels == SHAPE[0]
    with torch.no_grad():
        for p in model.decoder.parameters():  # off the zero-initialised output
            p.add_(0.05 * torch.randn_like(p))
    a, b = _clips(2, 5), _clips(2, 6)
    later = a.clone()
    later[:, :, CONTEXT:] = b[:, :, CONTEXT:]  # the same first k frames, other later ones
    z_0 = torch.randn((2, *model.latent_shape), generator=torch.Generator().manual_seed(1))

    def decode(context: torch.Tensor | None) -> torch.Tensor:
        gen = torch.Generator().manual_seed(7)
        return model.decode_latents(z_0, gen, sample_ddim, 2, context=context)

    first = decode(a)
    assert torch.equal(first, decode(a)) and torch.equal(first, decode(later))
    assert not torch.allclose(first, decode(b), atol=1e-4)
    with pytest.raises(ValueError, match=r"conditioned on the first 3 frames of a clip"):
        decode(None)
    # the training loss reads them too: another context, another decoder term
    noise = torch.Generator().manual_seed(3)
    with torch.no_grad():
        terms_a = model({"x": a}, torch.Generator().manual_seed(3))
        terms_b = model({"x": torch.cat([b[:, :, :CONTEXT], a[:, :, CONTEXT:]], 2)}, noise)
    assert not torch.allclose(terms_a.decoder_nats, terms_b.decoder_nats)


def test_decoder_context_frames_that_do_not_fit_stop_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"decoder_context_frames must be >= 0, got -1"):
        _stage1_with_decoder_context(-1)
    for frames, x in ((8, _clips(1, 0)[0]), (3, torch.zeros(1, 16, 16))):
        with pytest.raises(ConfigError, match=rf"decoder_context_frames={frames} needs clips"):
            _stage1_with_decoder_context(frames).build(
                BuildContext({"x": x, "label": torch.tensor(0)}, 10, torch.device("cpu"), tmp_path)
            )


# ---- training on the model's own rounds (`ul_base.rollout_training`) -------------------------
def test_rollout_training_conditions_windows_on_the_models_own_steps(tmp_path, monkeypatch) -> None:
    """`rollout_training = 1`: before every training window at offset o the base model runs
    R = 2 rounds of a continuation (one chain each, no gradient) from the clip's true steps
    o - 2 .. o; the window learns the clip's true steps o .. o + W - 1 from a context of its
    first true step and the 2 generated after it ("given": the context's steps as they are, then
    the clip's). In evaluation the context is the true one."""
    _, model = _built(
        tmp_path, window_steps=5, rollout_steps=1, rollout_training=1.0,
        rollout_training_rounds=2, rollout_training_steps=2,
    )  # fmt: skip
    z = torch.arange(8.0)[None, None, :, None, None].expand(64, 2, 8, 4, 4).contiguous()
    z = z + torch.arange(64.0)[:, None, None, None, None] * 100  # step t of clip i: 100 i + t
    seen = _contexts_seen(model, monkeypatch)
    model.train()
    windows, context = model._inputs({"z": z}, torch.Generator().manual_seed(0))
    assert context is not None and not context.requires_grad
    offsets = (windows[:, 0, 0, 0, 0] - torch.arange(64.0) * 100).long()
    assert set(offsets.tolist()) == {2, 3}  # 2 rounds before a window of 5 in 8 steps
    assert len(seen) == 2  # one chain per round, every clip's in one batch
    for i, o in enumerate(offsets.tolist()):
        assert torch.equal(windows[i], z[i, :, o : o + 5])
        assert torch.equal(context[i, :, 0], z[i, :, o])  # the window's first step is true
        generated = context[i, :, 1:CONTEXT]
        assert (generated - z[i, :, o + 1 : o + CONTEXT]).abs().min() > 1  # the model's own
        last = context[i, :, CONTEXT - 1 : CONTEXT].expand(-1, 5 - CONTEXT, -1, -1)
        assert torch.equal(context[i, :, CONTEXT:], last)  # the last step repeated
        assert torch.equal(seen[0][i, :, :CONTEXT], z[i, :, o - 2 : o + 1])  # round 1: true
        assert torch.equal(seen[1][i, :, : CONTEXT - 1], z[i, :, o - 1 : o + 1])  # round 2
        assert torch.equal(seen[1][i, :, CONTEXT - 1], context[i, :, 1])  # round 1's step
    terms = model({"z": z[:4]}, torch.Generator().manual_seed(0))
    assert terms.base_nats.shape == (4,) and torch.isfinite(terms.base_nats).all()
    # "given": the window learns its context's steps as given, the clip's true steps after
    model.rollout_training_target = "given"
    given, context = model._inputs({"z": z}, torch.Generator().manual_seed(0))
    assert context is not None and torch.equal(given[:, :, :CONTEXT], context[:, :, :CONTEXT])
    assert torch.equal(given[:, :, CONTEXT:], windows[:, :, CONTEXT:])  # same draws, true steps
    model.eval()
    windows, context = model._inputs({"z": z}, torch.Generator().manual_seed(0))
    assert context is not None and torch.equal(context[:, :, :CONTEXT], windows[:, :, :CONTEXT])


def test_rollout_training_settings_that_cannot_work_stop_at_config_time(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"rollout_training=0.5 must be in \[0, 1\], and > 0"):
        _stage2(rollout_training=0.5)  # no windows
    with pytest.raises(ConfigError, match=r"rollout_training is not combined with"):
        _stage2(window_steps=5, rollout_steps=1, rollout_training=0.5, anchor_context=True)
    with pytest.raises(ConfigError, match=r"rollout_training_rounds and rollout_training_steps"):
        _stage2(window_steps=5, rollout_steps=1, rollout_training=0.5, rollout_training_steps=0)
    with pytest.raises(ConfigError, match=r"need more than the latent's 8 steps"):
        _built(tmp_path, window_steps=5, rollout_steps=1, rollout_training=0.5,
               rollout_training_rounds=4)  # fmt: skip


# ---- the context along the channels (`stack_context`) and the chains' temperature -------------
def test_a_stacked_context_is_the_last_steps_along_the_channels(tmp_path, monkeypatch) -> None:
    """`stack_context`: the base model denoises only the W - k steps of a window after its
    context and reads the k context steps stacked along the channels (step by step), in
    training and in every round of a continuation, which keeps the first step it generates."""
    stage, model = _built(tmp_path, window_steps=5, rollout_steps=1, stack_context=True)
    assert model.base_shape == (2, 2, 4, 4) and model.pixels == 2 * 16 * 16
    z = torch.arange(8.0)[None, None, :, None, None].expand(64, 2, 8, 4, 4).contiguous()
    z = z + torch.arange(64.0)[:, None, None, None, None] * 100  # step t of clip i: 100 i + t
    z[:, 1] += 50  # channel 1
    model.train()
    target, context = model._inputs({"z": z}, torch.Generator().manual_seed(0))
    assert target.shape == (64, 2, 2, 4, 4) and context is not None
    assert context.shape == (64, 2 * CONTEXT, 2, 4, 4)
    offsets = (target[:, 0, 0, 0, 0] - torch.arange(64.0) * 100).long() - CONTEXT
    assert set(offsets.tolist()) == {0, 1, 2, 3}
    for i, o in enumerate(offsets.tolist()):
        assert torch.equal(target[i], z[i, :, o + CONTEXT : o + 5])
        for s in range(CONTEXT):  # channels 2 s, 2 s + 1: step o + s, at both window steps
            assert torch.equal(
                context[i, 2 * s : 2 * s + 2], z[i, :, o + s : o + s + 1].expand(-1, 2, -1, -1)
            )
    terms = model({"z": z[:4]}, torch.Generator().manual_seed(0))
    assert terms.base_nats.shape == (4,) and torch.isfinite(terms.base_nats).all()
    # sampling: one chain of W - k steps per round, its context the last k known steps
    model.eval()
    x = _clips(2, 9)
    out, outputs, contexts, handed = _spied_continuation(stage, model, x, monkeypatch)
    assert len(outputs) == len(contexts) == SHAPE[1] - CONTEXT
    known = model.encode_clean(x)[:, :, :CONTEXT]
    for context, z_round in zip(contexts, outputs, strict=True):
        assert z_round.shape == (2, 2, 2, 4, 4)
        stacked = known[:, :, -CONTEXT:].transpose(1, 2).reshape(2, 2 * CONTEXT, 1, 4, 4)
        assert torch.equal(context, stacked.expand(-1, -1, 2, -1, -1))
        known = torch.cat([known, z_round[:, :, :1]], 2)
    assert torch.equal(handed[0][:, :, CONTEXT:], known[:, :, CONTEXT:])
    assert torch.equal(out[:, :, :CONTEXT], x[:, :, :CONTEXT])
    with pytest.raises(ConfigError, match=r"stack_context=True needs window_steps > 0"):
        _stage2(stack_context=True, rollout_steps=1)
    with pytest.raises(ConfigError, match=r"and no anchor_context"):
        _stage2(stack_context=True, window_steps=5, rollout_steps=1, anchor_context=True)


def test_temperature_scales_the_chains_starting_noise(tmp_path, monkeypatch) -> None:
    """`temperature` τ: every base-model chain starts from τ z_1 (the same z_1 the model at
    τ = 1 starts from); at τ = 0 with a deterministic sampler the base latents no longer depend
    on the seed. `decoder_sampler` is the sampler the decoder runs."""
    from ulframe.diffusion.samplers import sample_dpmpp_2m, sample_heun

    stage, model = _built(
        tmp_path, window_steps=5, rollout_steps=1, sampler=sample_dpmpp_2m,
        decoder_sampler=sample_heun,
    )  # fmt: skip
    x = _clips(2, 10)
    starts: list[torch.Tensor] = []
    chains = ul_base.sample_latents

    def spy_chain(eps_cond, eps_uncond, z_1, schedule, sampler, *args, **kwargs):
        assert sampler is sample_dpmpp_2m
        starts.append(z_1)
        return chains(eps_cond, eps_uncond, z_1, schedule, sampler, *args, **kwargs)

    samplers: list[object] = []
    decode = model.latents().decode_latents

    def spy_decode(z_0, generator, sampler, *args, **kwargs):
        samplers.append(sampler)
        return decode(z_0, generator, sampler, *args, **kwargs)

    monkeypatch.setattr(model.stage1, "decode_latents", spy_decode)
    monkeypatch.setattr(ul_base, "sample_latents", spy_chain)
    stage.sample(model, 2, None, None, torch.Generator().manual_seed(0), context=x)
    assert samplers == [sample_heun]
    one = list(starts)
    starts.clear()
    model.temperature = 0.25
    stage.sample(model, 2, None, None, torch.Generator().manual_seed(0), context=x)
    assert len(starts) == len(one) == SHAPE[1] - CONTEXT
    assert torch.equal(starts[0], 0.25 * one[0])  # the same draws, scaled
    handed = _latents_decoded(model, monkeypatch)
    model.temperature = 0.0
    for seed in (0, 1):
        stage.sample(model, 2, None, None, torch.Generator().manual_seed(seed), context=x)
    assert torch.allclose(handed[0][:, :, CONTEXT:], handed[1][:, :, CONTEXT:], atol=1e-5)
    assert not torch.allclose(handed[0][:, :, :CONTEXT], handed[1][:, :, :CONTEXT])  # z_0 noise
    with pytest.raises(ConfigError, match=r"ul_base.temperature must be >= 0, got -1"):
        _stage2(temperature=-1.0)


def test_a_trained_base_model_continues_each_clip_from_its_own_last_step(
    tmp_path, monkeypatch
) -> None:
    """After a short training on clips that stand still (each clip one random frame, repeated),
    the first latent step a continuation generates is nearer its own clip's last context step
    than any other clip's: the context reaches the generated steps. Fails when the base model
    does not read the context, or reads another clip's."""
    from ulframe.diffusion.samplers import sample_dpmpp_2m

    stage, model = _built(
        tmp_path, window_steps=4, rollout_steps=1, stack_context=True, sampler=sample_dpmpp_2m,
        sample_steps=8, temperature=0.0,
    )  # fmt: skip
    frames = _clips(24, 11)[:, :, :1]
    clips = frames.expand(-1, -1, SHAPE[1], -1, -1).contiguous()  # (24, C, T, H, W), still
    latents = model.encode_clean(clips)
    optimizer = torch.optim.Adam(model.base.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(300):
        rows = torch.randint(len(clips), (16,), generator=generator)
        loss = model({"z": latents[rows]}, generator).base_nats.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    handed = _latents_decoded(model, monkeypatch)
    stage.sample(model, len(clips), None, None, torch.Generator().manual_seed(1), context=clips)
    first = handed[0][:, :, CONTEXT].flatten(1)  # the first generated step, at λ_z(0)
    last = latents[:, :, CONTEXT - 1].flatten(1)  # each clip's last context step
    distance = torch.cdist(first, last)  # (generated clip, context clip)
    own = distance.diagonal()
    others = distance + torch.diag(torch.full((len(clips),), float("inf")))
    assert bool((own < others.min(1).values).all()), (own, others.min(1).values)
