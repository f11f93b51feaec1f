"""Diffusion decoder D: v_hat(x_t, logsnr, z_0) in pixel space (U-ViT), a velocity prediction."""

import math

import torch

from ulframe.errors import ConfigError

from .blocks import as_tuple, divided_grid, space_to_depth, stage_plan, to_tokens
from .uvit import UViTBody


class UViTDecoder(UViTBody):
    """U-ViT decoder: conv ResBlock stages around a Transformer at the latent grid.

    Pipeline: patching by ``patch_size`` (space-to-depth) and a 3x3 stem; for each entry of
    ``channels`` a stage of logsnr-conditioned ResBlocks followed by a strided-conv
    ``Downsample``; the middle Transformer (``width``, ``depth``, adaLN-Zero on the logsnr
    embedding) runs on the tokens of the resulting grid, which must equal the latent grid;
    then mirrored up stages (``Upsample``, concatenation of the U-Net skip of the same stage,
    ResBlocks) and a zero-initialised output conv, un-patched back to the input shape, so an
    untrained decoder returns v_hat = 0 (it predicts velocity; stages convert with ``eps_from_v``).

    How z_0 enters (the paper leaves it open; two options are natural): z_0 (B, C_z, *grid)
    is flattened to tokens and projected by a per-token linear map to ``width``, then ADDED
    to the middle Transformer's input tokens (after their positional embedding). The
    alternative, up-sampling z_0 and concatenating it at the input, is not used: adding at
    the latent grid keeps the z_0 pathway cheap and aligned token-for-token with the latent.

    Down-sampling: ``spatial / (patch_size * prod(stage_downsample))`` must equal the latent
    grid, per axis. Video uses per-axis factors: the paper's Kinetics 16x128x128 clips with
    a 4x16x16 latent grid (4x8x8 down) are, with three stages, ``patch_size=(1, 2, 2),
    stage_downsample=((1, 2, 2), (2, 2, 2), (2, 1, 1))``; a factor of 1 on an axis keeps it.

    Attributes:
        latent_shape: per-example shape of z_0, (C_z, *grid).
        downsample: total per-axis down-sampling from the input to the latent grid.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        latent_shape: tuple[int, ...],
        channels: tuple[int, ...] = (128, 256, 512),
        blocks_per_stage: int | tuple[int, ...] = 2,
        width: int = 1024,
        depth: int = 8,
        heads: int = 16,
        patch_size: int | tuple[int, ...] = 2,
        dropout: float = 0.1,
        stage_downsample: tuple[int | tuple[int, ...], ...] | None = None,
        mlp_ratio: float = 4.0,
        upsample: str = "nearest",
        conv_kernel: int | tuple[int, ...] = 3,
        latent_patch: int | tuple[int, ...] = 1,
        context_channels: int = 0,
    ) -> None:
        """
        Args:
            shape: per-example input shape, (C, H, W) or (C, T, H, W), measured from the data.
            latent_shape: per-example shape of z_0, (C_z, *latent grid), from the encoder.
            channels: width of each conv stage; each stage ends in a down-sampling
                (paper: 128, 256, 512).
            blocks_per_stage: ResBlocks per stage, int or one per stage (paper: 2).
            width: token width of the middle Transformer (paper: 1024).
            depth: Transformer blocks in the middle (paper: 8).
            heads: attention heads of the middle Transformer.
            patch_size: per-axis patch size of the input patching (int or tuple; paper: 2).
            dropout: dropout probability in ResBlocks and Transformer MLPs (paper: 0.1).
            stage_downsample: per-axis down-sampling factor after each conv stage, one entry
                per stage, each int or per-axis tuple; None = 2 on every axis.
            mlp_ratio: MLP hidden width of the Transformer as a multiple of ``width``.
            upsample: ``"nearest"`` (repeat, then a 3x3 conv) or ``"subpixel"`` (a conv to
                ``factor`` times the channels, then depth-to-space): with a factor of 4 in time
                (a video latent step spanning 4 frames) only ``"subpixel"`` lets the 4 frames
                differ at the decoder's coarse path (docs/method.md, "Video").
            conv_kernel: kernel of the conv stages' ResBlocks, int or per axis; ``(1, 3, 3)``
                on clips convolves each frame on its own (time is mixed by the Transformer and
                the up-sampling), a third of the cost of 3x3x3.
            latent_patch: per-axis patch of z_0 folded into one Transformer token
                (space-to-depth): the Transformer then runs on the latent grid divided by it,
                e.g. ``(1, 2, 2)`` for a latent of one step per frame at 16x8x8 read by 16x4x4
                tokens (a quarter of the tokens).
            context_channels: channels of the context pixels concatenated to x_t at the input
                (0: none); supplied by the stage that conditions its decoder on the first
                frames of a clip (`ul_joint.decoder_context_frames`).
        """
        in_channels, *spatial = shape
        latent_channels, *latent_grid = latent_shape
        plan = stage_plan(
            spatial, channels, blocks_per_stage, patch_size, stage_downsample, "after"
        )
        latent_patch = as_tuple(latent_patch, plan.ndim)
        super().__init__(
            plan, in_channels + context_channels, in_channels, channels, width, depth, heads,
            dropout, mlp_ratio, upsample, conv_kernel,
            token_features=latent_channels * math.prod(latent_patch),
        )  # fmt: skip
        self.context_channels = context_channels
        self.downsample = plan.downsample
        self.latent_shape = tuple(latent_shape)
        self.latent_patch = latent_patch
        token_grid = divided_grid(tuple(latent_grid), self.latent_patch, "UViTDecoder latent_patch")
        self._check_latent_grid(tuple(spatial), token_grid, channels)

    def _check_latent_grid(
        self,
        spatial: tuple[int, ...],
        latent_grid: tuple[int, ...],
        channels: tuple[int, ...],
    ) -> None:
        """Raise ValueError unless spatial / downsample equals the latent grid on every axis."""
        if len(latent_grid) != len(spatial) or any(
            s != g * d for s, g, d in zip(spatial, latent_grid, self.downsample, strict=True)
        ):
            raise ConfigError(
                f"UViTDecoder: input spatial shape {spatial} divided by the total "
                f"down-sampling {self.downsample} (patch_size {self.patch} times one "
                f"down-sampling after each of the {len(channels)} conv stages, "
                f"channels={tuple(channels)}) does not equal the latent grid {latent_grid} (of "
                f"latent_shape, divided by latent_patch); change channels (number of stages), patch_size or "
                f"stage_downsample so that spatial / (patch_size * prod(stage factors)) equals "
                f"the latent grid"
            )

    def forward(
        self,
        x_t: torch.Tensor,
        logsnr: torch.Tensor,
        z_0: torch.Tensor,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """v_hat (B, C, *S) of x_t (B, C, *S) at `logsnr` (B,) given z_0 (B, *latent_shape);
        `context` (B, context_channels, *S): pixels concatenated to x_t (a decoder built with
        `context_channels` > 0 needs them, one without takes none)."""
        if (context is None) != (self.context_channels == 0):
            raise ValueError(
                f"UViTDecoder built with context_channels={self.context_channels} got "
                f"{'no' if context is None else 'a'} context"
            )
        if context is not None:
            x_t = torch.cat([x_t, context.to(x_t.dtype)], dim=1)  # (B, C + C_ctx, *S)
        emb = self.logsnr_emb(logsnr)  # (B, E)
        z_tokens = to_tokens(space_to_depth(z_0, self.latent_patch))  # (B, N, C_z * patch)
        return self.body(x_t, emb, z_tokens)  # (B, C, *S)
