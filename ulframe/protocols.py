"""One `typing.Protocol` per extension point.

An entry point of kind K resolves to a *factory* (a class or function) that gin configures; the
object it returns must provide `PROTOCOLS[K]`. Factories are checked when they are loaded (the
methods a class must define) and their products when they are built (`check_built`).

Call signatures (one per role):

- encoders:   factory(shape=(C, *S), **hyper) -> module;  module(x) -> z_clean
- priors:     factory(shape=(C, *S), num_classes=0, **hyper) -> module;
              module(z_t, logsnr, label=None) -> v_hat   (velocity: eps = sigma z_t + alpha v)
- decoders:   factory(shape=(C, *S), latent_shape=(Cz, *s), **hyper) -> module;
              module(x_t, logsnr, z_0) -> v_hat   (velocity, as for priors)
- ae_decoders: factory(shape=(C, *S), latent_shape=(Cz, *s), **hyper) -> module;
              module(z) -> x_hat   (the deterministic decoder of an autoencoder, e.g. KL-AE)
- weightings: factory(**hyper) -> w;  w(logsnr) -> weight (same shape)
- schedules:  factory(logsnr_min, logsnr_max, resolution, **hyper) -> schedule
- datasets:   factory(**hyper) -> dataset;  dataset.source(split) -> Source (plain, picklable)
- stages:     factory(**hyper) -> stage (see `Stage`)
- samplers:   sampler(eps_fn, x_1, logsnrs, generator=None) -> x_0   (a plain function)
- metrics:    factory(**hyper) -> metric;  metric(reference, estimate) -> dict[str, float]
- hooks:      factory(**hyper) -> object with pluggy hook implementations (see hookspecs.py)

Shapes: images are (B, C, H, W), videos (B, C, T, H, W); `logsnr` is (B,).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, runtime_checkable

import torch
from torch import Tensor

from ulframe.data.pipeline import Dataset
from ulframe.diffusion.samplers import Sampler
from ulframe.diffusion.schedules import Schedule
from ulframe.diffusion.weighting import Weighting


@runtime_checkable
class Encoder(Protocol):
    """Deterministic encoder: `z_clean = E(x)`."""

    latent_channels: int

    def __call__(self, x: Tensor) -> Tensor: ...
    def state_dict(self) -> dict[str, Any]: ...


@runtime_checkable
class Prior(Protocol):
    """Noise-level (and optionally class) conditioned v-predictor over latents: returns v_hat."""

    num_classes: int

    def __call__(self, z_t: Tensor, logsnr: Tensor, label: Tensor | None = None) -> Tensor: ...
    def state_dict(self) -> dict[str, Any]: ...


@runtime_checkable
class Decoder(Protocol):
    """V-predictor over data, conditioned on the noise level and the noisy latent z_0 (v_hat)."""

    def __call__(self, x_t: Tensor, logsnr: Tensor, z_0: Tensor) -> Tensor: ...
    def state_dict(self) -> dict[str, Any]: ...


@runtime_checkable
class AEDecoder(Protocol):
    """Deterministic decoder of an autoencoder: `x_hat = D(z)`, (B, Cz, *s) -> (B, C, *S).

    A kind of its own, not a `Decoder`: it maps a latent to data in one call, with no noisy
    input and no noise level (the diffusion decoders' contract stays as it is).
    """

    def __call__(self, z: Tensor) -> Tensor: ...
    def state_dict(self) -> dict[str, Any]: ...


@runtime_checkable
class Metric(Protocol):
    """Compares a batch of references with a batch of estimates (same shape)."""

    name: str

    def __call__(self, reference: Tensor, estimate: Tensor) -> dict[str, float]: ...


class LossTerms(Protocol):
    """A stage's loss as a small typed record of per-example terms (nats, shape (B,))."""

    def total_nats(self) -> Tensor: ...
    def metrics(self) -> dict[str, Tensor]: ...


@dataclass
class BuildContext:
    """What a stage may know when it builds its networks: facts measured from the data."""

    example: dict[str, Tensor]  # one decoded example: {"x": (C, *S), "label": ()}
    num_classes: int
    device: torch.device
    stage_dir: Path
    previous: dict[str, Path] = field(default_factory=dict)  # finished stage name -> its dir


@dataclass
class EvalReport:
    """What a stage's evaluation returns: scalars and images (NCHW in [-1, 1])."""

    scalars: dict[str, float]
    images: dict[str, Tensor] = field(default_factory=dict)


@runtime_checkable
class Stage(Protocol):
    """One stage of an experiment: builds its networks and defines its loss and evaluation.

    `build` returns a module whose forward *is* the loss: `model(batch, noise)` returns the
    stage's `LossTerms` record (`noise`: a `ulframe.diffusion.BatchNoise`, this rank's rows of
    draws made for the global batch; `BatchNoise.of(generator)` outside the loop), so the one training loop (`ulframe.train.loop`) can wrap it in
    DDP/FSDP unchanged. `train_source`, called after `build`, returns the Source the loop trains
    on (the dataset's own, or e.g. cached latents). `evaluate` receives the EMA copy of the module.
    """

    name: str
    train: Any  # ulframe.train.settings.TrainSettings

    def build(self, ctx: BuildContext) -> torch.nn.Module: ...
    def train_source(self, source: Any) -> Any: ...
    def evaluate(
        self,
        model: torch.nn.Module,
        batches: Sequence[dict[str, Tensor]],
        generator: torch.Generator,
    ) -> EvalReport: ...


PROTOCOLS: dict[str, Any] = {
    "encoders": Encoder,
    "priors": Prior,
    "decoders": Decoder,
    "ae_decoders": AEDecoder,
    "weightings": Weighting,
    "schedules": Schedule,
    "datasets": Dataset,
    "stages": Stage,
    "samplers": Sampler,
    "metrics": Metric,
    "hooks": None,  # validated by pluggy against hookspecs.py when registered
}


# Arguments the engine passes when it calls a factory of this kind (so gin need not bind them).
SUPPLIED_BY_ENGINE: dict[str, set[str]] = {
    "encoders": {"shape"},
    "priors": {"shape", "num_classes"},
    "decoders": {"shape", "latent_shape"},
    "ae_decoders": {"shape", "latent_shape"},
    "schedules": {"logsnr_min", "logsnr_max", "resolution"},
    "samplers": {"eps_fn", "x_1", "logsnrs"},
    "optimizers": {"params"},  # TrainSettings.build_optimizer(params)
    "lr_schedules": {"samples_seen", "total_samples", "warmup_samples"},
}


def protocol_members(protocol: type) -> list[str]:
    """Names a protocol requires: its annotated attributes and its methods."""
    names: set[str] = set()
    for klass in protocol.__mro__:
        if klass in (Protocol, Generic, object):
            continue
        names.update(getattr(klass, "__annotations__", {}))
        names.update(
            n
            for n, v in vars(klass).items()
            if callable(v) and (not n.startswith("_") or n == "__call__")
        )
    return sorted(names)


_ABSENT = object()


def _iter_missing(obj: Any, members: Iterable[str]) -> Iterator[str]:
    # getattr_static: a property (e.g. a dataset's lazily scanned `num_classes`) is not run.
    for name in members:
        if inspect.getattr_static(obj, name, _ABSENT) is _ABSENT:
            yield name


def check_factory(kind: str, factory: Any) -> list[str]:
    """What a loaded entry lacks for its kind (empty when fine). Classes: their methods."""
    protocol = PROTOCOLS[kind]
    if protocol is None:
        return []
    if not callable(factory):
        return [f"is not callable (got {type(factory).__name__})"]
    if inspect.isclass(factory):
        methods = [
            n
            for n in protocol_members(protocol)
            if n not in getattr(protocol, "__annotations__", {})
        ]
        return [f"lacks method '{n}'" for n in _iter_missing(factory, methods)]
    return []


def check_built(kind: str, obj: Any, origin: str) -> Any:
    """Raise `PluginError` unless `obj` (a factory's product) provides `PROTOCOLS[kind]`."""
    from ulframe.errors import PluginError

    protocol = PROTOCOLS[kind]
    if protocol is None:
        return obj
    missing = list(_iter_missing(obj, protocol_members(protocol)))
    if missing:
        raise PluginError(
            f"{origin} built a {type(obj).__name__} that does not provide the "
            f"{kind} protocol: missing {', '.join(missing)}"
        )
    return obj
