"""Contract suite: every registered plugin of every kind honours its kind's contract.

The entries are discovered through the real entry points (``ulframe.registry.Registry()``), so an
installed third-party plugin is checked too. Each entry is built with tiny keyword arguments
(:data:`TINY_KWARGS`, per ``(kind, name)``; kinds whose factories need none are tried with their
defaults) plus what the engine supplies (``ulframe.protocols.SUPPLIED_BY_ENGINE``). An entry with
no tiny arguments is skipped with a reason (built-in entries never are: see
:func:`test_every_builtin_entry_has_tiny_kwargs`).

Checks, per kind:

- every kind: the product provides the protocol (``check_built``) and the entry is bindable from
  gin (``ulframe.wiring.register``; ``f.x = @kind.name`` resolves and building through gin gives
  what building directly gives);
- networks (encoders, priors, decoders, ae_decoders): shapes and float32 dtype on 2-D (image)
  inputs, seeded determinism, state-dict round trip into a fresh instance (and through
  ``torch.save`` with ``weights_only=True``); ae_decoders take the latent alone, ``D(z) -> x``;
- weightings: same shape out as in, finite and non-negative on λ ∈ [-20, 20];
- schedules: exact endpoints, strictly decreasing, ``-dλ/dt > 0`` and equal to a finite
  difference, ``t_from_logsnr`` inverts ``logsnr``;
- samplers: with the eps-predictor of a point mass they return the point; seeded determinism;
- datasets: each split's Source decodes to ``float32 (3, H, W)`` (video: ``(3, T, H, W)``) in
  [-1, 1] with a valid label, is picklable and deterministic (``image_folder`` runs on a
  temporary tree of 3 PNGs, ``kinetics`` on one of 3 MPEG-4 videos);
- metrics: a dict of finite floats, deterministic (``fid_inception`` on a random-init state dict
  at 75 px: the real weights are never downloaded).
"""

from __future__ import annotations

import io
import math
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gin
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ulframe import wiring
from ulframe.data import Source, first_example
from ulframe.diffusion import CosineSchedule, alpha_sigma, expand_like, logsnr_grid
from ulframe.protocols import SUPPLIED_BY_ENGINE, check_built
from ulframe.registry import KINDS, Entry, Registry

REGISTRY = Registry()  # real discovery through the installed entry points

NETWORK_KINDS = ("encoders", "priors", "decoders", "ae_decoders")
CONTRACT_KINDS = (*NETWORK_KINDS, "weightings", "schedules", "samplers", "datasets", "metrics")
CORE_DISTRIBUTION = "ulframe"

BATCH = 2
IMAGE_SHAPE = (3, 16, 16)  # (C, H, W): 2-D inputs
LATENT_SHAPE = (4, 4, 4)  # (Cz, h, w): what the tiny encoder makes of IMAGE_SHAPE
NUM_CLASSES = 3  # for the class-conditional prior check
LOGSNR_RANGE = (-10.0, 10.0)  # noise levels fed to the networks
WEIGHTING_LOGSNR_RANGE = (-20.0, 20.0)  # PAPER-scale λ range on which weightings must be finite
SCHEDULE_ENDPOINTS = ((-15.0, 5.0), (-10.0, 15.0))  # (λ_min, λ_max): latent prior and pixels
SCHEDULE_RESOLUTION = 16
SAMPLER_STEPS = 6
PERTURB_STD = 0.1  # std of the values given to zero-initialised parameters

