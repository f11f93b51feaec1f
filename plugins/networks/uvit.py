"""The U-ViT body shared by the diffusion decoder and the U-ViT latent denoiser.

Conv ResBlock stages around a Transformer: patching by ``patch_size`` (space-to-depth) and a 3x3
stem; for each entry of ``channels`` a stage of logsnr-conditioned ResBlocks followed by a
strided-conv ``Downsample``; the middle Transformer (``width``, ``depth``, adaLN-Zero on the
conditioning embedding) on the tokens of the resulting grid; mirrored up stages (``Upsample``,
concatenation of the U-Net skip of the same stage, ResBlocks) and a zero-initialised output
conv, un-patched back to the input shape: an untrained network returns 0.
"""

import math
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import (
    Downsample,
    LogSNREmbedding,
    ResBlock,
    StagePlan,
    TransformerBlock,
    Upsample,
    conv_nd,
    depth_to_space,
    from_tokens,
    group_norm,
    sincos_position_embedding,
    space_to_depth,
    to_tokens,
    zero_,
)


class UViTBody(nn.Module):
    """Conv stages around a middle Transformer (see the module docstring); subclasses say what
    goes in and what conditions it (:class:`~.decoders.UViTDecoder`, :class:`~.priors.ConvViT`)."""

    def __init__(
        self,
        plan: StagePlan,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int],
        width: int,
        depth: int,
        heads: int,
        dropout: float,
        mlp_ratio: float,
        upsample: str,
        conv_kernel: int | tuple[int, ...],
        token_features: int = 0,
    ) -> None:
        """
        Args:
            plan: the geometry (:func:`~.blocks.stage_plan`, transitions ``"after"``).
            in_channels: input channels at full resolution (before patching).
            out_channels: output channels at full resolution.
            channels: width of each conv stage.
            width, depth, heads: the middle Transformer's token width, blocks and heads; the
                conditioning embedding has ``width`` features.
            dropout: dropout probability in ResBlocks and Transformer MLPs.
            mlp_ratio: MLP hidden width of the Transformer as a multiple of ``width``.
            upsample: ``"nearest"`` or ``"subpixel"`` (:class:`~.blocks.Upsample`).
            conv_kernel: kernel of the ResBlocks, int or per axis.
            token_features: features per middle token projected (``latent_proj``) and added to
                the Transformer's input tokens (the decoder's z_0 patches); 0: none.
        """
        super().__init__()
        ndim, blocks, factors = plan.ndim, plan.blocks, plan.factors
        self.patch = plan.patch
        self.logsnr_emb = LogSNREmbedding(width)
        self.stem = conv_nd(ndim, in_channels * math.prod(self.patch), channels[0], 3, padding=1)

        # Down path: ResBlocks, remember the skip, down-sample.
        self.down_stages = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        ch = channels[0]
        for stage_channels, count, factor in zip(channels, blocks, factors, strict=True):
            stage = nn.ModuleList()
            for _ in range(count):
                stage.append(ResBlock(ndim, ch, stage_channels, width, dropout, conv_kernel))
                ch = stage_channels
            self.down_stages.append(stage)
            self.downsamplers.append(Downsample(ndim, ch, ch, factor))

        # Middle Transformer at the coarsest grid, with optional per-token features added.
        self.mid_in = nn.Linear(ch, width)
        self.latent_proj = nn.Linear(token_features, width) if token_features else None
        self.mid_blocks = nn.ModuleList(
            TransformerBlock(width, heads, width, mlp_ratio, dropout) for _ in range(depth)
        )
        self.mid_norm = nn.LayerNorm(width)
        self.mid_out = nn.Linear(width, ch)

        # Up path (mirrored): up-sample, concatenate the skip, ResBlocks.
        self.upsamplers = nn.ModuleList()
        self.up_stages = nn.ModuleList()
        for stage_channels, count, factor in reversed(
            list(zip(channels, blocks, factors, strict=True))
        ):
            self.upsamplers.append(Upsample(ndim, ch, ch, factor, upsample))
            stage = nn.ModuleList()
            skip_channels = stage_channels
            for _ in range(count):
                stage.append(
                    ResBlock(ndim, ch + skip_channels, stage_channels, width, dropout, conv_kernel)
                )
                ch, skip_channels = stage_channels, 0
            self.up_stages.append(stage)

        self.out_norm = group_norm(ch)
        self.out_conv = zero_(conv_nd(ndim, ch, out_channels * math.prod(self.patch), 3, padding=1))

    def body(
        self, x: torch.Tensor, emb: torch.Tensor, token_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The network on ``x`` (B, C_in, *S) conditioned on ``emb`` (B, width); with
        ``token_features`` (B, N, token_features) added to the middle tokens. (B, C_out, *S)."""
        h = self.stem(space_to_depth(x, self.patch))  # (B, C0, *S / patch)
        skips = []
        for stage, down in zip(self.down_stages, self.downsamplers, strict=True):
            for block in cast(nn.ModuleList, stage):
                h = block(h, emb)  # (B, C_i, *S_i)
            skips.append(h)
            h = down(h)  # (B, C_i, *S_i / factor_i)

        grid = tuple(h.shape[2:])
        tokens = self.mid_in(to_tokens(h))  # (B, N, D)
        tokens = tokens + sincos_position_embedding(grid, tokens.shape[-1], h.device, h.dtype)
        if token_features is not None:
            assert self.latent_proj is not None, "this U-ViT was built with token_features=0"
            tokens = tokens + self.latent_proj(token_features)  # (B, N, D)
        for block in self.mid_blocks:
            tokens = block(tokens, emb)  # (B, N, D)
        h = from_tokens(self.mid_out(self.mid_norm(tokens)), grid)  # (B, C_last, *grid)

        for up, stage in zip(self.upsamplers, self.up_stages, strict=True):
            h = torch.cat([up(h), skips.pop()], dim=1)  # (B, C + C_i, *S_i)
            for block in cast(nn.ModuleList, stage):
                h = block(h, emb)  # (B, C_i, *S_i)
        h = self.out_conv(F.silu(self.out_norm(h)))  # (B, C_out * prod(patch), *S / patch)
        return depth_to_space(h, self.patch)  # (B, C_out, *S)
