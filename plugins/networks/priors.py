"""Latent denoisers for the stage-1 prior and the stage-2 base model: a multi-level ViT and a
U-ViT (convolutions around a ViT)."""

import torch
from torch import nn

from ulframe.errors import ConfigError

from .blocks import (
    FinalLayer,
    LogSNREmbedding,
    PatchEmbed,
    PatchUnembed,
    TransformerBlock,
    as_tuple,
    divided_grid,
    from_tokens,
    sincos_position_embedding,
    stage_plan,
    to_tokens,
)
from .uvit import UViTBody


def conditioned_input(
    net: "ViT | ConvViT",
    z_t: torch.Tensor,
    logsnr: torch.Tensor,
    label: torch.Tensor | None,
    context: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What :class:`ViT` and :class:`ConvViT` share: ``(input, cond)``, ``z_t`` with the context
    concatenated along the channels and the embedding of ``logsnr`` plus the class of ``label``
    (None: the null label). ValueError when the context does not match ``net.context_channels``.
    """
    if (context is None) != (net.context_channels == 0):
        raise ValueError(
            f"{type(net).__name__} built with context_channels={net.context_channels} got "
            f"{'no context' if context is None else 'a context'}"
        )
    cond = net.logsnr_emb(logsnr)  # (B, E)
    if net.class_emb is not None:
        if label is None:
            label = torch.full_like(logsnr, net.num_classes, dtype=torch.long)  # (B,)
        cond = cond + net.class_emb(label)  # (B, E)
    x = z_t if context is None else torch.cat([z_t, context.to(z_t.dtype)], 1)
    return x, cond  # (B, C + C_ctx, *S), (B, E)


class _Level(nn.Module):
    """One resolution level of the hourglass ViT; recursively holds the deeper levels.

    Innermost level: ``depth`` Transformer blocks. Other levels: ``depth // 2`` blocks, token
    merging (a ``PatchEmbed`` of the token grid by ``factor``) into the next level, token
    splitting (``PatchUnembed``) back, a skip connection fused by a linear map of the
    concatenation [skip, upsampled], then the remaining ``depth - depth // 2`` blocks.
    """

    def __init__(
        self,
        ndim: int,
        widths: tuple[int, ...],
        depths: tuple[int, ...],
        heads: int,
        cond_dim: int,
        mlp_ratio: float,
        dropout: float,
        factor: tuple[int, ...],
    ) -> None:
        """
        Args:
            ndim: number of spatial dims of the token grid.
            widths: token width of this level and every deeper one.
            depths: Transformer blocks of this level and every deeper one.
            heads: attention heads of every block.
            cond_dim: width of the conditioning vector.
            mlp_ratio: MLP hidden width as a multiple of the token width.
            dropout: dropout probability inside the MLPs.
            factor: per-axis token-merging factor between consecutive levels.
        """
        super().__init__()
        width, depth = widths[0], depths[0]
        self.factor = factor
        self.has_inner = len(widths) > 1
        num_before = depth // 2 if self.has_inner else depth

        def make_blocks(count: int) -> nn.ModuleList:
            return nn.ModuleList(
                TransformerBlock(width, heads, cond_dim, mlp_ratio, dropout) for _ in range(count)
            )

        self.before = make_blocks(num_before)
        if self.has_inner:
            self.merge = PatchEmbed(ndim, width, widths[1], factor)
            self.inner = _Level(
                ndim, widths[1:], depths[1:], heads, cond_dim, mlp_ratio, dropout, factor
            )
            self.split = PatchUnembed(ndim, widths[1], width, factor)
            self.fuse = nn.Linear(2 * width, width)
        self.after = make_blocks(depth - num_before)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        x = x + sincos_position_embedding(grid, x.shape[-1], x.device, x.dtype)  # (B, N, D)
        for block in self.before:
            x = block(x, cond)  # (B, N, D)
        if self.has_inner:
            inner_grid = tuple(g // f for g, f in zip(grid, self.factor, strict=True))
            h = self.merge(from_tokens(x, grid))  # (B, N / F, D_inner)
            h = self.inner(h, cond, inner_grid)  # (B, N / F, D_inner)
            h = to_tokens(self.split(h, inner_grid))  # (B, N, D)
            x = self.fuse(torch.cat([x, h], dim=-1))  # (B, N, D)
        for block in self.after:
            x = block(x, cond)  # (B, N, D)
        return x


class ViT(nn.Module):
    """Multi-level (hourglass / U-ViT style) ViT denoiser over latents: v_hat(z_t, logsnr, label).

    The input (B, C, *spatial) is patched by ``patch_size`` into a token grid (level 0, width
    ``widths[0]``). Level i+1 merges ``level_downsample`` tokens per axis (2x2 for images,
    2x2x2 for videos by default) into one token of width ``widths[i+1]``; level i runs
    ``depths[i] // 2`` blocks before and the rest after the deeper level, with a skip
    connection around it; the innermost level runs all its blocks. Every level adds a fixed
    sin-cos positional embedding of its own grid.

    Conditioning (adaLN-Zero in every block): a Fourier embedding of logsnr, plus, when
    ``num_classes > 0``, a class embedding with ``num_classes + 1`` rows; row ``num_classes``
    is the null label for classifier-free guidance (``label=None`` means all-null). An
    unconditional ViT (``num_classes=0``) has no class embedding and ignores ``label``.
    With ``context_channels > 0`` a context tensor of the latent's grid (e.g. the latent of a
    video's first frames, stages.ul_base ``context_frames``) is concatenated to ``z_t`` along
    the channels before the patch embedding; the output keeps ``z_t``'s channels.
    Returns the velocity v_hat (B, C, *spatial); stages convert it with ``eps_from_v``.
    The output layer is zero-initialised: an untrained ViT returns v_hat = 0.

    Paper presets: stage-1 prior ``widths=(1024,), depths=(8,)``; stage-2 base model
    ``widths=(512, 1024), depths=(6, 16), dropout=0.1``; both ``patch_size=1``.

    Attributes:
        num_classes: number of real classes (0 = unconditional); the null label equals it.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        widths: tuple[int, ...] = (1024,),
        depths: tuple[int, ...] = (8,),
        heads: int = 16,
        patch_size: int | tuple[int, ...] = 1,
        num_classes: int = 0,
        dropout: float = 0.0,
        mlp_ratio: float = 4.0,
        level_downsample: int | tuple[int, ...] = 2,
        context_channels: int = 0,
    ) -> None:
        """
        Args:
            shape: per-example latent shape, (C, H, W) or (C, T, H, W), measured from data.
            widths: token width of each level, finest first (paper prior: 1024).
            depths: Transformer blocks of each level (paper prior: 8).
            heads: attention heads of every block (each width must be divisible by it).
            patch_size: per-axis patch size of the input patching (int or tuple; paper: 1).
            num_classes: number of classes for class conditioning; 0 = unconditional.
            dropout: dropout probability inside the MLPs.
            mlp_ratio: MLP hidden width as a multiple of the token width.
            level_downsample: per-axis token-merging factor between levels (int or tuple).
            context_channels: channels of the context concatenated to the input (0: none);
                supplied by the stage that conditions on one.
        """
        super().__init__()
        in_channels, *spatial = shape
        ndim = len(spatial)
        if len(widths) != len(depths):
            raise ConfigError(f"widths {widths} and depths {depths} must have the same length")
        self.num_classes = num_classes
        self.context_channels = context_channels
        self.patch = as_tuple(patch_size, ndim)
        factor = as_tuple(level_downsample, ndim)
        grid = divided_grid(tuple(spatial), self.patch, "ViT patching")
        deepest = tuple(f ** (len(widths) - 1) for f in factor)
        divided_grid(grid, deepest, f"ViT with {len(widths)} levels (token grid)")

        cond_dim = max(widths)
        self.logsnr_emb = LogSNREmbedding(cond_dim)
        self.class_emb = nn.Embedding(num_classes + 1, cond_dim) if num_classes > 0 else None
        self.embed = PatchEmbed(ndim, in_channels + context_channels, widths[0], self.patch)
        self.levels = _Level(ndim, widths, depths, heads, cond_dim, mlp_ratio, dropout, factor)
        self.final = FinalLayer(ndim, widths[0], cond_dim, in_channels, self.patch)

    def forward(
        self,
        z_t: torch.Tensor,
        logsnr: torch.Tensor,
        label: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x, cond = conditioned_input(self, z_t, logsnr, label, context)
        grid = tuple(s // p for s, p in zip(z_t.shape[2:], self.patch, strict=True))
        x = self.embed(x)  # (B, N, D)
        x = self.levels(x, cond, grid)  # (B, N, D)
        return self.final(x, cond, grid)  # (B, C, *spatial)


class ConvViT(UViTBody):
    """U-ViT latent denoiser: v_hat(z_t, logsnr, label, context) with convolutions around a ViT.

    The body of the U-ViT decoder (:mod:`.uvit`) on latents: conv ResBlock stages at the latent's
    own resolution, down-sampled by ``stage_downsample`` to the middle Transformer's token grid,
    and back. Where :class:`ViT` sees a latent only through patches, the convolutions are
    translation-equivariant and, with ``conv_kernel = 3`` on a clip's latent, read the
    neighbouring latent steps directly: a pattern that moves by a fraction of a patch from one
    step to the next is a local, position-independent operation for them, which a ViT has to
    learn at every position (docs/method.md, "Video").

    Conditioning: the logsnr embedding, plus a class embedding (``num_classes + 1`` rows, the
    last the null label) when ``num_classes > 0``, enters every ResBlock (scale and shift) and
    every Transformer block (adaLN-Zero). A context tensor of the latent's grid
    (``context_channels > 0``, e.g. the latent of a video's first frames) is concatenated to
    ``z_t`` along the channels at the input. Zero-initialised output: an untrained network
    returns v_hat = 0. The interface is :class:`ViT`'s, so either serves as stage 1's prior or
    stage 2's base model.

    Attributes:
        num_classes: number of real classes (0 = unconditional); the null label equals it.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        channels: tuple[int, ...] = (128,),
        blocks_per_stage: int | tuple[int, ...] = 1,
        width: int = 512,
        depth: int = 8,
        heads: int = 8,
        patch_size: int | tuple[int, ...] = 1,
        stage_downsample: tuple[int | tuple[int, ...], ...] | None = None,
        conv_kernel: int | tuple[int, ...] = 3,
        num_classes: int = 0,
        dropout: float = 0.0,
        mlp_ratio: float = 4.0,
        upsample: str = "nearest",
        context_channels: int = 0,
    ) -> None:
        """
        Args:
            shape: per-example latent shape, (C, H, W) or (C, T, H, W), measured from data.
            channels: width of each conv stage; each ends in a down-sampling.
            blocks_per_stage: ResBlocks per stage, int or one per stage.
            width: token width of the middle Transformer (and of the conditioning embedding).
            depth: Transformer blocks in the middle.
            heads: attention heads of the middle Transformer.
            patch_size: per-axis patch of the input patching (int or tuple).
            stage_downsample: per-axis down-sampling after each conv stage, one entry per
                stage, each int or per-axis tuple; None = 2 on every axis. ``((1, 2, 2),)``
                keeps a clip's latent steps apart and halves its height and width.
            conv_kernel: kernel of the ResBlocks, int or per axis.
            num_classes: number of classes for class conditioning; 0 = unconditional.
            dropout: dropout probability in ResBlocks and Transformer MLPs.
            mlp_ratio: MLP hidden width of the Transformer as a multiple of ``width``.
            upsample: ``"nearest"`` or ``"subpixel"``.
            context_channels: channels of the context concatenated to the input (0: none);
                supplied by the stage that conditions on one.
        """
        in_channels, *spatial = shape
        plan = stage_plan(
            spatial, channels, blocks_per_stage, patch_size, stage_downsample, "after"
        )
        divided_grid(tuple(spatial), plan.downsample, "ConvViT patch_size times stage_downsample")
        super().__init__(
            plan, in_channels + context_channels, in_channels, channels, width, depth, heads,
            dropout, mlp_ratio, upsample, conv_kernel,
        )  # fmt: skip
        self.num_classes = num_classes
        self.context_channels = context_channels
        self.class_emb = nn.Embedding(num_classes + 1, width) if num_classes > 0 else None

    def forward(
        self,
        z_t: torch.Tensor,
        logsnr: torch.Tensor,
        label: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x, emb = conditioned_input(self, z_t, logsnr, label, context)
        return self.body(x, emb)  # (B, C, *S)
