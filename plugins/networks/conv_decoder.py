"""Deterministic convolutional decoder of an autoencoder: ``x_hat = D(z)`` (kind ``ae_decoders``).

The decoder of the KL autoencoder baseline (``stages.kl_ae``, in the style of Stable Diffusion's
AutoencoderKL, Rombach et al. 2022): the mirror image of ``encoders.resnet``, built from the same
N-d blocks. It is not a diffusion decoder: it takes the latent alone, no noisy input and no noise
level, so it is registered under its own kind (``ulframe.ae_decoders``, protocol
``ulframe.protocols.AEDecoder``) and the contract of ``decoders`` is unchanged.
"""

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ulframe.errors import ConfigError

from .blocks import (
    ResBlock,
    Upsample,
    conv_nd,
    depth_to_space,
    divided_grid,
    group_norm,
    stage_plan,
)


class ConvDecoder(nn.Module):
    """Convolutional ResNet decoder (B, Cz, *grid) -> (B, C, *S), the mirror of ResNetEncoder.

    Pipeline: a 3x3 conv from the latent channels to ``channels[-1]``; the encoder's stages in
    reverse order (the stage of ``channels[i]`` holds ``blocks_per_stage[i]`` unconditioned
    ResBlocks), with a nearest-neighbour ``Upsample`` (+ 3x3 conv) between consecutive stages
    by the encoder's ``stage_downsample`` factors; then GroupNorm-SiLU-conv to
    ``C * prod(patch_size)`` channels and depth-to-space back to the input shape. No attention
    and no output non-linearity (SD's decoder has a mid-block attention; the encoder it mirrors
    here has none). Default init of the output conv, so the decoder passes signal from the start.

    Give it the encoder's ``channels``, ``blocks_per_stage``, ``patch_size`` and
    ``stage_downsample`` (the same gin values): ``spatial / (patch_size * prod(factors))`` must
    equal the latent grid, per axis (checked at build with a clear error).

    Attributes:
        latent_shape: per-example shape of the latent it decodes, (Cz, *grid).
        downsample: total per-axis factor from the output to the latent grid.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        latent_shape: tuple[int, ...],
        channels: tuple[int, ...] = (128, 256, 512, 512),
        blocks_per_stage: int | tuple[int, ...] = (2, 2, 2, 3),
        patch_size: int | tuple[int, ...] = 2,
        stage_downsample: tuple[int | tuple[int, ...], ...] | None = None,
        dropout: float = 0.0,
    ) -> None:
        """
        Args:
            shape: per-example output shape, (C, H, W) or (C, T, H, W), measured from the data.
            latent_shape: per-example latent shape, (Cz, *grid), measured from the encoder.
            channels: width of each stage, in the encoder's order (high to low resolution).
            blocks_per_stage: residual blocks per stage, int or one per stage (encoder order).
            patch_size: per-axis patch size of the output un-patching (int or tuple).
            stage_downsample: the encoder's per-axis factors between consecutive stages (one
                entry per transition, each int or per-axis tuple); None = 2 on every axis.
            dropout: dropout probability inside the residual blocks.
        """
        super().__init__()
        out_channels, *spatial = shape
        latent_channels, *latent_grid = latent_shape
        plan = stage_plan(
            spatial, channels, blocks_per_stage, patch_size, stage_downsample, "between"
        )
        self.patch, self.downsample = plan.patch, plan.downsample
        grid = divided_grid(tuple(spatial), self.downsample, "ConvDecoder")
        if tuple(latent_grid) != grid:
            raise ConfigError(
                f"ConvDecoder: the latent grid {tuple(latent_grid)} is not the output "
                f"{tuple(spatial)} down-sampled by {self.downsample} (= {grid}); give the decoder "
                "the encoder's channels, patch_size and stage_downsample"
            )
        self.latent_shape = tuple(latent_shape)

        ch = channels[-1]
        self.stem = conv_nd(plan.ndim, latent_channels, ch, 3, padding=1)
        self.stages = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for i in reversed(range(len(channels))):  # lowest resolution first
            stage = nn.ModuleList()
            for _ in range(plan.blocks[i]):
                stage.append(ResBlock(plan.ndim, ch, channels[i], dropout=dropout))
                ch = channels[i]
            self.stages.append(stage)
            if i > 0:  # the encoder's Downsample between stages i-1 and i, inverted
                self.upsamplers.append(
                    Upsample(plan.ndim, ch, channels[i - 1], plan.factors[i - 1])
                )
                ch = channels[i - 1]
        self.out_norm = group_norm(ch)
        self.out_conv = conv_nd(plan.ndim, ch, out_channels * math.prod(self.patch), 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.stem(z)  # (B, C_last, *grid)
        for i, stage in enumerate(self.stages):
            for block in cast(nn.ModuleList, stage):
                h = block(h)  # (B, C_i, *S_i)
            if i < len(self.upsamplers):
                h = self.upsamplers[i](h)  # (B, C_{i-1}, *S_i * factor)
        h = self.out_conv(F.silu(self.out_norm(h)))  # (B, C * prod(patch), *S / patch)
        return depth_to_space(h, self.patch)  # (B, C, *S)
