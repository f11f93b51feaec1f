"""Stage 1 of Unified Latents: encoder, diffusion prior and diffusion decoder trained jointly.

The objective (UL paper Algorithm 1; docs/method.md, "Stage 1"), per example, in nats:

    z_clean = E(x)
    L_z = (-dλ_z/dt) · ½ · Σ (eps - eps_hat(z_t, λ_z))²  +  KL(q(z_1 | x) || N(0, I))
          with z_t = alpha(λ_z) z_clean + sigma(λ_z) eps,  λ_z ∈ [λ_min, λ_z(0) = 5],  w ≡ 1
    L_x = c_lf · (-dλ_x/dt) · ½ · sigmoid(b - λ_x) · Σ (eps' - eps_hat'(x_t, λ_x, z_0))²
          with z_0 = alpha(5) z_clean + sigma(5) eps_z (fresh noise)
    L   = L_z + L_x

The networks predict v = alpha eps - sigma x (Salimans & Ho 2022) and `eps_hat` is computed from
it (`eps_from_v`): the loss is exactly the eps-MSE above, but x_hat = (z_t - sigma eps_hat) / alpha
stays finite at λ = -15, where an eps-predicting network's error is amplified sigma/alpha ≈ 1800
times and few-step DDIM reconstructions come out as noise (docs/method.md).

Both typos of the paper are fixed: `-dλ/dt` (not `+`) and `sigmoid(b - λ)` (not `λ - b`).
The loss factor c_lf is a float32 buffer of the model (`ULJointModel.loss_factor`), so a hook that
changes it while training (`hooks.bitrate_controller`) has its value saved in checkpoints, restored
on resume and copied into the EMA model with the other buffers.
The two terms draw independent t and noise. `L_z / ln 2` bounds the bits in z_0; bits/pixel
divides by ln 2 and the number of pixels H·W (T·H·W for video), not by the channel count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ulframe.diffusion import (
    BatchNoise,
    CosineSchedule,
    ELBOWeighting,
    Schedule,
    ShiftedCosineSchedule,
    SigmoidWeighting,
    Weighting,
    diffuse,
    elbo_term_nats,
    eps_from_v,
    is_elbo_weighting,
    kl_standard_normal_nats,
    sample_ddim,
    stratified_t,
)
from ulframe.diffusion.samplers import sampler_grid
from ulframe.diffusion.weighting import check_weighting
from ulframe.errors import ConfigError
from ulframe.eval.batches import Measured, evaluate_batches
from ulframe.eval.metrics import bits_per_pixel, psnr
from ulframe.protocols import BuildContext, EvalReport, TrainsOnDataset, check_built
from ulframe.train.settings import TrainSettings

from .sampling import context_clip

LATENT_LOGSNR_MAX = 5.0  # λ_z(0): the fixed encoding noise of the paper


def crossing_logsnr(weighting: Callable[[Tensor], Tensor], loss_factor: float) -> float | None:
    """λ* where loss_factor · w(λ*) = 1, the log-SNR below which the decoder's scaled weight
    exceeds the prior's (coarser content goes to the latent); None when the weighting has no
    crossing (`crossing_logsnr` method) or loss_factor <= 1."""
    crossing = getattr(weighting, "crossing_logsnr", None)
    if crossing is None or loss_factor <= 1:
        return None
    return float(crossing(loss_factor))


@dataclass(frozen=True)
class ULJointTerms:
    """The stage-1 loss terms, nats per example, each (B,)."""

    prior_diffusion_nats: Tensor  # diffusion part of L_z (ELBO, w ≡ 1)
    prior_kl1_nats: Tensor  # KL(q(z_1|x) || N(0, I))
    decoder_nats: Tensor  # L_x: loss factor × sigmoid-weighted ELBO term
    pixels: int  # H·W (T·H·W for video): the bits/pixel normaliser
    crossing_logsnr: float | None = None  # λ* = b + log(c_lf - 1) of the decoder weighting
    loss_factor: Tensor | None = None  # c_lf, 0-d: the model's buffer when the terms were made

    @property
    def prior_nats(self) -> Tensor:
        return self.prior_diffusion_nats + self.prior_kl1_nats  # (B,)

    def total_nats(self) -> Tensor:
        return self.prior_nats + self.decoder_nats  # (B,)

    def metrics(self) -> dict[str, Tensor]:
        """Batch means of every term, and bits/pixel of the latent."""
        out = {
            "prior_nats": self.prior_nats.mean(),
            "prior_diffusion_nats": self.prior_diffusion_nats.mean(),
            "prior_kl1_nats": self.prior_kl1_nats.mean(),
            "decoder_nats": self.decoder_nats.mean(),
            "total_nats": self.total_nats().mean(),
            "bits_per_pixel": bits_per_pixel(self.prior_nats.mean(), self.pixels),
        }
        if self.crossing_logsnr is not None:
            out["crossing_logsnr"] = torch.tensor(self.crossing_logsnr)
        if self.loss_factor is not None:
            out["loss_factor"] = self.loss_factor.detach().float().reshape(())
        return out


class ULJointModel(nn.Module):
    """Encoder, prior and decoder; `forward(batch, noise)` is the stage-1 loss.

    `loss_factor` (c_lf) is a registered float32 0-d buffer: it is in `state_dict()` (checkpoints,
    EMA copies) and may be changed in place while training (`model.loss_factor.fill_(c)`); the
    crossing point λ* reported in the metrics follows it.
    """

    loss_factor: Tensor

    def __init__(
        self,
        encoder: nn.Module,
        prior: nn.Module,
        decoder: nn.Module,
        prior_schedule: Any,
        decoder_schedule: Any,
        decoder_weighting: Callable[[Tensor], Tensor],
        loss_factor: float,
        latent_logsnr_max: float,
        pixels: int,
        image_shape: Sequence[int] = (),
        latent_shape: Sequence[int] = (),
        context_frames: int = 0,
    ) -> None:
        super().__init__()
        self.context_frames = context_frames  # the decoder sees the first k frames (0: none)
        self.encoder = encoder
        self.prior = prior
        self.decoder = decoder
        self.prior_schedule = prior_schedule
        self.decoder_schedule = decoder_schedule
        self.decoder_weighting = decoder_weighting
        self.register_buffer("loss_factor", torch.tensor(float(loss_factor), dtype=torch.float32))
        self.latent_logsnr_max = latent_logsnr_max
        self.pixels = pixels
        self.image_shape = tuple(image_shape)  # (C, *S)
        self.latent_shape = tuple(latent_shape)  # (Cz, *s)
        self._crossing_key: tuple[int, int] | None = None  # (id, version) of the buffer seen
        self._crossing: float | None = None

    def crossing_logsnr(self) -> float | None:
        """λ* where c_lf · w(λ*) = 1 for the current c_lf (None if w has no crossing or c_lf <= 1).

        Recomputed only when the buffer changed (its version counter moved), so training steps
        at a constant c_lf read no device value.
        """
        key = (id(self.loss_factor), self.loss_factor._version)
        if key != self._crossing_key:
            self._crossing = crossing_logsnr(self.decoder_weighting, float(self.loss_factor))
            self._crossing_key = key
        return self._crossing

    def prior_eps(self, z_t: Tensor, logsnr: Tensor) -> Tensor:
        """eps_hat of the prior: its network predicts v."""
        return eps_from_v(z_t, self.prior(z_t, logsnr).float(), logsnr)  # (B, Cz, *s)

    def decoder_eps(
        self, x_t: Tensor, logsnr: Tensor, z_0: Tensor, context: Tensor | None = None
    ) -> Tensor:
        """eps_hat of the decoder: its network predicts v. `context` (B, C, *S): the clip's
        first `context_frames` frames, the last repeated (`decoder_context`), or None."""
        if context is None:
            v = self.decoder(x_t, logsnr, z_0)
        else:
            v = self.decoder(x_t, logsnr, z_0, context=context)
        return eps_from_v(x_t, v.float(), logsnr)  # (B, C, *S)

    def decoder_context(self, clips: Tensor | None) -> Tensor | None:
        """What the decoder sees of real `clips` (B, C, T, H, W): their first `context_frames`
        frames, the last repeated to T; None when the decoder takes no context. Raises
        ValueError when it needs one and `clips` is None."""
        if not self.context_frames:
            return None
        if clips is None:
            raise ValueError(
                f"this stage-1 decoder is conditioned on the first {self.context_frames} frames "
                "of a clip: pass the clips whose continuation this is (`context`)"
            )
        return context_clip(clips, self.context_frames, "ul_joint.decoder_context_frames")

    def encode(self, x: Tensor, noise: BatchNoise | torch.Generator) -> tuple[Tensor, Tensor]:
        """z_clean = E(x) and z_0 = alpha(λ_z(0)) z_clean + sigma(λ_z(0)) eps_z."""
        z_clean = self.encoder(x)  # (B, Cz, *s)
        eps_z = BatchNoise.of(noise).randn(z_clean.shape, x.device, z_clean.dtype)
        logsnr_0 = torch.full((x.shape[0],), self.latent_logsnr_max, device=x.device)
        return z_clean, diffuse(z_clean, logsnr_0, eps_z)

    def prior_terms(
        self, z_clean: Tensor, t: Tensor, noise: BatchNoise | torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Diffusion part of L_z at times t (B,), and KL_1; both (B,) nats."""
        logsnr = self.prior_schedule.logsnr(t)  # (B,)
        eps = BatchNoise.of(noise).randn(z_clean.shape, z_clean.device, z_clean.dtype)
        z_t = diffuse(z_clean, logsnr, eps)  # (B, Cz, *s)
        eps_hat = self.prior_eps(z_t, logsnr)  # (B, Cz, *s)
        diffusion = elbo_term_nats(eps, eps_hat, self.prior_schedule.neg_dlogsnr_dt(t))  # (B,)
        logsnr_1 = torch.full_like(t, self.prior_schedule.logsnr_min)
        return diffusion, kl_standard_normal_nats(z_clean, logsnr_1)

    def decoder_term(
        self, x: Tensor, z_0: Tensor, t: Tensor, noise: BatchNoise | torch.Generator
    ) -> Tensor:
        """L_x at times t: loss factor × sigmoid-weighted ELBO term, (B,) nats."""
        logsnr = self.decoder_schedule.logsnr(t)  # (B,)
        eps = BatchNoise.of(noise).randn(x.shape, x.device, x.dtype)
        x_t = diffuse(x, logsnr, eps)  # (B, C, *S)
        eps_hat = self.decoder_eps(x_t, logsnr, z_0, self.decoder_context(x))  # (B, C, *S)
        weight = self.decoder_weighting(logsnr)  # (B,)
        neg_dlogsnr_dt = self.decoder_schedule.neg_dlogsnr_dt(t)  # (B,)
        return self.loss_factor * elbo_term_nats(eps, eps_hat, neg_dlogsnr_dt, weight)  # (B,)

    def forward(
        self, batch: dict[str, Tensor], noise: BatchNoise | torch.Generator
    ) -> ULJointTerms:
        """The stage-1 loss terms of `batch`; `noise` draws this rank's rows (BatchNoise)."""
        noise = BatchNoise.of(noise)
        x = batch["x"]  # (B, C, *S)
        b = x.shape[0]
        z_clean, z_0 = self.encode(x, noise)
        t_z = noise.antithetic_t(b, x.device)  # independent times for the two terms
        t_x = noise.antithetic_t(b, x.device)  # (Algorithm 1)
        prior_diffusion, kl1 = self.prior_terms(z_clean.float(), t_z, noise)
        decoder = self.decoder_term(x, z_0, t_x, noise)
        loss_factor = self.loss_factor.detach().clone()  # the value these terms were made with
        return ULJointTerms(
            prior_diffusion, kl1, decoder, self.pixels, self.crossing_logsnr(), loss_factor
        )

    @torch.no_grad()
    def bits_per_pixel(self, x: Tensor, generator: torch.Generator, num_t: int) -> Tensor:
        """Latent bitrate bound per example, (B,), with `num_t` stratified t per example."""
        z_clean = self.encoder(x).float()
        t = stratified_t(x.shape[0], num_t, generator, x.device)  # (B, K)
        total = torch.zeros(x.shape[0], device=x.device)
        for k in range(num_t):
            diffusion, kl1 = self.prior_terms(z_clean, t[:, k], generator)
            total += diffusion / num_t
        return bits_per_pixel(total + kl1, self.pixels)

    @torch.no_grad()
    def reconstruct(
        self, x: Tensor, generator: torch.Generator, sampler: Callable[..., Tensor], steps: int
    ) -> Tensor:
        """Encode, draw z_0, and sample the decoder from pure noise: x_hat, shape of x."""
        _, z_0 = self.encode(x, generator)
        return self.decode_latents(z_0, generator, sampler, steps, context=x)

    @torch.no_grad()
    def sample_latents(
        self, n: int, generator: torch.Generator, sampler: Callable[..., Tensor], steps: int
    ) -> Tensor:
        """n latents z_0 drawn from the stage-1 prior: the prior chain's own state at λ_z(0)
        (UL paper, Algorithm 2; not its clean estimate noised again), (n, Cz, *s)."""
        device = next(self.parameters()).device
        z_1 = torch.randn((n, *self.latent_shape), generator=generator, device=device)
        grid = sampler_grid(sampler, self.prior_schedule, steps).to(device, torch.float32)
        return sampler(self.prior_eps, z_1, grid, generator=generator, final="state")

    # -- the hand-off to a later stage (ulframe.protocols.LatentModel) ---------------------------
    noisy_latent = True  # decode_latents takes z_0, the latent at λ_z(0)

    @torch.no_grad()
    def encode_clean(self, x: Tensor) -> Tensor:
        """z_clean = E(x), float32: the latent a base model models."""
        return self.encoder(x).float()

    @torch.no_grad()
    def decode_latents(
        self,
        z_0: Tensor,
        generator: torch.Generator | None,
        sampler: Callable[..., Tensor],
        steps: int,
        context: Tensor | None = None,
    ) -> Tensor:
        """The diffusion decoder conditioned on z_0 (the latent at λ_z(0)), sampled from
        x_1 ~ N(0, I) with `sampler` for `steps` steps: (B, C, *S), x_hat clipped to [-1, 1].
        `context` (B, C, T, H, W): the real clips being continued; a decoder conditioned on
        their first frames (`context_frames`) needs them, any other ignores them."""
        if not self.image_shape:
            raise ValueError("ULJointModel.decode_latents needs the model's image_shape")
        x_1 = torch.randn((z_0.shape[0], *self.image_shape), generator=generator, device=z_0.device)
        grid = sampler_grid(sampler, self.decoder_schedule, steps).to(z_0.device, torch.float32)
        seen = self.decoder_context(context.to(x_1) if context is not None else None)

        def eps_fn(x_t: Tensor, logsnr: Tensor) -> Tensor:
            return self.decoder_eps(x_t, logsnr, z_0, seen)

        return sampler(eps_fn, x_1, grid, generator=generator, clip_x=1.0)

    def latent_state(self) -> dict[str, Tensor]:
        """What `encode_clean` depends on: the encoder's weights (keys the latent cache)."""
        return self.encoder.state_dict()