# Tiny keyword arguments per (kind, name): the hyperparameters gin would bind. Networks need them
# (their defaults are the paper's ImageNet sizes); other kinds default to {} (factory defaults).
TINY_KWARGS: dict[tuple[str, str], dict[str, Any]] = {
    ("encoders", "resnet"): dict(
        latent_channels=4, channels=(8, 16), blocks_per_stage=(1, 1), patch_size=2
    ),
    ("priors", "vit"): dict(widths=(32,), depths=(1,), heads=2, patch_size=1, dropout=0.1),
    ("priors", "normal"): {},  # parameter-free: the exact denoiser of N(0, I)
    ("decoders", "uvit"): dict(
        channels=(16,), blocks_per_stage=1, width=32, depth=1, heads=2, patch_size=2, dropout=0.1
    ),
    ("ae_decoders", "conv"): dict(channels=(8, 16), blocks_per_stage=(1, 1), patch_size=2),
    ("weightings", "elbo"): {},
    ("weightings", "sigmoid"): dict(bias=0.5),
    ("schedules", "cosine"): {},
    ("schedules", "linear"): {},
    ("schedules", "shifted_cosine"): dict(reference_resolution=32),
    ("samplers", "ancestral"): {},
    ("samplers", "ddim"): {},
    ("datasets", "photos"): dict(resolution=16, crops_per_epoch=4, eval_crops=2, seed=3),
    ("datasets", "image_folder"): dict(resolution=16),  # + root: a temporary tree, see below
    ("datasets", "kinetics"): dict(resolution=16, num_frames=4),  # + root: temporary videos
    ("datasets", "moving_photos"): dict(
        resolution=16, num_frames=4, clips_per_epoch=4, eval_clips=2, seed=3
    ),
    ("datasets", "digits"): dict(resolution=16, channels=3),  # 3: the contract's (3, H, W)
    ("datasets", "moving_digits"): dict(
        resolution=16, num_frames=4, channels=3, clips_per_epoch=4, eval_clips=2, seed=3
    ),
    ("metrics", "psnr"): {},
    ("metrics", "fd_photos"): {},  # the shipped weights
    ("metrics", "fd_digits"): {},  # the shipped weights
    ("metrics", "fid_inception"): dict(input_size=75),  # + weights_path: random init, see below
    ("metrics", "fvd_i3d"): dict(input_size=16),  # + weights: a tiny TorchScript net, see below
}
NEEDS_TINY_KWARGS = {*NETWORK_KINDS, "datasets"}  # kinds whose defaults are not tiny / not usable


@gin.configurable("contract_probe", module="ulframe_tests")
def contract_probe(value: Any = None) -> Any:
    """Returns what gin binds to `value`: the probe of the bindable-from-gin check."""
    return value


def params(kinds: tuple[str, ...]) -> list[Any]:
    """One pytest param per registered entry of `kinds`, id `kind.name`."""
    return [
        pytest.param(entry, id=f"{kind}.{entry.name}")
        for kind in kinds
        for entry in REGISTRY.entries(kind)
    ]


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny networks run fastest on one thread (the CPU is small and shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photo_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<root>/train/<class>/<image>: 3 random PNGs in 2 classes (no val: 1 image is held out)."""
    root = tmp_path_factory.mktemp("image_folder")
    rng = np.random.default_rng(0)
    for i, cls in enumerate(("cats", "cats", "dogs")):
        folder = root / "train" / cls
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(20 + 4 * i, 24, 3), dtype=np.uint8)  # (H, W, 3)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def video_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<root>/train/<class>/<video>.mp4: 3 MPEG-4 videos of 8 random frames in 2 classes (no
    val: 1 video is held out)."""
    import av

    root = tmp_path_factory.mktemp("kinetics")
    rng = np.random.default_rng(0)
    for i, cls in enumerate(("cats", "cats", "dogs")):
        folder = root / "train" / cls
        folder.mkdir(parents=True, exist_ok=True)
        with av.open(str(folder / f"{i}.mp4"), mode="w") as container:
            stream = container.add_stream("mpeg4", rate=25)
            stream.width, stream.height, stream.pix_fmt = 24, 20 + 4 * i, "yuv420p"
            for _ in range(8):
                pixels = rng.integers(0, 256, size=(stream.height, 24, 3), dtype=np.uint8)
                frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
    return root


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init FID Inception-v3 state dict (the real weights are never downloaded)."""
    from ulframe_plugins.metrics.fid_inception import FIDInceptionV3

    path = tmp_path_factory.mktemp("fid_inception") / "random_init.pt"
    torch.manual_seed(0)
    torch.save(FIDInceptionV3().state_dict(), path)
    return path


class _TinyI3D(torch.nn.Module):
    """A TorchScript module with the I3D detector's call (the real weights are never
    downloaded): per-channel mean and deviation of the clip as its 6 features."""

    def forward(
        self,
        x: torch.Tensor,
        rescale: bool = False,
        resize: bool = False,
        return_features: bool = False,
    ) -> torch.Tensor:
        return torch.cat([x.mean((2, 3, 4)), x.std((2, 3, 4))], 1)


@pytest.fixture(scope="module")
def i3d_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import warnings

    path = tmp_path_factory.mktemp("fvd_i3d") / "tiny_i3d.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated
        torch.jit.script(_TinyI3D()).save(str(path))
    return path


@pytest.fixture
def tiny(request: pytest.FixtureRequest, photo_tree: Path) -> Callable[[Entry], dict[str, Any]]:
    """tiny(entry) -> the entry's tiny kwargs; skips entries that have none."""

    def get(entry: Entry) -> dict[str, Any]:
        key = (entry.kind, entry.name)
        if key not in TINY_KWARGS:
            if entry.kind in NEEDS_TINY_KWARGS:
                pytest.skip(
                    f"{entry.origin}: no tiny kwargs for this third-party {entry.kind} plugin; "
                    "add an entry to TINY_KWARGS in tests/contract/test_contract.py to check it"
                )
            return {}
        kwargs = dict(TINY_KWARGS[key])
        if key == ("datasets", "image_folder"):
            kwargs["root"] = str(photo_tree)
        if key == ("datasets", "kinetics"):
            kwargs["root"] = str(request.getfixturevalue("video_tree"))
        if key == ("metrics", "fid_inception"):
            kwargs["weights_path"] = str(request.getfixturevalue("fid_weights"))
        if key == ("metrics", "fvd_i3d"):
            kwargs["weights"] = str(request.getfixturevalue("i3d_weights"))
        return kwargs

    return get


