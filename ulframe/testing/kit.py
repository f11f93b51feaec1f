"""The contract kit: every check a plugin of each kind must pass, at tiny sizes.

`collect(distributions)` lists one `Check` per registered plugin of those distributions and per
check of its kind; `Kit.run(check)` runs one and returns an `Outcome` (PASS, FAIL with one line
saying what the plugin returned and what is expected, or SKIP with the reason). Checks of one
plugin share what they build (a `Kit` caches it), and a plugin that does not build or whose
first example is malformed fails once: the checks that depend on it are skipped.

Checks per kind:

- networks (encoders, priors, decoders, ae_decoders): ``build`` (the product provides the
  protocol), ``output_shape`` (shape, float32, finite on (2, 3, 16, 16) images),
  ``gradients`` (every parameter gets a gradient), ``determinism`` (same seed, same weights and
  outputs; another seed, others), ``state_dict`` (round trip into a fresh instance through
  ``torch.save`` / ``weights_only`` loads), ``bf16_autocast`` (runs under CPU bfloat16
  autocast), ``video`` (where the factory builds for (3, 8, 16, 16) clips: shapes, gradients,
  round trip); priors also ``class_conditioning`` and, when they take ``context_channels``,
  ``context``;
- datasets: ``layout`` (the first example of each split: a float32 tensor C×H×W or C×T×H×W
  in [-1, 1], ``ulframe.data.pipeline.example_problem``), ``labels`` (ints within
  ``num_classes``), ``picklable``, ``determinism``, ``disjoint`` (when the dataset sets
  ``disjoint_splits = True``: no item of the eval split is in the train split);
- weightings: ``shape_dtype``, ``finite_positive`` (finite and >= 0 on λ ∈ [-20, 20]), ``pure``;
- schedules: ``endpoints``, ``monotone`` (λ(t) strictly decreasing), ``derivative``
  (``-dλ/dt`` positive, finite, equal to a finite difference), ``inverse``, ``shape_dtype``;
- samplers: ``point_mass`` (the eps-predictor of a point mass gives the point), ``determinism``;
- metrics: ``call`` (a dict of finite floats on tiny inputs, deterministic);
- hooks: ``hook_names`` (pluggy accepts the implementations: known hook names, arguments the
  hooks pass).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import math
import pickle
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from ulframe.data.pipeline import shown as describe
from ulframe.diffusion.weighting import CHECK_RANGE, weighting_problem
from ulframe.errors import UserError
from ulframe.registry import Entry, Registry, _normalized
from ulframe.testing import tiny

NETWORK_KINDS = ("encoders", "priors", "decoders", "ae_decoders")
CHECKED_KINDS: tuple[str, ...] = (
    *NETWORK_KINDS, "weightings", "schedules", "samplers", "datasets", "metrics", "hooks",
)  # fmt: skip

BATCH = 2
IMAGE_SHAPE = (3, 16, 16)  # (C, H, W)
LATENT_SHAPE = (4, 4, 4)  # (Cz, h, w)
VIDEO_SHAPE = (3, 8, 16, 16)  # (C, T, H, W)
VIDEO_LATENT_SHAPE = (4, 4, 4, 4)  # (Cz, t, h, w)
NUM_CLASSES = 3
LOGSNR_RANGE = (-10.0, 10.0)  # noise levels fed to networks
WEIGHTING_POINTS = 401  # λ grid of the weighting checks (over weighting.CHECK_RANGE)
SCHEDULE_ENDPOINTS = ((-15.0, 5.0), (-10.0, 15.0))
SCHEDULE_RESOLUTION = 16
SAMPLER_STEPS = 6
PERTURB_STD = 0.1
VIDEO_METRIC_FRAMES = 10

CHECKS: dict[str, tuple[str, ...]] = {
    "encoders": ("build", "output_shape", "gradients", "determinism", "state_dict"),
    "priors": ("build", "output_shape", "gradients", "determinism", "state_dict"),
    "decoders": ("build", "output_shape", "gradients", "determinism", "state_dict"),
    "ae_decoders": ("build", "output_shape", "gradients", "determinism", "state_dict"),
    "weightings": ("build", "shape_dtype", "finite_positive", "pure"),
    "schedules": ("build", "endpoints", "monotone", "derivative", "inverse", "shape_dtype"),
    "samplers": ("point_mass", "determinism"),
    "datasets": ("build", "layout", "labels", "picklable", "determinism", "disjoint"),
    "metrics": ("build", "call"),
    "hooks": ("hook_names",),
}
for _kind in NETWORK_KINDS:
    CHECKS[_kind] += ("bf16_autocast", "video")
CHECKS["priors"] += ("class_conditioning", "context")


class CheckFailed(AssertionError):
    """A check's verdict: the plugin breaks its contract (the message is one line)."""


