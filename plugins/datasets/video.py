"""Video helpers shared by the video dataset plugins: PyAV in, engine tensors out.

A clip is ``num_frames`` frames at times ``start + k * step`` (k = 0 .. T - 1), where ``step``
is ``frame_stride`` native frames, or ``1 / fps`` seconds when a target ``fps`` is set (frames
are then picked by their timestamps: the decoded frame nearest to each target time). The start
is uniform over the positions where the whole clip fits (train) or the middle one (eval).

:func:`read_clip` opens the file with PyAV, seeks to the key frame at or before the clip's
first frame (when the clip does not start at the first frame), decodes up to the clip's last
frame and converts only the frames the clip uses: resized with swscale so that the shorter
side is ``resolution`` and cropped to a square (at a random position or centered), as RGB.
Any failure (no video stream, corrupt or truncated data, a video shorter than the clip) gives
``None`` and a WARNING that names the file; the engine skips and counts it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ulframe.errors import ConfigError

from .common import warn_once

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi")
"""File endings counted as videos by default (compared case-insensitively)."""

INTERPOLATION = "BICUBIC"
"""swscale's filter for resizing; it widens with the downscale factor (antialiased)."""

_frame_counts: dict[str, int] = {}
"""Per process: frames counted by demuxing, for files whose header has neither a frame count
nor a duration (counted once, on the first decode of the file)."""
_frame_counts_lock = threading.Lock()


@dataclass(frozen=True)
class ClipSpec:
    """How to cut one clip out of a video; plain values, picklable.

    Attributes:
        num_frames: frames per clip, T.
        frame_stride: native frames between consecutive clip frames (used when ``fps`` is None).
        fps: if set, clip frames are ``1 / fps`` seconds apart, picked by timestamp.
        resolution: side of the square frames, in pixels.
        random_clip: start at a uniformly drawn position (else the centered clip).
        random_crop: crop the square at a random position (else centered).
        hflip: mirror the whole clip left to right with probability 1/2.
        threads: decoder threads per video (1: none; 0: FFmpeg's choice).
    """

    num_frames: int
    frame_stride: int = 1
    fps: float | None = None
    resolution: int = 128
    random_clip: bool = False
    random_crop: bool = False
    hflip: bool = False
    threads: int = 1

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ConfigError(f"num_frames must be >= 1; got {self.num_frames}")
        if self.frame_stride < 1:
            raise ConfigError(f"frame_stride must be >= 1; got {self.frame_stride}")
        if self.fps is not None and not self.fps > 0:
            raise ConfigError(f"fps must be positive or None; got {self.fps}")
        if self.resolution < 1:
            raise ConfigError(f"resolution must be >= 1; got {self.resolution}")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0; got {self.threads}")

    def describe(self) -> str:
        step = f"fps={self.fps:g}" if self.fps is not None else f"frame_stride={self.frame_stride}"
        return f"num_frames={self.num_frames}, {step}"


@dataclass(frozen=True)
class StreamInfo:
    """What a video stream's header says.

    Attributes:
        start: time of the first frame, seconds.
        rate: native frames per second.
        frames: number of frames (from the header, or estimated from the duration).
        width, height: frame size in pixels.
    """

    start: float
    rate: float
    frames: int
    width: int
    height: int

    @property
    def period(self) -> float:
        return 1.0 / self.rate


def _count_frames(container: Any, stream: Any, path: str) -> int:
    """Frames of ``stream`` counted by demuxing (no decoding), cached per path."""
    with _frame_counts_lock:
        if path in _frame_counts:
            return _frame_counts[path]
    count = sum(1 for packet in container.demux(stream) if packet.size)
    container.seek(0)
    with _frame_counts_lock:
        _frame_counts[path] = count
    return count


def _tag_seconds(tag: str | None) -> float | None:
    """Seconds of a Matroska duration tag ``HH:MM:SS.fffffffff``; None if absent or malformed."""
    try:
        hours, minutes, seconds = (tag or "").split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except ValueError:
        return None


