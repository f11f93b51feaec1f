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
weights are loaded from the newest checkpoint (`ulframe.train.checkpoint.load_stage_ema`).
Encoder and decoder (and the stage-1 prior) are frozen: `requires_grad=False`, kept in eval mode
even when the loop calls `.train()`; only the base model's parameters are trainable.

Stage 1 is reached only through the hand-off between stages (`ulframe.protocols.LatentModel`:
`encode_clean`, `decode_latents`, `latent_state`, `latent_shape`, `latent_logsnr_max`,
`noisy_latent`), which `ULJointModel` and the KL autoencoder baseline (`stages.kl_ae`) implement
themselves. With `cache_latents` the train split is encoded once (`latent_cache.py`: one file
held in memory, or with `latent_cache_format = 'shards'` tar shards streamed from disk); the loop
trains on the stage's `train_source(source)`.

End-to-end samples (UL paper Algorithm 2, `sampling.py`): the base model's chain runs from
z_1 ~ N(0, I) to λ_max, and its state there (UL: z_0) goes to the stage-1 decoder as it is.

Evaluation reports `base_nats` (the weighted loss), `bits_per_pixel_base` (the unweighted ELBO
of z_clean under the base model, `eval_t_per_example` t per example, plus KL(q(z_1)||N(0,I)),
divided by ln 2 · H · W: the bitrate bound of UL paper Table 5, "bpd with base model") and a grid
of end-to-end samples.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ulframe.diffusion import (
    BatchNoise,
    CosineSchedule,
    Schedule,
    SigmoidWeighting,
    Weighting,
    diffuse,
    elbo_term_nats,
    eps_from_v,
    kl_standard_normal_nats,
    sample_ddim,
    stratified_t,
)
from ulframe.diffusion.weighting import check_weighting
from ulframe.errors import ConfigError
from ulframe.eval.batches import Measured, evaluate_batches
from ulframe.eval.metrics import bits_per_pixel
from ulframe.protocols import (
    BuildContext,
    EvalReport,
    LatentModel,
    SampleSettings,
    Stage,
    check_built,
)
from ulframe.train.checkpoint import load_stage_ema
from ulframe.train.settings import TrainSettings

from . import latent_cache
from .sampling import context_clip, sample_latents

log = logging.getLogger(__name__)