class CheckSkipped(Exception):
    """A check that does not apply (the message says why)."""


def expect(condition: Any, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


@dataclass(frozen=True)
class Check:
    """One check of one plugin."""

    entry: Entry
    name: str

    @property
    def label(self) -> str:
        return f"{self.entry.kind}.{self.entry.name}"

    @property
    def id(self) -> str:
        return f"{self.label}::{self.name}"


@dataclass(frozen=True)
class Outcome:
    status: str  # PASS, FAIL or SKIP
    label: str  # kind.name
    check: str
    message: str = ""

    def line(self) -> str:
        return f"{self.status} {self.label}  {self.check}" + (
            f": {self.message}" if self.message else ""
        )


# ---- which plugins ------------------------------------------------------------------------------
def installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def collect(
    distributions: Sequence[str], registry: Registry | None = None
) -> tuple[list[Check], list[Outcome]]:
    """(the checks of every plugin the distributions register, FAIL outcomes for the entries
    of theirs that did not load)."""
    registry = registry or Registry()
    wanted = {_normalized(d) for d in distributions}
    checks: list[Check] = []
    broken: list[Outcome] = []
    for kind in CHECKED_KINDS:
        for entry in registry.entries(kind):
            if _normalized(entry.distribution) in wanted:
                checks += [Check(entry, name) for name in CHECKS[kind]]
        for b in registry.broken(kind):
            if _normalized(b.distribution) in wanted:
                broken.append(Outcome("FAIL", f"{kind}.{b.name}", "load", b.reason))
    return checks, broken


# ---- building -----------------------------------------------------------------------------------
def supplied(kind: str, video: bool = False) -> dict[str, Any]:
    """What the engine passes a factory of `kind` (ulframe.protocols.SUPPLIED_BY_ENGINE)."""
    x, z = (VIDEO_SHAPE, VIDEO_LATENT_SHAPE) if video else (IMAGE_SHAPE, LATENT_SHAPE)
    values: dict[str, dict[str, Any]] = {
        "encoders": {"shape": x},
        "priors": {"shape": z, "num_classes": 0},
        "decoders": {"shape": x, "latent_shape": z},
        "ae_decoders": {"shape": x, "latent_shape": z},
        "schedules": {
            "logsnr_min": SCHEDULE_ENDPOINTS[0][0],
            "logsnr_max": SCHEDULE_ENDPOINTS[0][1],
            "resolution": SCHEDULE_RESOLUTION,
        },
    }
    return values.get(kind, {})


def perturb_zero_init_(module: nn.Module, seed: int = 1) -> nn.Module:
    """Seeded random values for every all-zero parameter (zero-initialised output layers make
    an untrained network's output 0, and every check on it vacuous)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point() and not p.any():
                p.copy_(PERTURB_STD * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def network_inputs(kind: str, video: bool = False, seed: int = 2) -> tuple[Tensor, ...]:
    """Positional inputs of a network of `kind`, in the protocol's call order."""
    gen = torch.Generator().manual_seed(seed)
    x_shape, z_shape = (VIDEO_SHAPE, VIDEO_LATENT_SHAPE) if video else (IMAGE_SHAPE, LATENT_SHAPE)
    x = torch.rand((BATCH, *x_shape), generator=gen) * 2 - 1
    low, high = LOGSNR_RANGE
    logsnr = low + (high - low) * torch.rand(BATCH, generator=gen)
    z = torch.randn((BATCH, *z_shape), generator=gen)
    return {
        "encoders": (x,),
        "priors": (z, logsnr),
        "decoders": (x, logsnr, z),
        "ae_decoders": (z,),
    }[kind]


def expected_shape(kind: str, video: bool = False) -> tuple[int, ...]:
    x_shape, z_shape = (VIDEO_SHAPE, VIDEO_LATENT_SHAPE) if video else (IMAGE_SHAPE, LATENT_SHAPE)
    return (BATCH, *(z_shape if kind in ("encoders", "priors") else x_shape))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _video_kwargs(kwargs: Mapping[str, Any], factory: Callable[..., Any]) -> dict[str, Any]:
    """Tiny kwargs for clips: an int patch size p becomes (1, p, p) (whole frames in time)."""
    out = dict(kwargs)
    p = out.get("patch_size", tiny.signature_defaults(factory).get("patch_size"))
    if isinstance(p, int) and not isinstance(p, bool) and p > 1:
        out["patch_size"] = (1, p, p)
    return out


@dataclass
class _Built:
    kwargs: dict[str, Any] | None = None  # the tiny kwargs that build (None: not found)
    error: str = ""  # why nothing builds
    product: Any = None
    failed: dict[str, str] = field(default_factory=dict)  # check -> why (for dependents)


class Kit:
    """Runs checks; caches what each plugin's checks share. `overrides` maps `kind.name` to
    keyword arguments used instead of the derived ones."""

    def __init__(
        self,
        folder: Path | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if folder is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="ulframe-check-")
            folder = Path(self._tmp.name)
        self.folder = folder
        self.overrides = {k: dict(v) for k, v in (overrides or {}).items()}
        self._built: dict[str, _Built] = {}
        self._trees: dict[bool, Path] = {}

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Kit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- tiny arguments ---------------------------------------------------------------------
    def tree(self, video: bool) -> Path:
        if video not in self._trees:
            root = self.folder / ("video_tree" if video else "image_tree")
            self._trees[video] = tiny.make_tree(root, video)
        return self._trees[video]

    def candidates(self, entry: Entry) -> list[dict[str, Any]]:
        """Keyword arguments to try, tiniest first."""
        label = f"{entry.kind}.{entry.name}"
        if label in self.overrides:
            return [self.overrides[label]]
        hook = getattr(entry.factory, tiny.CHECK_KWARGS_ATTR, None)
        if callable(hook):
            folder = self.folder / label
            folder.mkdir(parents=True, exist_ok=True)
            return [dict(hook(folder))]
        given = supplied(entry.kind)
        missing = tiny.missing_required(entry.factory, given)
        derived = [tiny.derive(entry.factory, given, self.tree, n) for n in tiny.STAGE_TRIES]
        if missing or any(d is None for d in derived):
            raise CheckSkipped(
                f"needs {', '.join(missing) or 'arguments'} that the kit cannot derive; give the "
                f"factory `{tiny.CHECK_KWARGS_ATTR}(folder) -> dict` (docs/plugins.md)"
            )
        out: list[dict[str, Any]] = []
        for kwargs in [*derived, {}]:
            if kwargs not in out:
                out.append(cast(dict[str, Any], kwargs))
        return out

    def build(self, entry: Entry, kwargs: Mapping[str, Any], seed: int = 0, **extra: Any) -> Any:
        if entry.kind == "samplers":
            return entry.factory
        torch.manual_seed(seed)
        return entry.factory(**(supplied(entry.kind) | extra), **kwargs)

    def state(self, entry: Entry) -> _Built:
        """Builds the plugin once (the first candidate that builds and, for a network, runs)."""
        label = f"{entry.kind}.{entry.name}"
        if label in self._built:
            return self._built[label]
        from ulframe.protocols import check_built

        built = _Built()
        self._built[label] = built
        try:
            candidates = self.candidates(entry)
        except CheckSkipped as skip:
            built.error = f"SKIP {skip}"
            return built
        errors: list[str] = []
        for kwargs in candidates:
            try:
                obj = check_built(entry.kind, self.build(entry, kwargs), label)
                if entry.kind in NETWORK_KINDS:
                    with torch.no_grad():
                        perturb_zero_init_(obj).eval()(*network_inputs(entry.kind))
            except UserError as err:  # asks for configuration the kit cannot give
                errors.append(f"SKIP needs configuration: {_first_line(err)}")
                continue
            except Exception as err:
                errors.append(_first_line(err))
                continue
            built.kwargs, built.product = dict(kwargs), obj
            return built
        # a crash of the plugin's own tiniest build is its verdict; configuration it asks for
        # (a UserError under every candidate) is a skip
        built.error = next((e for e in errors if not e.startswith("SKIP ")), errors[0])
        return built

    # -- running ----------------------------------------------------------------------------
    def run(self, check: Check) -> Outcome:
        entry = check.entry
        built = _Built() if entry.kind == "samplers" else self.state(entry)
        try:
            fn = getattr(self, f"_{entry.kind}_{check.name}", None) or getattr(
                self, f"_{check.name}"
            )
            if entry.kind not in ("samplers", "hooks"):
                if built.kwargs is None:
                    skipped = built.error.startswith("SKIP ")
                    if check.name != "build":
                        raise CheckSkipped(f"build {'skipped' if skipped else 'failed'}")
                    if skipped:
                        raise CheckSkipped(built.error[5:])
                    raise CheckFailed(f"does not build with {self.shown(entry)}: {built.error}")
                for name in built.failed:
                    if name in DEPENDS.get(check.name, ()):
                        raise CheckSkipped(f"{name} failed")
            fn(entry, built)
        except CheckSkipped as skip:
            return Outcome("SKIP", check.label, check.name, str(skip))
        except CheckFailed as fail:
            built.failed[check.name] = str(fail)
            return Outcome("FAIL", check.label, check.name, str(fail).splitlines()[0])
        except Exception as err:  # a crash is a verdict too, in one line
            built.failed[check.name] = _first_line(err)
            return Outcome("FAIL", check.label, check.name, f"raised {_first_line(err)}")
        return Outcome("PASS", check.label, check.name)

    def shown(self, entry: Entry) -> str:
        try:
            kwargs = self.candidates(entry)[0]
        except CheckSkipped:
            return "its defaults"
        return ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "its defaults"

    # -- every kind -------------------------------------------------------------------------
    def _build(self, entry: Entry, built: _Built) -> None:
        pass  # reaching here: it built (state()) and provides the protocol

    # -- networks ---------------------------------------------------------------------------
    def _net(self, entry: Entry, built: _Built, seed: int = 0) -> nn.Module:
        assert built.kwargs is not None
        return perturb_zero_init_(self.build(entry, built.kwargs, seed=seed))

    def _output_shape(self, entry: Entry, built: _Built) -> None:
        module = self._net(entry, built).eval()
        with torch.no_grad():
            out = module(*network_inputs(entry.kind))
        _check_output(entry.kind, out, expected_shape(entry.kind), module)

    def _gradients(self, entry: Entry, built: _Built, video: bool = False) -> None:
        module = self._net(entry, built).train()
        _check_gradients(module, module(*network_inputs(entry.kind, video)))

    def _determinism(self, entry: Entry, built: _Built) -> None:
        if entry.kind == "samplers":
            return _sampler_determinism(entry)
        if entry.kind == "datasets":
            return self._dataset_determinism(entry, built)
        inputs = network_inputs(entry.kind)

        def run(build_seed: int) -> Tensor:
            module = self._net(entry, built, seed=build_seed).train()
            torch.manual_seed(10)
            with torch.no_grad():
                return module(*inputs)

        first = run(0)
        expect(torch.equal(first, run(0)), "two builds with one seed gave different outputs")
        if _learns(built.product):
            expect(not torch.equal(first, run(1)), "builds with two seeds gave identical outputs")

    def _state_dict(self, entry: Entry, built: _Built, video: bool = False) -> None:
        _round_trip(
            self._net(entry, built, seed=0).eval(),
            self.build(entry, built.kwargs or {}, seed=1).eval(),
            network_inputs(entry.kind, video),
        )

    def _bf16_autocast(self, entry: Entry, built: _Built) -> None:
        module = self._net(entry, built).eval()
        with (
            torch.no_grad(),
            torch.autocast("cpu", dtype=torch.bfloat16),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore", UserWarning)  # torch: "cannot dispatch to fused ..."
            out = module(*network_inputs(entry.kind))
        with torch.no_grad():
            want = tuple(module(*network_inputs(entry.kind)).shape)
        expect(
            isinstance(out, Tensor) and tuple(out.shape) == want,
            f"under bfloat16 autocast returned {describe(out)}; expected shape {want}",
        )
        expect(torch.isfinite(out.float()).all(), "under bfloat16 autocast returned nan or inf")

    def _video(self, entry: Entry, built: _Built) -> None:
        kwargs = _video_kwargs(built.kwargs or {}, entry.factory)
        try:
            torch.manual_seed(0)
            module = entry.factory(**supplied(entry.kind, video=True), **kwargs)
        except Exception as err:
            why = f"does not build for clips {VIDEO_SHAPE}: {_first_line(err)}"
            raise CheckSkipped(why) from err
        perturb_zero_init_(module).train()
        out = module(*network_inputs(entry.kind, video=True))
        _check_output(entry.kind, out, expected_shape(entry.kind, video=True), module)
        _check_gradients(module, out)
        torch.manual_seed(1)
        fresh = entry.factory(**supplied(entry.kind, video=True), **kwargs).eval()
        _round_trip(module.eval(), fresh, network_inputs(entry.kind, video=True))

    def _class_conditioning(self, entry: Entry, built: _Built) -> None:
        module = self.build(entry, built.kwargs or {}, num_classes=NUM_CLASSES)
        module = perturb_zero_init_(module).eval()
        expect(
            getattr(module, "num_classes", None) == NUM_CLASSES,
            f"built with num_classes={NUM_CLASSES} has num_classes="
            f"{getattr(module, 'num_classes', None)}",
        )
        z_t, logsnr = network_inputs("priors")
        labels = torch.arange(BATCH) % NUM_CLASSES
        with torch.no_grad():
            conditional = module(z_t, logsnr, labels)
            unconditional = module(z_t, logsnr)
        expect(
            conditional.shape == unconditional.shape == expected_shape("priors"),
            f"with labels returned {describe(conditional)}; expected {expected_shape('priors')}",
        )
        if _learns(module):
            expect(not torch.equal(conditional, unconditional), "labels do not change the output")

    def _context(self, entry: Entry, built: _Built) -> None:
        if "context_channels" not in tiny.signature_defaults(entry.factory):
            raise CheckSkipped("takes no context_channels")
        module = self.build(
            entry, built.kwargs or {}, num_classes=NUM_CLASSES, context_channels=LATENT_SHAPE[0]
        )
        module = perturb_zero_init_(module).eval()
        z_t, logsnr = network_inputs("priors")
        context = torch.randn((BATCH, *LATENT_SHAPE), generator=torch.Generator().manual_seed(9))
        labels = torch.arange(BATCH) % NUM_CLASSES
        with torch.no_grad():
            out = module(z_t, logsnr, labels, context=context)
            expect(
                out.shape == expected_shape("priors"), f"with a context returned {describe(out)}"
            )
            other = module(z_t, logsnr, labels, context=torch.zeros_like(context))
        if _learns(module):
            expect(not torch.equal(out, other), "the context does not change the output")

    # -- weightings -------------------------------------------------------------------------
    def _shape_dtype(self, entry: Entry, built: _Built) -> None:
        if entry.kind == "schedules":
            return self._schedule_shape_dtype(built.product)
        w = built.product
        for shape in ((), (7,), (3, 5)):
            for dtype in (torch.float32, torch.float64):
                logsnr = torch.linspace(*CHECK_RANGE, math.prod(shape), dtype=dtype)
                out = w(logsnr.reshape(shape))
                expect(
                    isinstance(out, Tensor) and out.shape == shape and out.dtype == dtype,
                    f"w(λ) of a {dtype} tensor of shape {shape} returned {describe(out)}; "
                    "expected the same shape and dtype",
                )

    def _finite_positive(self, entry: Entry, built: _Built) -> None:
        for dtype in (torch.float32, torch.float64):
            problem = weighting_problem(built.product, *CHECK_RANGE, WEIGHTING_POINTS, dtype)
            if problem:
                raise CheckFailed(problem)

    def _pure(self, entry: Entry, built: _Built) -> None:
        grid = torch.linspace(*CHECK_RANGE, WEIGHTING_POINTS)
        expect(
            torch.equal(built.product(grid).nan_to_num(), built.product(grid.clone()).nan_to_num()),
            "w(λ) differs between two calls on the same λ; expected a pure function of λ",
        )

    # -- schedules --------------------------------------------------------------------------
    def _schedules(self, entry: Entry, built: _Built) -> Iterator[Any]:
        for low, high in SCHEDULE_ENDPOINTS:
            for resolution in (None, SCHEDULE_RESOLUTION):
                kwargs = dict(built.kwargs or {})
                yield entry.factory(
                    logsnr_min=low, logsnr_max=high, resolution=resolution, **kwargs
                )

    def _endpoints(self, entry: Entry, built: _Built) -> None:
        for s in self._schedules(entry, built):
            ends = s.logsnr(torch.tensor([0.0, 1.0], dtype=torch.float64))
            want = torch.tensor([s.logsnr_max, s.logsnr_min], dtype=torch.float64)
            expect(
                torch.allclose(ends, want, rtol=1e-6, atol=1e-6),
                f"λ(0), λ(1) = {ends.tolist()}; expected {want.tolist()}",
            )

    def _monotone(self, entry: Entry, built: _Built) -> None:
        t = torch.linspace(0, 1, 1001, dtype=torch.float64)
        for s in self._schedules(entry, built):
            logsnr = s.logsnr(t)
            expect((logsnr[1:] < logsnr[:-1]).all(), "λ(t) does not decrease strictly")

    def _derivative(self, entry: Entry, built: _Built) -> None:
        t = torch.linspace(0, 1, 1001, dtype=torch.float64)
        h, inner = 1e-6, t[1:-1]
        for s in self._schedules(entry, built):
            d = s.neg_dlogsnr_dt(t)
            expect((d > 0).all() and torch.isfinite(d).all(), "-dλ/dt is not finite and > 0")
            fd = -(s.logsnr(inner + h) - s.logsnr(inner - h)) / (2 * h)
            expect(
                torch.allclose(s.neg_dlogsnr_dt(inner), fd, rtol=1e-5, atol=1e-6),
                "neg_dlogsnr_dt differs from the finite difference of logsnr",
            )

    def _inverse(self, entry: Entry, built: _Built) -> None:
        t = torch.linspace(0, 1, 1001, dtype=torch.float64)
        for s in self._schedules(entry, built):
            expect(
                torch.allclose(s.t_from_logsnr(s.logsnr(t)), t, rtol=0, atol=1e-9),
                "t_from_logsnr(logsnr(t)) != t",
            )

    @staticmethod
    def _schedule_shape_dtype(schedule: Any) -> None:
        t = torch.linspace(0, 1, 21)
        for method in (schedule.logsnr, schedule.neg_dlogsnr_dt):
            out = method(t.reshape(3, 7))
            expect(
                out.shape == (3, 7) and out.dtype == torch.float32,
                f"{method.__name__} of a float32 (3, 7) tensor returned {describe(out)}",
            )

    # -- samplers ---------------------------------------------------------------------------
    def _point_mass(self, entry: Entry, built: _Built) -> None:
        sampler = entry.factory
        for dtype, atol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
            point, x_1, grid = _sampler_inputs(dtype)
            gen = torch.Generator().manual_seed(0)
            for clip in (None, 1.0):
                x_0 = sampler(_point_mass_eps(point), x_1, grid, generator=gen, clip_x=clip)
                expect(
                    isinstance(x_0, Tensor) and x_0.shape == point.shape and x_0.dtype == dtype,
                    f"returned {describe(x_0)}; expected {describe(point)}",
                )
                err = float((x_0 - point).abs().max())
                expect(err <= atol, f"missed the point of a point mass by {err:.3g} ({dtype})")

    # -- datasets ---------------------------------------------------------------------------
    def _first(self, entry: Entry, built: _Built, split: str) -> Any:
        """The split's source and its first readable example, as a run finds it (unreadable
        items first are skipped, as the loader skips them); not checked."""
        from ulframe.data.pipeline import first_readable

        source = built.product.source(split)
        expect(len(source.items) > 0, f"source('{split}') has no items")
        return source, first_readable(source)

    def _layout(self, entry: Entry, built: _Built) -> None:
        from ulframe.data.pipeline import example_problem

        for split in ("train", "eval"):
            _, example = self._first(entry, built, split)
            problem = example_problem(example)
            if problem:
                raise CheckFailed(f"{problem} (first {split} example)")

    def _labels(self, entry: Entry, built: _Built) -> None:
        from ulframe.data.pipeline import example_problem

        num_classes = built.product.num_classes
        expect(
            isinstance(num_classes, int) and num_classes >= 0,
            f"num_classes is {num_classes!r}; expected an int >= 0",
        )
        for split in ("train", "eval"):
            _, example = self._first(entry, built, split)
            problem = example_problem(example, num_classes, labels_only=True)
            if problem:
                raise CheckFailed(f"{problem} (first {split} example)")

    def _picklable(self, entry: Entry, built: _Built) -> None:
        for split in ("train", "eval"):
            source = built.product.source(split)
            try:
                clone = pickle.loads(pickle.dumps(source))
            except Exception as err:
                raise CheckFailed(
                    f"source('{split}') cannot be pickled ({_first_line(err)}); worker processes "
                    "need it: keep gin-configured objects and open files out of the Source"
                ) from err
            expect(len(clone.items) == len(source.items), "the pickled source lost items")

    def _dataset_determinism(self, entry: Entry, built: _Built) -> None:
        from ulframe.data.pipeline import first_example

        first = first_example(self.build(entry, built.kwargs or {}).source("train"))
        second = first_example(self.build(entry, built.kwargs or {}).source("train"))
        expect(
            torch.equal(first["x"], second["x"]) and first["label"] == second["label"],
            "two datasets built alike decode different first examples (draw random "
            "augmentation from ulframe.data.sample_rng())",
        )

    def _disjoint(self, entry: Entry, built: _Built) -> None:
        if not getattr(built.product, "disjoint_splits", False):
            raise CheckSkipped("the dataset does not declare disjoint_splits = True")
        train = {repr(i) for i in built.product.source("train").items}
        shared = [i for i in built.product.source("eval").items if repr(i) in train]
        if shared:
            raise CheckFailed(f"{len(shared)} eval items are train items too, e.g. {shared[0]!r}")

    # -- metrics ----------------------------------------------------------------------------
    def _call(self, entry: Entry, built: _Built) -> None:
        metric = built.product
        expect(isinstance(getattr(metric, "name", None), str), "has no `name` string")
        ref = _metric_inputs(metric)
        noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0))
        est = (ref + 0.1 * noise).clamp(-1, 1)
        for a, b in ((ref, est), (ref, ref)):
            values = metric(a, b)
            expect(
                isinstance(values, dict)
                and values
                and all(isinstance(v, float) and math.isfinite(v) for v in values.values()),
                f"returned {values!r}; expected a non-empty dict of finite floats",
            )
            expect(values == metric(a.clone(), b.clone()), "two calls on the same inputs differ")

    # -- hooks ------------------------------------------------------------------------------
    def _hook_names(self, entry: Entry, built: _Built) -> None:
        from ulframe.hookspecs import plugin_manager

        if built.kwargs is None:
            if built.error.startswith("SKIP "):
                raise CheckSkipped(built.error[5:])
            raise CheckFailed(f"does not build: {built.error}")
        try:
            plugin_manager([built.product])
        except UserError as err:
            raise CheckFailed(str(err)) from err