def stream_info(container: Any, stream: Any, path: str) -> StreamInfo:
    """Frame rate, first-frame time and frame count of ``stream`` from its header.

    The count is the header's when it has one (MP4, AVI); else it is estimated from the video
    stream's duration (WebM, MKV: its DURATION tag) or the file's, rounded down, and as a last
    resort counted by demuxing.

    Raises:
        ValueError: the stream has no usable frame rate.
    """
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or float(rate) <= 0:
        raise ValueError("no frame rate in the stream header")
    rate = float(rate)
    time_base = float(stream.time_base) if stream.time_base else 0.0
    start = stream.start_time * time_base if stream.start_time is not None else 0.0
    frames = int(stream.frames or 0)
    if frames <= 0:
        duration = _tag_seconds(stream.metadata.get("DURATION"))  # Matroska / WebM, per stream
        if duration is None and stream.duration is not None and time_base > 0:
            duration = stream.duration * time_base
        if duration is None and container.duration is not None:
            duration = container.duration / 1_000_000  # AV_TIME_BASE; all streams, audio too
        if duration is not None and duration > 0:
            frames = math.floor(duration * rate + 1e-6)
        else:
            frames = _count_frames(container, stream, path)
    width, height = stream.codec_context.width, stream.codec_context.height
    return StreamInfo(start, rate, frames, width, height)


