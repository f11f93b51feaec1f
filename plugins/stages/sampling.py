"""End-to-end sampling of Unified Latents (UL paper, Algorithm 2) with classifier-free guidance.

    z_0 ~ base model: its chain from z_1 ~ N(0, I) at λ_min down to λ_max = λ_z(0) = 5; the
          chain's own state there is z_0, a sample of the noisy latent the decoder was trained
          on (`sampler(..., final="state")`), not its clean estimate noised again
    x   ~ decoder, from x_1 ~ N(0, I), conditioned on z_0

Guidance (Ho & Salimans 2022): ``eps = eps_uncond + w (eps_cond - eps_uncond)``, applied only
where λ lies in ``interval`` (the conditional prediction elsewhere). ``w = 1`` is the
conditional model exactly (the unconditional pass is skipped), ``w = 0`` the unconditional one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ulframe.diffusion import expand_like
from ulframe.diffusion.samplers import sampler_grid
from ulframe.errors import ConfigError

EpsFn = Callable[[Tensor, Tensor], Tensor]


def context_clip(x: Tensor, frames: int, name: str = "ul_base.context_frames") -> Tensor:
    """Clips (B, C, T, H, W) cut to their first `frames` frames, the last repeated to T: what a
    network conditioned on the context of a clip sees (`name`: the setting, for the error)."""
    if x.dim() != 5 or not 0 < frames < x.shape[2]:
        raise ConfigError(
            f"{name}={frames} needs clips (B, C, T > {frames}, H, W); got {tuple(x.shape)}"
        )
    last = x[:, :, frames - 1 : frames].expand(-1, -1, x.shape[2] - frames, -1, -1)
    return torch.cat([x[:, :, :frames], last], 2)


def guided_eps_fn(
    eps_cond: EpsFn,
    eps_uncond: EpsFn,
    scale: float,
    interval: tuple[float, float] | None = None,
) -> EpsFn:
    """Classifier-free guided eps_fn(z_t, logsnr) from a conditional and an unconditional one.

    Args:
        eps_cond, eps_uncond: eps-predictors ``(z_t (B, ...), logsnr (B,)) -> eps_hat``.
        scale: guidance scale w (1: conditional, 0: unconditional, > 1: guided).
        interval: ``(λ_lo, λ_hi)``: guidance applies where ``λ_lo <= λ <= λ_hi``; None: always.
    """
    if scale == 1.0:
        return eps_cond

    def eps_fn(z_t: Tensor, logsnr: Tensor) -> Tensor:
        cond = eps_cond(z_t, logsnr)
        uncond = eps_uncond(z_t, logsnr)
        guided = uncond + scale * (cond - uncond)
        if interval is None:
            return guided
        inside = (logsnr >= interval[0]) & (logsnr <= interval[1])  # (B,)
        return torch.where(expand_like(inside, cond), guided, cond)

    return eps_fn


@torch.no_grad()
def sample_latents(
    eps_cond: EpsFn,
    eps_uncond: EpsFn,
    z_1: Tensor,
    schedule: object,
    sampler: Callable[..., Tensor],
    steps: int,
    generator: torch.Generator | None,
    guidance: float = 1.0,
    interval: tuple[float, float] | None = None,
    final: str = "state",
) -> Tensor:
    """Run the base model's sampler from ``z_1`` along its schedule, shape of z_1: the chain's
    state at λ_max (``final="state"``: UL's z_0) or its clean estimate there (``"x_hat"``).

    The grid is the one the sampler declares (``sampler_grid``: ddim and ancestral even in t,
    the higher-order solvers even in λ); guidance applies at every model call the sampler
    makes, its intermediate (e.g. Heun's second) calls included."""
    grid = sampler_grid(sampler, schedule, steps).to(z_1.device, z_1.dtype)  # type: ignore[arg-type]
    eps_fn = guided_eps_fn(eps_cond, eps_uncond, guidance, interval)
    return sampler(eps_fn, z_1, grid, generator=generator, final=final)