# checks that a failed check makes meaningless
DEPENDS: dict[str, tuple[str, ...]] = {
    "labels": ("layout",),
    "picklable": (),
    "determinism": ("layout", "output_shape"),
    "disjoint": (),
    "gradients": ("output_shape",),
    "state_dict": ("output_shape",),
    "bf16_autocast": ("output_shape",),
    "video": ("output_shape",),
    "class_conditioning": ("output_shape",),
    "context": ("output_shape",),
    "pure": ("shape_dtype",),
}


def _check_output(kind: str, out: Any, shape: tuple[int, ...], module: Any = None) -> None:
    """`out` is a finite float32 tensor of `shape`; an encoder's: (B, latent_channels, *s), its
    own down-sampling of the input's axes (the latent shape is the encoder's choice)."""
    if kind == "encoders":
        channels = getattr(module, "latent_channels", None)
        expect(
            isinstance(out, Tensor) and out.dtype == torch.float32 and out.dim() == len(shape)
            and tuple(out.shape[:2]) == (BATCH, channels),
            f"returned {describe(out)}; expected torch.Tensor (B={BATCH}, latent_channels="
            f"{channels}, *spatial) float32",
        )  # fmt: skip
    else:
        expect(
            isinstance(out, Tensor) and tuple(out.shape) == shape and out.dtype == torch.float32,
            f"returned {describe(out)}; expected torch.Tensor {shape} float32",
        )
    expect(torch.isfinite(out).all(), "returned nan or inf")


