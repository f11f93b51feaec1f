"""Stage 1 alternative: a KL-regularised autoencoder (the baseline of the UL paper, Fig. 4).

In the style of Stable Diffusion's AutoencoderKL (Rombach et al. 2022), without its perceptual
(LPIPS) and adversarial (patch-GAN) losses. Per example:

    mean, logvar = split(E(x))                        E: `@encoders.resnet` with 2·Cz channels
    z            = mean + exp(logvar / 2) · eps       reparameterised posterior sample, (Cz, *s)
    x_hat        = D(z)                               D: deterministic (`@ae_decoders.conv`)
    L_rec        = Σ |x - x_hat|          ('l1', SD's pixel loss)   or   Σ (x - x_hat)²  ('l2')
    KL           = ½ Σ (mean² + exp(logvar) - 1 - logvar)             KL(q(z|x) || N(0, I)), nats
    L            = L_rec + β · KL                     β = `kl_weight` (SD: 1e-6)

Sums run over all dimensions of one example, as SD's loss does (its KL weight multiplies a KL
summed over latent elements against a reconstruction loss summed over pixel values). `L_rec` is
the negative log-likelihood of a unit-scale Laplace (l1) or of a Gaussian of variance ½ (l2),
up to a constant, so the record's terms are nats up to that constant. `logvar` is clamped to
[-30, 20] as in SD. With β = 1e-6 the latent is nearly unregularised: its scale is whatever the
encoder makes it, and its KL (reported as `bits_per_pixel` = KL / (ln 2 · H · W)) is large.

The latent a base model sees (the hand-off between stages, `ulframe.protocols.LatentModel`,
documented there): `encode_clean(x) = mean(x) · s`, the posterior mean scaled to unit variance as SD does
before its latent diffusion model (SD: `scale_factor = 1 / std` of the first batch's latents).
Here `s = 1 / sqrt(latent_var)`, where the buffer `latent_var` is a running average of the
variance of `mean` over the training batches (half-life `latent_stats_halflife_samples`), so the
scale travels with the weights in every checkpoint. `decode_latents(z) = D(z / s)`, clipped to
[-1, 1]: no noise is added and no sampler is run (`noisy_latent = False`: a base model hands
over its clean estimate, not its chain's state). `latent_logsnr_max` is where a base model on
these latents stops its diffusion (the stage-1 loss does not use it); see docs/method.md,
"KL autoencoder baseline".

Evaluation: the loss terms, `bits_per_pixel` of the KL, PSNR and SSIM of the reconstructions
D(mean) (the posterior mean, deterministic), the latent's standard deviation before scaling
(`latent_std`) and the posterior's signal-to-noise ratio `posterior_logsnr` =
log(Var[mean] / E[exp(logvar)]); images: inputs beside reconstructions, and the scaled latents.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from ulframe.diffusion import BatchNoise
from ulframe.errors import ConfigError
from ulframe.eval.batches import Measured, evaluate_batches
from ulframe.eval.metrics import bits_per_pixel, psnr
from ulframe.protocols import BuildContext, EvalReport, TrainsOnDataset, check_built
from ulframe.train.settings import TrainSettings

LOGVAR_RANGE = (-30.0, 20.0)  # SD's DiagonalGaussianDistribution clamp
SD_LATENT_LOGSNR_MAX = 7.0  # ≈ SD's LDM endpoint: log((1 - β_1) / β_1) with β_1 = 0.00085
Reconstruction = Literal["l1", "l2"]
RECONSTRUCTION_LOSSES: tuple[str, ...] = get_args(Reconstruction)


@dataclass(frozen=True)
class KLAETerms:
    """The KL autoencoder's loss terms, each (B,): reconstruction and KL, per example."""

    reconstruction_nats: Tensor  # Σ |x - x_hat| (l1) or Σ (x - x_hat)² (l2)
    kl_nats: Tensor  # KL(q(z|x) || N(0, I)), nats
    kl_weight: float  # β
    pixels: int  # H·W (T·H·W for video): the bits/pixel normaliser
    psnr: Tensor | None = None  # of the decoded posterior sample, dB

    def total_nats(self) -> Tensor:
        return self.reconstruction_nats + self.kl_weight * self.kl_nats  # (B,)

    def metrics(self) -> dict[str, Tensor]:
        """Batch means; `bits_per_pixel` is the KL term in bits per pixel."""
        out = {
            "reconstruction_nats": self.reconstruction_nats.mean(),
            "kl_nats": self.kl_nats.mean(),
            "total_nats": self.total_nats().mean(),
            "bits_per_pixel": bits_per_pixel(self.kl_nats.mean(), self.pixels),
        }
        if self.psnr is not None:
            out["psnr"] = self.psnr.mean()
        return out


