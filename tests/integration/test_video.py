"""Video end to end: `gin/ul_kinetics.gin` (validated, refused without data, and run tiny on
MP4 files written here from real photographs), clip continuation by `ulframe sample`, FVD by
`ulframe eval`, and the video quickstart's configuration."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import pytest
import torch

RunCli = Callable[..., subprocess.CompletedProcess[str]]
FRAMES, SIDE = 16, 16

# gin/ul_kinetics.gin with the tiny video networks and a few samples per stage; eager (its
# torch.compile is tested in tests/unit/test_compile.py: compiling here costs minutes of C++
# builds), no MFU measurement.
TINY_KINETICS = [
    "gin/ul_kinetics.gin",
    "gin/presets/tiny_video.gin",
    "--gin.TrainSettings.measure_mfu=False",
    "--gin.stage1/TrainSettings.compile='off'",
    "--gin.stage2/TrainSettings.compile='off'",
    "--gin.datasets.kinetics.resolution=16",
    "--gin.Experiment.num_workers=0",
    "--gin.stage1/TrainSettings.batch_size=4",
    "--gin.stage1/TrainSettings.train_samples=8",
    "--gin.stage1/TrainSettings.precision='fp32'",
    "--gin.stage1/TrainSettings.warmup_samples=4",
    "--gin.stage1/TrainSettings.log_every_samples=4",
    "--gin.stage1/TrainSettings.eval_every_samples=0",
    "--gin.stage1/TrainSettings.eval_batches=1",
    "--gin.stage1/TrainSettings.checkpoint_every_samples=8",
    "--gin.stage1/stages.ul_joint.sample_steps=2",
    "--gin.stage1/stages.ul_joint.eval_t_per_example=1",
    "--gin.stage1/stages.ul_joint.eval_images=2",
    "--gin.stage2/TrainSettings.batch_size=4",
    "--gin.stage2/TrainSettings.train_samples=8",
    "--gin.stage2/TrainSettings.precision='fp32'",
    "--gin.stage2/TrainSettings.warmup_samples=4",
    "--gin.stage2/TrainSettings.log_every_samples=4",
    "--gin.stage2/TrainSettings.eval_every_samples=0",
    "--gin.stage2/TrainSettings.eval_batches=1",
    "--gin.stage2/TrainSettings.checkpoint_every_samples=8",
    "--gin.stage2/stages.ul_base.sampler=@samplers.ddim",
    "--gin.stage2/stages.ul_base.sample_steps=2",
    "--gin.stage2/stages.ul_base.eval_t_per_example=1",
    "--gin.stage2/stages.ul_base.eval_images=2",
]


def _write_mp4(path: Path, frames: np.ndarray) -> None:
    """(T, H, W, 3) uint8 frames as an MPEG-4 file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.bit_rate = 4_000_000
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def kinetics_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/{train,val}/<class>/<video>.mp4: clips panning across the embedded photographs
    (2 classes, 6 + 2 videos of 24 frames at 32x32), and one zero-byte file that is skipped."""
    from ulframe_plugins.datasets.moving_photos import MovingPhotos

    root = tmp_path_factory.mktemp("kinetics")
    source = MovingPhotos(resolution=32, num_frames=24, clips_per_epoch=64, seed=1).source("train")
    for i in range(8):
        example = source.decode(source.items[i])
        frames = ((example["x"].permute(1, 2, 3, 0) + 1) * 127.5).round().to(torch.uint8)
        split = "val" if i >= 6 else "train"
        _write_mp4(root / split / f"class{i % 2}" / f"video{i}.mp4", frames.numpy())
    (root / "train" / "class0" / "broken.mp4").write_bytes(b"")
    return root


def test_ul_kinetics_validates_and_without_data_says_what_to_set(
    cli: RunCli, tmp_path: Path
) -> None:
    ok = cli("config", "gin/ul_kinetics.gin")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "CONTEXT_FRAMES = 5" in ok.stdout
    assert "stage2/ul_base.context_frames = %CONTEXT_FRAMES" in ok.stdout

    refused = cli("run", "gin/ul_kinetics.gin", "--workdir", tmp_path / "run")
    assert refused.returncode == 2, refused.stderr[-2000:]
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("ulframe: error:") and "datasets.kinetics.root" in last, last
    assert "Traceback" not in refused.stderr


@pytest.mark.slow
def test_tiny_ul_kinetics_runs_continues_clips_and_reports_fvd(
    cli: RunCli, tmp_path: Path, kinetics_root: Path
) -> None:
    workdir = tmp_path / "run"
    data = f"--gin.DATA_ROOT='{kinetics_root}'"
    done = cli("run", *TINY_KINETICS, data, "--workdir", workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipping" in done.stderr and "broken.mp4" in done.stderr  # counted, not a crash
    gifs = sorted(p.name for p in (workdir / "stages").glob("*/images/*.gif"))
    assert any(g.startswith("reconstructions-") for g in gifs), gifs
    assert any(g.startswith("continuations-") for g in gifs), gifs
    for gif in (workdir / "stages").glob("*/images/*.gif"):
        assert gif.read_bytes()[:4] == b"GIF8"

    sampled = cli("sample", *TINY_KINETICS, data, "--workdir", workdir, "-n", "2")
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    summary = json.loads(sampled.stdout.strip().splitlines()[-1])
    assert summary["context_frames"] == 5
    assert Path(summary["mp4"]).stat().st_size > 0 and Path(summary["gif"]).is_file()
    clips = np.load(summary["npz"])["images"]
    assert clips.shape == (2, FRAMES, SIDE, SIDE, 3) and clips.dtype == np.uint8
    # The first 5 frames are the real context frames: two eval clips of the data.
    from ulframe_plugins.datasets.kinetics import Kinetics

    source = Kinetics(root=str(kinetics_root), num_frames=FRAMES, resolution=SIDE).source("eval")
    real = [source.decode(item) for item in source.items]
    context = {
        ((e["x"][:, :5].permute(1, 2, 3, 0) + 1) * 127.5).round().to(torch.uint8).numpy().tobytes()
        for e in real
        if e is not None
    }
    for clip in clips:
        assert clip[:5].tobytes() in context

    # FVD with a TorchScript detector given as a local file (the real I3D is never downloaded).
    class TinyI3D(torch.nn.Module):
        def forward(
            self,
            x: torch.Tensor,
            rescale: bool = False,
            resize: bool = False,
            return_features: bool = False,
        ) -> torch.Tensor:
            return torch.cat([x.mean((2, 3, 4)), x.std((2, 3, 4))], 1)

    weights = tmp_path / "tiny_i3d.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(TinyI3D()).save(str(weights))
    evaluated = cli(
        "eval", *TINY_KINETICS, data, "--workdir", workdir, "--fd_samples", "2",
        f"--gin.metrics.fvd_i3d.weights='{weights}'", "--gin.metrics.fvd_i3d.input_size=16",
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["fvd"] >= 0 and np.isfinite(result["fvd"])
    assert {"bits_per_pixel", "psnr", "bits_per_pixel_base"} <= result.keys()


def test_video_quickstart_config_is_ok(cli: RunCli) -> None:
    done = cli("config", "gin/quickstart_video.gin")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Experiment.dataset = @datasets.moving_digits()" in done.stdout
    assert "CONTEXT_FRAMES = 5" in done.stdout


def test_video_quickstart_on_photographs_config_is_ok(cli: RunCli) -> None:
    done = cli("config", "gin/quickstart_video_photos.gin")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Experiment.dataset = @datasets.moving_photos()" in done.stdout
    assert "CONTEXT_FRAMES = 5" in done.stdout


# gin/quickstart_video.gin with a few samples per stage (its own networks and 32x32 clips).
TINY_VIDEO_QUICKSTART = [
    "gin/quickstart_video.gin",
    "--gin.TrainSettings.measure_mfu=False",
    "--gin.TRAIN_SAMPLES=16",
    "--gin.BASE_TRAIN_SAMPLES=8",
    "--gin.Experiment.num_workers=0",
    "--gin.Experiment.hooks=[@hooks.console()]",
    "--gin.datasets.moving_digits.clips_per_epoch=16",
    "--gin.datasets.moving_digits.eval_clips=4",
    "--gin.stage1/TrainSettings.batch_size=4",
    "--gin.stage1/TrainSettings.warmup_samples=4",
    "--gin.stage1/TrainSettings.log_every_samples=4",
    "--gin.stage1/TrainSettings.checkpoint_every_samples=8",
    "--gin.stage1/stages.ul_joint.sample_steps=2",
    "--gin.stage1/stages.ul_joint.eval_t_per_example=1",
    "--gin.stage1/stages.ul_joint.eval_images=2",
    "--gin.stage2/TrainSettings.batch_size=4",
    "--gin.stage2/TrainSettings.warmup_samples=4",
    "--gin.stage2/TrainSettings.log_every_samples=4",
    "--gin.stage2/TrainSettings.checkpoint_every_samples=8",
    "--gin.stage2/stages.ul_base.sample_steps=2",
    "--gin.stage2/stages.ul_base.eval_t_per_example=1",
    "--gin.stage2/stages.ul_base.eval_images=2",
]


@pytest.mark.slow
def test_video_quickstart_resumes_after_a_kill_and_continues_moving_digits(
    cli: RunCli, cli_env: Callable[[], dict[str, str]], tmp_path: Path
) -> None:
    # The first run is a process of its own (it is killed); the resume and `sample` are not.
    workdir = tmp_path / "run"
    args = [sys.executable, "-m", "ulframe", "run", *TINY_VIDEO_QUICKSTART, "--workdir", workdir]
    proc = subprocess.Popen(
        list(map(str, args)), env=cli_env(), cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    first = workdir / "stages" / "stage1" / "checkpoints" / f"ckpt-{8:012d}"  # renamed in whole
    deadline = time.monotonic() + 300
    while not first.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"ended before the kill:\n{err[-2000:]}"
    done = cli("run", *TINY_VIDEO_QUICKSTART, "--workdir", workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed at 8 samples" in done.stderr
    for stage in ("stage1", "stage2"):
        assert (workdir / "stages" / stage / "DONE.json").is_file()
    sampled = cli("sample", workdir, "-n", "2")  # the run's own config.gin
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    summary = json.loads(sampled.stdout.strip().splitlines()[-1])
    assert summary["context_frames"] == 5
    clips = np.load(summary["npz"])["images"]
    assert clips.shape == (2, 16, 32, 32, 1) and clips.dtype == np.uint8  # grey clips: one channel
    # The first 5 frames are the context: the first two eval clips of datasets.moving_digits.
    from ulframe_plugins.datasets.moving_digits import MovingDigits

    source = MovingDigits(num_digits=1, eval_clips=4).source("eval")
    for clip, item in zip(clips, source.items):
        real = ((source.decode(item)["x"][0, :5] + 1) * 127.5).round().to(torch.uint8).numpy()
        assert np.array_equal(clip[:5, :, :, 0], real)
