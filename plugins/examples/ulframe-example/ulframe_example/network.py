"""A network plugin: a patch encoder, images or clips to latents, N-d.

``z = W2 · silu(W1 ⋆ x)``: a convolution whose kernel and stride are the patch (each patch of
the input becomes one latent position), then a 1×1 convolution to ``latent_channels``. The
number of spatial axes comes from ``shape`` (images (C, H, W), clips (C, T, H, W)), so the same
class serves both; ``patch_size`` is an int (every axis) or a per-axis tuple.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ulframe.errors import ConfigError

CONVS = {2: nn.Conv2d, 3: nn.Conv3d}


class PatchEncoder(nn.Module):
    """Patch encoder: ``shape`` (C, *S) → (latent_channels, *S / patch_size).

    Args:
        shape: (C, *S) of one example; supplied by the engine, measured from the data.
        latent_channels: channels of the latent.
        width: hidden channels.
        patch_size: the down-sampling, an int or one factor per spatial axis.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        latent_channels: int = 8,
        width: int = 256,
        patch_size: int | tuple[int, ...] = 4,
    ) -> None:
        super().__init__()
        channels, *spatial = shape
        if len(spatial) not in CONVS:
            raise ConfigError(f"encoders.patch takes images or clips; got shape {shape}")
        patch = (patch_size,) * len(spatial) if isinstance(patch_size, int) else patch_size
        if len(patch) != len(spatial) or any(s % p for s, p in zip(spatial, patch)):
            raise ConfigError(
                f"encoders.patch.patch_size {patch_size} must divide every axis of {shape[1:]}"
            )
        conv: Any = CONVS[len(spatial)]
        self.latent_channels = latent_channels
        self.embed = conv(channels, width, kernel_size=patch, stride=patch)
        self.out = conv(width, latent_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, *S) → z_clean (B, latent_channels, *S / patch_size)."""
        return self.out(torch.nn.functional.silu(self.embed(x)))
