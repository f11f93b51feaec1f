"""Stage 2 of Unified Latents: a base model trained on the frozen stage-1 latents.

The objective (docs/method.md, "Stage 2"), per example, in nats:

    z_clean = E(x)                                   (E frozen: the stage-1 EMA encoder)
    L_base  = (-dλ/dt) · ½ · sigmoid(b' - λ) · Σ (eps - eps_hat(z_t, λ, y))²
              with z_t = alpha(λ) z_clean + sigma(λ) eps,  λ ∈ [λ_min, λ_max = λ_z(0) = 5]

λ_max is not a parameter: it is read from the stage-1 model (`latent_logsnr_max`), so the base
model models exactly the z_clean whose noisy version z_0 the decoder was trained on. The label y
is replaced by the null label (`num_classes`) with probability `label_dropout` while training,
so one network is both the conditional and the unconditional model of classifier-free guidance.
The network predicts v, as in stage 1 (`eps_from_v`).

The stage-1 model comes from the stage named `source_stage` (its folder in `ctx.previous`): the
stage object `stage1` (gin: `stage2/stages.ul_base.stage1 = @stage1/stages.ul_joint()`, the same
scoped configuration as the first stage, so the same networks) is built again and its EMA
weights are loaded from the newest checkpoint. Encoder and decoder (and the stage-1 prior) are
frozen: `requires_grad=False`, kept in eval mode even when the loop calls `.train()`; only the
base model's parameters are trainable.

Latent cache (`cache_latents=True`): the train split is encoded once into
`stage_dir/latent_cache/latents-<key>.pt`, key = SHA-256 of the encoder's weights and of the
pickled train Source (its items and settings), so a cache of another encoder or dataset is never
used. The file is written to a temporary name, fsynced and renamed; a marker
`latents-<key>.json` with the file's SHA-256 is written last. A file without a valid marker (a
run killed mid-write) is rebuilt. Training then reads `{"z": (Cz, h, w), "label"}` examples from
memory (`LatentSource`); the training loop asks the stage for it through the optional
`train_source(source)` method. Random augmentation inside the dataset's decode is frozen by the
cache (one draw per item). The key covers the Source's configuration (paths, crop boxes,
resolution), not the bytes of files it reads: replacing an image file in place is not noticed.
With several processes every rank encodes and renames the same file into place (safe, but the
work is repeated).

Stage 1 is reached only through the stage-1 latent interface (`LatentModel`, below): any stage-1
model that implements `encode_clean`, `decode_latents`, `latent_state` and `latent_logsnr_max`
can sit under a base model. The KL autoencoder baseline (`stages.kl_ae`) implements it itself; a
UL stage-1 model (`ULJointModel`) is adapted by `ULJointLatents` (z_0 = alpha(λ_z(0)) z_clean +
sigma(λ_z(0)) eps, then the diffusion decoder), which draws exactly what this stage drew before
the interface existed, so UL's samples, losses and cache keys are unchanged.

Evaluation reports `base_nats` (the weighted loss), `bits_per_pixel_base` (the unweighted ELBO
of z_clean under the base model, `eval_t_per_example` t per example, plus KL(q(z_1)||N(0,I)),
divided by ln 2 · H · W: the bitrate bound of UL paper Table 5, "bpd with base model") and a grid
of end-to-end samples (`sampling.py`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import pickle
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ulframe.diffusion import (
    BatchNoise,
    CosineSchedule,
    SigmoidWeighting,
    diffuse,
    elbo_term_nats,
    eps_from_v,
    kl_standard_normal_nats,
    logsnr_grid,
    sample_ddim,
    stratified_t,
)
from ulframe.errors import ConfigError
from ulframe.protocols import BuildContext, EvalReport, check_built
from ulframe.train import checkpoint
from ulframe.train.settings import TrainSettings

from .sampling import noisy_latent, sample_latents

log = logging.getLogger(__name__)
CACHE_DIR = "latent_cache"
CACHE_FORMAT = 2  # bump when the cache layout changes: old caches get another key
STALE_TMP_S = 600.0  # a temporary cache file this old was left by a killed run


# ------------------------------------------------------------------------------ stage-1 latents
@runtime_checkable
class LatentModel(Protocol):
    """What a base model needs of a stage-1 model: the stage-1 latent interface.

    - `latent_logsnr_max`: λ_max of the base model's diffusion (UL: λ_z(0) = 5, the encoding
      noise the decoder was trained on).
    - `encode_clean(x)`: x (B, C, *S) -> z_clean (B, Cz, *s) float32, the latent the base
      model models (deterministic).
    - `decode_latents(z_clean, generator, sampler, steps)`: z_clean (B, Cz, *s) -> images
      (B, C, *S) in [-1, 1] (UL: add the encoding noise, run the diffusion decoder with
      `sampler` for `steps` steps; an autoencoder: its deterministic decoder).
    - `latent_state()`: the tensors `encode_clean` depends on (keys the latent cache).
    """

    latent_logsnr_max: float

    def encode_clean(self, x: Tensor) -> Tensor: ...

    def decode_latents(
        self,
        z_clean: Tensor,
        generator: torch.Generator | None,
        sampler: Callable[..., Tensor],
        steps: int,
    ) -> Tensor: ...

    def latent_state(self) -> dict[str, Tensor]: ...


class ULJointLatents:
    """The stage-1 latent interface of a UL stage-1 model (`ULJointModel`: encoder, decoder_eps,
    decoder_schedule, latent_logsnr_max); `image_shape` (C, *S) sizes the decoder's x_1."""

    def __init__(self, model: nn.Module, image_shape: Sequence[int]) -> None:
        self.model = model
        self.image_shape = tuple(image_shape)
        self.latent_logsnr_max = float(model.latent_logsnr_max)

    @torch.no_grad()
    def encode_clean(self, x: Tensor) -> Tensor:
        """z_clean = E(x) of the frozen encoder, float32."""
        return self.model.encoder(x).float()

    @torch.no_grad()
    def decode_latents(
        self,
        z_clean: Tensor,
        generator: torch.Generator | None,
        sampler: Callable[..., Tensor],
        steps: int,
    ) -> Tensor:
        """z_0 = alpha(λ_z(0)) z_clean + sigma(λ_z(0)) eps; the decoder from x_1 ~ N(0, I)."""
        z_0 = noisy_latent(z_clean, self.latent_logsnr_max, generator)
        x_1 = torch.randn(
            (z_clean.shape[0], *self.image_shape), generator=generator, device=z_clean.device
        )
        grid = logsnr_grid(self.model.decoder_schedule, steps).to(z_clean.device, torch.float32)
        return sampler(
            lambda x_t, logsnr: self.model.decoder_eps(x_t, logsnr, z_0),
            x_1,
            grid,
            generator=generator,
            clip_x=1.0,
        )

    def latent_state(self) -> dict[str, Tensor]:
        return self.model.encoder.state_dict()


