"""Shared N-d building blocks for the UL encoder, priors and decoder.

Every block works for any number of spatial dimensions (``ndim`` = 2 for images
(B, C, H, W), 3 for videos (B, C, T, H, W)), so image and video networks share one
implementation. Tokens are (B, N, D) with N the flattened spatial grid in row-major
order (T, H, W).

Initialisation convention (ADM / DiT): every residual branch ends in a zero-initialised
layer (the second conv of a ``ResBlock``, the adaLN gates of a ``TransformerBlock``), so each
block is the identity at init, and every denoiser's output layer is zero-initialised so an
untrained denoiser predicts ``v = 0`` (the networks predict velocity, not noise).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ulframe.errors import ConfigError

# Largest number of GroupNorm groups; the actual count is gcd(MAX_NORM_GROUPS, channels).
MAX_NORM_GROUPS = 32
# logsnr is divided by this before the Fourier features: pixel/latent schedules span about
# [-15, 15], so the scaled value lies in about [-1, 1].
LOGSNR_SCALE = 15.0
# Highest angular frequency (in units of pi) of the logsnr Fourier features: resolves
# logsnr differences of about LOGSNR_SCALE / LOGSNR_MAX_FREQUENCY.
LOGSNR_MAX_FREQUENCY = 1000.0
# Number of sin/cos frequency features of logsnr before the embedding MLP (DiT uses 256).
LOGSNR_FOURIER_FEATURES = 256
# Base period of the fixed sin-cos positional embedding (Transformer / MAE convention).
POSITION_MAX_PERIOD = 10000.0

UPSAMPLE_MODES = ("nearest", "subpixel")

_AXIS_NAMES = {1: ("w",), 2: ("h", "w"), 3: ("t", "h", "w")}


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters of ``module`` (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())


def as_tuple(value: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """Broadcast an int to a per-axis tuple of length ``ndim``; check a tuple's length."""
    if isinstance(value, int):
        return (value,) * ndim
    value = tuple(int(v) for v in value)
    if len(value) != ndim:
        raise ConfigError(f"expected an int or a tuple of {ndim} per-axis values, got {value}")
    return value


def stage_factors(
    factors: tuple[int | tuple[int, ...], ...] | None,
    num_stages: int,
    ndim: int,
) -> tuple[tuple[int, ...], ...]:
    """Per-stage, per-axis down-sampling factors.

    ``None`` means 2 on every axis at every stage; otherwise one entry per stage, each an int
    (all axes) or a per-axis tuple, e.g. ``((2, 2, 2), (1, 2, 2))`` for T x H x W.
    """
    if factors is None:
        return ((2,) * ndim,) * num_stages
    if len(factors) != num_stages:
        raise ConfigError(f"expected {num_stages} per-stage down-sampling factors, got {factors}")
    return tuple(as_tuple(f, ndim) for f in factors)


def axis_product(factors: tuple[tuple[int, ...], ...], ndim: int) -> tuple[int, ...]:
    """Per-axis product of a sequence of per-axis factors."""
    return tuple(math.prod(f[axis] for f in factors) for axis in range(ndim))


@dataclass(frozen=True)
class StagePlan:
    """The geometry of a network of conv stages over a ``spatial`` grid (:func:`stage_plan`):
    what an encoder and the decoder of its latents agree on, the latent grid being
    ``spatial / downsample`` per axis."""

    ndim: int  # spatial axes
    blocks: tuple[int, ...]  # residual blocks of each stage
    patch: tuple[int, ...]  # per-axis patch of the (un-)patching at full resolution
    factors: tuple[tuple[int, ...], ...]  # per-axis down-sampling factor of each transition
    downsample: tuple[int, ...]  # per-axis total: the patch times every factor


