"""The video contract: every built-in network plugin also works on clips (B, C, T, H, W).

The image contract (test_contract.py) checks each network on (B, 3, 16, 16); here the same
classes are built for (B, 3, 8, 16, 16) clips with per-axis (T, H, W) factors, as
gin/presets/tiny_video.gin does, and must give the right shapes, finite values, gradients for
every parameter, seeded determinism and a state-dict round trip. A built-in network without
video settings below fails `test_every_builtin_network_has_video_kwargs`.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from torch import nn

from ulframe.protocols import check_built
from ulframe.registry import Entry, Registry

REGISTRY = Registry()
CORE_DISTRIBUTION = "ulframe"
VIDEO_KINDS = ("encoders", "priors", "decoders")

BATCH = 2
VIDEO_SHAPE = (3, 8, 16, 16)  # (C, T, H, W)
LATENT_SHAPE = (4, 4, 4, 4)  # (Cz, t, h, w): the tiny encoder's 2x4x4 down-sampling
NUM_CLASSES = 3

VIDEO_KWARGS: dict[tuple[str, str], dict[str, Any]] = {
    ("encoders", "resnet"): dict(
        latent_channels=4, channels=(8, 16), blocks_per_stage=(1, 1), patch_size=(1, 2, 2),
        stage_downsample=((2, 2, 2),),
    ),
    ("priors", "vit"): dict(widths=(32, 48), depths=(1, 1), heads=2, patch_size=1),
    ("priors", "normal"): {},
    ("decoders", "uvit"): dict(
        channels=(16,), blocks_per_stage=1, width=32, depth=1, heads=2, patch_size=(1, 2, 2),
        stage_downsample=((2, 2, 2),), dropout=0.0,
    ),
}  # fmt: skip


def _entries() -> list[Any]:
    return [
        pytest.param(e, id=f"{kind}.{e.name}")
        for kind in VIDEO_KINDS
        for e in REGISTRY.entries(kind)
        if (kind, e.name) in VIDEO_KWARGS
    ]


def _build(entry: Entry, seed: int = 0, **extra: Any) -> nn.Module:
    torch.manual_seed(seed)
    supplied = {
        "encoders": {"shape": VIDEO_SHAPE},
        "priors": {"shape": LATENT_SHAPE, "num_classes": 0},
        "decoders": {"shape": VIDEO_SHAPE, "latent_shape": LATENT_SHAPE},
    }[entry.kind]
    module = entry.factory(**(supplied | extra), **VIDEO_KWARGS[(entry.kind, entry.name)])
    module = check_built(entry.kind, module, entry.origin)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # zero-initialised output layers would make every check vacuous
        for p in module.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return module


def _inputs(kind: str) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(2)
    x = torch.rand((BATCH, *VIDEO_SHAPE), generator=gen) * 2 - 1
    logsnr = torch.tensor([-5.0, 3.0])
    z = torch.randn((BATCH, *LATENT_SHAPE), generator=gen)
    return {"encoders": (x,), "priors": (z, logsnr), "decoders": (x, logsnr, z)}[kind]


def _expected(kind: str) -> tuple[int, ...]:
    return (BATCH, *(LATENT_SHAPE if kind in ("encoders", "priors") else VIDEO_SHAPE))


def test_every_builtin_network_has_video_kwargs() -> None:
    missing = [
        f"{kind}.{e.name}"
        for kind in VIDEO_KINDS
        for e in REGISTRY.entries(kind)
        if e.distribution == CORE_DISTRIBUTION and (kind, e.name) not in VIDEO_KWARGS
    ]
    assert missing == []


@pytest.mark.parametrize("entry", _entries())
def test_video_shapes_finite_and_every_parameter_learns(entry: Entry) -> None:
    module = _build(entry).train()
    out = module(*_inputs(entry.kind))
    assert out.shape == _expected(entry.kind) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:  # a parameter-free network (priors.normal): nothing to learn
        return
    out.square().mean().backward()
    no_grad = [n for n, p in module.named_parameters() if p.grad is None or not p.grad.any()]
    assert no_grad == [], f"parameters without gradient on video: {no_grad[:5]}"


@pytest.mark.parametrize("entry", _entries())
def test_video_seeded_determinism_and_state_dict_round_trip(entry: Entry) -> None:
    source, fresh = _build(entry, seed=0).eval(), _build(entry, seed=5).eval()
    with torch.no_grad():
        expected = source(*_inputs(entry.kind))
        assert torch.equal(expected, _build(entry, seed=0).eval()(*_inputs(entry.kind)))
        buffer = io.BytesIO()
        torch.save(source.state_dict(), buffer)
        buffer.seek(0)
        fresh.load_state_dict(torch.load(buffer, weights_only=True))
        assert torch.equal(fresh(*_inputs(entry.kind)), expected)


def test_video_prior_takes_a_context_and_labels() -> None:
    """The base model of a clip-continuing stage 2: class labels and a context latent (the
    latent of the first frames, concatenated along channels) both change the prediction."""
    (entry,) = [e for e in REGISTRY.entries("priors") if e.name == "vit"]
    module = _build(entry, num_classes=NUM_CLASSES, context_channels=LATENT_SHAPE[0]).eval()
    z_t, logsnr = _inputs("priors")
    context = torch.randn((BATCH, *LATENT_SHAPE), generator=torch.Generator().manual_seed(9))
    labels = torch.arange(BATCH) % NUM_CLASSES
    with torch.no_grad():
        out = module(z_t, logsnr, labels, context=context)
        assert out.shape == _expected("priors")
        assert not torch.equal(out, module(z_t, logsnr, None, context=context))
        assert not torch.equal(out, module(z_t, logsnr, labels, context=torch.zeros_like(context)))
    with pytest.raises(ValueError, match="context"):
        module(z_t, logsnr, labels)  # built for a context: refusing to run without one
