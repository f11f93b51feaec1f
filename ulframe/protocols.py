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
- samplers:   sampler(eps_fn, x_1, logsnrs, generator=None, clip_x=None, final="x_hat") -> x
              (a plain function; final="state": the chain's state at the last grid point)
- metrics:    factory(**hyper) -> metric;  metric(reference, estimate) -> dict[str, float]
- hooks:      factory(**hyper) -> object with pluggy hook implementations (see hookspecs.py)

Shapes: images are (B, C, H, W), videos (B, C, T, H, W); `logsnr` is (B,).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
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


@runtime_checkable
class LatentModel(Protocol):
    """The hand-off between stages: a finished stage's model whose latents a later stage models.

    UL: the stage-1 model (encoder, prior, decoder) under the base model of stage 2; a KL
    autoencoder implements it as well. What the later stage needs, and nothing more:

    - `latent_shape`: (Cz, *s), the shape of one latent.
    - `latent_logsnr_max`: λ_max of the later stage's diffusion over the latents (UL: λ_z(0) = 5,
      the encoding noise the decoder was trained on).
    - `noisy_latent`: True when `decode_latents` takes the latent *at* λ = `latent_logsnr_max`
      (UL: z_0): the later stage's sampling chain hands over its own state there
      (`sampler(..., final="state")`, UL paper Algorithm 2). False when it takes a clean latent
      (an autoencoder): the chain hands over its clean estimate at its last grid point.
    - `encode_clean(x)`: x (B, C, *S) -> the clean latent (B, *latent_shape), float32,
      deterministic (what the later stage models and caches).
    - `decode_latents(z, generator, sampler, steps, context=None)`: latents (B, *latent_shape)
      -> data (B, C, *S) in [-1, 1] (UL: the diffusion decoder run with `sampler` for `steps`
      steps; an autoencoder: its deterministic decoder, `sampler` and `steps` unused). `context`
      (B, C, T, H, W): the real clips whose continuation `z` is; a decoder conditioned on their
      first frames needs them, any other ignores them.
    - `latent_state()`: the tensors `encode_clean` depends on (they key latent caches).
    """

    latent_shape: tuple[int, ...]
    latent_logsnr_max: float
    noisy_latent: bool

    def encode_clean(self, x: Tensor) -> Tensor: ...

    def decode_latents(
        self,
        z: Tensor,
        generator: torch.Generator | None,
        sampler: Callable[..., Tensor],
        steps: int,
        context: Tensor | None = None,
    ) -> Tensor: ...

    def latent_state(self) -> dict[str, Tensor]: ...


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
    Optional: `check_data(example)` raises a one-line ConfigError when the stage's settings do
    not fit the data's first train example; the engine calls it for every stage before any
    stage trains (`ulframe run`, `ulframe config`).
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


class TrainsOnDataset:
    """Base of a stage that trains on the dataset's examples as they are (UL stage 1, a KL
    autoencoder): its `Stage.train_source` hands the dataset's Source through unchanged."""

    def train_source(self, source: Any) -> Any:
        """The dataset's Source itself: the stage trains on its examples as they are."""
        return source


@dataclass(frozen=True)
class SampleSettings:
    """How a sampling stage draws: its own defaults, or the command line's overrides."""

    guidance: float  # classifier-free guidance scale (1: none)
    steps: int  # sampler steps
    continues: bool = False  # samples continue real examples, passed to `sample` as `context`
    facts: dict[str, Any] = field(default_factory=dict)  # more to report (e.g. context length)


@runtime_checkable
class SamplingStage(Stage, Protocol):
    """A stage that draws samples from its trained model (UL stage 2: end-to-end samples).

    What `ulframe sample` and the sample metrics of `ulframe eval` call; the CLI knows nothing
    else about a stage. Sampler, steps and guidance are the stage's own (`sample_settings`);
    `guidance` and `steps` given to `sample` override them.

    - `sample_labels(n, device, num_classes)`: n labels covering the classes in class order
      (None without classes), for samples drawn "of every class".
    - `sample_settings(model, guidance=None, steps=None)`: the settings `sample` uses with
      these overrides (None: the stage's), and whether samples continue real examples.
    - `sample(model, n, labels, guidance, generator, steps=None, context=None)`: n samples
      (n, C, *S) in [-1, 1] from `model` (the stage's built module with its EMA weights);
      `labels` (n,) or None (unconditional); `context` (n, C, *S) real examples the samples
      continue, when `sample_settings(...).continues`.
    """

    def sample_labels(self, n: int, device: torch.device, num_classes: int) -> Tensor | None: ...

    def sample_settings(
        self, model: torch.nn.Module, guidance: float | None = None, steps: int | None = None
    ) -> SampleSettings: ...

    def sample(
        self,
        model: torch.nn.Module,
        n: int,
        labels: Tensor | None = None,
        guidance: float | None = None,
        generator: torch.Generator | None = None,
        steps: int | None = None,
        context: Tensor | None = None,
    ) -> Tensor: ...


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