UL_STAGE1_ATTRIBUTES = ("encoder", "decoder_eps", "decoder_schedule", "latent_logsnr_max")


def latent_model(stage1: nn.Module, image_shape: Sequence[int]) -> LatentModel:
    """`stage1` itself when it implements `LatentModel`, a UL model adapted, else ConfigError."""
    if isinstance(stage1, LatentModel):
        return stage1
    if all(hasattr(stage1, a) for a in UL_STAGE1_ATTRIBUTES):
        return ULJointLatents(stage1, image_shape)
    raise ConfigError(
        f"ul_base.stage1 built a {type(stage1).__name__}, which does not provide the stage-1 "
        "latent interface (latent_logsnr_max, encode_clean, decode_latents, latent_state; "
        "see plugins/stages/ul_base.py, LatentModel)"
    )


# ------------------------------------------------------------------------------ loss record
@dataclass(frozen=True)
class ULBaseTerms:
    """The stage-2 loss terms, nats per example, each (B,)."""

    base_nats: Tensor  # sigmoid-weighted diffusion loss: what is optimised
    elbo_nats: Tensor  # unweighted ELBO at the same t (one-sample estimate) + KL_1
    pixels: int  # H·W (T·H·W for video): the bits/pixel normaliser

    def total_nats(self) -> Tensor:
        return self.base_nats  # (B,)

    def metrics(self) -> dict[str, Tensor]:
        """Batch means; `bits_per_pixel_base` is the one-t estimate of the base model's bound."""
        return {
            "base_nats": self.base_nats.mean(),
            "total_nats": self.total_nats().mean(),
            "elbo_nats_base": self.elbo_nats.mean(),
            "bits_per_pixel_base": self.elbo_nats.mean() / (math.log(2) * self.pixels),
        }


