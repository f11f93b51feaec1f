"""Videos: (N, C, T, H, W) tensors in [-1, 1] to animated GIFs and MP4 files.

Every frame of a video batch is tiled like an image batch (:func:`ulframe.eval.images.grid`):
frame ``t`` of the output shows frame ``t`` of all N clips side by side, so one animation plays
the whole batch in lock step.

- GIF (:func:`encode_gif`, :func:`save_gif`) is what evaluation writes (``save_media``) and what
  the TensorBoard hook logs: Pillow only, plays in any browser and in TensorBoard's Images tab.
  GIF has a 256-colour palette per frame (Pillow's adaptive palette), frame delays in
  hundredths of a second (8 fps is stored as 12 or 13 cs), and Pillow merges identical
  consecutive frames into one frame with the summed delay (the playback is the same).
- MP4 (:func:`save_mp4`) through PyAV, H.264 (``libx264``) when this PyAV build has it, else
  MPEG-4 Part 2 (``mpeg4``); 4:2:0 chroma needs even sides, so frames are padded with white
  (the grid's padding colour) to even sizes.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ulframe.eval.images import grid

__all__ = [
    "DEFAULT_FPS",
    "encode_gif",
    "mp4_codec",
    "save_gif",
    "save_mp4",
    "video_grid_frames",
]

logger = logging.getLogger(__name__)

DEFAULT_FPS = 8.0
MP4_CODECS = ("libx264", "mpeg4")  # in order of preference


def _check_video(x: torch.Tensor) -> None:
    if x.dim() != 5:
        raise ValueError(f"videos must be (N, C, T, H, W); got shape {tuple(x.shape)}")
    if 0 in x.shape:
        raise ValueError(f"videos must not be empty; got shape {tuple(x.shape)}")


def video_grid_frames(x: torch.Tensor, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """(N, C, T, H, W) in [-1, 1] -> (T, H', W', 3) uint8: frame t tiles frame t of the N clips.

    Each frame is ``grid(x[:, :, t], ncols, pad)`` (C = 1 is repeated to gray RGB, C > 3 shows
    the first three channels, as for images).
    """
    _check_video(x)
    x = x.detach()
    return np.stack([grid(x[:, :, t], ncols, pad) for t in range(x.shape[2])])


def _as_frames(frames: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """(T, H, W, 3) uint8 (array or sequence of (H, W, 3)) -> list of T (H, W, 3) uint8 arrays."""
    out = [np.asarray(f) for f in frames]
    if not out:
        raise ValueError("a video needs at least one frame")
    shape = out[0].shape
    for f in out:
        if f.dtype != np.uint8 or f.ndim != 3 or f.shape[-1] != 3 or f.shape != shape:
            raise ValueError(
                "frames must be uint8 (H, W, 3) arrays of one size; got "
                f"{f.dtype} {f.shape} (first frame {shape})"
            )
    return out


def _upscale(frames: list[np.ndarray], scale: int) -> list[np.ndarray]:
    """Nearest-neighbour upscaling of (H, W, 3) frames by an integer factor."""
    if scale <= 1:
        return frames
    return [f.repeat(scale, axis=0).repeat(scale, axis=1) for f in frames]


def encode_gif(
    frames: np.ndarray | Sequence[np.ndarray], fps: float = DEFAULT_FPS, loop: bool = True
) -> bytes:
    """Animated GIF bytes of frames (T, H, W, 3) uint8, ``fps`` frames per second.

    ``loop`` plays it forever (NETSCAPE loop count 0); otherwise once. A single frame gives a
    still GIF. The bytes start with ``b"GIF89a"``.
    """
    if fps <= 0:
        raise ValueError(f"fps must be > 0; got {fps}")
    images = [Image.fromarray(f, "RGB") for f in _as_frames(frames)]
    buffer = io.BytesIO()
    options: dict[str, object] = {"format": "GIF", "duration": max(round(1000 / fps), 10)}
    if len(images) > 1:
        options |= {"save_all": True, "append_images": images[1:]}
        if loop:
            options["loop"] = 0
    images[0].save(buffer, **options)  # type: ignore[arg-type]
    return buffer.getvalue()


def save_gif(
    x: torch.Tensor,
    path: Path,
    ncols: int | None = None,
    fps: float = DEFAULT_FPS,
    scale: int = 1,
) -> Path:
    """Write videos (N, C, T, H, W) in [-1, 1] as one looping GIF of their grid; returns `path`.

    The folder is created; ``scale`` upscales nearest-neighbour.
    """
    from ulframe import rundir

    frames = _upscale(list(video_grid_frames(x, ncols)), scale)
    rundir.write_bytes(path, encode_gif(frames, fps))  # atomic; a full disk names the file
    return path


def mp4_codec() -> str:
    """The first of ``libx264``, ``mpeg4`` this PyAV build can encode (``ValueError`` if none)."""
    import av

    available = av.codecs_available
    for name in MP4_CODECS:
        if name in available:
            try:
                av.codec.Codec(name, "w")
            except Exception:  # listed, but no encoder in this build
                continue
            return name
    raise ValueError(f"this PyAV build has none of the MP4 encoders {', '.join(MP4_CODECS)}")


def _even(frame: np.ndarray) -> np.ndarray:
    """Pad (H, W, 3) with white on the bottom/right to even sides (4:2:0 chroma needs them)."""
    h, w = frame.shape[:2]
    if h % 2 == 0 and w % 2 == 0:
        return frame
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), constant_values=255)


def save_mp4(
    x: torch.Tensor | np.ndarray,
    path: Path,
    fps: float = DEFAULT_FPS,
    ncols: int | None = None,
    scale: int = 1,
    codec: str | None = None,
) -> Path:
    """Write an MP4 file with PyAV; returns `path` (the folder is created).

    Args:
        x: videos (N, C, T, H, W) in [-1, 1] (written as their grid, one MP4 frame per t), or
            ready frames (T, H, W, 3) uint8.
        fps: frames per second.
        ncols: clips per row of the grid (default: about sqrt(N)).
        scale: nearest-neighbour upscaling factor.
        codec: an encoder name; default :func:`mp4_codec` (``libx264``, else ``mpeg4``).
    """
    import av
    from av.video.stream import VideoStream

    if fps <= 0:
        raise ValueError(f"fps must be > 0; got {fps}")
    raw = video_grid_frames(x, ncols) if isinstance(x, torch.Tensor) else x
    frames = [_even(f) for f in _upscale(_as_frames(raw), scale)]
    codec = codec or mp4_codec()
    rate = Fraction(fps).limit_denominator(1001)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=rate)
        if not isinstance(stream, VideoStream):
            raise ValueError(f"{codec} is not a video codec")
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18"}  # visually near-lossless
        elif codec == "mpeg4":
            stream.bit_rate = 8_000_000  # the default (~200 kb/s) blurs small grids badly
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder
            container.mux(packet)
    logger.debug("wrote %s: %d frames, %s, %s fps", path, len(frames), codec, rate)
    return path