@pytest.fixture
def wired(monkeypatch: pytest.MonkeyPatch):
    """gin with every discovered entry registered (ulframe.wiring); bindings cleared after."""
    # bitsandbytes takes ~6 s to import on a CPU machine and has nothing to do with plugins.
    monkeypatch.setattr(wiring, "_bnb_optimizers", dict)
    wiring.register(REGISTRY)
    yield
    gin.clear_config()


# ---------------------------------------------------------------------------------- builders


def supplied(kind: str) -> dict[str, Any]:
    """What the engine passes a factory of `kind` (ulframe.protocols.SUPPLIED_BY_ENGINE)."""
    values = {
        "encoders": {"shape": IMAGE_SHAPE},
        "priors": {"shape": LATENT_SHAPE, "num_classes": 0},
        "decoders": {"shape": IMAGE_SHAPE, "latent_shape": LATENT_SHAPE},
        "ae_decoders": {"shape": IMAGE_SHAPE, "latent_shape": LATENT_SHAPE},
        "schedules": {
            "logsnr_min": SCHEDULE_ENDPOINTS[0][0],
            "logsnr_max": SCHEDULE_ENDPOINTS[0][1],
            "resolution": SCHEDULE_RESOLUTION,
        },
    }.get(kind, {})
    assert set(values) == SUPPLIED_BY_ENGINE.get(kind, set()) - {"eps_fn", "x_1", "logsnrs"}
    return values


def build(entry: Entry, kwargs: dict[str, Any], seed: int = 0, factory: Any = None) -> Any:
    """The entry's product (samplers are functions: the factory itself), seeded."""
    if entry.kind == "samplers":
        return factory or entry.factory
    torch.manual_seed(seed)
    return (factory or entry.factory)(**supplied(entry.kind), **kwargs)