def latent_model(stage1: nn.Module) -> LatentModel:
    """`stage1` when it implements the hand-off (`LatentModel`), else ConfigError."""
    if isinstance(stage1, LatentModel):
        return stage1
    raise ConfigError(
        f"ul_base.stage1 built a {type(stage1).__name__}, which does not provide the hand-off "
        "between stages (ulframe.protocols.LatentModel: latent_shape, latent_logsnr_max, "
        "noisy_latent, encode_clean, decode_latents, latent_state)"
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
            "bits_per_pixel_base": bits_per_pixel(self.elbo_nats.mean(), self.pixels),
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
        context_latent_steps: int = 0,
        rollout_steps: int = 0,
        noisy_context: bool = False,
        window_steps: int = 0,
        context_noise: tuple[float, float] | None = None,
        context_noise_sample: float = 0.0,
        context_dropout: float = 0.0,
        anchor_context: bool = False,
        rollout_training: float = 0.0,
        rollout_training_rounds: int = 1,
        rollout_training_steps: int = 8,
        rollout_training_sampler: Callable[..., Tensor] = sample_ddim,
        rollout_training_target: str = "clip",
        temperature: float = 1.0,
        stack_context: bool = False,
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
        self.context_latent_steps = context_latent_steps
        self.rollout_steps = rollout_steps
        self.noisy_context = noisy_context
        self.window_steps = window_steps
        self.context_noise = context_noise
        self.context_noise_sample = context_noise_sample
        self.context_dropout = context_dropout
        self.anchor_context = anchor_context
        self.rollout_training = rollout_training
        self.rollout_training_rounds = rollout_training_rounds
        self.rollout_training_steps = rollout_training_steps
        self.rollout_training_sampler = rollout_training_sampler
        self.rollout_training_target = rollout_training_target
        self.temperature = temperature
        self.stack_context = stack_context
        # With `window_steps` W the base model sees windows of W latent steps (the clip's T
        # otherwise), with `stack_context` only the W - m after the context: its own shape, and
        # the pixels its bits/pixel divide by.
        self.base_shape = base_shape(
            self.latent_shape, window_steps, context_latent_steps if stack_context else 0
        )
        self.pixels = self.pixels * self.base_shape[1] // self.latent_shape[1]

    def latents(self) -> LatentModel:
        """The frozen stage-1 model, as the hand-off between stages."""
        return latent_model(self.stage1)

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

    def _rollout(
        self, z_context: Tensor, chain: Callable[[Tensor, Tensor, Tensor], Tensor]
    ) -> Tensor:
        """A continuation in rounds (`rollout_steps` r > 0): each round runs one base-model chain
        conditioned on the last `context_latent_steps` m known latent steps (the context's own,
        then generated ones, as if they were a context of their own) and keeps the first r
        steps it generates, until the clip's latent is full. The model is trained on clips
        whose first m steps are given and every later one generated; a round asks it only for
        the steps just after a context, where it is most precise. `chain(window_context,
        clip_context, offset)` gets the round's context, the clip's own first m steps and the
        round's offset (B,) in latent steps from them. (B, C, T, H, W): the first m steps are
        the context's (replaced by the caller), the rest generated."""
        m, length = self.context_latent_steps, self.latent_shape[1]
        first = self.first_generated
        known = z_context[:, :, :m]
        while known.shape[2] < length:
            offset = torch.full((known.shape[0],), known.shape[2] - m, device=known.device)
            z = chain(self.round_context(known), z_context, offset)
            take = min(self.rollout_steps, length - known.shape[2])
            known = torch.cat([known, z[:, :, first : first + take].to(known.dtype)], 2)
        return known

    @property
    def first_generated(self) -> int:
        """The first step of the base model's window that a round keeps: m =
        `context_latent_steps` (its first m steps are the context's), 0 with `stack_context`."""
        return 0 if self.stack_context else self.context_latent_steps

    def round_context(self, known: Tensor) -> Tensor:
        """The base model's context input from the last m = `context_latent_steps` known steps
        (B, C, T', H, W): those steps, the m-th repeated over the window (`_window_context`),
        or with `stack_context` stacked along the channels, (B, m C, W - m, H, W)."""
        m = self.context_latent_steps
        if self.stack_context:
            return _stacked_context(known, m, self.base_shape[1])
        return _window_context(known, m, self.base_shape[1])

    def _windows(
        self, z_clean: Tensor, noise: BatchNoise | torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor]:
        """With `window_steps` W: one window of W consecutive latent steps per clip of `z_clean`
        (B, C, T, H, W), at an offset drawn uniformly from [0, T - W], and its context: the
        window's first m = `context_latent_steps` steps, the m-th repeated to W (the latent of
        the window's first frames, as a frame-wise encoder gives it). ((B, C, W, H, W) twice)"""
        b, length, window = z_clean.shape[0], z_clean.shape[2], self.window_steps
        u = BatchNoise.of(noise).rand((b,), z_clean.device)
        offsets = (u * (length - window + 1)).long().clamp_(max=length - window)
        z = _steps(z_clean, offsets, window)
        m = self.context_latent_steps
        return z, _window_context(z[:, :, :m], m, window), offsets

    def _rolled_windows(
        self, z_clean: Tensor, label: Tensor, noise: BatchNoise | torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`_windows` with `rollout_training` p: a fraction p of the windows (drawn per example)
        is conditioned on a context that ends in the base model's own steps, as a continuation's
        later rounds are. For such a window at offset o, R = `rollout_training_rounds` rounds
        run first from the true steps before it: round i is one base-model chain
        (`rollout_training_sampler`, `rollout_training_steps` steps, no gradient) conditioned on
        the last m known steps, and keeps the r = `rollout_steps` steps after them; the window
        is then conditioned on the last m known steps (its last min(m, R r) generated) and
        trained to denoise the clip's true steps o .. o + W - 1 (`rollout_training_target`
        "clip"), or its context as given and the clip's true steps after it ("given"): it
        learns to continue from its own slightly wrong steps, whose errors compound over a
        continuation's rounds. ((B, C, W, H, W) twice, offsets (B,))"""
        noise = BatchNoise.of(noise)
        z, context, offsets = self._windows(z_clean, noise)
        b, length, device = z_clean.shape[0], z_clean.shape[2], z_clean.device
        window, m, r = self.window_steps, self.context_latent_steps, self.rollout_steps
        ahead = self.rollout_training_rounds * r  # generated steps before a rolled window
        rolled = noise.rand((b,), device) < self.rollout_training
        u = noise.rand((b,), device)
        start = (u * (length - window - ahead + 1)).long().clamp_(max=length - window - ahead)
        # Every rank draws the chains' starting noise for the global batch (BatchNoise) and one
        # seed for their step noise; the rows a rank rolls out are its own.
        z_1 = noise.randn((b, self.rollout_training_rounds, *self.base_shape), device)
        z_1 = z_1 * self.temperature  # as a continuation's rounds start (`temperature`)
        seed = int(torch.randint(2**62, (1,), generator=noise.generator).item())
        rows = rolled.nonzero().squeeze(1)
        if rows.numel() == 0:
            return z, context, offsets
        offsets = offsets.clone()
        offsets[rows] = start[rows] + ahead
        z[rows] = _steps(z_clean[rows], offsets[rows], window)
        generator = torch.Generator(device).manual_seed(seed)
        known = _steps(z_clean[rows], start[rows], m)  # the true steps the rounds start from
        first = self.first_generated
        with torch.no_grad():
            for i in range(self.rollout_training_rounds):
                z_round = self._training_chain(
                    self.round_context(known), label[rows], z_1[rows, i], generator
                )
                z_new = z_round[:, :, first : first + r].to(known.dtype)
                known = torch.cat([known, z_new], 2)[:, :, -m:]
        context[rows] = _window_context(known, m, window)
        if self.rollout_training_target == "given":
            z[rows, :, :m] = known.to(z.dtype)
        return z, context, offsets

    def _training_chain(
        self, context: Tensor, label: Tensor, z_1: Tensor, generator: torch.Generator
    ) -> Tensor:
        """One base-model chain from `z_1` conditioned on `context`, as a continuation's round
        runs it (the chain's state at λ_z(0) for UL), for `rollout_training`."""

        def eps_fn(z_t: Tensor, logsnr: Tensor) -> Tensor:
            return self.base_eps(z_t, logsnr, label, context)

        final = "state" if self.latents().noisy_latent else "x_hat"
        return sample_latents(
            eps_fn, eps_fn, z_1, self.schedule, self.rollout_training_sampler,
            self.rollout_training_steps, generator, 1.0, None, final,
        )  # fmt: skip

    def _inputs(
        self, batch: dict[str, Tensor], noise: BatchNoise | torch.Generator
    ) -> tuple[Tensor, Tensor | None]:
        """(z_clean, context) the base model is trained and scored on: the clip's latent and
        its context latent, or with `window_steps` a window of each clip and its context."""
        z_clean = self._latents(batch)
        context: Tensor | None
        clip, offsets = None, None
        if self.window_steps:
            clip = z_clean
            if self.training and self.rollout_training > 0:
                label = self._labels(batch, z_clean.shape[0], None)
                z_clean, context, offsets = self._rolled_windows(z_clean, label, noise)
            else:
                z_clean, context, offsets = self._windows(z_clean, noise)
            if self.stack_context:  # the steps after the context, the context along channels
                m = self.context_latent_steps
                z_clean, context = z_clean[:, :, m:], self.round_context(context[:, :, :m])
        else:
            context = self._context(batch)
        context = self.conditioning(self.noised_context(context, noise), clip, offsets, noise)
        if context is not None and self.context_dropout > 0:
            dropped = torch.zeros(context.shape[0], dtype=torch.bool, device=context.device)
            if self.training:
                u = BatchNoise.of(noise).rand((context.shape[0],), context.device)
                dropped = u < self.context_dropout
            context = self.flagged_context(context, dropped)
        return z_clean, context

    def conditioning(
        self,
        context: Tensor | None,
        clip_context: Tensor | None,
        offset: Tensor | None,
        noise: BatchNoise | torch.Generator,
    ) -> Tensor | None:
        """The base model's context input from the context latent (B, C, L, H, W): augmented as
        `context_noise` says; with `anchor_context`, followed along the
        channels by the clip's own first m = `context_latent_steps` steps (`clip_context`,
        clean, the m-th repeated to L) and the window's offset from them in latent steps
        (`offset` (B,), one channel of offset / T)."""
        context = self.augmented_context(context, noise)
        if context is None or not self.anchor_context:
            return context
        if clip_context is None or offset is None:
            raise ValueError("anchor_context needs the clip's context steps and the offset")
        m, length = self.context_latent_steps, context.shape[2]
        anchor = _window_context(clip_context[:, :, :m].to(context.dtype), m, length)
        steps = self.latent_shape[1]
        level = (offset.to(context.dtype) / steps)[:, None, None, None, None]
        return torch.cat([context, anchor, level.expand(-1, 1, *context.shape[2:])], 1)

    def flagged_context(self, context: Tensor, dropped: Tensor | bool) -> Tensor:
        """With `context_dropout`: the context with one more channel, 1 where the context is
        dropped (its latent zeroed: the null context of guidance) and 0 where it is given."""
        b = context.shape[0]
        dropped = torch.as_tensor(dropped, device=context.device).expand(b)
        flag = dropped.to(context.dtype)[:, None, None, None, None]
        context = torch.where(flag > 0, torch.zeros_like(context), context)
        return torch.cat([context, flag.expand(-1, 1, *context.shape[2:])], 1)

    def augmented_context(
        self, context: Tensor | None, noise: BatchNoise | torch.Generator
    ) -> Tensor | None:
        """With `context_noise` (λ_lo, λ_hi): the context latent noised to a log-SNR λ_c,
        alpha(λ_c) c + sigma(λ_c) eps, and λ_c / 10 appended as one more channel, so that the
        base model knows how far to trust it (noise augmentation of the conditioning, as in
        cascaded diffusion and in autoregressive video models: a model trained on noised true
        contexts tolerates the errors of its own generated steps). λ_c is drawn per example,
        uniform in [λ_lo, λ_hi], while training; it is `context_noise_sample` otherwise.
        Without `context_noise`: `context` as it is."""
        if context is None or self.context_noise is None:
            return context
        b, device = context.shape[0], context.device
        if self.training:
            lo, hi = self.context_noise
            logsnr = lo + (hi - lo) * BatchNoise.of(noise).rand((b,), device)
        else:
            logsnr = torch.full((b,), float(self.context_noise_sample), device=device)
        eps = BatchNoise.of(noise).randn(context.shape, device, context.dtype)
        level = (logsnr / 10).to(context.dtype)[:, None, None, None, None]
        level = level.expand(-1, 1, *context.shape[2:])
        return torch.cat([diffuse(context, logsnr, eps), level], 1)

    def _context(self, batch: dict[str, Tensor]) -> Tensor | None:
        if self.context_frames == 0:
            return None
        if "context" in batch:
            return batch["context"].float()
        return self.encode_context(batch["x"])

    def noised_context(
        self, context: Tensor | None, noise: BatchNoise | torch.Generator
    ) -> Tensor | None:
        """With `noisy_context`, the context latent as the decoder sees a latent: noised to
        λ_z(0), z_0 = alpha z_clean + sigma eps (fresh eps from `noise`); else `context`."""
        if context is None or not self.noisy_context:
            return context
        eps = BatchNoise.of(noise).randn(context.shape, context.device, context.dtype)
        logsnr = torch.full((context.shape[0],), self.latent_logsnr_max, device=context.device)
        return diffuse(context, logsnr, eps)

    @torch.no_grad()
    def encode_clean(self, x: Tensor) -> Tensor:
        """z_clean of the frozen stage-1 model (UL: E(x)), float32."""
        return self.latents().encode_clean(x).float()

    def _latents(self, batch: dict[str, Tensor]) -> Tensor:
        return batch["z"].float() if "z" in batch else self.encode_clean(batch["x"])

    def _labels(
        self, batch: dict[str, Tensor], b: int, noise: BatchNoise | torch.Generator | None
    ) -> Tensor:
        """The labels of `batch` (B,), the null label where there are none; while training
        each is dropped with probability `label_dropout` (not without `noise`)."""
        device = next(iter(batch.values())).device
        label = batch.get("label")
        if label is None or self.num_classes == 0:
            return self.null_labels(b, device)
        label = label.long()
        if self.training and self.label_dropout > 0 and noise is not None:
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
        z_clean, context = self._inputs(batch, noise)  # (B, Cz, *s)
        b = z_clean.shape[0]
        label = self._labels(batch, b, noise)
        t = noise.antithetic_t(b, z_clean.device)
        weighted, unweighted = self.terms(z_clean, label, t, noise, context)
        return ULBaseTerms(weighted, unweighted + self.kl1(z_clean), self.pixels)

    @torch.no_grad()
    def bits_per_pixel(
        self, batch: dict[str, Tensor], generator: torch.Generator, num_t: int
    ) -> Tensor:
        """Bitrate bound of z_clean under the (conditional) base model, (B,), `num_t` t each."""
        z_clean, context = self._inputs(batch, generator)
        b = z_clean.shape[0]
        label = self._labels(batch, b, generator)
        t = stratified_t(b, num_t, generator, z_clean.device)  # (B, K)
        total = torch.zeros(b, device=z_clean.device)
        for k in range(num_t):
            total += self.terms(z_clean, label, t[:, k], generator, context)[1] / num_t
        return bits_per_pixel(total + self.kl1(z_clean), self.pixels)

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
        decoder_sampler: Callable[..., Tensor] | None = None,
    ) -> Tensor:
        """End-to-end samples (Algorithm 2): base model -> z_clean -> z_0 -> decoder; (n, C, *S).

        `labels` (n,) condition the base model (None: unconditional = null label); guidance
        `eps_u + w (eps_c - eps_u)` applies where λ lies in `interval` (None: everywhere).
        With `context_frames` k > 0, `context` (n, C, T, H, W) are real clips: the base model is
        conditioned on the latent of their first k frames, and the result is the continuation:
        the k given frames followed by T - k generated ones. The base model's chains start from
        N(0, τ² I), τ = `temperature` (1: the model's own distribution); the decoder runs
        `decoder_sampler` (None: `sampler`).
        """
        device = next(self.parameters()).device
        cond_labels = labels.to(device).long() if labels is not None else None
        null = self.null_labels(n, device)
        z_context = None
        if self.context_frames:
            if context is None or context.shape[0] != n:
                raise ValueError(f"this model continues clips: pass `context` with {n} clips")
            context = context.to(device)
            z_context = self.noised_context(self.encode_context(context), generator)

        latents = self.latents()
        # UL: the chain's own state at λ_max = λ_z(0) is z_0 (Algorithm 2); an autoencoder
        # decodes the chain's clean estimate there.
        final = "state" if latents.noisy_latent else "x_hat"

        def one_chain(z_ctx: Tensor | None) -> Tensor:
            """One base-model chain from fresh noise, conditioned on `z_ctx` as it is."""

            given = z_ctx
            null_ctx = z_ctx
            if z_ctx is not None and self.context_dropout > 0:  # guidance on the context
                given = self.flagged_context(z_ctx, False)
                null_ctx = self.flagged_context(z_ctx, True)

            def eps_cond(z_t: Tensor, logsnr: Tensor) -> Tensor:
                label = cond_labels if cond_labels is not None else null
                return self.base_eps(z_t, logsnr, label, given)

            def eps_uncond(z_t: Tensor, logsnr: Tensor) -> Tensor:
                return self.base_eps(z_t, logsnr, null, null_ctx)

            z_1 = torch.randn((n, *self.base_shape), generator=generator, device=device)
            z_1 = z_1 * self.temperature
            return sample_latents(
                eps_cond, eps_uncond, z_1, self.schedule, sampler, steps, generator, guidance,
                interval, final,
            )  # fmt: skip

        def chain(
            z_ctx: Tensor | None, clip_ctx: Tensor | None = None, offset: Tensor | None = None
        ) -> Tensor:
            """One base-model chain conditioned on the context latent `z_ctx` (its
            `conditioning`: augmented, anchored)."""
            return one_chain(self.conditioning(z_ctx, clip_ctx, offset, generator))

        if z_context is not None and self.context_latent_steps and self.rollout_steps:
            z = self._rollout(z_context, chain)
        else:  # (no anchor: it needs windows, and windows rounds)
            z = chain(z_context)
        if z_context is not None and self.context_latent_steps:
            # The first latent steps are the context's own (a frame-wise encoder): the decoder
            # gets them as in training, z_0 = alpha(λ_max) z_clean + sigma(λ_max) eps.
            m = self.context_latent_steps
            known = z_context[:, :, :m]
            if final == "state" and not self.noisy_context:  # (noisy: already a z_0)
                eps = torch.randn(known.shape, generator=generator, device=device)
                logsnr = torch.full((n,), self.latent_logsnr_max, device=device)
                known = diffuse(known, logsnr, eps)
            z = torch.cat([known.to(z.dtype), z[:, :, m:]], 2)
        steps = decoder_steps or steps
        decoder_sampler = sampler if decoder_sampler is None else decoder_sampler
        if context is None:  # (a LatentModel written before `context` needs none)
            x = latents.decode_latents(z, generator, decoder_sampler, steps)
        else:
            x = latents.decode_latents(z, generator, decoder_sampler, steps, context=context)
        if context is not None and self.context_frames:
            x[:, :, : self.context_frames] = context[:, :, : self.context_frames].to(x.dtype)
        return x


