"""``metrics.fvd_i3d``: the Fréchet Video Distance on I3D features from a local TorchScript file.

FVD (Unterthiner et al., 2018) is the Fréchet distance between Gaussians fitted to features of
an I3D video classifier trained on Kinetics-400. The network is loaded from a TorchScript file
the user names (``metrics.fvd_i3d.weights``), never downloaded: ``i3d_torchscript.pt``, the
TorchScript port of the TF-Hub I3D of the original FVD code that StyleGAN-V
(``src/metrics/frechet_video_distance.py``), DIGAN and the "common metrics on video quality"
code load.

Convention followed: the StyleGAN-V detector as the common video-metrics code calls it
(``fvd/styleganv/fvd.py``: ``preprocess_single`` and ``get_feats``), i.e. the preprocessing is
done here and the detector's own is switched off:

- input (N, 3, T, H, W) float, values in [-1, 1], channels RGB, layout N, C, T, H, W;
- every frame resized bilinearly (``align_corners=False``, no antialiasing) so that its shorter
  side is 224, then centre-cropped to 224 x 224;
- ``detector(x, rescale=False, resize=False, return_features=True)``: the 400-d "raw features
  before the softmax layer" (the Kinetics-400 logits), one row per video;
- clips of at least 10 frames (that code skips shorter clips); 16 frames is the usual FVD16.

StyleGAN-V's own evaluation feeds uint8 frames in [0, 255] with ``rescale=True, resize=True``
and lets the detector rescale to [-1, 1] and resize to 224 itself; the frames it sees are 8-bit,
so this metric rounds its inputs to 8-bit levels first (``quantize``, on by default). The
bilinear per-frame resize here is the common code's; the detector's internal resize may differ
in interpolation details, so values can differ slightly from numbers computed with
``resize=True``. The covariances are unbiased (``N - 1``, as ``np.cov`` in the common code;
StyleGAN-V divides by ``N``), a difference that vanishes at the usual 2048 videos.

Inputs here are (N, 3, T, H, W) in [-1, 1] (C = 1 is repeated to gray RGB, as StyleGAN-V does).
Like FID, FVD from few videos is biased upwards: compare values only at one sample count.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ulframe.errors import UserError
from ulframe.eval.frechet import FeatureFrechetMetric

__all__ = ["DETECTOR_KWARGS", "FVDI3D", "load_i3d", "preprocess_videos"]

FEATURE_DIM = 400  # Kinetics-400 logits (what the real detector returns with return_features)
INPUT_SIZE = 224
MIN_FRAMES = 10
WEIGHTS_PARAMETER = "metrics.fvd_i3d.weights"
WEIGHTS_FILE = "i3d_torchscript.pt"
DETECTOR_KWARGS = {"rescale": False, "resize": False, "return_features": True}


def load_i3d(weights: str | Path | None, parameter: str = WEIGHTS_PARAMETER) -> nn.Module:
    """The TorchScript I3D detector of ``weights``, on CPU, in eval mode.

    A ``UserError`` naming ``parameter`` when the path is unset, missing or not TorchScript.
    """
    how = (
        f"FVD needs the I3D feature network as a local TorchScript file, {WEIGHTS_FILE} (the "
        "Kinetics-400 I3D that the FVD code of StyleGAN-V and DIGAN loads). It is never "
        f"downloaded: get that file yourself and bind `{parameter} = '/path/to/{WEIGHTS_FILE}'` "
        "in gin."
    )
    if weights is None or not str(weights).strip():
        raise UserError(f"{parameter} is not set. {how}")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserError(f"{parameter} = {str(weights)!r}: no such file. {how}")
    try:
        with warnings.catch_warnings():  # torch.jit is deprecated; the I3D exists only as such
            warnings.simplefilter("ignore", DeprecationWarning)
            detector = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:
        raise UserError(
            f"{parameter} = {str(path)!r}: cannot be loaded as a TorchScript module "
            f"({type(error).__name__}: {str(error).strip().splitlines()[0]}). {how}"
        ) from error
    return detector.eval()


def preprocess_videos(
    videos: Tensor, input_size: int = INPUT_SIZE, quantize: bool = True
) -> Tensor:
    """(N, C, T, H, W) in [-1, 1] -> (N, 3, T, S, S) in [-1, 1], S = ``input_size``, float32.

    Clamped; rounded to 8-bit levels if ``quantize``; C = 1 repeated to 3; every frame resized
    bilinearly (``align_corners=False``) so that its shorter side is S (the longer side
    ``ceil(side * S / shorter)``), then centre-cropped to S x S.
    """
    if videos.ndim != 5 or videos.shape[1] not in (1, 3):
        raise ValueError(f"videos must be (N, 3, T, H, W); got {tuple(videos.shape)}")
    x = videos.float().clamp(-1, 1)
    if quantize:
        x = torch.round((x + 1) * 127.5) / 127.5 - 1
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1, -1)
    n, c, t, h, w = x.shape
    if (h, w) != (input_size, input_size):
        scale = input_size / min(h, w)
        size = (input_size, math.ceil(w * scale)) if h < w else (math.ceil(h * scale), input_size)
        frames = x.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)
        frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False)
        top, left = (size[0] - input_size) // 2, (size[1] - input_size) // 2
        frames = frames[..., top : top + input_size, left : left + input_size]
        x = frames.reshape(n, t, c, input_size, input_size).permute(0, 2, 1, 3, 4)
    return x.contiguous()


class FVDI3D(FeatureFrechetMetric):
    """Fréchet Video Distance between reference and estimate videos (I3D features).

    ``metric(reference, estimate)`` takes two (N, 3, T, H, W) batches in [-1, 1] (N >= 2 each,
    T >= 10; they may differ in N, T and H, W) and returns ``{"fvd": value}``. The convention
    (preprocessing, detector call) is described in the module docstring.

    Args:
        weights: local path of the I3D TorchScript file ``i3d_torchscript.pt``; required (unset
            or missing is a ``UserError`` saying what file to get). Never downloaded.
        batch_size: videos per forward pass (the features do not depend on it).
        quantize: round inputs to 8-bit levels first (the detector saw uint8 frames).
        input_size: side the frames are resized and cropped to. 224 is FVD; other values give
            numbers not comparable with published FVDs (tests use small sides to run fast).
        min_frames: the fewest frames a clip may have (10: the common FVD code skips shorter
            clips).
    """

    name = "fvd"
    inputs = "videos"  # (N, 3, T, H, W); image metrics take (N, C, H, W)

    def __init__(
        self,
        weights: str | None = None,
        batch_size: int = 8,
        quantize: bool = True,
        input_size: int = INPUT_SIZE,
        min_frames: int = MIN_FRAMES,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"metrics.fvd_i3d.batch_size must be >= 1; got {batch_size}")
        self.weights = weights
        self.batch_size = batch_size
        self.quantize = quantize
        self.input_size = input_size
        self.min_frames = min_frames
        self.network = load_i3d(weights, WEIGHTS_PARAMETER)

    def embed(self, x: Tensor) -> Tensor:
        """I3D features (n, D) of a chunk of videos (n, 3, T, H, W) in [-1, 1]."""
        x = preprocess_videos(x, self.input_size, self.quantize)
        features = self.network(x, **DETECTOR_KWARGS)
        return features.reshape(x.shape[0], -1)

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Features (N, D), float32, of videos (N, 3, T, H, W) in [-1, 1], in chunks of batch_size.

        (Overrides the image-shaped check of the base class; the name `images` is the base's.)
        """
        if images.ndim != 5 or images.shape[1] not in (1, 3):
            raise ValueError(f"videos must be (N, 3, T, H, W); got {tuple(images.shape)}")
        if images.shape[2] < self.min_frames:
            raise ValueError(
                f"FVD needs clips of at least {self.min_frames} frames (16 is usual); got "
                f"{images.shape[2]} (shape {tuple(images.shape)})"
            )
        self.network.to(images.device)
        return torch.cat([self.embed(c).float() for c in images.split(self.batch_size)])