def stage_plan(
    spatial: Sequence[int],
    channels: Sequence[int],
    blocks_per_stage: int | tuple[int, ...],
    patch_size: int | tuple[int, ...],
    stage_downsample: tuple[int | tuple[int, ...], ...] | None,
    transitions: Literal["between", "after"],
) -> StagePlan:
    """The :class:`StagePlan` of ``len(channels)`` conv stages.

    Args:
        spatial: the full-resolution grid, ``(H, W)`` or ``(T, H, W)``.
        channels: width of each stage (their number is the number of stages).
        blocks_per_stage: residual blocks per stage, int or one per stage.
        patch_size: per-axis patch size, int or tuple.
        stage_downsample: one factor per transition, each int or per-axis tuple; None = 2 on
            every axis (:func:`stage_factors`).
        transitions: ``"between"`` consecutive stages (``len(channels) - 1`` down-samplings)
            or ``"after"`` each stage (``len(channels)``).

    Raises:
        ConfigError: a per-stage or per-axis value of the wrong length.
    """
    ndim, num_stages = len(spatial), len(channels)
    blocks = as_tuple(blocks_per_stage, num_stages)
    patch = as_tuple(patch_size, ndim)
    count = num_stages - 1 if transitions == "between" else num_stages
    factors = stage_factors(stage_downsample, count, ndim)
    downsample = tuple(p * f for p, f in zip(patch, axis_product(factors, ndim), strict=True))
    return StagePlan(ndim, blocks, patch, factors, downsample)


def norm_groups(channels: int) -> int:
    """GroupNorm group count: as many as possible up to MAX_NORM_GROUPS, dividing channels."""
    return math.gcd(MAX_NORM_GROUPS, channels)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with ``norm_groups(channels)`` groups."""
    return nn.GroupNorm(norm_groups(channels), channels)


def conv_nd(
    ndim: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, ...],
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] = 0,
) -> nn.Module:
    """A ``ndim``-dimensional convolution (Conv1d / Conv2d / Conv3d)."""
    convs: dict[int, Any] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    if ndim not in convs:
        raise ConfigError(f"conv_nd supports 1 to 3 spatial dims, got {ndim}")
    return convs[ndim](in_channels, out_channels, kernel_size, stride=stride, padding=padding)


def zero_(module: nn.Module) -> nn.Module:
    """Zero all parameters of ``module`` in place and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def axis_names(ndim: int) -> tuple[str, ...]:
    """einops names of the spatial axes: ('h', 'w') for 2-D, ('t', 'h', 'w') for 3-D."""
    return _AXIS_NAMES.get(ndim, tuple(f"s{i}" for i in range(ndim)))


def patch_names(ndim: int) -> tuple[str, ...]:
    """einops names of the per-axis patch sizes: ('ph', 'pw') for 2-D."""
    return tuple(f"p{a}" for a in axis_names(ndim))


def patch_lengths(patch: tuple[int, ...]) -> dict[str, int]:
    """einops axis lengths for the patch axes, e.g. {'ph': 2, 'pw': 2}."""
    return dict(zip(patch_names(len(patch)), patch, strict=True))


def grid_lengths(grid: tuple[int, ...]) -> dict[str, int]:
    """einops axis lengths for the grid axes, e.g. {'h': 32, 'w': 32}."""
    return dict(zip(axis_names(len(grid)), grid, strict=True))


def _inverse(pattern: str) -> str:
    """The einops pattern that undoes `pattern`: its two sides swapped."""
    source, target = pattern.split(" -> ")
    return f"{target} -> {source}"


def _patched_grid(ndim: int) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """Grid axes, patch axes and the grid written as patches: (['h', 'w'], ['ph', 'pw'],
    '(h ph) (w pw)')."""
    axes, patches = axis_names(ndim), patch_names(ndim)
    return axes, patches, " ".join(f"({a} {p})" for a, p in zip(axes, patches, strict=True))


def patchify_pattern(ndim: int) -> str:
    """'b c (h ph) (w pw) -> b (h w) (ph pw c)': image to patch tokens."""
    axes, patches, spatial = _patched_grid(ndim)
    return f"b c {spatial} -> b ({' '.join(axes)}) ({' '.join(patches)} c)"