# ------------------------------------------------------------------------------ the module
class ULBaseModel(nn.Module):
    """Frozen stage-1 model plus the trainable base model; `forward` is the stage-2 loss."""

    def __init__(
        self,
        stage1: nn.Module,
        base: nn.Module,
        schedule: Any,
        weighting: Callable[[Tensor], Tensor],
        label_dropout: float,
        num_classes: int,
        latent_shape: Sequence[int],
        image_shape: Sequence[int],
        context_frames: int = 0,
    ) -> None:
        super().__init__()
        self.stage1 = stage1.eval().requires_grad_(False)
        self.base = base
        self.schedule = schedule
        self.weighting = weighting
        self.label_dropout = label_dropout
        self.num_classes = num_classes
        self.latent_shape = tuple(latent_shape)
        self.image_shape = tuple(image_shape)
        self.latent_logsnr_max = float(self.latents().latent_logsnr_max)
        self.pixels = math.prod(self.image_shape[1:])
        self.context_frames = context_frames

    def latents(self) -> LatentModel:
        """The stage-1 latent interface of the frozen stage-1 model."""
        return latent_model(self.stage1, self.image_shape)

    def train(self, mode: bool = True) -> ULBaseModel:
        """Only the base model changes mode: the frozen stage-1 networks stay in eval mode."""
        super().train(mode)
        self.stage1.eval()
        return self

    def null_labels(self, n: int, device: torch.device) -> Tensor:
        return torch.full((n,), self.num_classes, dtype=torch.long, device=device)

    def base_eps(
        self, z_t: Tensor, logsnr: Tensor, label: Tensor | None, context: Tensor | None = None
    ) -> Tensor:
        """eps_hat of the base model (its network predicts v); label None = null label."""
        if self.num_classes == 0:
            label = None
        if context is None:
            v = self.base(z_t, logsnr, label)
        else:
            v = self.base(z_t, logsnr, label, context=context)
        return eps_from_v(z_t, v.float(), logsnr)

    @torch.no_grad()
    def encode_context(self, x: Tensor) -> Tensor:
        """Latent of the clip's first `context_frames` frames (the last one repeated to T)."""
        return self.encode_clean(context_clip(x, self.context_frames))

    def _context(self, batch: dict[str, Tensor]) -> Tensor | None:
        if self.context_frames == 0:
            return None
        if "context" in batch:
            return batch["context"].float()
        return self.encode_context(batch["x"])

    @torch.no_grad()
    def encode_clean(self, x: Tensor) -> Tensor:
        """z_clean of the frozen stage-1 model (UL: E(x)), float32."""
        return self.latents().encode_clean(x).float()

    def _latents(self, batch: dict[str, Tensor]) -> Tensor:
        return batch["z"].float() if "z" in batch else self.encode_clean(batch["x"])

    def _labels(
        self, batch: dict[str, Tensor], b: int, noise: BatchNoise | torch.Generator
    ) -> Tensor:
        device = next(iter(batch.values())).device
        label = batch.get("label")
        if label is None or self.num_classes == 0:
            return self.null_labels(b, device)
        label = label.long()
        if self.training and self.label_dropout > 0:
            drop = BatchNoise.of(noise).rand((b,), device) < self.label_dropout
            label = torch.where(drop, self.null_labels(b, device), label)
        return label

    def terms(
        self,
        z_clean: Tensor,
        label: Tensor,
        t: Tensor,
        noise: BatchNoise | torch.Generator,
        context: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(weighted loss, unweighted diffusion ELBO term) at times t (B,); both (B,) nats."""
        logsnr = self.schedule.logsnr(t)  # (B,)
        eps = BatchNoise.of(noise).randn(z_clean.shape, z_clean.device, z_clean.dtype)
        z_t = diffuse(z_clean, logsnr, eps)
        eps_hat = self.base_eps(z_t, logsnr, label, context)
        rate = self.schedule.neg_dlogsnr_dt(t)  # (B,)
        weighted = elbo_term_nats(eps, eps_hat, rate, self.weighting(logsnr))
        unweighted = elbo_term_nats(eps.detach(), eps_hat.detach(), rate)
        return weighted, unweighted

    def kl1(self, z_clean: Tensor) -> Tensor:
        t_1 = torch.ones(z_clean.shape[0], device=z_clean.device)
        logsnr_1 = self.schedule.logsnr(t_1).to(z_clean.device, torch.float32)  # λ_min, (B,)
        return kl_standard_normal_nats(z_clean, logsnr_1)

    def forward(self, batch: dict[str, Tensor], noise: BatchNoise | torch.Generator) -> ULBaseTerms:
        """The stage-2 loss terms of `batch`; `noise` draws this rank's rows (BatchNoise)."""
        noise = BatchNoise.of(noise)
        z_clean = self._latents(batch)  # (B, Cz, *s)
        b = z_clean.shape[0]
        label = self._labels(batch, b, noise)
        t = noise.antithetic_t(b, z_clean.device)
        weighted, unweighted = self.terms(z_clean, label, t, noise, self._context(batch))
        return ULBaseTerms(weighted, unweighted + self.kl1(z_clean), self.pixels)

    @torch.no_grad()
    def bits_per_pixel(
        self, batch: dict[str, Tensor], generator: torch.Generator, num_t: int
    ) -> Tensor:
        """Bitrate bound of z_clean under the (conditional) base model, (B,), `num_t` t each."""
        z_clean = self._latents(batch)
        b = z_clean.shape[0]
        label = self._labels(batch, b, generator)
        context = self._context(batch)
        t = stratified_t(b, num_t, generator, z_clean.device)  # (B, K)
        total = torch.zeros(b, device=z_clean.device)
        for k in range(num_t):
            total += self.terms(z_clean, label, t[:, k], generator, context)[1] / num_t
        return (total + self.kl1(z_clean)) / (math.log(2) * self.pixels)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        generator: torch.Generator,
        labels: Tensor | None = None,
        sampler: Callable[..., Tensor] = sample_ddim,
        steps: int = 32,
        decoder_steps: int | None = None,
        guidance: float = 1.0,
        interval: tuple[float, float] | None = None,
        context: Tensor | None = None,
    ) -> Tensor:
        """End-to-end samples (Algorithm 2): base model -> z_clean -> z_0 -> decoder; (n, C, *S).

        `labels` (n,) condition the base model (None: unconditional = null label); guidance
        `eps_u + w (eps_c - eps_u)` applies where λ lies in `interval` (None: everywhere).
        With `context_frames` k > 0, `context` (n, C, T, H, W) are real clips: the base model is
        conditioned on the latent of their first k frames, and the result is the continuation:
        the k given frames followed by T - k generated ones.
        """
        device = next(self.parameters()).device
        cond_labels = labels.to(device).long() if labels is not None else None
        null = self.null_labels(n, device)
        z_context = None
        if self.context_frames:
            if context is None or context.shape[0] != n:
                raise ValueError(f"this model continues clips: pass `context` with {n} clips")
            context = context.to(device)
            z_context = self.encode_context(context)

        def eps_cond(z_t: Tensor, logsnr: Tensor) -> Tensor:
            label = cond_labels if cond_labels is not None else null
            return self.base_eps(z_t, logsnr, label, z_context)

        def eps_uncond(z_t: Tensor, logsnr: Tensor) -> Tensor:
            return self.base_eps(z_t, logsnr, null, z_context)

        z_1 = torch.randn((n, *self.latent_shape), generator=generator, device=device)
        z_clean = sample_latents(
            eps_cond, eps_uncond, z_1, self.schedule, sampler, steps, generator, guidance, interval
        )
        x = self.latents().decode_latents(z_clean, generator, sampler, decoder_steps or steps)
        if context is not None and self.context_frames:
            x[:, :, : self.context_frames] = context[:, :, : self.context_frames].to(x.dtype)
        return x