def _check_gradients(module: nn.Module, out: Tensor) -> None:
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not params:
        return
    out.float().square().mean().backward()
    missing = [n for n, p in params if p.grad is None or not p.grad.any()]
    expect(
        not missing,
        f"{len(missing)} of {len(params)} parameters get no gradient, e.g. {missing[:3]}",
    )


def _round_trip(source: nn.Module, fresh: nn.Module, inputs: tuple[Tensor, ...]) -> None:
    with torch.no_grad():
        expected = source(*inputs)
    state = source.state_dict()
    odd = [k for k, v in state.items() if not isinstance(v, Tensor)]
    expect(not odd, f"state_dict holds non-tensors: {odd[:3]}")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.no_grad():
        expect(
            torch.equal(fresh(*inputs), expected),
            "a fresh instance loaded with the state dict computes something else",
        )


def _learns(module: Any) -> bool:
    return isinstance(module, nn.Module) and any(True for _ in module.parameters())


def _point_mass_eps(point: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """The exact eps-predictor of data that is always `point`: eps = (x_t - alpha x) / sigma."""
    from ulframe.diffusion import alpha_sigma, expand_like

    def eps_fn(x_t: Tensor, logsnr: Tensor) -> Tensor:
        alpha, sigma = alpha_sigma(expand_like(logsnr, x_t))
        return (x_t - alpha * point) / sigma

    return eps_fn


def _sampler_inputs(dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    from ulframe.diffusion import CosineSchedule, logsnr_grid

    gen = torch.Generator().manual_seed(4)
    point = torch.rand((BATCH, *IMAGE_SHAPE), generator=gen, dtype=torch.float64) * 1.8 - 0.9
    x_1 = torch.randn((BATCH, *IMAGE_SHAPE), generator=gen, dtype=torch.float64)
    grid = logsnr_grid(cast(Any, CosineSchedule(-15.0, 15.0)), SAMPLER_STEPS)
    return point.to(dtype), x_1.to(dtype), grid.to(dtype)


def _sampler_determinism(entry: Entry) -> None:
    _, x_1, grid = _sampler_inputs(torch.float32)

    def run(seed: int) -> Tensor:
        return entry.factory(
            lambda x_t, logsnr: 0.5 * x_t, x_1, grid, generator=torch.Generator().manual_seed(seed)
        )

    expect(torch.equal(run(0), run(0)), "one generator seed gave two different samples")


def _metric_inputs(metric: Any, seed: int = 2) -> Tensor:
    """Images (2, 3, 16, 16); clips (2, 3, 10, 16, 16) for a metric with inputs = "videos"."""
    x = network_inputs("decoders", seed=seed)[0]
    if getattr(metric, "inputs", "images") != "videos":
        return x
    return torch.stack([x.roll(k, -1) for k in range(VIDEO_METRIC_FRAMES)], 2)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny networks run fastest on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_all(
    distributions: Sequence[str],
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    registry: Registry | None = None,
) -> list[Outcome]:
    """Every check of every plugin the distributions register, in order."""
    checks, outcomes = collect(distributions, registry)
    with Kit(overrides=overrides) as kit, one_thread():
        outcomes += [kit.run(check) for check in checks]
    return outcomes


__all__ = [
    "CHECKS",
    "Check",
    "CheckFailed",
    "CheckSkipped",
    "Kit",
    "Outcome",
    "collect",
    "installed",
    "run_all",
]