def perturb_zero_init_(module: nn.Module, seed: int = 1) -> nn.Module:
    """Give every all-zero parameter seeded random values (zero-init output layers make an
    untrained network's output identically 0, which would make every check below vacuous)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(PERTURB_STD * torch.randn(p.shape, generator=gen))
    return module


def network_inputs(kind: str, seed: int = 2) -> tuple[torch.Tensor, ...]:
    """Positional inputs of a network of `kind`, in the protocol's call order."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((BATCH, *IMAGE_SHAPE), generator=gen) * 2 - 1  # (B, C, H, W) in [-1, 1]
    low, high = LOGSNR_RANGE
    logsnr = low + (high - low) * torch.rand(BATCH, generator=gen)  # (B,)
    z = torch.randn((BATCH, *LATENT_SHAPE), generator=gen)  # (B, Cz, h, w)
    return {
        "encoders": (x,),
        "priors": (z, logsnr),
        "decoders": (x, logsnr, z),
        "ae_decoders": (z,),  # a deterministic decoder: the latent alone
    }[kind]


def metric_inputs(metric: Any, seed: int = 2) -> torch.Tensor:
    """Images (B, C, H, W) for an image metric; clips (B, 3, 10, H, W) for a video metric
    (`metric.inputs == "videos"`), the images moving one pixel per frame."""
    x = network_inputs("decoders", seed)[0]
    if getattr(metric, "inputs", "images") != "videos":
        return x
    return torch.stack([x.roll(k, -1) for k in range(10)], 2)[:, :3]


def expected_shape(kind: str) -> tuple[int, ...]:
    return (BATCH, *(LATENT_SHAPE if kind in ("encoders", "priors") else IMAGE_SHAPE))