def context_clip(x: Tensor, frames: int) -> Tensor:
    """Clips (B, C, T, H, W) cut to their first `frames` frames, the last repeated to T."""
    if x.dim() != 5 or not 0 < frames < x.shape[2]:
        raise ValueError(f"context of {frames} frames needs clips (B, C, T > {frames}, H, W)")
    last = x[:, :, frames - 1 : frames].expand(-1, -1, x.shape[2] - frames, -1, -1)
    return torch.cat([x[:, :, :frames], last], 2)


# ------------------------------------------------------------------------------ stage 1 weights
def checkpoint_dir(stage_dir: Path) -> Path:
    """Where a stage's checkpoints are (single process: checkpoints/, else checkpoints/rank0)."""
    directory = stage_dir / "checkpoints"
    if not checkpoint.list_checkpoints(directory) and (directory / "rank0").is_dir():
        return directory / "rank0"
    return directory


def load_stage_ema(stage: Any, ctx: BuildContext, stage_dir: Path) -> nn.Module:
    """Build `stage`'s module as it was built in its own run and load its newest EMA weights."""
    sub = BuildContext(ctx.example, ctx.num_classes, ctx.device, stage_dir, dict(ctx.previous))
    model = stage.build(sub)
    state = checkpoint.load_latest(checkpoint_dir(stage_dir), map_location="cpu")
    if state is None:
        raise ConfigError(
            f"stage '{stage.name}' at {stage_dir} has no valid checkpoint to load its EMA weights from"
        )
    model.load_state_dict(state["ema"])
    return model


