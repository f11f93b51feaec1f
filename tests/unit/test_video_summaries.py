"""Video media: ``save_media`` (PNG grids, GIF animations), MP4 files, and TensorBoard video
summaries that are really in the event file (animated GIFs in image summaries)."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from ulframe.eval.images import grid
from ulframe.eval.media import save_media
from ulframe.eval.video import encode_gif, save_mp4, video_grid_frames
from ulframe.hookspecs import RunInfo, StageInfo
from ulframe_plugins.hooks.tensorboard import TensorBoardLogger, latent_video_channels


def videos(n: int, c: int, t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(n, c, t, h, w) uniform in [-1, 1]: every frame differs from the next."""
    return torch.rand((n, c, t, h, w), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def grid_size(n: int, h: int, w: int, ncols: int | None = None, pad: int = 1) -> tuple[int, int]:
    """(width, height) of `grid` for n tiles of h x w (ncols default: ceil(sqrt(n)))."""
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = -(-n // ncols)
    return ncols * (w + pad) + pad, nrows * (h + pad) + pad


def gif_frames(data: bytes) -> list[np.ndarray]:
    """Every frame of a GIF as (H, W, 3) uint8."""
    with Image.open(io.BytesIO(data)) as img:
        frames = []
        for i in range(img.n_frames):
            img.seek(i)
            frames.append(np.asarray(img.convert("RGB")))
        return frames


# ------------------------------------------------------------------------------ files


def test_save_media_writes_images_as_png_grid(tmp_path: Path):
    x = videos(5, 3, 1, 6, 7)[:, :, 0]  # (5, 3, 6, 7)
    path = save_media(x, tmp_path / "images" / "recon-000000012")
    assert path == tmp_path / "images" / "recon-000000012.png"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == grid_size(5, 6, 7)
        assert np.array_equal(np.asarray(img.convert("RGB")), grid(x))


def test_save_media_writes_videos_as_looping_gif_of_the_grid(tmp_path: Path):
    x = videos(3, 3, 6, 8, 10, seed=1)  # (N, C, T, H, W)
    path = save_media(x, tmp_path / "images" / "samples-000000012")
    assert path == tmp_path / "images" / "samples-000000012.gif"
    data = path.read_bytes()
    assert data.startswith(b"GIF8")
    with Image.open(path) as img:
        assert img.n_frames == 6 and img.is_animated
        assert img.size == grid_size(3, 8, 10)
        assert img.info["loop"] == 0  # forever
        assert 100 <= img.info["duration"] <= 150  # ~8 fps (GIF stores hundredths of a second)
    frames = gif_frames(data)
    expected = video_grid_frames(x)
    assert expected.shape == (6, *frames[0].shape)
    for t, frame in enumerate(frames):  # palette quantisation: close, not exact
        err = np.abs(frame.astype(int) - expected[t].astype(int)).mean()
        assert err < 12, (t, err)
        assert np.array_equal(expected[t], grid(x[:, :, t]))


def test_save_media_rejects_other_ranks(tmp_path: Path):
    with pytest.raises(ValueError, match=r"\(N, C, T, H, W\)"):
        save_media(torch.zeros(3, 4, 4), tmp_path / "x")


def test_encode_gif_single_frame_and_bad_frames():
    frame = np.zeros((4, 5, 3), np.uint8)
    data = encode_gif([frame])
    assert data.startswith(b"GIF8")
    with Image.open(io.BytesIO(data)) as img:
        assert img.n_frames == 1 and img.size == (5, 4)
    with pytest.raises(ValueError, match="uint8"):
        encode_gif([frame, np.zeros((4, 6, 3), np.uint8)])
    with pytest.raises(ValueError, match="at least one frame"):
        encode_gif([])


def test_save_mp4_round_trip(tmp_path: Path):
    """The grid of 3 clips of 9 x 11 is 25 x 21: padded to 26 x 22 for 4:2:0; all frames kept."""
    x = videos(3, 3, 7, 9, 11, seed=2)
    path = save_mp4(x, tmp_path / "out" / "continuations.mp4", fps=8)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name in ("h264", "mpeg4")
        assert stream.average_rate == 8
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 7
    assert decoded[0].shape == (22, 26, 3)
    expected = video_grid_frames(x)
    err = np.abs(decoded[3][:21, :25].astype(int) - expected[3].astype(int)).mean()
    assert err < 40  # lossy, 4:2:0 chroma on random pixels; a wrong frame order would be ~85


# ------------------------------------------------------------------------------ TensorBoard


def test_tensorboard_logs_videos_as_gif_image_summaries(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = RunInfo(workdir=tmp_path, stage_names=["stage1"], operative_config="")
    stage = StageInfo("stage1", 0, tmp_path / "stages" / "stage1", 100, 0, 4)
    logger = TensorBoardLogger(hparams=(), flush_secs=1)
    samples = videos(2, 3, 5, 8, 8, seed=3)
    latents = videos(2, 4, 5, 4, 4, seed=4)
    still = videos(2, 3, 1, 8, 8, seed=5)[:, :, 0]
    logger.ulframe_eval_end(
        run=run,
        stage=stage,
        samples_seen=12,
        scalars={"psnr": 20.0},
        images={"samples": samples, "latents": latents, "reconstructions": still},
    )
    logger.ulframe_stage_end(run=run, stage=stage, scalars={})  # closes (flushes) the writer

    events = list((tmp_path / "tb" / "stage1").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]), size_guidance={"images": 0})
    acc.Reload()
    assert {"eval/samples", "eval/latents", "eval/reconstructions"} <= set(acc.Tags()["images"])

    (event,) = acc.Images("eval/samples")
    assert event.step == 12
    data = event.encoded_image_string
    assert data.startswith(b"GIF8")
    with Image.open(io.BytesIO(data)) as img:
        assert img.n_frames == 5
        assert img.size == grid_size(2, 8, 8) == (event.width, event.height)

    (event,) = acc.Images("eval/latents")  # 4 channels: a row per example, a tile per channel
    with Image.open(io.BytesIO(event.encoded_image_string)) as img:
        assert img.n_frames == 5 and img.size == grid_size(2 * 4, 4, 4, ncols=4)

    (event,) = acc.Images("eval/reconstructions")  # 4-D stays a PNG
    assert event.encoded_image_string.startswith(b"\x89PNG")


def test_latent_video_channels_normalise_each_channel_over_all_frames():
    """A channel that brightens over time stays dark in frame 0 and bright in the last frame."""
    t = torch.linspace(-3, 5, 4).reshape(1, 1, 4, 1, 1)
    z = torch.cat([t.expand(1, 1, 4, 3, 3), torch.zeros(1, 1, 4, 3, 3)], dim=1)  # (1, 2, 4, 3, 3)
    frames = latent_video_channels(z)
    assert frames.shape == (4, *grid_size(2, 3, 3, ncols=2)[::-1], 3)
    tile = (slice(1, 4), slice(1, 4))  # the first channel's tile in the first row
    assert frames[0][tile].max() == 0 and frames[-1][tile].min() == 255
    assert frames[1][tile].mean() < frames[2][tile].mean()