def reconstruction_loss(x: Tensor, x_hat: Tensor, kind: str) -> Tensor:
    """Σ |x - x_hat| ('l1') or Σ (x - x_hat)² ('l2') over all non-batch dimensions, (B,)."""
    diff = (x.float() - x_hat.float()).flatten(1)
    return diff.abs().sum(1) if kind == "l1" else diff.pow(2).sum(1)


def kl_diagonal_gaussian_nats(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) = ½ Σ (mean² + exp(logvar) - 1 - logvar), (B,)."""
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


class KLAEModel(nn.Module):
    """Encoder and deterministic decoder; `forward(batch, noise)` is the KL autoencoder loss.

    Also implements the hand-off to a later stage (`ulframe.protocols.LatentModel`:
    `encode_clean`, `decode_latents`, `latent_state`, `latent_shape`, `latent_logsnr_max`).
    """

    latent_var: Tensor
    latent_stats_samples: Tensor

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        reconstruction: str,
        kl_weight: float,
        latent_logsnr_max: float,
        pixels: int,
        latent_stats_halflife_samples: int,
        latent_shape: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.reconstruction = reconstruction
        self.kl_weight = kl_weight
        self.latent_logsnr_max = latent_logsnr_max
        self.pixels = pixels
        self.latent_stats_halflife_samples = latent_stats_halflife_samples
        self.latent_shape = tuple(latent_shape)  # (Cz, *s)
        # Running variance of the posterior mean over training batches (1 until the first one).
        self.register_buffer("latent_var", torch.ones(()))
        self.register_buffer("latent_stats_samples", torch.zeros((), dtype=torch.long))

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """mean and logvar of q(z|x), each (B, Cz, *s), float32; logvar clamped as SD."""
        mean, logvar = self.encoder(x).float().chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def latent_scale(self) -> Tensor:
        """s = 1 / std of the posterior mean (SD's `scale_factor`), 0-d."""
        return self.latent_var.clamp_min(1e-12).rsqrt()

    @torch.no_grad()
    def _track_latent_var(self, mean: Tensor) -> None:
        b = mean.shape[0]
        var = mean.detach().float().var()
        if int(self.latent_stats_samples) == 0 or self.latent_stats_halflife_samples <= 0:
            self.latent_var.copy_(var)
        else:
            beta = 0.5 ** (b / self.latent_stats_halflife_samples)
            self.latent_var.lerp_(var, 1.0 - beta)
        self.latent_stats_samples.add_(b)

    def forward(self, batch: dict[str, Tensor], noise: BatchNoise | torch.Generator) -> KLAETerms:
        """The loss terms of `batch`; `noise` draws this rank's rows (BatchNoise)."""
        noise = BatchNoise.of(noise)
        x = batch["x"]  # (B, C, *S)
        mean, logvar = self.posterior(x)  # (B, Cz, *s)
        eps = noise.randn(mean.shape, mean.device, mean.dtype)
        z = mean + (0.5 * logvar).exp() * eps
        x_hat = self.decoder(z)  # (B, C, *S)
        if self.training:
            self._track_latent_var(mean)
        return KLAETerms(
            reconstruction_loss(x, x_hat, self.reconstruction),
            kl_diagonal_gaussian_nats(mean, logvar),
            self.kl_weight,
            self.pixels,
            psnr(x, x_hat.detach()),
        )

    # -- the hand-off to a later stage (ulframe.protocols.LatentModel) ---------------------------
    noisy_latent = False  # decode_latents takes the clean latent: the base model's clean estimate

    @torch.no_grad()
    def encode_clean(self, x: Tensor) -> Tensor:
        """The latent a base model models: the posterior mean at unit variance, (B, Cz, *s)."""
        return self.posterior(x)[0] * self.latent_scale()

    @torch.no_grad()
    def decode_latents(
        self,
        z_clean: Tensor,
        generator: torch.Generator | None = None,
        sampler: Callable[..., Tensor] | None = None,
        steps: int | None = None,
        context: Tensor | None = None,
    ) -> Tensor:
        """x = D(z_clean / s) clipped to [-1, 1], (B, C, *S); deterministic (sampler unused;
        `context` too: the decoder is conditioned on the latent alone)."""
        del context
        return self.decoder(z_clean / self.latent_scale()).float().clamp(-1, 1)

    def latent_state(self) -> dict[str, Tensor]:
        """Everything `encode_clean` depends on: the encoder's weights and the latent scale."""
        return {**self.encoder.state_dict(), "latent_var": self.latent_var}


@dataclass
class KLAutoencoder(TrainsOnDataset):
    """KL-regularised autoencoder (SD's AutoencoderKL objective without LPIPS and GAN losses).

    Its fields are the gin parameters of `stages.kl_ae`:

    - encoder: encoder factory (`@encoders.resnet`) with `latent_channels = 2·Cz`: the first Cz
      channels are the posterior mean, the last Cz its log-variance.
    - decoder: deterministic decoder factory (`@ae_decoders.conv`), called with the data shape
      and the latent shape (Cz, *s).
    - train: this stage's `TrainSettings`.
    - reconstruction: 'l1' (SD's pixel loss) or 'l2', summed over the example.
    - kl_weight: β of the KL term (SD: 1e-6).
    - latent_logsnr_max: λ_max of a base model trained on these latents (`stages.ul_base` reads
      it); unit-variance latents diffused to ≈ SD's endpoint by default.
    - latent_stats_halflife_samples: half-life of the running variance of the posterior mean
      that sets the latent scale (0: the last batch's).
    - eval_images: examples shown as inputs beside reconstructions.
    - name: the stage's folder name under `workdir/stages/`.
    """

    encoder: Callable[..., nn.Module]
    decoder: Callable[..., nn.Module]
    train: TrainSettings
    reconstruction: Reconstruction = "l1"
    kl_weight: float = 1e-6
    latent_logsnr_max: float = SD_LATENT_LOGSNR_MAX
    latent_stats_halflife_samples: int = 2000
    eval_images: int = 8
    name: str = "stage1"
    latent_shape: tuple[int, ...] = field(default=(), init=False)  # (Cz, *s), set by `build`

    def __post_init__(self) -> None:
        if self.reconstruction not in RECONSTRUCTION_LOSSES:
            raise ConfigError(
                f"kl_ae.reconstruction must be one of {RECONSTRUCTION_LOSSES}, "
                f"got {self.reconstruction!r}"
            )
        if self.kl_weight < 0:
            raise ConfigError(f"kl_ae.kl_weight must be >= 0, got {self.kl_weight}")

    def build(self, ctx: BuildContext) -> KLAEModel:
        shape = tuple(ctx.example["x"].shape)  # (C, *S), measured from the data
        encoder = check_built("encoders", self.encoder(shape=shape), "kl_ae.encoder")
        with torch.no_grad():
            moments = tuple(encoder(ctx.example["x"][None].float()).shape[1:])  # (2·Cz, *s)
        if moments[0] % 2:
            raise ConfigError(
                f"kl_ae.encoder must output 2·Cz channels (mean and log-variance), got "
                f"{moments[0]}: set its latent_channels to twice the latent channels"
            )
        self.latent_shape = (moments[0] // 2, *moments[1:])
        decoder = check_built(
            "ae_decoders",
            self.decoder(shape=shape, latent_shape=self.latent_shape),
            "kl_ae.decoder",
        )
        return KLAEModel(
            encoder, decoder, self.reconstruction, self.kl_weight, self.latent_logsnr_max,
            math.prod(shape[1:]), self.latent_stats_halflife_samples, self.latent_shape,
        )  # fmt: skip

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, batches: Sequence[dict[str, Tensor]], generator: torch.Generator
    ) -> EvalReport:
        """Loss terms, bits/pixel of the KL, PSNR and SSIM of D(mean), latent statistics."""
        assert isinstance(model, KLAEModel)

        def measure(batch: dict[str, Tensor]) -> Measured:
            x = batch["x"]
            values = {k: float(v) for k, v in model(batch, generator).metrics().items()}
            values.pop("psnr", None)  # of a posterior sample; reported for the mean instead
            mean, logvar = model.posterior(x)
            values["latent_std"] = float(mean.std())
            values["posterior_logsnr"] = float(mean.var().log() - logvar.exp().mean().log())
            x_hat = model.decoder(mean).float().clamp(-1, 1)
            return Measured(values, x_hat, {"latents": mean * model.latent_scale()})

        result = evaluate_batches(batches, measure, pairs=self.eval_images)
        scalars = result.scalars | {"latent_scale": float(model.latent_scale())}
        images: dict[str, Tensor] = {}
        if result.pairs is not None:
            images["reconstructions"] = result.pairs
            if len(self.latent_shape) == 3:  # (Cz, h, w): latent channels of the inputs shown
                images["latents"] = result.shown["latents"]
        return EvalReport(scalars, images)