# ------------------------------------------------------------------------------ latent cache
class LatentSource:
    """In-memory Source of cached latents: items are indices, decode gives {"z", "label"}
    (and "context", the latent of the clip's first frames, when the stage conditions on them)."""

    def __init__(self, z: Tensor, labels: Tensor, context: Tensor | None = None) -> None:
        self.z = z
        self.labels = labels
        self.context = context
        self.items = list(range(z.shape[0]))

    def decode(self, item: int) -> dict[str, Any]:
        example = {"z": self.z[item], "label": int(self.labels[item])}
        if self.context is not None:
            example["context"] = self.context[item]
        return example


def cache_key(
    encoder: nn.Module | Mapping[str, Tensor], source: Any, context_frames: int = 0
) -> str:
    """SHA-256 of the encoder's weights (a module or the `latent_state()` of a stage-1 model),
    the context length and the Source (pickled; repr if unpicklable)."""
    h = hashlib.sha256(f"ulframe-latent-cache-{CACHE_FORMAT}-{context_frames}".encode())
    state = encoder.state_dict() if isinstance(encoder, nn.Module) else encoder
    for name, value in sorted(state.items()):
        h.update(name.encode())
        h.update(str(value.dtype).encode() + str(tuple(value.shape)).encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    try:
        h.update(pickle.dumps(source, protocol=4))
    except Exception:  # an unpicklable Source: its type and repr
        h.update(f"{type(source).__qualname__}:{source!r}".encode())
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_cache(directory: Path, key: str) -> dict[str, Tensor] | None:
    """The cached {"z", "label"[, "context"]} for `key`, or None when absent, unfinished or
    corrupt."""
    data_path, marker = directory / f"latents-{key}.pt", directory / f"latents-{key}.json"
    if not (data_path.is_file() and marker.is_file()):
        return None
    try:
        meta = json.loads(marker.read_text())
        data = data_path.read_bytes()
        if meta.get("key") != key or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            return None
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if not {"z", "label"} <= state.keys():
            return None
        return dict(state)
    except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError):
        return None