def point_mass_eps_fn(point: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The exact eps-predictor of data that is always `point`: eps = (x_t - alpha x) / sigma."""

    def eps_fn(x_t: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        alpha, sigma = alpha_sigma(expand_like(logsnr, x_t))
        return (x_t - alpha * point) / sigma

    return eps_fn


def sampler_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(point in [-0.9, 0.9], x_1 ~ N(0, I), an increasing log-SNR grid) of `dtype`."""
    gen = torch.Generator().manual_seed(4)
    point = torch.rand((BATCH, *IMAGE_SHAPE), generator=gen, dtype=torch.float64) * 1.8 - 0.9
    x_1 = torch.randn((BATCH, *IMAGE_SHAPE), generator=gen, dtype=torch.float64)
    grid = logsnr_grid(CosineSchedule(-15.0, 15.0), SAMPLER_STEPS)  # (N + 1,)
    return point.to(dtype), x_1.to(dtype), grid.to(dtype)


def fingerprint(kind: str, obj: Any) -> dict[str, Any]:
    """What an entry's product computes on fixed inputs: equal fingerprints, equal behaviour."""
    if kind in NETWORK_KINDS:
        perturb_zero_init_(obj).eval()
        with torch.no_grad():
            return {"out": obj(*network_inputs(kind))}
    if kind == "weightings":
        return {"w": obj(torch.linspace(*WEIGHTING_LOGSNR_RANGE, 101, dtype=torch.float64))}
    if kind == "schedules":
        t = torch.linspace(0, 1, 11, dtype=torch.float64)
        return {"logsnr": obj.logsnr(t), "neg_dlogsnr_dt": obj.neg_dlogsnr_dt(t)}
    if kind == "samplers":
        point, x_1, grid = sampler_inputs(torch.float64)
        gen = torch.Generator().manual_seed(5)
        return {"x_0": obj(point_mass_eps_fn(point), x_1, grid, generator=gen)}
    if kind == "datasets":
        return {"num_classes": obj.num_classes, "x": first_example(obj.source("eval"))["x"]}
    if kind == "metrics":
        ref, est = metric_inputs(obj), metric_inputs(obj, seed=3)
        return obj(ref, est)
    raise AssertionError(f"no fingerprint for kind {kind}")


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


# ------------------------------------------------------------------------------ registry


def test_registry_discovers_every_builtin_kind():
    for kind in (*CONTRACT_KINDS, "stages", "hooks"):
        assert REGISTRY.entries(kind), f"no {kind} entry discovered: is the project installed?"


@pytest.mark.parametrize("kind", KINDS)
def test_no_entry_failed_to_load(kind: str):
    assert REGISTRY.broken(kind) == []


def test_every_builtin_entry_has_tiny_kwargs():
    """Built-in entries of the contract kinds are never skipped for lack of tiny kwargs."""
    missing = [
        f"{e.kind}.{e.name}"
        for kind in CONTRACT_KINDS
        for e in REGISTRY.entries(kind)
        if e.distribution == CORE_DISTRIBUTION and (kind, e.name) not in TINY_KWARGS
    ]
    assert missing == []


# ------------------------------------------------------------------------------ every kind


@pytest.mark.parametrize("entry", params(CONTRACT_KINDS))
def test_product_provides_protocol(entry: Entry, tiny):
    obj = build(entry, tiny(entry))
    assert check_built(entry.kind, obj, entry.origin) is obj


@pytest.mark.parametrize("entry", params(KINDS))
def test_bindable_from_gin(entry: Entry, wired):
    """`f.value = @kind.name` parses and resolves to the registered factory."""
    gin.parse_config([f"contract_probe.value = @{entry.kind}.{entry.name}"])
    configurable = gin.get_configurable(f"{entry.kind}.{entry.name}")
    bound = contract_probe()
    assert bound is configurable
    if isinstance(entry.factory, type):
        assert issubclass(configurable, entry.factory)
    else:
        assert configurable.__wrapped__ is entry.factory


@pytest.mark.parametrize("entry", params(CONTRACT_KINDS))
def test_built_through_gin_equals_built_directly(entry: Entry, tiny, wired):
    """Hyperparameters bound in gin reach the factory: same product as a direct call.

    Classes are referenced as factories (`@encoders.resnet`, the engine calls them) except for
    kinds gin builds itself (`@weightings.sigmoid()`, `@datasets.photos()`, `@metrics.psnr()`).
    """
    kwargs = tiny(entry)
    selector = f"{entry.kind}.{entry.name}"
    gin_called = entry.kind in ("weightings", "datasets", "metrics")
    bindings = [f"{selector}.{k} = {v!r}" for k, v in kwargs.items()]
    bindings.append(f"contract_probe.value = @{selector}{'()' if gin_called else ''}")
    gin.parse_config(bindings)
    if gin_called:
        via_gin = contract_probe()
    else:
        via_gin = build(entry, {}, factory=contract_probe())
    assert isinstance(via_gin, entry.factory) if isinstance(entry.factory, type) else True
    assert_same(fingerprint(entry.kind, via_gin), fingerprint(entry.kind, build(entry, kwargs)))


# ------------------------------------------------------------------------------ networks


@pytest.mark.parametrize("entry", params(NETWORK_KINDS))
def test_network_shapes_and_dtype_on_images(entry: Entry, tiny):
    module = perturb_zero_init_(build(entry, tiny(entry)))
    out = module(*network_inputs(entry.kind))
    assert out.shape == expected_shape(entry.kind)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    if entry.kind == "encoders":
        assert out.shape[1] == module.latent_channels


@pytest.mark.parametrize("entry", params(("priors",)))
def test_prior_class_conditioning(entry: Entry, tiny):
    """A prior built with num_classes > 0 takes labels (and label=None, the null label)."""
    torch.manual_seed(0)
    module = entry.factory(shape=LATENT_SHAPE, num_classes=NUM_CLASSES, **tiny(entry))
    module = perturb_zero_init_(check_built("priors", module, entry.origin)).eval()
    assert module.num_classes == NUM_CLASSES
    z_t, logsnr = network_inputs("priors")
    labels = torch.arange(BATCH) % NUM_CLASSES
    if not _learns(entry, tiny):  # takes labels, but has nothing that could depend on them
        with torch.no_grad():
            assert module(z_t, logsnr, labels).shape == module(z_t, logsnr).shape
        return
    with torch.no_grad():
        conditional = module(z_t, logsnr, labels)
        unconditional = module(z_t, logsnr)
    assert conditional.shape == unconditional.shape == expected_shape("priors")
    assert not torch.equal(conditional, unconditional)


@pytest.mark.parametrize("entry", params(NETWORK_KINDS))
def test_network_seeded_determinism(entry: Entry, tiny):
    """Same seed: identical weights and identical (train-mode, dropout on) outputs."""

    def run(build_seed: int, forward_seed: int) -> torch.Tensor:
        module = perturb_zero_init_(build(entry, tiny(entry), seed=build_seed)).train()
        torch.manual_seed(forward_seed)
        return module(*network_inputs(entry.kind)).detach()

    first = run(0, 10)
    assert torch.equal(first, run(0, 10))
    if _learns(entry, tiny):  # the seed matters: the check is not vacuous
        assert not torch.equal(first, run(1, 10))


def _learns(entry: Entry, tiny) -> bool:
    """False for a parameter-free network (`priors.normal`: the exact denoiser of N(0, I)),
    whose output no seed and no weights can change."""
    return any(True for _ in build(entry, tiny(entry)).parameters())


@pytest.mark.parametrize("entry", params(NETWORK_KINDS))
def test_network_state_dict_round_trip(entry: Entry, tiny):
    """Weights loaded into a fresh instance (built with another seed) give identical outputs;
    the state dict holds only tensors and survives torch.save / torch.load(weights_only=True)."""
    inputs = network_inputs(entry.kind)
    source = perturb_zero_init_(build(entry, tiny(entry), seed=0)).eval()
    fresh = build(entry, tiny(entry), seed=1).eval()
    with torch.no_grad():
        expected = source(*inputs)
        if _learns(entry, tiny):
            assert not torch.equal(expected, fresh(*inputs))
    state = source.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.no_grad():
        assert torch.equal(fresh(*inputs), expected)


# ------------------------------------------------------------------------------ weightings


@pytest.mark.parametrize("entry", params(("weightings",)))
@pytest.mark.parametrize("shape", [(), (7,), (3, 5)], ids=["0d", "B", "BxK"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_weighting_keeps_shape_and_dtype(entry: Entry, tiny, shape, dtype):
    w = build(entry, tiny(entry))
    logsnr = torch.linspace(*WEIGHTING_LOGSNR_RANGE, math.prod(shape), dtype=dtype).reshape(shape)
    out = w(logsnr)
    assert out.shape == logsnr.shape
    assert out.dtype == dtype


@pytest.mark.parametrize("entry", params(("weightings",)))
def test_weighting_finite_and_nonnegative(entry: Entry, tiny):
    w = build(entry, tiny(entry))
    for dtype in (torch.float32, torch.float64):
        out = w(torch.linspace(*WEIGHTING_LOGSNR_RANGE, 401, dtype=dtype))
        assert torch.isfinite(out).all()
        assert (out >= 0).all()
    grid = torch.linspace(*WEIGHTING_LOGSNR_RANGE, 401)
    assert torch.equal(w(grid), w(grid.clone()))  # a pure function of λ


# ------------------------------------------------------------------------------ schedules


@pytest.mark.parametrize("entry", params(("schedules",)))
@pytest.mark.parametrize("endpoints", SCHEDULE_ENDPOINTS, ids=lambda e: f"{e[0]:g}..{e[1]:g}")
@pytest.mark.parametrize("resolution", [None, SCHEDULE_RESOLUTION], ids=["nores", "res16"])
def test_schedule_contract(entry: Entry, tiny, endpoints, resolution):
    logsnr_min, logsnr_max = endpoints
    schedule = entry.factory(
        logsnr_min=logsnr_min, logsnr_max=logsnr_max, resolution=resolution, **tiny(entry)
    )
    check_built("schedules", schedule, entry.origin)
    assert (schedule.logsnr_min, schedule.logsnr_max) == (logsnr_min, logsnr_max)
    ends = schedule.logsnr(torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(ends, torch.tensor([logsnr_max, logsnr_min], dtype=torch.float64))

    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    logsnr = schedule.logsnr(t)
    assert (logsnr[1:] < logsnr[:-1]).all(), "λ(t) must decrease strictly"
    neg_dlogsnr_dt = schedule.neg_dlogsnr_dt(t)
    assert (neg_dlogsnr_dt > 0).all() and torch.isfinite(neg_dlogsnr_dt).all()
    # central finite difference of λ on the interior
    h = 1e-6
    inner = t[1:-1]
    fd = -(schedule.logsnr(inner + h) - schedule.logsnr(inner - h)) / (2 * h)
    torch.testing.assert_close(schedule.neg_dlogsnr_dt(inner), fd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(schedule.t_from_logsnr(logsnr), t, rtol=0, atol=1e-9)

    t32 = t.float()[::50]
    for method in (schedule.logsnr, schedule.neg_dlogsnr_dt):
        out = method(t32.reshape(3, 7))
        assert out.shape == (3, 7) and out.dtype == torch.float32


# ------------------------------------------------------------------------------ samplers


@pytest.mark.parametrize("entry", params(("samplers",)))
def test_sampler_returns_the_point_of_a_point_mass(entry: Entry):
    sampler = entry.factory
    point, x_1, grid = sampler_inputs(torch.float64)
    gen = torch.Generator().manual_seed(0)
    x_0 = sampler(point_mass_eps_fn(point), x_1, grid, generator=gen)
    torch.testing.assert_close(x_0, point, rtol=0, atol=1e-9)
    clipped = sampler(point_mass_eps_fn(point), x_1, grid, generator=gen, clip_x=1.0)
    torch.testing.assert_close(clipped, point, rtol=0, atol=1e-9)

    point, x_1, grid = sampler_inputs(torch.float32)
    x_0 = sampler(point_mass_eps_fn(point), x_1, grid, generator=gen)
    assert x_0.shape == point.shape and x_0.dtype == torch.float32
    torch.testing.assert_close(x_0, point, rtol=0, atol=1e-4)


@pytest.mark.parametrize("entry", params(("samplers",)))
def test_sampler_seeded_determinism(entry: Entry):
    """Same generator seed, same samples (with a model that does not know the answer)."""
    _, x_1, grid = sampler_inputs(torch.float32)

    def eps_fn(x_t: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        return 0.5 * x_t  # any smooth model

    def run(seed: int) -> torch.Tensor:
        return entry.factory(eps_fn, x_1, grid, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(0), run(0))


# ------------------------------------------------------------------------------ datasets


@pytest.mark.parametrize("entry", params(("datasets",)))
@pytest.mark.parametrize("split", ["train", "eval"])
def test_dataset_source_yields_examples_in_range(entry: Entry, tiny, split: str):
    dataset = check_built("datasets", build(entry, tiny(entry)), entry.origin)
    assert isinstance(dataset.num_classes, int) and dataset.num_classes >= 0
    source = dataset.source(split)
    assert isinstance(source, Source)
    assert len(source.items) > 0
    example = source.decode(source.items[0])
    x = example["x"]
    assert x.dtype == torch.float32
    kwargs = tiny(entry)
    frames = (kwargs["num_frames"],) if "num_frames" in kwargs else ()  # video: (C, T, H, W)
    assert x.shape == (3, *frames, kwargs["resolution"], kwargs["resolution"])
    assert -1.0 <= float(x.min()) < float(x.max()) <= 1.0
    assert 0 <= int(example["label"]) < max(dataset.num_classes, 1)
    clone = pickle.loads(pickle.dumps(source))  # sources go to worker processes
    assert len(clone.items) == len(source.items)


@pytest.mark.parametrize("entry", params(("datasets",)))
def test_dataset_seeded_determinism(entry: Entry, tiny):
    """Two datasets built alike decode the same first example (engine-seeded augmentation)."""
    first = first_example(build(entry, tiny(entry)).source("train"))
    second = first_example(build(entry, tiny(entry)).source("train"))
    assert torch.equal(first["x"], second["x"])
    assert first["label"] == second["label"]


# ------------------------------------------------------------------------------ metrics


@pytest.mark.parametrize("entry", params(("metrics",)))
def test_metric_returns_finite_floats(entry: Entry, tiny):
    metric = build(entry, tiny(entry))
    assert isinstance(metric.name, str) and metric.name
    ref = metric_inputs(metric)
    est = (ref + 0.1 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(0))).clamp(
        -1, 1
    )
    for a, b in ((ref, est), (ref, ref)):
        values = metric(a, b)
        assert values and all(isinstance(v, float) and math.isfinite(v) for v in values.values())
        assert values == metric(a.clone(), b.clone())
