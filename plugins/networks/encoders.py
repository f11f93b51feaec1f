"""Deterministic UL encoder E: ``z_clean = E(x)`` (paper section Architectures)."""

import math
from typing import cast

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ulframe.errors import ConfigError

from .blocks import (
    Downsample,
    ResBlock,
    as_tuple,
    axis_product,
    conv_nd,
    divided_grid,
    group_norm,
    space_to_depth,
    stage_factors,
)


class ResNetEncoder(nn.Module):
    """Convolutional ResNet encoder for images (B, C, H, W) or videos (B, C, T, H, W).

    Pipeline: patching by ``patch_size`` (space-to-depth), a 3x3 stem conv, then
    ``len(channels)`` stages of unconditioned ResBlocks with a strided-conv ``Downsample``
    between consecutive stages, and an output GroupNorm-SiLU-conv to ``latent_channels``
    (default init, not zero: the latent must carry signal from the start).

    The total down-sampling per axis is ``patch_size * prod(stage_downsample)``. Video
    factors are per-axis: e.g. the paper's Kinetics 4x8x8 (T x H x W) is
    ``patch_size=(1, 2, 2), channels=(c1, c2, c3), stage_downsample=((2, 2, 2), (2, 2, 2))``.

    Attributes:
        latent_channels: channels of ``z_clean``.
        downsample: total per-axis down-sampling factor (tuple, one per spatial axis).
        latent_shape: per-example shape of ``z_clean``, (latent_channels, *grid).
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        latent_channels: int = 32,
        channels: tuple[int, ...] = (128, 256, 512, 512),
        blocks_per_stage: int | tuple[int, ...] = (2, 2, 2, 3),
        patch_size: int | tuple[int, ...] = 2,
        stage_downsample: tuple[int | tuple[int, ...], ...] | None = None,
        dropout: float = 0.0,
        frame_wise: bool = False,
    ) -> None:
        """
        Args:
            shape: per-example input shape, (C, H, W) or (C, T, H, W), measured from the data.
            latent_channels: channels of the latent z_clean (paper: 32).
            channels: width of each ResNet stage (paper: 128, 256, 512, 512).
            blocks_per_stage: residual blocks per stage, int or one per stage (paper: 2, 2, 2, 3).
            patch_size: per-axis patch size of the input patching (int or tuple; paper: 2).
            stage_downsample: per-axis down-sampling factor between consecutive stages, one
                entry per transition (len(channels) - 1), each int or per-axis tuple;
                None = 2 on every axis.
            dropout: dropout probability inside the residual blocks.
            frame_wise: clips (C, T, H, W) only: encode every frame on its own with the image
                network that the other arguments describe (per-axis values for (H, W); the
                frames are folded into the batch, so convolutions and GroupNorm statistics stay
                within a frame). Latent step t is then a function of frame t alone: the latent
                of a clip's first k frames is exactly its first k latent steps
                (docs/method.md, "Video"). The latent is (latent_channels, T, h, w).
        """
        super().__init__()
        in_channels, *spatial = shape
        self.frame_wise = frame_wise
        frames: tuple[int, ...] = ()
        if frame_wise:
            if len(spatial) != 3:
                raise ConfigError(
                    f"encoders.resnet.frame_wise needs clips (C, T, H, W); the data gives {shape}"
                )
            frames, spatial = (spatial[0],), spatial[1:]
        ndim = len(spatial)
        num_stages = len(channels)
        blocks = as_tuple(blocks_per_stage, num_stages)
        self.patch = as_tuple(patch_size, ndim)
        factors = stage_factors(stage_downsample, num_stages - 1, ndim)
        self.latent_channels = latent_channels
        self.downsample = tuple(
            p * f for p, f in zip(self.patch, axis_product(factors, ndim), strict=True)
        )
        grid = divided_grid(tuple(spatial), self.downsample, "ResNetEncoder")
        self.latent_shape = (latent_channels, *frames, *grid)
        self.downsample = (1,) * len(frames) + self.downsample

        patch_channels = in_channels * math.prod(self.patch)
        self.stem = conv_nd(ndim, patch_channels, channels[0], 3, padding=1)
        self.stages = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        ch = channels[0]
        for i, (width, count) in enumerate(zip(channels, blocks, strict=True)):
            stage = nn.ModuleList()
            for _ in range(count):
                stage.append(ResBlock(ndim, ch, width, dropout=dropout))
                ch = width
            self.stages.append(stage)
            if i < num_stages - 1:
                self.downsamplers.append(Downsample(ndim, ch, ch, factors[i]))
        self.out_norm = group_norm(ch)
        self.out_conv = conv_nd(ndim, ch, latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frame_wise:
            frames = x.shape[2]
            z = self._encode(rearrange(x, "b c t h w -> (b t) c h w"))  # (B T, Cz, h, w)
            return rearrange(z, "(b t) c h w -> b c t h w", t=frames)  # (B, Cz, T, h, w)
        return self._encode(x)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(space_to_depth(x, self.patch))  # (B, C0, *S / patch)
        for i, stage in enumerate(self.stages):
            for block in cast(nn.ModuleList, stage):
                h = block(h)  # (B, C_i, *S_i)
            if i < len(self.downsamplers):
                h = self.downsamplers[i](h)  # (B, C_i, *S_i / factor_i)
        return self.out_conv(F.silu(self.out_norm(h)))  # (B, latent_channels, *grid)
