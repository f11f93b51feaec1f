"""``metrics.fid_inception``: the Fréchet Inception Distance, with weights from a local file.

The network is the Inception-v3 of TensorFlow's FID (``inception-2015-12-05``) as pytorch-fid
rebuilds it, written here in plain torch (no torchvision): torchvision's ``Inception3`` layout
with 1008 classes and no auxiliary classifier, its ``Mixed_5b..5d``, ``Mixed_6b..6e``,
``Mixed_7b`` and ``Mixed_7c`` blocks patched as TensorFlow computes them (average pools that do
not count the padding; a max pool in the last block's pool branch). Features are the 2048-d
global average pool after ``Mixed_7c`` ("pool3").

State-dict naming: torchvision's ``Inception3`` keys, as in pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` (``Conv2d_1a_3x3.conv.weight``,
``Conv2d_1a_3x3.bn.running_mean``, ``Mixed_5b.branch5x5_1.conv.weight``, ...,
``Mixed_7c.branch_pool.bn.bias``, ``fc.weight`` (1008, 2048), ``fc.bias``). A file with those
keys loads as is. The layout (names, channels, kernels, paddings) was written from memory and
then compared by reading torchvision's ``inception.py`` and pytorch-fid's ``inception.py``; the
parameter count equals ``Inception3(num_classes=1008, aux_logits=False)``'s (23 850 960). It has
not been checked against the real weights file, which is not available offline here. ``fc`` is never used for
features: a file without ``fc.*`` loads too, and BatchNorm's ``num_batches_tracked`` may be
absent. Nothing is ever downloaded: point ``metrics.fid_inception.weights_path`` at the file.

Inputs in [-1, 1] (the engine's range, which is what the network expects: pytorch-fid maps its
[0, 1] inputs to [-1, 1]) are clamped, rounded to 8-bit levels (``quantize``: FID is normally
computed from saved 8-bit images) and resized to 299 x 299 bilinearly (pytorch-fid's
``F.interpolate(..., mode="bilinear", align_corners=False)``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ulframe.errors import UserError
from ulframe.eval.frechet import FeatureFrechetMetric

FEATURE_DIM = 2048
INPUT_SIZE = 299
MIN_INPUT_SIZE = 75  # smaller inputs vanish before Mixed_7c
NUM_CLASSES = 1008  # the TF graph's classifier (1000 ImageNet classes + 8 unused)


class BasicConv2d(nn.Module):
    """Convolution (no bias), BatchNorm (eps 1e-3), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv)  # type: ignore[arg-type]
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: Tensor) -> Tensor:
    """TensorFlow's 3x3 / stride-1 average pool: padded zeros are not counted."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """Mixed_5b..5d: 64 + 64 + 96 + pool_features channels."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([self.branch1x1(x), b5, b3, pool], 1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction to 17x17, 384 + 96 + in_channels channels."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    """Mixed_6b..6e: factorised 7x7 convolutions, 4 x 192 channels."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            bd = layer(bd)
        pool = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([self.branch1x1(x), b7, bd, pool], 1)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction to 8x8, 320 + 192 + in_channels channels."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """Mixed_7b (``max_pool=False``) and Mixed_7c (``max_pool=True``): 2048 channels.

    TensorFlow's graph uses a max pool in the pool branch of the last block (pytorch-fid's
    ``FIDInceptionE_2``), an average pool (not counting padding) in the one before.
    """

    def __init__(self, in_channels: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.max_pool:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg_pool_tf(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3; ``forward(x)`` maps (N, 3, H, W) in [-1, 1] to pool3 (N, 2048).

    The input is used as given (no resize): :class:`FIDInception` resizes to 299 first.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)  # kept for key compatibility; unused

    def forward(self, x: Tensor) -> Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        return x.mean((2, 3))  # (N, 2048): global average pool


def _optional(key: str) -> bool:
    """Keys a weights file may lack: the unused classifier and BatchNorm's step counters."""
    return key.startswith("fc.") or key.endswith("num_batches_tracked")


def load_fid_weights(network: nn.Module, weights_path: str | Path, parameter: str) -> None:
    """Load a local state dict into ``network``; a ``UserError`` naming ``parameter`` if the file
    is missing, unreadable or its keys/shapes do not match."""
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise UserError(
            f"{parameter} = {str(weights_path)!r}: no such file. The FID Inception weights are "
            "never downloaded: fetch pytorch-fid's pt_inception-2015-12-05-6726825d.pth yourself "
            f"and set {parameter} to its local path."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(
            f"{parameter} = {str(path)!r}: cannot be read as a torch state dict: "
            f"{type(error).__name__}: {error}"
        ) from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(
            f"{parameter} = {str(path)!r}: holds a {type(state).__name__}, not a state dict"
        )
    expected = network.state_dict()
    missing = sorted(k for k in expected if k not in state and not _optional(k))
    unexpected = sorted(k for k in state if k not in expected)
    wrong = sorted(
        k
        for k in expected
        if k in state and (not isinstance(state[k], Tensor) or state[k].shape != expected[k].shape)
    )
    if missing or unexpected or wrong:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {what} keys (e.g. {', '.join(keys[:3])})")
        raise UserError(
            f"{parameter} = {str(path)!r}: the keys do not match the FID Inception-v3 "
            f"(torchvision Inception3 naming, as pytorch-fid's pt_inception-2015-12-05): "
            f"{'; '.join(parts)}"
        )
    network.load_state_dict(state, strict=False)


class FIDInception(FeatureFrechetMetric):
    """Fréchet Inception Distance between reference and estimate images (pool3 features).

    Args:
        weights_path: local file with the FID Inception-v3 state dict (pytorch-fid's
            ``pt_inception-2015-12-05-6726825d.pth``); never downloaded.
        batch_size: images per forward pass.
        quantize: round inputs to 8-bit levels first (as FID on saved PNGs does).
        input_size: side the images are resized to. 299 is FID; any other value gives numbers
            not comparable with published FIDs (the contract tests use 75, the smallest side the
            network accepts, to run fast).

    ``metric(reference, estimate)`` takes two (N, 3, H, W) batches in [-1, 1] (N >= 2 each; they
    may differ in N and H, W) and returns ``{"fid": value}``. FID from few images is strongly
    biased upwards: compare values only at a fixed sample count (the usual one is 50 000).
    """

    name = "fid"

    def __init__(
        self,
        weights_path: str,
        batch_size: int = 50,
        quantize: bool = True,
        input_size: int = INPUT_SIZE,
    ) -> None:
        if input_size < MIN_INPUT_SIZE:
            raise UserError(
                f"metrics.fid_inception.input_size must be >= {MIN_INPUT_SIZE} (FID uses "
                f"{INPUT_SIZE}); got {input_size}"
            )
        self.weights_path = weights_path
        self.batch_size = batch_size
        self.quantize = quantize
        self.input_size = input_size
        self.network = FIDInceptionV3().eval().requires_grad_(False)
        load_fid_weights(self.network, weights_path, "metrics.fid_inception.weights_path")

    def embed(self, x: Tensor) -> Tensor:
        """pool3 features of a chunk: 8-bit quantised (optional), resized bilinearly."""
        if self.quantize:
            x = torch.round((x + 1) * 127.5) / 127.5 - 1
        size = (self.input_size, self.input_size)
        return self.network(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