def base_shape(
    latent_shape: Sequence[int], window_steps: int, stacked_steps: int = 0
) -> tuple[int, ...]:
    """The base model's input shape: the latent's (C, T, *grid), or with `window_steps` W > 0 a
    window of it, (C, W, *grid), less the `stacked_steps` it reads along the channels
    (`stack_context`): (C, W - stacked_steps, *grid)."""
    shape = tuple(latent_shape)
    return (shape[0], window_steps - stacked_steps, *shape[2:]) if window_steps else shape


def _steps(z: Tensor, offsets: Tensor, steps: int) -> Tensor:
    """`steps` consecutive latent steps of each clip of `z` (B, C, T, H, W) from its offset
    (B,): (B, C, steps, H, W)."""
    index = offsets[:, None] + torch.arange(steps, device=z.device)  # (B, steps)
    index = index[:, None, :, None, None].expand(-1, z.shape[1], -1, *z.shape[3:])
    return z.gather(2, index)


def _stacked_context(known: Tensor, steps: int, length: int) -> Tensor:
    """The last `steps` latent steps of `known` (B, C, T', H, W) stacked along the channels,
    step by step, and repeated over `length` steps: (B, steps * C, length, H, W)."""
    window = known[:, :, -steps:]
    stacked = window.transpose(1, 2).reshape(window.shape[0], -1, 1, *window.shape[3:])
    return stacked.expand(-1, -1, length, -1, -1)