def unpatchify_pattern(ndim: int) -> str:
    """'b (h w) (ph pw c) -> b c (h ph) (w pw)': patch tokens to image."""
    return _inverse(patchify_pattern(ndim))


def space_to_depth_pattern(ndim: int) -> str:
    """'b c (h ph) (w pw) -> b (ph pw c) h w': patches folded into channels, channel-first."""
    axes, patches, spatial = _patched_grid(ndim)
    return f"b c {spatial} -> b ({' '.join(patches)} c) {' '.join(axes)}"


def depth_to_space_pattern(ndim: int) -> str:
    """'b (ph pw c) h w -> b c (h ph) (w pw)': inverse of ``space_to_depth_pattern``."""
    return _inverse(space_to_depth_pattern(ndim))


def to_tokens_pattern(ndim: int) -> str:
    """'b c h w -> b (h w) c': channel-first grid to tokens."""
    axes = " ".join(axis_names(ndim))
    return f"b c {axes} -> b ({axes}) c"


def from_tokens_pattern(ndim: int) -> str:
    """'b (h w) c -> b c h w': tokens to channel-first grid."""
    source, target = to_tokens_pattern(ndim).split(" -> ")
    return f"{target} -> {source}"


def broadcast_pattern(ndim: int) -> str:
    """'b c -> b c 1 1': a per-channel vector broadcastable over ``ndim`` spatial axes."""
    return "b c -> b c " + " ".join("1" for _ in range(ndim))


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *grid) -> (B, N, C)."""
    return rearrange(x, to_tokens_pattern(x.ndim - 2))


def from_tokens(tokens: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """(B, N, C) -> (B, C, *grid)."""
    return rearrange(tokens, from_tokens_pattern(len(grid)), **grid_lengths(grid))


def space_to_depth(x: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """(B, C, *spatial) -> (B, C * prod(patch), *spatial / patch)."""
    return rearrange(x, space_to_depth_pattern(len(patch)), **patch_lengths(patch))


def depth_to_space(x: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """(B, C * prod(patch), *grid) -> (B, C, *grid * patch)."""
    return rearrange(x, depth_to_space_pattern(len(patch)), **patch_lengths(patch))


def divided_grid(
    spatial: tuple[int, ...],
    factor: tuple[int, ...],
    what: str,
) -> tuple[int, ...]:
    """``spatial / factor`` per axis; ValueError naming ``what`` if an axis does not divide."""
    if any(s % f for s, f in zip(spatial, factor, strict=True)):
        raise ConfigError(
            f"{what}: spatial shape {tuple(spatial)} is not divisible by the total "
            f"down-sampling {tuple(factor)}; change the input size, patch_size or factors"
        )
    return tuple(s // f for s, f in zip(spatial, factor, strict=True))


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------


class LogSNREmbedding(nn.Module):
    """Fourier features of ``logsnr / LOGSNR_SCALE`` followed by a 2-layer SiLU MLP.

    Frequencies are geometric between pi and pi * LOGSNR_MAX_FREQUENCY (ADM-style timestep
    embedding, but on the log-SNR, the noise-level currency of ulframe).
    """

    def __init__(
        self,
        dim: int,
        num_features: int = LOGSNR_FOURIER_FEATURES,
    ) -> None:
        """
        Args:
            dim: output embedding width.
            num_features: number of sin + cos Fourier features (even).
        """
        super().__init__()
        if num_features % 2:
            raise ConfigError(f"num_features must be even, got {num_features}")
        self.num_features = num_features
        self.mlp = nn.Sequential(nn.Linear(num_features, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, logsnr: torch.Tensor) -> torch.Tensor:
        half = self.num_features // 2
        exponent = torch.linspace(0.0, 1.0, half, device=logsnr.device, dtype=torch.float32)
        freqs = math.pi * LOGSNR_MAX_FREQUENCY**exponent  # (F/2,)
        angles = (logsnr.float() / LOGSNR_SCALE)[:, None] * freqs[None, :]  # (B, F/2)
        features = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # (B, F)
        return self.mlp(features.to(next(self.mlp.parameters()).dtype))  # (B, dim)


def sincos_position_embedding(
    grid: tuple[int, ...],
    dim: int,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Fixed N-d sin-cos positional embedding of a token grid, shape (prod(grid), dim).

    The width is split evenly over the axes (an even number of features per axis, sin then
    cos of the integer grid coordinate at geometric frequencies); leftover features are zero.
    """
    ndim = len(grid)
    per_axis = 2 * (dim // (2 * ndim))
    half = per_axis // 2
    omega = POSITION_MAX_PERIOD ** (
        -torch.arange(half, device=device, dtype=torch.float32) / max(half, 1)
    )  # (F/2,)
    coords = torch.meshgrid(
        *[torch.arange(n, device=device, dtype=torch.float32) for n in grid], indexing="ij"
    )
    features = []
    for coord in coords:
        angles = coord.reshape(-1)[:, None] * omega[None, :]  # (N, F/2)
        features += [torch.sin(angles), torch.cos(angles)]
    pad = torch.zeros(math.prod(grid), dim - ndim * per_axis, device=device)
    return torch.cat([*features, pad], dim=-1).to(dtype)  # (N, dim)


# ---------------------------------------------------------------------------------------------
# Convolutional blocks
# ---------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block, N-d, with optional scale/shift conditioning.

    h = conv1(silu(norm1(x))); h = norm2(h) * (1 + scale) + shift with (scale, shift) from the
    embedding; out = skip(x) + conv2(dropout(silu(h))). conv2 starts at zero (identity block).
    """

    def __init__(
        self,
        ndim: int,
        in_channels: int,
        out_channels: int,
        emb_dim: int | None = None,
        dropout: float = 0.0,
        kernel_size: int | tuple[int, ...] = 3,
    ) -> None:
        """
        Args:
            ndim: number of spatial dims (2 images, 3 videos).
            in_channels: input channels.
            out_channels: output channels (a 1x1 conv skip is used if they differ).
            emb_dim: width of the conditioning embedding; None for an unconditioned block.
            dropout: dropout probability before the second conv.
            kernel_size: odd size of both convs, int or per axis: ``(1, 3, 3)`` on a video
                convolves each frame on its own (a third of the cost of 3x3x3).
        """
        super().__init__()
        self.ndim = ndim
        kernel = as_tuple(kernel_size, ndim)
        if any(k % 2 == 0 for k in kernel):
            raise ConfigError(f"ResBlock kernel sizes must be odd, got {kernel}")
        padding = tuple(k // 2 for k in kernel)
        self.norm1 = group_norm(in_channels)
        self.conv1 = conv_nd(ndim, in_channels, out_channels, kernel, padding=padding)
        self.emb = None if emb_dim is None else nn.Linear(emb_dim, 2 * out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_(conv_nd(ndim, out_channels, out_channels, kernel, padding=padding))
        self.skip = (
            nn.Identity()
            if in_channels == out_channels
            else conv_nd(ndim, in_channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, *S)
        h = self.norm2(h)  # (B, C_out, *S)
        if self.emb is not None:
            if emb is None:
                raise ValueError("this ResBlock is conditioned: pass emb")
            scale_shift = rearrange(self.emb(F.silu(emb)), broadcast_pattern(self.ndim))
            scale, shift = scale_shift.chunk(2, dim=1)  # (B, C_out, 1, ...)
            h = h * (1 + scale) + shift  # (B, C_out, *S)
        h = self.conv2(self.dropout(F.silu(h)))  # (B, C_out, *S)
        return self.skip(x) + h  # (B, C_out, *S)


def _strided_kernel(factor: int) -> tuple[int, int]:
    """(kernel, padding) of a strided conv that maps n to exactly n / factor (n divisible)."""
    kernel = 3 if factor == 1 else 2 * factor - 1
    return kernel, (kernel - 1) // 2


class Downsample(nn.Module):
    """Strided convolution, down-sampling each axis by its own integer factor."""

    def __init__(
        self,
        ndim: int,
        in_channels: int,
        out_channels: int,
        factor: int | tuple[int, ...] = 2,
    ) -> None:
        """
        Args:
            ndim: number of spatial dims.
            in_channels: input channels.
            out_channels: output channels.
            factor: per-axis down-sampling factor (int for all axes, or a tuple, e.g. (1, 2, 2)).
        """
        super().__init__()
        self.factor = as_tuple(factor, ndim)
        kernel, padding = zip(*(_strided_kernel(f) for f in self.factor), strict=True)
        self.conv = conv_nd(ndim, in_channels, out_channels, kernel, self.factor, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # (B, C_out, *S / factor)


class Upsample(nn.Module):
    """Up-sampling by a per-axis integer factor, then a 3x3 conv; two modes.

    ``"nearest"``: nearest-neighbour repeat, then the conv. With a factor of 4 or more the
    middle copies of one input see the same conv window and come out identical, so the
    up-sampled positions of one input can only differ at the group's borders.
    ``"subpixel"`` (Shi et al. 2016, ESPCN): the conv at the input resolution makes
    ``out_channels * prod(factor)`` channels, rearranged (depth-to-space) so that every output
    position has weights of its own: the 4 frames that a video latent step spans can differ.
    """

    # Its constructor mirrors Downsample's (deliberately: the down and up paths are built from
    # the same per-stage arguments).
    def __init__(
        self,
        ndim: int,
        in_channels: int,
        out_channels: int,
        factor: int | tuple[int, ...] = 2,
        mode: str = "nearest",
    ) -> None:
        """
        Args:
            ndim: number of spatial dims.
            in_channels: input channels.
            out_channels: output channels.
            factor: per-axis up-sampling factor (int for all axes, or a tuple).
            mode: ``"nearest"`` or ``"subpixel"`` (see the class docstring).
        """
        super().__init__()
        if mode not in UPSAMPLE_MODES:
            raise ConfigError(f"upsample mode must be one of {UPSAMPLE_MODES}, got {mode!r}")
        self.factor = as_tuple(factor, ndim)
        self.mode = mode
        multiple = math.prod(self.factor) if mode == "subpixel" else 1
        self.conv = conv_nd(ndim, in_channels, out_channels * multiple, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "subpixel":
            return depth_to_space(self.conv(x), self.factor)  # (B, C_out, *S * factor)
        size = tuple(s * f for s, f in zip(x.shape[2:], self.factor, strict=True))
        x = F.interpolate(x, size=size, mode="nearest")  # (B, C_in, *S * factor)
        return self.conv(x)  # (B, C_out, *S * factor)


# ---------------------------------------------------------------------------------------------
# Token blocks
# ---------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """(B, C, *spatial) -> (B, N, D): non-overlapping N-d patches, then a linear map."""

    def __init__(
        self,
        ndim: int,
        in_channels: int,
        width: int,
        patch_size: int | tuple[int, ...] = 1,
    ) -> None:
        """
        Args:
            ndim: number of spatial dims.
            in_channels: channels of the input grid.
            width: token width D.
            patch_size: per-axis patch size (int or tuple, e.g. (1, 2, 2)).
        """
        super().__init__()
        self.patch = as_tuple(patch_size, ndim)
        self.pattern = patchify_pattern(ndim)
        self.proj = nn.Linear(in_channels * math.prod(self.patch), width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = rearrange(x, self.pattern, **patch_lengths(self.patch))  # (B, N, P*C)
        return self.proj(patches)  # (B, N, D)


class PatchUnembed(nn.Module):
    """(B, N, D) -> (B, C, *spatial): a linear map to patch pixels, then un-patching."""

    # Its constructor's arguments are FinalLayer's less `cond_dim` (deliberately spelled out in
    # both: FinalLayer builds one, and each documents its own).

    def __init__(
        self,
        ndim: int,
        width: int,
        out_channels: int,
        patch_size: int | tuple[int, ...] = 1,
    ) -> None:
        """
        Args:
            ndim: number of spatial dims.
            width: token width D.
            out_channels: channels of the output grid.
            patch_size: per-axis patch size (int or tuple).
        """
        super().__init__()
        self.patch = as_tuple(patch_size, ndim)
        self.pattern = unpatchify_pattern(ndim)
        self.proj = nn.Linear(width, out_channels * math.prod(self.patch))

    def forward(self, tokens: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        patches = self.proj(tokens)  # (B, N, P*C)
        return rearrange(
            patches, self.pattern, **grid_lengths(grid), **patch_lengths(self.patch)
        )  # (B, C, *grid * patch)


class Attention(nn.Module):
    """Multi-head self-attention over tokens with SDPA and optional RMS qk-norm."""

    def __init__(
        self,
        width: int,
        heads: int,
        qk_norm: bool = True,
    ) -> None:
        """
        Args:
            width: token width D (divisible by heads).
            heads: number of attention heads.
            qk_norm: RMS-normalise queries and keys per head (stabilises large models).
        """
        super().__init__()
        if width % heads:
            raise ConfigError(f"heads {heads} does not divide the width {width}")
        self.heads = heads
        head_dim = width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = nn.RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = rearrange(
            self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads
        )  # (3, B, H, N, Dh)
        q, k, v = self.q_norm(qkv[0]), self.k_norm(qkv[1]), qkv[2]  # (B, H, N, Dh)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, Dh)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))  # (B, N, D)


class MLP(nn.Module):
    """Linear-GELU-Dropout-Linear feed-forward block."""

    def __init__(
        self,
        width: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        """
        Args:
            width: token width D.
            mlp_ratio: hidden width as a multiple of D.
            dropout: dropout probability after the activation.
        """
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.net = nn.Sequential(
            nn.Linear(width, hidden),
            nn.GELU(approximate="tanh"),
            nn.Dropout(dropout),
            nn.Linear(hidden, width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, N, D)


class TransformerBlock(nn.Module):
    """Pre-norm Transformer block with adaLN-Zero modulation (DiT) from a conditioning vector.

    (shift, scale, gate) for attention and MLP come from a zero-initialised linear map of
    silu(cond), so the block is the identity at init.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        cond_dim: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        qk_norm: bool = True,
    ) -> None:
        """
        Args:
            width: token width D.
            heads: number of attention heads.
            cond_dim: width of the conditioning vector (noise level + optional class).
            mlp_ratio: MLP hidden width as a multiple of D.
            dropout: dropout probability inside the MLP.
            qk_norm: RMS-normalise queries and keys.
        """
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads, qk_norm)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(width, mlp_ratio, dropout)
        self.modulation = zero_(nn.Linear(cond_dim, 6 * width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        mod = rearrange(self.modulation(F.silu(cond)), "b (six d) -> six b 1 d", six=6)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod  # each (B, 1, D)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1)  # (B, N, D)
        x = x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)  # (B, N, D)
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm followed by a zero-initialised ``PatchUnembed`` (DiT)."""

    def __init__(
        self,
        ndim: int,
        width: int,
        cond_dim: int,
        out_channels: int,
        patch_size: int | tuple[int, ...] = 1,
    ) -> None:
        """
        Args:
            ndim: number of spatial dims.
            width: token width D.
            cond_dim: width of the conditioning vector.
            out_channels: channels of the output grid.
            patch_size: per-axis patch size of the output.
        """
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = zero_(nn.Linear(cond_dim, 2 * width))
        self.unembed = PatchUnembed(ndim, width, out_channels, patch_size)
        zero_(self.unembed)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        shift, scale = rearrange(self.modulation(F.silu(cond)), "b (two d) -> two b 1 d", two=2)
        x = self.norm(x) * (1 + scale) + shift  # (B, N, D)
        return self.unembed(x, grid)  # (B, C, *grid * patch)