@dataclass
class ULJoint(TrainsOnDataset):
    """Unified Latents stage 1: joint training of encoder, diffusion prior and diffusion decoder.

    Its fields are the gin parameters of `stages.ul_joint`:

    - encoder, prior, decoder: network factories (`@encoders.resnet`, `@priors.vit`,
      `@decoders.uvit`); shapes are measured from the data at build time.
    - train: this stage's `TrainSettings`.
    - decoder_weighting: w(λ) of the decoder's ELBO term, `sigmoid(b - λ)`.
    - prior_weighting: must be the ELBO weighting (w ≡ 1): anything else lets the encoder hide
      information at discounted noise levels and L_z stops bounding the bitrate.
    - loss_factor: c_lf, multiplies the decoder term (paper: 1.3-1.7; 1.5 on ImageNet); the
      initial value of the model's `loss_factor` buffer, which a hook may change while training
      (`hooks.bitrate_controller`).
    - latent_logsnr_max: λ_z(0), the log-SNR of the fixed encoding noise (paper: 5).
    - decoder_context_frames: clips only; k > 0 conditions the decoder on the first k frames of
      the clip (its pixels concatenated to x_t, the k-th repeated over the later frames), as it
      will be when it decodes a continuation of those k frames (0: no context).
    - latent_logsnr_min: λ_min of the prior's diffusion (and of KL_1).
    - decoder_logsnr_min, decoder_logsnr_max: endpoints of the decoder's diffusion.
    - prior_schedule, decoder_schedule: schedule factories (`@schedules.cosine`, ...).
    - sampler, sample_steps: the decoder's sampler for reconstructions (`@samplers.ddim`).
    - eval_t_per_example: t values per example in the evaluation's bitrate estimate.
    - eval_images: examples shown as inputs beside reconstructions.
    - name: the stage's folder name under `workdir/stages/`.
    """

    encoder: Callable[..., nn.Module]
    prior: Callable[..., nn.Module]
    decoder: Callable[..., nn.Module]
    train: TrainSettings
    decoder_weighting: Weighting = SigmoidWeighting(0.0)
    prior_weighting: Weighting = ELBOWeighting()
    loss_factor: float = 1.5
    latent_logsnr_max: float = LATENT_LOGSNR_MAX
    decoder_context_frames: int = 0
    latent_logsnr_min: float = -15.0
    decoder_logsnr_min: float = -15.0
    decoder_logsnr_max: float = 15.0
    prior_schedule: Callable[..., Schedule] = CosineSchedule
    decoder_schedule: Callable[..., Schedule] = ShiftedCosineSchedule
    sampler: Callable[..., Tensor] = sample_ddim
    sample_steps: int = 50
    eval_t_per_example: int = 32
    eval_images: int = 8
    name: str = "stage1"
    latent_shape: tuple[int, ...] = field(default=(), init=False)  # (Cz, *s), set by `build`

    def __post_init__(self) -> None:
        check_weighting(
            self.decoder_weighting,
            "ul_joint.decoder_weighting",
            self.decoder_logsnr_min,
            self.decoder_logsnr_max,
        )
        if not is_elbo_weighting(
            self.prior_weighting, self.latent_logsnr_min, self.latent_logsnr_max
        ):
            raise ConfigError(
                f"ul_joint.prior_weighting must be the ELBO weighting (w = 1), got {type(self.prior_weighting).__name__}: "
                "with any other weighting the encoder can hide information at discounted noise levels "
                "and the prior loss no longer bounds the latent bitrate (docs/method.md, Stage 1)"
            )
        if self.eval_t_per_example < 1:
            raise ConfigError(
                f"ul_joint.eval_t_per_example must be >= 1, got {self.eval_t_per_example}"
            )
        if self.loss_factor <= 0:
            raise ConfigError(f"ul_joint.loss_factor must be positive, got {self.loss_factor}")
        if self.sample_steps < 1:
            raise ConfigError(f"ul_joint.sample_steps must be >= 1, got {self.sample_steps}")
        if self.decoder_context_frames < 0:
            raise ConfigError(
                f"ul_joint.decoder_context_frames must be >= 0, got {self.decoder_context_frames}"
            )

    def crossing_logsnr(self) -> float | None:
        """λ* where loss_factor · w(λ*) = 1 (coarser content goes to the latent), if defined."""
        return crossing_logsnr(self.decoder_weighting, self.loss_factor)

    def build(self, ctx: BuildContext) -> ULJointModel:
        shape = tuple(ctx.example["x"].shape)  # (C, *S), measured from the data
        k = self.decoder_context_frames
        if k and (len(shape) != 4 or not 0 < k < shape[1]):
            raise ConfigError(
                f"ul_joint.decoder_context_frames={k} needs clips (C, T > {k}, H, W); the data's "
                f"examples are {shape}"
            )
        resolution = max(shape[1:])
        encoder = check_built("encoders", self.encoder(shape=shape), "ul_joint.encoder")
        with torch.no_grad():
            self.latent_shape = tuple(encoder(ctx.example["x"][None].float()).shape[1:])  # (Cz, *s)
        prior = check_built("priors", self.prior(shape=self.latent_shape), "ul_joint.prior")
        extra = {"context_channels": shape[0]} if k else {}
        decoder = check_built(
            "decoders",
            self.decoder(shape=shape, latent_shape=self.latent_shape, **extra),
            "ul_joint.decoder",
        )
        prior_schedule = self.prior_schedule(
            logsnr_min=self.latent_logsnr_min, logsnr_max=self.latent_logsnr_max, resolution=None
        )
        decoder_schedule = self.decoder_schedule(
            logsnr_min=self.decoder_logsnr_min,
            logsnr_max=self.decoder_logsnr_max,
            resolution=resolution,
        )
        pixels = math.prod(shape[1:])
        return ULJointModel(
            encoder, prior, decoder, prior_schedule, decoder_schedule, self.decoder_weighting,
            self.loss_factor, self.latent_logsnr_max, pixels, shape, self.latent_shape, k,
        )  # fmt: skip

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, batches: Sequence[dict[str, Tensor]], generator: torch.Generator
    ) -> EvalReport:
        """Bits/pixel (many t per example), loss terms, PSNR and SSIM of sampled reconstructions;
        with `decoder_context_frames` k, also `psnr_after_context`: PSNR of the frames after
        the first k (the decoder sees those)."""
        assert isinstance(model, ULJointModel)

        def measure(batch: dict[str, Tensor]) -> Measured:
            x = batch["x"]
            terms = model(batch, generator)
            values = {k: float(v) for k, v in terms.metrics().items() if k != "bits_per_pixel"}
            values["bits_per_pixel"] = float(
                model.bits_per_pixel(x, generator, self.eval_t_per_example).mean()
            )
            x_hat = model.reconstruct(x, generator, self.sampler, self.sample_steps)
            if model.context_frames:  # the frames the decoder does not see
                k = model.context_frames
                values["psnr_after_context"] = float(psnr(x[:, :, k:], x_hat[:, :, k:]).mean())
            return Measured(values, x_hat)

        result = evaluate_batches(batches, measure, pairs=self.eval_images)
        images: dict[str, Tensor] = {}
        if result.pairs is not None:  # (N, C, H, W) images or (N, C, T, H, W) videos
            images["reconstructions"] = result.pairs
            z_0 = model.sample_latents(self.eval_images, generator, self.sampler, self.sample_steps)
            shown = images["reconstructions"][0::2][: self.eval_images]  # (the inputs)
            images["prior_samples"] = model.decode_latents(
                z_0[: shown.shape[0]] if model.context_frames else z_0, generator, self.sampler,
                self.sample_steps, context=shown if model.context_frames else None,
            )  # fmt: skip
            if len(model.latent_shape) == 3:  # (Cz, h, w): latent channels of the inputs shown
                inputs = images["reconstructions"][0::2]
                images["latents"] = model.encode(inputs, generator)[1]  # z_0
        return EvalReport(result.scalars, images)