def clip_times(info: StreamInfo, spec: ClipSpec, rng: np.random.Generator) -> np.ndarray | None:
    """Target times (T,) in seconds of the clip's frames, or None if the video is too short.

    The clip starts on a native frame ``s``: uniform over the starts where the whole clip fits
    (``spec.random_clip``, one draw from ``rng``) or the middle one.
    """
    step = spec.frame_stride * info.period if spec.fps is None else 1.0 / spec.fps
    span_frames = (spec.num_frames - 1) * step * info.rate  # native frames the clip spans
    last_start = math.floor(info.frames - 1 - span_frames + 1e-6)
    if last_start < 0:
        return None
    s = int(rng.integers(0, last_start + 1)) if spec.random_clip else last_start // 2
    return info.start + s * info.period + step * np.arange(spec.num_frames)


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``resolution``, keeping the aspect ratio."""
    scale = resolution / min(width, height)
    return max(resolution, round(width * scale)), max(resolution, round(height * scale))


@contextlib.contextmanager
def _open(path: str) -> Iterator[Any]:
    import av  # imported here: workers that never decode video do not pay for it

    try:
        path.encode()
    except UnicodeEncodeError:  # a name that is not UTF-8: FFmpeg gets an open file instead
        with open(path, "rb") as f, av.open(f, mode="r") as container:
            yield container
        return
    with av.open(path, mode="r") as container:
        yield container


def read_clip(path: str, spec: ClipSpec, rng: np.random.Generator) -> np.ndarray | None:
    """The clip of ``spec`` from the video at ``path``: uint8 (T, R, R, 3) RGB, or None.

    Random choices (clip start, crop position, flip) are drawn from ``rng`` in that order.
    ``None`` (with a WARNING naming the file) for a file that cannot be opened or decoded, has
    no video stream, or ends before the clip's last frame.
    """
    try:
        with _open(path) as container:
            if not container.streams.video:
                warn_once(logger, path, "skipping video %s: no video stream")
                return None
            stream = container.streams.video[0]
            codec = stream.codec_context
            codec.thread_count = spec.threads
            if spec.threads != 1:
                codec.thread_type = "AUTO"  # frame and slice threads
            info = stream_info(container, stream, path)
            times = clip_times(info, spec, rng)
            if times is None:
                warn_once(
                    logger, path,
                    "skipping video %s: %d frames at %.4g fps, too short for a clip of %s",
                    info.frames, info.rate, spec.describe(),
                )  # fmt: skip
                return None
            width, height = resized_size(info.width, info.height, spec.resolution)
            if spec.random_crop:
                left = int(rng.integers(0, width - spec.resolution + 1))
                top = int(rng.integers(0, height - spec.resolution + 1))
            else:
                left, top = (width - spec.resolution) // 2, (height - spec.resolution) // 2
            flip = spec.hflip and rng.random() < 0.5
            frames = _decode_at(container, stream, info, times, (width, height))
    except Exception as error:  # PyAV signals bad data with FFmpegError, OSError, ValueError
        warn_once(logger, path, "skipping unreadable video %s: %s: %s", type(error).__name__, error)
        return None
    if isinstance(frames, float) and frames == -math.inf:
        warn_once(logger, path, "skipping video %s: no frame could be decoded")
        return None
    if isinstance(frames, float):
        warn_once(
            logger, path,
            "skipping video %s: the stream ends at %.3f s, before the clip's last frame at "
            "%.3f s (truncated?)",
            frames, times[-1],
        )  # fmt: skip
        return None
    clip = frames[:, top : top + spec.resolution, left : left + spec.resolution]
    if flip:
        clip = clip[:, :, ::-1]
    return np.ascontiguousarray(clip)


def _decode_at(
    container: Any,
    stream: Any,
    info: StreamInfo,
    times: np.ndarray,
    size: tuple[int, int],
    seek: bool = True,
) -> np.ndarray | float:
    """Frames nearest to ``times`` (T,), RGB uint8 (T, height, width, 3) at ``size``.

    A decoded frame at time t stands for [t - period/2, t + period/2): each target takes the
    last frame that starts at or before it (the first frame, for targets before it). With
    ``seek``, decoding starts at the key frame at or before the first target. Returns the time
    of the last decoded frame (a float) if the stream ends before the last target.
    """
    half = 0.5 * info.period
    sought = seek and times[0] > info.start + half
    if sought:
        container.seek(_to_pts(times[0], stream), stream=stream, backward=True)
    out = np.empty((len(times), size[1], size[0], 3), dtype=np.uint8)
    reformatter = _reformatter()  # one swscale context for the clip (~10x faster than per frame)
    k = 0
    previous: Any = None
    previous_rgb: np.ndarray | None = None
    last_time = -math.inf
    count = 0
    for frame in container.decode(stream):
        if count == 0 and sought and (frame.pts is None or frame.time > times[0] + half):
            # The seek overshot (or frames carry no timestamps): decode from the start.
            container.seek(0)
            return _decode_at(container, stream, info, times, size, seek=False)
        t = frame.time if frame.pts is not None else info.start + count * info.period
        count += 1
        if previous is None:
            previous = frame
        while k < len(times) and t > times[k] + half:
            if previous_rgb is None:
                previous_rgb = _rgb(previous, size, reformatter)
            out[k] = previous_rgb
            k += 1
        if k == len(times):
            return out
        if previous is not frame:
            previous, previous_rgb = frame, None
        last_time = t
    while k < len(times) and previous is not None and times[k] <= last_time + half:
        if previous_rgb is None:
            previous_rgb = _rgb(previous, size, reformatter)
        out[k] = previous_rgb
        k += 1
    return out if k == len(times) else float(last_time)


def _to_pts(seconds: float, stream: Any) -> int:
    return math.floor(seconds / float(stream.time_base))


def _reformatter() -> Any:
    from av.video.reformatter import VideoReformatter

    return VideoReformatter()


def _rgb(frame: Any, size: tuple[int, int], reformatter: Any) -> np.ndarray:
    """A decoded frame as RGB uint8 (height, width, 3) at ``size`` = (width, height)."""
    width, height = size
    rgb = reformatter.reformat(frame, width, height, "rgb24", interpolation=INTERPOLATION)
    return rgb.to_ndarray()


def to_tensor(clip: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) RGB frames as a float32 (3, T, H, W) tensor in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(clip)).permute(3, 0, 1, 2)  # (3, T, H, W)
    return (x.to(torch.float32) / 127.5 - 1.0).contiguous()