def _window_context(known: Tensor, steps: int, length: int) -> Tensor:
    """The base model's context from the last `steps` latent steps of `known` (B, C, T', H, W):
    those steps, the last one repeated up to `length` steps, as `encode_context` builds it."""
    window = known[:, :, -steps:]
    tail = window[:, :, -1:].expand(-1, -1, length - steps, -1, -1)
    return torch.cat([window, tail], 2)  # (B, C, length, H, W)


def _latent_frames(stage1: Any, shape: tuple[int, ...]) -> int | None:
    """Latent steps in time of stage 1's encoder on clips `shape`, from the encoder built on the
    meta device (no weights); None when it cannot be known without building stage 1."""
    factory = getattr(stage1, "encoder", None)
    if factory is None:
        return None
    with torch.device("meta"):
        encoder = factory(shape=shape)
    latent_shape = getattr(encoder, "latent_shape", None)
    return int(latent_shape[1]) if latent_shape is not None and len(latent_shape) == 4 else None


# ------------------------------------------------------------------------------ the stage
@dataclass
class ULBase:
    """Unified Latents stage 2: a class-conditional base model on frozen stage-1 latents.

    Its fields are the gin parameters of `stages.ul_base`:

    - stage1: the stage-1 stage object, configured as the first stage
      (`@stage1/stages.ul_joint()`, or `@stage1/stages.kl_ae()` for the KL autoencoder baseline);
      rebuilt here and loaded with its EMA weights. Its model must provide the stage-1 latent
      interface (`LatentModel`).
    - base: the base model's factory (`@base/priors.vit`); called with the latent shape and the
      dataset's `num_classes`.
    - train: this stage's `TrainSettings`.
    - source_stage: name of the finished stage whose checkpoints hold the stage-1 weights.
    - weighting: w(λ) of the base loss, `sigmoid(b' - λ)`.
    - schedule: the base model's schedule factory; its λ_max is stage 1's `latent_logsnr_max`
      (UL: λ_z(0)).
    - logsnr_min: λ_min of the base model's diffusion.
    - label_dropout: probability of replacing a label by the null label while training.
    - cache_latents: encode the train split once and train on the cached latents.
    - latent_cache_format: how the cache is stored: "file" (one file, loaded into memory) or
      "shards" (tar shards of `ulframe.data.shards`, read example by example: for a cache
      larger than memory); the same items, order and resume either way.
    - latent_cache_shard_size: the most bytes of one shard with `latent_cache_format =
      'shards'` ("1GB", "256MB", "64MiB").
    - sampler, sample_steps: sampler and steps of the base model (and of the decoder).
    - decoder_sampler: the decoder's sampler when sampling (None: `sampler`).
    - decoder_sample_steps: the decoder's steps when sampling (None: `sample_steps`).
    - temperature: τ, the base model's chains start from N(0, τ² I) instead of N(0, I), in
      sampling and in `rollout_training`'s rounds alike. With a deterministic sampler
      (`samplers.dpmpp_2m`, `heun`, `unipc`, `ddim`) τ < 1 is reduced-temperature sampling: the
      probability-flow ODE maps the likelier starting points to the likelier latents (Glow's
      temperature; stochastic samplers add fresh noise on the way, which τ does not scale). For
      prediction, where the future is (nearly) determined by the context, it keeps each round
      from adding its own noise to what the next round reads (docs/method.md, "Video"). 1: the
      model's own distribution.
    - guidance_scale: w of classifier-free guidance in evaluation samples (1: none).
    - guidance_interval: (λ_lo, λ_hi) where guidance applies; None: everywhere.
    - eval_t_per_example: t values per example in the evaluation's bitrate estimate.
    - eval_images: end-to-end samples shown per evaluation.
    - context_frames: video only: condition the base model on the latent of each clip's first k
      frames (the paper's Kinetics-600 protocol: 5 of 16) and generate the continuation; 0:
      unconditional on frames. See docs/method.md, "Video".
    - context_latent_steps: with a frame-wise encoder (latent step t a function of frame t alone:
      `encoders.resnet.frame_wise = True`), the first `context_latent_steps` latent steps of a
      continuation are the context's own latent (noised to λ_z(0) like any z_0), not the base
      model's estimate of it; it must equal `context_frames` divided by the latent's
      down-sampling in time. 0: the base model's z_0 is decoded as it is.
    - rollout_steps: with `context_latent_steps` m > 0, sample a continuation in rounds: each
      round is one base-model chain conditioned on the last m known latent steps (generated ones
      included) and keeps the r = `rollout_steps` steps after them, until the clip is full (a
      window sliding over time; ceil((T - m) / r) chains per continuation). 0: one chain for the
      whole clip. Training is the same either way.
    - window_steps: train the base model on windows of W consecutive latent steps of each clip
      (at a random offset), conditioned on the window's first m = `context_latent_steps` steps,
      and sample in rounds of W steps (needs `rollout_steps` r with m + r <= W). The rounds use
      only the steps right after a context; a window of m + r steps spends the base model's
      training there, at W/T of the clip's cost per example. 0: the whole clip.
    - context_noise: (λ_lo, λ_hi): noise augmentation of the context latent. While training,
      the context is noised to a log-SNR drawn uniformly in [λ_lo, λ_hi] per example and the
      base model is told the level (one more context channel); when sampling, every round's
      context (the true steps and the generated ones alike) is noised to
      `context_noise_sample`. Meant to let a model that reads noisy true contexts tolerate the
      errors of its own generated steps; on Moving-Digits it made the continuations worse
      (docs/method.md, "Video"). None: the context as it is.
    - context_noise_sample: the context's log-SNR when sampling with `context_noise`.
    - context_dropout: probability of replacing the context latent by the null context (zeros,
      flagged in one more context channel) while training, so that one network is also the
      model without context and `guidance_scale` guides on the context (and on the label,
      when there is one): eps_null + w (eps_context - eps_null). 0: no null context.
    - anchor_context: with `window_steps`, condition every window also on the clip's own first
      m = `context_latent_steps` latent steps (clean; the true context's when sampling) and on
      the window's offset from them, so that every round of a continuation sees the real
      context frames, not only the last m steps (generated ones after the first round), and
      knows how far it is from them. With `context_noise` only the window's context is noised,
      not the anchor. On Moving-Digits the model did not use it (docs/method.md, "Video").
      False: the window's context alone.
    - rollout_training: with `window_steps`, the fraction of training windows conditioned on
      a context that ends in the base model's own steps: `rollout_training_rounds` rounds of a
      continuation run first (no gradient) from the true steps before the window, and the
      window learns what `rollout_training_target` says from the context they leave (its last
      steps generated, as in a continuation's later rounds). Meant to teach the model to correct
      its own drift; each rolled window costs `rollout_training_rounds` ×
      `rollout_training_steps` more forward passes (docs/method.md, "Video"). 0: true contexts.
    - rollout_training_rounds: the rounds run before a rolled window (each keeps
      `rollout_steps` steps).
    - rollout_training_steps: the base-model steps of each of those chains, with the stage's
      `sampler`.
    - rollout_training_target: what a rolled window learns at its context's steps: "clip", the
      clip's true steps (the model is asked to correct the steps it generated); "given", the
      context's steps as given (generated ones included), the clip's true steps after them.
    - stack_context: with `window_steps` W, the base model denoises only the W - m steps of a
      window after its context and reads the context's m = `context_latent_steps` steps
      stacked along the channels (m × C channels on the grid of those steps), as video
      prediction networks stack their input frames: a base model of (C, W - m, H, W) that sees
      all m context steps at its first layer, at (W - m) / W of the cost of one that denoises
      the whole window (with `window_steps` 6 and `rollout_steps` 1: a sixth). The context's
      steps are not denoised, so `rollout_training_target`'s two targets coincide. False: the
      whole window, the context along the channels of every step.
    - noisy_context: condition the base model on the context's latent noised to λ_z(0) (a z_0,
      as the decoder sees latents; fresh noise in every batch) instead of z_clean, in training
      and sampling alike; the generated steps a round reads are such z_0 too. False: z_clean.
    - class_conditional: condition the base model on the dataset's labels (with `label_dropout`
      for guidance). False: the base model has no class input and labels are ignored, so a clip
      is continued from its context alone (the video experiments: frame prediction as on
      Kinetics-600, no label).
    - name: the stage's folder name under `workdir/stages/`.
    """

    # The gin parameters, one field each (deliberately: TrainSettings lists its own the same way).
    stage1: Stage
    base: Callable[..., nn.Module]
    train: TrainSettings
    source_stage: str = "stage1"
    weighting: Weighting = SigmoidWeighting(0.0)
    schedule: Callable[..., Schedule] = CosineSchedule
    logsnr_min: float = -15.0
    label_dropout: float = 0.1
    cache_latents: bool = True
    latent_cache_format: latent_cache.CacheFormat = "file"
    latent_cache_shard_size: str = latent_cache.SHARD_SIZE
    sampler: Callable[..., Tensor] = sample_ddim
    sample_steps: int = 32
    decoder_sampler: Callable[..., Tensor] | None = None
    decoder_sample_steps: int | None = None
    temperature: float = 1.0
    stack_context: bool = False
    guidance_scale: float = 1.0
    guidance_interval: tuple[float, float] | None = None
    eval_t_per_example: int = 8
    eval_images: int = 8
    context_frames: int = 0
    context_latent_steps: int = 0
    rollout_steps: int = 0
    noisy_context: bool = False
    window_steps: int = 0
    context_noise: tuple[float, float] | None = None
    context_noise_sample: float = 4.0
    context_dropout: float = 0.0
    anchor_context: bool = False
    rollout_training: float = 0.0
    rollout_training_rounds: int = 1
    rollout_training_steps: int = 8
    rollout_training_target: str = "clip"
    class_conditional: bool = True
    name: str = "stage2"
    _model: ULBaseModel | None = field(default=None, init=False, repr=False)
    _stage_dir: Path | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        frames, steps = self.context_frames, self.context_latent_steps
        if frames < 0:
            raise ConfigError(f"ul_base.context_frames must be >= 0, got {frames}")
        if steps < 0 or (steps and not frames):
            raise ConfigError(
                f"ul_base.context_latent_steps={steps} needs context_frames > 0 "
                f"(got {frames}) and must be >= 0"
            )
        if self.rollout_steps < 0 or (self.rollout_steps and not steps):
            raise ConfigError(
                f"ul_base.rollout_steps={self.rollout_steps} needs context_latent_steps > 0 "
                f"(got {steps}) and must be >= 0"
            )
        window, rollout = self.window_steps, self.rollout_steps
        if window < 0 or (window and not (rollout and steps + rollout <= window)):
            raise ConfigError(
                f"ul_base.window_steps={window} needs rollout_steps > 0 and context_latent_steps "
                f"+ rollout_steps <= window_steps (got context_latent_steps={steps}, "
                f"rollout_steps={rollout}) and must be >= 0"
            )
        noise = self.context_noise
        if noise is not None:
            if not frames or len(noise) != 2 or noise[0] > noise[1]:
                raise ConfigError(
                    f"ul_base.context_noise={noise} must be (λ_lo, λ_hi) with λ_lo <= λ_hi, on "
                    f"a stage with context_frames > 0 (got {frames})"
                )
            self.context_noise = (float(noise[0]), float(noise[1]))
        if not 0.0 <= self.context_dropout < 1.0 or (self.context_dropout and not frames):
            raise ConfigError(
                f"ul_base.context_dropout={self.context_dropout} must be in [0, 1), and > 0 only "
                f"with context_frames > 0 (got {frames})"
            )
        if self.stack_context and (not window or self.anchor_context):
            raise ConfigError(
                "ul_base.stack_context=True needs window_steps > 0 (the steps after a window's "
                f"context; got window_steps={window}) and no anchor_context"
            )
        if self.anchor_context and not window:
            raise ConfigError(
                "ul_base.anchor_context=True needs window_steps > 0 (the windows it anchors to "
                f"the clip's context; got window_steps={window})"
            )
        if not 0.0 <= self.rollout_training <= 1.0 or (self.rollout_training and not window):
            raise ConfigError(
                f"ul_base.rollout_training={self.rollout_training} must be in [0, 1], and > 0 "
                f"only with window_steps > 0 (got {window})"
            )
        if self.rollout_training and (
            self.context_noise is not None or self.context_dropout or self.anchor_context
        ):
            raise ConfigError(
                "ul_base.rollout_training is not combined with context_noise, context_dropout "
                "or anchor_context: the rounds it runs condition on the context as it is"
            )
        if self.rollout_training_target not in ("clip", "given"):
            raise ConfigError(
                "ul_base.rollout_training_target must be 'clip' or 'given', got "
                f"{self.rollout_training_target!r}"
            )
        if self.rollout_training_rounds < 1 or self.rollout_training_steps < 1:
            raise ConfigError(
                "ul_base.rollout_training_rounds and rollout_training_steps must be >= 1, got "
                f"{self.rollout_training_rounds} and {self.rollout_training_steps}"
            )
        if not 0.0 <= self.label_dropout < 1.0:
            raise ConfigError(f"ul_base.label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.latent_cache_format not in latent_cache.CACHE_FORMATS:
            raise ConfigError(
                f"ul_base.latent_cache_format must be one of {latent_cache.CACHE_FORMATS}, "
                f"got {self.latent_cache_format!r}"
            )
        latent_cache.shard_bytes(self.latent_cache_shard_size)  # ConfigError unless a size
        if self.eval_t_per_example < 1:
            raise ConfigError(
                f"ul_base.eval_t_per_example must be >= 1, got {self.eval_t_per_example}"
            )
        interval = self.guidance_interval
        if interval is not None and interval[0] > interval[1]:
            raise ConfigError(f"ul_base.guidance_interval must be (lo, hi), got {interval}")
        self.guidance_interval = (float(interval[0]), float(interval[1])) if interval else None
        if self.sample_steps < 1:
            raise ConfigError(f"ul_base.sample_steps must be >= 1, got {self.sample_steps}")
        if not self.temperature >= 0.0:
            raise ConfigError(f"ul_base.temperature must be >= 0, got {self.temperature}")
        if self.decoder_sample_steps is not None and self.decoder_sample_steps < 1:
            raise ConfigError(
                "ul_base.decoder_sample_steps must be >= 1 (or None), "
                f"got {self.decoder_sample_steps}"
            )
        check_weighting(self.weighting, "ul_base.weighting", self.logsnr_min)  # λ_max: stage 1's

    def build(self, ctx: BuildContext) -> ULBaseModel:
        if self.source_stage not in ctx.previous:
            raise ConfigError(
                f"ul_base.source_stage='{self.source_stage}' has not run before stage '{self.name}' "
                f"(finished stages: {sorted(ctx.previous) or 'none'}); list it first in Experiment.stages"
            )
        stage1 = load_stage_ema(self.stage1, ctx, ctx.previous[self.source_stage])
        image_shape = tuple(ctx.example["x"].shape)
        latents = latent_model(stage1)
        self.check_clip_length(image_shape)  # the latent steps: below, on the built encoder
        latent_shape = tuple(latents.latent_shape)
        if self.context_latent_steps:
            self.check_latent_steps(image_shape, latent_shape[1] if len(latent_shape) == 4 else 0)
        if self.window_steps and self.window_steps > latent_shape[1]:
            raise ConfigError(
                f"ul_base.window_steps={self.window_steps} is longer than the latent's "
                f"{latent_shape[1]} steps"
            )
        ahead = self.rollout_training_rounds * self.rollout_steps if self.rollout_training else 0
        if self.window_steps and self.window_steps + ahead > latent_shape[1]:
            raise ConfigError(
                f"ul_base.rollout_training_rounds={self.rollout_training_rounds} rounds of "
                f"rollout_steps={self.rollout_steps} before a window of window_steps="
                f"{self.window_steps} need more than the latent's {latent_shape[1]} steps"
            )
        # the latent's channels, + the noise level, + the anchor and its offset, + the null flag
        stacked = self.context_latent_steps if self.stack_context else 1
        channels = latent_shape[0] * stacked + bool(self.context_noise) + bool(self.context_dropout)
        channels += (latent_shape[0] + 1) * self.anchor_context
        extra = {"context_channels": channels} if self.context_frames else {}
        num_classes = ctx.num_classes if self.class_conditional else 0
        base = check_built(
            "priors",
            self.base(
                shape=base_shape(
                    latent_shape,
                    self.window_steps,
                    self.context_latent_steps if self.stack_context else 0,
                ),
                num_classes=num_classes,
                **extra,
            ),
            "ul_base.base",
        )
        schedule = self.schedule(
            logsnr_min=self.logsnr_min, logsnr_max=float(latents.latent_logsnr_max), resolution=None
        )
        model = ULBaseModel(
            stage1, base, schedule, self.weighting, self.label_dropout, num_classes,
            latent_shape, image_shape, self.context_frames, self.context_latent_steps,
            self.rollout_steps, self.noisy_context, self.window_steps, self.context_noise,
            self.context_noise_sample, self.context_dropout, self.anchor_context,
            self.rollout_training, self.rollout_training_rounds, self.rollout_training_steps,
            self.sampler, self.rollout_training_target, self.temperature, self.stack_context,
        )  # fmt: skip
        self._model, self._stage_dir = model, ctx.stage_dir
        return model

    def check_data(self, example: dict[str, Tensor]) -> None:
        """ConfigError (one line) when `context_frames` does not fit the data's clips: it needs
        clips (C, T, H, W) with T > context_frames. Called before any stage trains."""
        shape = tuple(example["x"].shape)
        self.check_clip_length(shape)
        if self.context_latent_steps:
            self.check_latent_steps(shape, _latent_frames(self.stage1, shape))

    def check_clip_length(self, shape: tuple[int, ...]) -> None:
        """ConfigError unless examples of `shape` are clips (C, T, H, W) with T > context_frames
        (when the stage continues clips)."""
        if self.context_frames and not (len(shape) == 4 and self.context_frames < shape[1]):
            raise ConfigError(
                f"ul_base.context_frames={self.context_frames} needs video clips (C, T, H, W) "
                f"with more than {self.context_frames} frames; the data gives {shape}"
            )

    def check_latent_steps(self, shape: tuple[int, ...], latent_frames: int | None) -> None:
        """ConfigError unless the first `context_latent_steps` latent steps cover exactly the
        `context_frames` frames of clips `shape` (C, T, H, W) with `latent_frames` latent steps
        (None: not known before the encoder is built; checked again at build)."""
        if latent_frames is None:
            return
        frames = shape[1]
        stride = frames // latent_frames if latent_frames and frames % latent_frames == 0 else 0
        if not stride or self.context_latent_steps * stride != self.context_frames:
            raise ConfigError(
                f"ul_base.context_latent_steps={self.context_latent_steps} does not fit "
                f"ul_base.context_frames={self.context_frames}: the latent has {latent_frames} "
                f"steps for {frames} frames (context_latent_steps x frames per step must equal "
                f"context_frames)"
            )

    def train_source(self, source: Any) -> Any:
        """The Source the loop trains on: cached latents when `cache_latents` (in memory, or
        streamed from the shard cache with `latent_cache_format = 'shards'`), else `source`."""
        if not self.cache_latents:
            return source
        if self._model is None or self._stage_dir is None:
            raise RuntimeError("ul_base.train_source is called after build")
        model = self._model
        latents = model.latents()
        key = latent_cache.cache_key(
            latents.latent_state(), source, self.context_frames, self.latent_cache_format
        )
        directory = self._stage_dir / latent_cache.CACHE_DIR
        device = next(model.stage1.parameters()).device
        context = model.encode_context if self.context_frames else None
        if self.latent_cache_format == "shards":
            shards = latent_cache.read_shard_cache(directory, key)
            if shards is None:
                log.info(
                    "stage %s: encoding the train split into shards in %s", self.name, directory
                )
                batches = latent_cache.encode_batches(
                    latents.encode_clean, source, device, context=context
                )
                max_bytes = latent_cache.shard_bytes(self.latent_cache_shard_size)
                shards = latent_cache.write_shard_cache(directory, key, batches, max_bytes)
            else:
                log.info(
                    "stage %s: %d cached latents in %s", self.name, len(shards.items), shards.folder
                )
            return shards
        cached = latent_cache.read_cache(directory, key)
        if cached is None:
            log.info("stage %s: encoding the train split into %s", self.name, directory)
            cached = latent_cache.encode_source(
                latents.encode_clean, source, device, context=context
            )
            latent_cache.write_cache(directory, key, cached)
        else:
            log.info("stage %s: %d cached latents from %s", self.name, len(cached["z"]), directory)
        return latent_cache.LatentSource(cached["z"], cached["label"], cached.get("context"))

    # -- sampling (ulframe.protocols.SamplingStage) ---------------------------------------------
    def sample_labels(self, n: int, device: torch.device, num_classes: int) -> Tensor | None:
        """n labels covering the classes evenly, in class order (so a grid of n = k *
        num_classes samples with k columns shows one class per row); None without classes."""
        if num_classes <= 0:
            return None
        return torch.arange(n, device=device) * num_classes // max(n, 1)

    def sample_settings(
        self, model: nn.Module, guidance: float | None = None, steps: int | None = None
    ) -> SampleSettings:
        """The guidance and base-model steps `sample` uses; clips continue real clips when the
        model conditions on their first frames."""
        assert isinstance(model, ULBaseModel)
        frames = model.context_frames
        return SampleSettings(
            guidance=self.guidance_scale if guidance is None else guidance,
            steps=self.sample_steps if steps is None else steps,
            continues=bool(frames),
            facts={"context_frames": frames} if frames else {},
        )

    @torch.no_grad()
    # The signature of protocols.SamplingStage.sample, repeated as an implementation must.
    def sample(
        self,
        model: nn.Module,
        n: int,
        labels: Tensor | None = None,
        guidance: float | None = None,
        generator: torch.Generator | None = None,
        steps: int | None = None,
        context: Tensor | None = None,
        sampler: Callable[..., Tensor] | None = None,
        decoder_steps: int | None = None,
    ) -> Tensor:
        """n end-to-end samples (Algorithm 2) with the stage's sampler (`sampler`: another one,
        for the base model and the decoder alike); `steps` (None: the stage's `sample_steps` and
        `decoder_sample_steps`) sets the base model's and the decoder's steps, `decoder_steps`
        the decoder's alone (over `steps`), `guidance` (None: `guidance_scale`) the guidance
        scale."""
        assert isinstance(model, ULBaseModel)
        if generator is None:
            generator = torch.Generator(next(model.parameters()).device)
        if decoder_steps is None:
            decoder_steps = self.decoder_sample_steps if steps is None else steps
        # A `sampler` passed here runs base model and decoder alike; the stage's own settings
        # may give the decoder another (`decoder_sampler`).
        decoder_sampler = self.decoder_sampler if sampler is None else sampler
        return model.sample(
            n, generator, labels, self.sampler if sampler is None else sampler,
            self.sample_steps if steps is None else steps, decoder_steps,
            self.guidance_scale if guidance is None else guidance,
            self.guidance_interval, context, decoder_sampler,
        )  # fmt: skip

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, batches: Sequence[dict[str, Tensor]], generator: torch.Generator
    ) -> EvalReport:
        """Weighted loss, bits/pixel under the base model, and a grid of end-to-end samples."""
        assert isinstance(model, ULBaseModel)

        def measure(batch: dict[str, Tensor]) -> Measured:
            terms = model(batch, generator)
            values = {"base_nats": float(terms.base_nats.mean())}
            values["bits_per_pixel_base"] = float(
                model.bits_per_pixel(batch, generator, self.eval_t_per_example).mean()
            )
            return Measured(values)

        scalars = evaluate_batches(batches, measure).scalars
        images: dict[str, Tensor] = {}
        if self.eval_images > 0:
            device = next(model.parameters()).device
            context = None
            if model.context_frames:  # continue real clips of the eval split
                context = torch.cat([b["x"] for b in batches if "x" in b])[: self.eval_images]
            count = self.eval_images if context is None else len(context)
            labels = self.sample_labels(count, device, model.num_classes)
            if context is not None and "label" in batches[0]:
                labels = torch.cat([b["label"] for b in batches])[:count].to(device)
            samples = self.sample(model, count, labels, generator=generator, context=context)
            if context is None:
                images["samples"] = samples
            else:  # each real clip, then its continuation
                images["continuations"] = torch.stack([context, samples], 1).flatten(0, 1)
        return EvalReport(scalars, images)