def write_cache(directory: Path, key: str, latents: dict[str, Tensor]) -> Path:
    """Write the cache atomically: data (temp + rename), then the completion marker."""
    directory.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in directory.glob("latents-*"):
        if old.name.endswith(".tmp"):  # another writer's, or left by a killed run
            if now - old.stat().st_mtime > STALE_TMP_S:
                old.unlink(missing_ok=True)
        elif not old.name.startswith(f"latents-{key}."):  # another key: stale
            old.unlink(missing_ok=True)
    buf = io.BytesIO()
    torch.save(latents, buf)
    data = buf.getvalue()
    path = directory / f"latents-{key}.pt"
    _atomic_write(path, data)
    count = int(latents["z"].shape[0])
    meta = {"key": key, "sha256": hashlib.sha256(data).hexdigest(), "count": count}
    _atomic_write(directory / f"latents-{key}.json", json.dumps(meta).encode())
    return path


@torch.no_grad()
def encode_source(
    encoder: Callable[[Tensor], Tensor],
    source: Any,
    device: torch.device,
    batch_size: int = 64,
    context_frames: int = 0,
) -> dict[str, Tensor]:
    """{"z": encoder(x) (N, Cz, *s) float32, "label": (N,)} of every readable item of `source`,
    on CPU (`encoder`: a module or a stage-1 model's `encode_clean`); with `context_frames` also
    "context", the latents of the clips' first frames."""
    zs: list[Tensor] = []
    contexts: list[Tensor] = []
    labels: list[int] = []
    pending: list[Tensor] = []

    def flush() -> None:
        if pending:
            x = torch.stack(pending).to(device)
            zs.append(encoder(x).float().cpu())
            if context_frames:
                contexts.append(encoder(context_clip(x, context_frames)).float().cpu())
            pending.clear()

    for item in source.items:
        example = source.decode(item)
        if example is None:
            continue
        pending.append(example["x"])
        labels.append(int(example.get("label", 0)))
        if len(pending) == batch_size:
            flush()
    flush()
    out = {"z": torch.cat(zs), "label": torch.tensor(labels, dtype=torch.long)}
    if context_frames:
        out["context"] = torch.cat(contexts)
    return out


# ------------------------------------------------------------------------------ the stage
class ULBase:
    """Unified Latents stage 2: a class-conditional base model on frozen stage-1 latents."""

    def __init__(
        self,
        stage1: Any,
        base: Callable[..., nn.Module],
        train: TrainSettings,
        source_stage: str = "stage1",
        weighting: Callable[[Tensor], Tensor] | None = None,
        schedule: Callable[..., Any] = CosineSchedule,
        logsnr_min: float = -15.0,
        label_dropout: float = 0.1,
        cache_latents: bool = True,
        sampler: Callable[..., Tensor] = sample_ddim,
        sample_steps: int = 32,
        decoder_sample_steps: int | None = None,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] | None = None,
        eval_t_per_example: int = 8,
        eval_images: int = 8,
        context_frames: int = 0,
        name: str = "stage2",
    ) -> None:
        """
        Args:
            stage1: the stage-1 stage object, configured as the first stage
                (`@stage1/stages.ul_joint()`, or `@stage1/stages.kl_ae()` for the KL
                autoencoder baseline); rebuilt here and loaded with its EMA weights. Its
                model must provide the stage-1 latent interface (`LatentModel`).
            base: the base model's factory (`@base/priors.vit`); called with the latent shape
                and the dataset's `num_classes`.
            train: this stage's `TrainSettings`.
            source_stage: name of the finished stage whose checkpoints hold the stage-1 weights.
            weighting: w(λ) of the base loss; default `sigmoid(b' - λ)` with b' = 0.
            schedule: the base model's schedule factory; its λ_max is stage 1's
                `latent_logsnr_max` (UL: λ_z(0)).
            logsnr_min: λ_min of the base model's diffusion.
            label_dropout: probability of replacing a label by the null label while training.
            cache_latents: encode the train split once and train on the cached latents.
            sampler, sample_steps: sampler and steps of the base model (and of the decoder).
            decoder_sample_steps: the decoder's steps when sampling (default: `sample_steps`).
            guidance_scale: w of classifier-free guidance in evaluation samples (1: none).
            guidance_interval: (λ_lo, λ_hi) where guidance applies; None: everywhere.
            eval_t_per_example: t values per example in the evaluation's bitrate estimate.
            eval_images: end-to-end samples shown per evaluation.
            context_frames: video only: condition the base model on the latent of each clip's
                first k frames (the paper's Kinetics-600 protocol: 5 of 16) and generate the
                continuation; 0: unconditional on frames. See docs/method.md, "Video".
            name: the stage's folder name under `workdir/stages/`.
        """
        if context_frames < 0:
            raise ConfigError(f"ul_base.context_frames must be >= 0, got {context_frames}")
        if not 0.0 <= label_dropout < 1.0:
            raise ConfigError(f"ul_base.label_dropout must be in [0, 1), got {label_dropout}")
        if eval_t_per_example < 1:
            raise ConfigError(f"ul_base.eval_t_per_example must be >= 1, got {eval_t_per_example}")
        if guidance_interval is not None and guidance_interval[0] > guidance_interval[1]:
            raise ConfigError(
                f"ul_base.guidance_interval must be (lo, hi), got {guidance_interval}"
            )
        self.stage1 = stage1
        self.base_factory = base
        self.train = train
        self.source_stage = source_stage
        self.weighting = weighting if weighting is not None else SigmoidWeighting(0.0)
        self.schedule_factory = schedule
        self.logsnr_min = logsnr_min
        self.label_dropout = label_dropout
        self.cache_latents = cache_latents
        self.sampler = sampler
        self.sample_steps = sample_steps
        self.decoder_sample_steps = decoder_sample_steps
        self.guidance_scale = guidance_scale
        self.guidance_interval = tuple(guidance_interval) if guidance_interval else None
        self.eval_t_per_example = eval_t_per_example
        self.eval_images = eval_images
        self.context_frames = context_frames
        self.name = name
        self._model: ULBaseModel | None = None
        self._stage_dir: Path | None = None

    def build(self, ctx: BuildContext) -> ULBaseModel:
        if self.source_stage not in ctx.previous:
            raise ConfigError(
                f"ul_base.source_stage='{self.source_stage}' has not run before stage '{self.name}' "
                f"(finished stages: {sorted(ctx.previous) or 'none'}); list it first in Experiment.stages"
            )
        stage1 = load_stage_ema(self.stage1, ctx, ctx.previous[self.source_stage])
        image_shape = tuple(ctx.example["x"].shape)
        latents = latent_model(stage1, image_shape)
        if self.context_frames and not (
            len(image_shape) == 4 and self.context_frames < image_shape[1]
        ):
            raise ConfigError(
                f"ul_base.context_frames={self.context_frames} needs video clips (C, T, H, W) "
                f"with more than {self.context_frames} frames; the data gives {image_shape}"
            )
        with torch.no_grad():
            latent_shape = tuple(latents.encode_clean(ctx.example["x"][None].float()).shape[1:])
        extra = {"context_channels": latent_shape[0]} if self.context_frames else {}
        base = check_built(
            "priors",
            self.base_factory(shape=latent_shape, num_classes=ctx.num_classes, **extra),
            "ul_base.base",
        )
        schedule = self.schedule_factory(
            logsnr_min=self.logsnr_min, logsnr_max=float(latents.latent_logsnr_max), resolution=None
        )
        model = ULBaseModel(
            stage1, base, schedule, self.weighting, self.label_dropout, ctx.num_classes,
            latent_shape, image_shape, self.context_frames,
        )  # fmt: skip
        self._model, self._stage_dir = model, ctx.stage_dir
        return model

    def train_source(self, source: Any) -> Any:
        """The Source the loop trains on: cached latents when `cache_latents`, else `source`."""
        if not self.cache_latents:
            return source
        if self._model is None or self._stage_dir is None:
            raise RuntimeError("ul_base.train_source is called after build")
        latents = self._model.latents()
        key = cache_key(latents.latent_state(), source, self.context_frames)
        directory = self._stage_dir / CACHE_DIR
        cached = read_cache(directory, key)
        if cached is None:
            device = next(self._model.stage1.parameters()).device
            log.info("stage %s: encoding the train split into %s", self.name, directory)
            cached = encode_source(
                latents.encode_clean, source, device, context_frames=self.context_frames
            )
            write_cache(directory, key, cached)
        else:
            log.info("stage %s: %d cached latents from %s", self.name, len(cached["z"]), directory)
        return LatentSource(cached["z"], cached["label"], cached.get("context"))

    def sample_labels(self, n: int, device: torch.device, num_classes: int) -> Tensor | None:
        """n labels covering the classes evenly, in class order (so a grid of n = k *
        num_classes samples with k columns shows one class per row); None without classes."""
        if num_classes <= 0:
            return None
        return torch.arange(n, device=device) * num_classes // max(n, 1)

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, batches: Sequence[dict[str, Tensor]], generator: torch.Generator
    ) -> EvalReport:
        """Weighted loss, bits/pixel under the base model, and a grid of end-to-end samples."""
        assert isinstance(model, ULBaseModel)
        sums: dict[str, float] = {}
        n = 0
        for batch in batches:
            b = next(iter(batch.values())).shape[0]
            terms = model(batch, generator)
            values = {"base_nats": float(terms.base_nats.mean())}
            values["bits_per_pixel_base"] = float(
                model.bits_per_pixel(batch, generator, self.eval_t_per_example).mean()
            )
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v * b
            n += b
        scalars = {k: v / max(n, 1) for k, v in sums.items()}
        images: dict[str, Tensor] = {}
        if self.eval_images > 0:
            device = next(model.parameters()).device
            context = None
            if model.context_frames:  # continue real clips of the eval split
                clips = torch.cat([b["x"] for b in batches if "x" in b])[: self.eval_images]
                context = clips
            count = self.eval_images if context is None else len(context)
            labels = self.sample_labels(count, device, model.num_classes)
            if context is not None and "label" in batches[0]:
                labels = torch.cat([b["label"] for b in batches])[:count].to(device)
            samples = model.sample(
                count, generator, labels, self.sampler, self.sample_steps,
                self.decoder_sample_steps, self.guidance_scale, self.guidance_interval, context,
            )  # fmt: skip
            if context is None:
                images["samples"] = samples
            else:  # each real clip, then its continuation
                images["continuations"] = torch.stack([context, samples], 1).flatten(0, 1)
        return EvalReport(scalars, images)
