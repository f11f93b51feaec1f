"""Video loader vs training step: can ``datasets.kinetics`` feed the tiny video stage 1?

    .venv/bin/python benchmarks/loader.py            # 64 videos, 16-frame clips, tiny_video preset
    .venv/bin/python benchmarks/loader.py --quick    # a smoke run of ~30 s

A temporary Kinetics-layout folder of real video files is written first: ``--videos`` H.264 MP4
files (``--codec``; libx264 with its default key-frame interval, as Kinetics files mostly are)
of ``--video-size`` pixels, ``--seconds`` long at 25 fps, in 4 class folders. Their content is a
window panning over the photographs scikit-image ships (real pixels, real motion). Then, in one
process:

(a) **loader**: clips/s delivered by ``ulframe.data.build_loader`` on ``Kinetics.source("train")``
    (random clip start, random crop, flips; ``--num-frames`` frames at ``--resolution``),
    ``--workers`` workers, for each ``--method`` (thread and process by default; the faster one
    is used for the ratio). The first batch of an iterator (worker start-up: a spawned process
    re-imports torch) is timed separately and not counted.
(b) **train**: clips/s consumed by stage-1 training steps (forward, backward, gradient clipping,
    AdamW step) of ``ULJointModel`` built by ``stages.ul_joint`` with the real networks of
    ``gin/presets/tiny_video.gin`` (``--preset``), parsed through ``ulframe.wiring`` like a run,
    on batches of clips decoded by (a), preloaded.

The two are timed in alternating rounds (loader, train, loader, ...; medians over the rounds),
with ``--threads`` torch intra-op threads (default 1, as ``benchmarks/overhead.py``); a loader
round first drains, untimed, what the loader prepared ahead while it was not being timed. Then
(c) the training step is timed on batches taken live from the faster loader, both sharing the
CPU. The last line is ``loader/train ratio: X.XX`` = (a) / (b): how many times faster than the
training step the loader delivers clips when it has the machine to itself; >= 5 on a 2-core
machine means decoding needs at most ~1/5 of the CPU that training needs.

(d) **shards vs folders**: the same videos written as a shard set (``ulframe shard``, i.e.
``Shards.write_folder``), and ``--images`` JPEG photographs (``--image-size``, 4 class folders)
written as a folder and as a shard set; for each, ``datasets.shards`` against the folder dataset
(``datasets.kinetics``, ``datasets.image_folder``) with the same settings, through the same
loader (the faster method of (a), ``--workers`` workers), in alternating rounds, then the CPU
seconds per example of ``decode`` alone (every item, in this thread; unlike the loader's rate it
does not depend on what else the machine runs). It prints ``shards/folder ratio (clips): X.XX
(loader rate); Y.YY (decode CPU, folder/shards)`` and the same for images: >= 1 means shards
are not slower. The files are in the page cache for both (just written): this measures what the
format costs in opening and reading files, not the disk.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from PIL import Image

from ulframe import wiring
from ulframe.data import build_loader
from ulframe.protocols import BuildContext
from ulframe.registry import Registry
from ulframe.train.settings import CONFIGURABLES
from ulframe.train.step import seed_for
from ulframe_plugins.datasets.image_folder import ImageFolder
from ulframe_plugins.datasets.kinetics import Kinetics
from ulframe_plugins.datasets.moving_photos import bounce, scaled_photographs
from ulframe_plugins.datasets.shards import Shards
from ulframe_plugins.stages.ul_joint import ULJointModel

ROOT = Path(__file__).resolve().parent.parent
PRESET = ROOT / "gin" / "presets" / "tiny_video.gin"
FPS = 25
CLASSES = 4
SEED = 0
PRELOADED_BATCHES = 4  # distinct batches of decoded clips the training step cycles through
DRAIN_BATCHES = 4  # untimed at the start of a loader round: prepared while other work was timed

# The stage around the preset's networks (gin/quickstart.gin's stage-1 settings).
STAGE_BINDINGS = (
    "stages.ul_joint.encoder = @encoders.resnet",
    "stages.ul_joint.prior = @prior/priors.vit",
    "stages.ul_joint.decoder = @decoders.uvit",
    "stages.ul_joint.decoder_weighting = @weightings.sigmoid()",
    "weightings.sigmoid.bias = 2.0",
    "stages.ul_joint.loss_factor = 3.0",
    "stages.ul_joint.prior_schedule = @schedules.cosine",
    "stages.ul_joint.decoder_schedule = @schedules.shifted_cosine",
    "stages.ul_joint.train = @TrainSettings()",
    "TrainSettings.optimizer = @optimizers.AdamW",
    "optimizers.AdamW.betas = (0.9, 0.99)",
    "optimizers.AdamW.weight_decay = 0.0",
    "TrainSettings.lr = 1e-3",
    "TrainSettings.grad_clip = 1.0",
)


# ---- the videos --------------------------------------------------------------------------------


def write_videos(
    root: Path, count: int, size: tuple[int, int], seconds: float, codec: str, seed: int
) -> int:
    """``count`` videos under root/train/<class>/; returns their total size in bytes."""
    width, height = size
    photos = scaled_photographs(2 * max(width, height))  # (H, W, 3) uint8, larger than a frame
    rng = np.random.default_rng(seed)
    frames = round(seconds * FPS)
    options = {"preset": "veryfast"} if codec == "libx264" else {}
    total = 0
    for i in range(count):
        photo = photos[i % len(photos)]
        x_max, y_max = photo.shape[1] - width, photo.shape[0] - height
        start = rng.uniform(0, [x_max, y_max])
        velocity = rng.uniform(-3, 3, size=2)  # pixels per frame
        steps = np.arange(frames)
        xs = np.rint(bounce(start[0] + velocity[0] * steps, 0, x_max)).astype(int)
        ys = np.rint(bounce(start[1] + velocity[1] * steps, 0, y_max)).astype(int)
        path = root / "train" / f"class{i % CLASSES}" / f"video{i:03d}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        with av.open(str(path), mode="w") as container:
            stream = container.add_stream(codec, rate=FPS, options=options)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for x, y in zip(xs, ys):
                pixels = np.ascontiguousarray(photo[y : y + height, x : x + width])
                container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
            container.mux(stream.encode())
        total += path.stat().st_size
    return total


def write_images(root: Path, count: int, size: tuple[int, int], seed: int) -> int:
    """``count`` JPEG crops of the photographs under root/train/<class>/; their total bytes."""
    width, height = size
    photos = scaled_photographs(2 * max(width, height))
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(count):
        photo = photos[i % len(photos)]
        x = int(rng.integers(0, photo.shape[1] - width + 1))
        y = int(rng.integers(0, photo.shape[0] - height + 1))
        path = root / "train" / f"class{i % CLASSES}" / f"image{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo[y : y + height, x : x + width]).save(path, quality=90)
        total += path.stat().st_size
    return total


# ---- (a) the loader ----------------------------------------------------------------------------


class LoaderBench:
    """One loader iterator kept alive over the rounds (process workers start only once)."""

    def __init__(self, source: Any, batch_size: int, workers: int, method: str) -> None:
        self.loader = build_loader(
            source, batch_size=batch_size, num_workers=workers, method=method, seed=SEED
        )
        self.batch_size = batch_size
        t0 = time.perf_counter()
        self.iterator: Iterator[dict[str, torch.Tensor]] | None = iter(self.loader)
        self.first = next(self.iterator)
        self.startup = time.perf_counter() - t0

    def round(self, batches: int) -> float:
        """Clips per second over ``batches`` batches, after draining what was prepared ahead
        (the prefetched batches and the workers' finished clips) while the loader was idle."""
        assert self.iterator is not None
        for _ in range(DRAIN_BATCHES):
            next(self.iterator)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(self.iterator)
        return batches * self.batch_size / (time.perf_counter() - t0)

    def close(self) -> None:
        self.iterator = None
        del self.loader
        gc.collect()


def shards_vs_folder(
    folder: Any, shards: Any, batch_size: int, workers: int, method: str, batches: int, rounds: int
) -> dict[str, dict[str, list[float]]]:
    """A folder Source against the shard Source of the same files, in alternating rounds
    (folder first in even rounds): {"loader": examples/s through `build_loader`, "cpu": CPU
    seconds per example of `decode` in this thread (every item, no loader)}, per source.

    The CPU time is what the format costs, whatever else the machine runs; the loader's rate
    is what training sees, noisy on a busy machine."""
    sources = {"folder": folder, "shards": shards}
    benches = {name: LoaderBench(s, batch_size, workers, method) for name, s in sources.items()}
    out: dict[str, dict[str, list[float]]] = {"loader": {}, "cpu": {}}
    for r in range(rounds):
        for name in ("folder", "shards") if r % 2 == 0 else ("shards", "folder"):
            out["loader"].setdefault(name, []).append(benches[name].round(batches))
    for bench in benches.values():
        bench.close()
    for r in range(rounds):
        for name in ("folder", "shards") if r % 2 == 0 else ("shards", "folder"):
            source = sources[name]
            t0 = time.process_time()
            for item in source.items:
                source.decode(item)
            out["cpu"].setdefault(name, []).append((time.process_time() - t0) / len(source.items))
    return out


# ---- (b) the training step ---------------------------------------------------------------------


def build_model(
    preset: Path, example: dict[str, torch.Tensor], batch_size: int, workdir: Path
) -> tuple[ULJointModel, Any]:
    """The stage-1 model of ``stages.ul_joint`` with ``preset``'s networks, and its settings."""
    # bitsandbytes takes seconds to import on a CPU machine and plays no part here.
    wiring._bnb_optimizers = dict  # type: ignore[assignment]
    wiring.register(Registry(), engine=CONFIGURABLES)
    wiring.parse(
        [preset],
        [
            *STAGE_BINDINGS,
            f"TrainSettings.batch_size = {batch_size}",
            "TrainSettings.warmup_samples = 0",
        ],
    )
    stage = wiring.call(wiring.configured("stages.ul_joint"))
    torch.manual_seed(seed_for(SEED, 0, 0))
    ctx = BuildContext(example, CLASSES, torch.device("cpu"), workdir)
    model = stage.build(ctx)
    return model, stage.train


class TrainBench:
    """Stage-1 steps (forward, backward, clip, AdamW) on preloaded batches."""

    def __init__(self, model: ULJointModel, settings: Any, batches: list[dict[str, Any]]) -> None:
        self.model = model.train()
        self.settings = settings
        self.optimizer = settings.build_optimizer(model.parameters())
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.batches = batches
        self.batch_size = len(batches[0]["label"])
        self.samples = 0

    def step(self, batch: dict[str, Any] | None = None) -> None:
        if batch is None:
            batch = self.batches[(self.samples // self.batch_size) % len(self.batches)]
        generator = torch.Generator().manual_seed(seed_for(SEED, 0, self.samples))
        loss = self.model(batch, generator).total_nats().mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.settings.grad_clip)
        self.optimizer.step()
        self.samples += self.batch_size

    def round(self, steps: int, feed: Iterator[dict[str, Any]] | None = None) -> float:
        """Clips per second over ``steps`` steps (on batches from ``feed`` if given)."""
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step(next(feed) if feed is not None else None)
        return steps * self.batch_size / (time.perf_counter() - t0)


# ---- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--videos", type=int, help="videos written (default 64; 16 quick)")
    parser.add_argument(
        "--video-size", type=int, nargs=2, default=(128, 96), metavar=("W", "H"),
        help="frame size of the written videos (default 128 96)",
    )  # fmt: skip
    parser.add_argument("--seconds", type=float, default=2.5, help="video length (default 2.5)")
    parser.add_argument(
        "--codec", help="encoder of the written videos (default libx264, else mpeg4)"
    )
    parser.add_argument("--resolution", type=int, default=16, help="clip side (preset: 16)")
    parser.add_argument("--num-frames", type=int, default=16, help="frames per clip (16)")
    parser.add_argument("--frame-stride", type=int, default=1, help="frames between clip frames")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per batch (default 8)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers (default 2)")
    parser.add_argument(
        "--method", choices=("thread", "process", "both"), default="both",
        help="loader workers: threads, processes, or both measured (default)",
    )  # fmt: skip
    parser.add_argument(
        "--decoder-threads", type=int, default=1,
        help="datasets.kinetics.decoder_threads: FFmpeg threads per video (default 1)",
    )  # fmt: skip
    parser.add_argument("--batches", type=int, help="loader batches per round (default 16; 6)")
    parser.add_argument("--steps", type=int, help="training steps per round (default 5; 2 quick)")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 3; 2 quick)")
    parser.add_argument("--preset", type=Path, default=PRESET, help="gin preset of the networks")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 keeps)")
    parser.add_argument("--images", type=int, help="(d): JPEG images written (default 512; 128)")
    parser.add_argument(
        "--image-size", type=int, nargs=2, default=(320, 240), metavar=("W", "H"),
        help="(d): size of the written images (default 320 240)",
    )  # fmt: skip
    parser.add_argument(
        "--image-resolution", type=int, default=64, help="(d): image side decoded (default 64)"
    )
    parser.add_argument(
        "--image-batch-size", type=int, default=32, help="(d): images per batch (default 32)"
    )
    args = parser.parse_args(argv)
    videos = args.videos or (16 if args.quick else 64)
    batches = args.batches or (6 if args.quick else 16)
    steps = args.steps or (2 if args.quick else 5)
    rounds = args.rounds or (2 if args.quick else 3)
    codec = args.codec or ("libx264" if "libx264" in av.codecs_available else "mpeg4")
    methods = ("thread", "process") if args.method == "both" else (args.method,)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not args.preset.is_file():
        print(f"no preset at {args.preset}: pass --preset FILE.gin")
        return 1

    with tempfile.TemporaryDirectory(prefix="ulframe-loader-") as tmp:
        root = Path(tmp) / "videos"
        (root / "val").mkdir(parents=True)  # no eval share held out of train
        t0 = time.perf_counter()
        size = write_videos(root, videos, tuple(args.video_size), args.seconds, codec, SEED)
        width, height = args.video_size
        print(
            f"{videos} videos ({codec}, {width}x{height}, {args.seconds:g} s at {FPS} fps, "
            f"{size / 2**20:.1f} MiB) written in {time.perf_counter() - t0:.1f} s; clips of "
            f"{args.num_frames} frames (stride {args.frame_stride}) at {args.resolution}x"
            f"{args.resolution}, batch {args.batch_size}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads, PyAV {av.__version__}"
        )
        dataset = Kinetics(
            root=str(root),
            num_frames=args.num_frames,
            frame_stride=args.frame_stride,
            resolution=args.resolution,
            decoder_threads=args.decoder_threads,
        )
        source = dataset.source("train")

        loaders = {m: LoaderBench(source, args.batch_size, args.workers, m) for m in methods}
        examples = next(iter(loaders.values())).first
        preloaded = [examples] + [
            next(loaders[methods[0]].iterator) for _ in range(PRELOADED_BATCHES - 1)
        ]
        example = {"x": examples["x"][0], "label": examples["label"][0]}
        model, settings = build_model(args.preset, example, args.batch_size, Path(tmp))
        params = sum(p.numel() for p in model.parameters())
        train = TrainBench(model, settings, preloaded)
        train.round(2)  # warm-up

        loader_rates: dict[str, list[float]] = {m: [] for m in methods}
        train_rates: list[float] = []
        for r in range(rounds):
            for m in methods if r % 2 == 0 else reversed(methods):
                loader_rates[m].append(loaders[m].round(batches))
                # a training round after each loader round: it also absorbs the idle loader's
                # refilling of its buffers, which would otherwise overlap the next loader round
                train_rates.append(train.round(steps))
        best = max(methods, key=lambda m: statistics.median(loader_rates[m]))
        fed_rates = [train.round(steps, loaders[best].iterator) for _ in range(rounds)]
        for bench in loaders.values():
            bench.close()

        # (d) the same files as shard sets, against their folders
        compared: dict[str, tuple[list[float], list[float]]] = {}
        clip_kwargs = {
            "num_frames": args.num_frames, "frame_stride": args.frame_stride,
            "resolution": args.resolution, "decoder_threads": args.decoder_threads,
        }  # fmt: skip
        Shards.write_folder(root, Path(tmp) / "video-shards", max_bytes=2**30, workers=2)
        clip_shards = Shards(root=str(Path(tmp) / "video-shards"), **clip_kwargs).source("train")
        compared["clips"] = shards_vs_folder(
            source, clip_shards, args.batch_size, args.workers, best, batches, rounds
        )
        images = args.images or (128 if args.quick else 512)
        image_root = Path(tmp) / "images"
        (image_root / "val").mkdir(parents=True)
        image_bytes = write_images(image_root, images, tuple(args.image_size), SEED)
        Shards.write_folder(image_root, Path(tmp) / "image-shards", max_bytes=2**30, workers=2)
        image_kwargs = {"resolution": args.image_resolution, "random_crop": True}
        compared["images"] = shards_vs_folder(
            ImageFolder(root=str(image_root), **image_kwargs).source("train"),
            Shards(root=str(Path(tmp) / "image-shards"), **image_kwargs).source("train"),
            args.image_batch_size, args.workers, best, batches, rounds,
        )  # fmt: skip

    print(
        f"stage-1 model: {args.preset.relative_to(ROOT) if args.preset.is_relative_to(ROOT) else args.preset}"
        f" networks, {params / 1e6:.2f}M parameters, x {tuple(example['x'].shape)}, "
        f"latent {tuple(model.encoder(example['x'][None]).shape[1:])}"
    )  # fmt: skip
    for m in methods:
        values = loader_rates[m]
        print(
            f"loader ({args.workers} {m} workers): {statistics.median(values):.1f} clips/s "
            f"(median of {rounds} rounds of {batches} batches; min {min(values):.1f}, max "
            f"{max(values):.1f}); first batch after {loaders[m].startup:.2f} s"
        )
    loader_rate = statistics.median(loader_rates[best])
    train_rate = statistics.median(train_rates)
    print(
        f"train (forward + backward + AdamW): {train_rate:.1f} clips/s "
        f"(median of {len(train_rates)} rounds of {steps} steps; min {min(train_rates):.1f}, max "
        f"{max(train_rates):.1f}); {1e3 * args.batch_size / train_rate:.0f} ms per step"
    )
    if len(methods) > 1:
        print(f"faster loader: {best} workers")
    fed = statistics.median(fed_rates)
    print(
        f"train fed by the {best} loader (sharing the CPU): {fed:.1f} clips/s "
        f"({100 * fed / train_rate:.0f}% of the rate on preloaded batches; noisy on a busy "
        "machine)"
    )
    image_width, image_height = args.image_size
    print(
        f"(d) {images} JPEG images ({image_width}x{image_height}, {image_bytes / 2**20:.1f} MiB), "
        f"random {args.image_resolution}x{args.image_resolution} crops, batch "
        f"{args.image_batch_size}; {args.workers} {best} workers, medians of {rounds} rounds of "
        f"{batches} batches"
    )
    for what, measured in compared.items():
        rate = {name: statistics.median(v) for name, v in measured["loader"].items()}
        cpu = {name: statistics.median(v) for name, v in measured["cpu"].items()}
        print(
            f"{what}: loader " + ", ".join(
                f"{name} {rate[name]:.1f}/s (min {min(v):.1f}, max {max(v):.1f})"
                for name, v in measured["loader"].items()
            ) + "; decode CPU " + ", ".join(f"{name} {1e3 * cpu[name]:.2f} ms" for name in cpu)
        )  # fmt: skip
        print(
            f"shards/folder ratio ({what}): {rate['shards'] / rate['folder']:.2f} (loader rate); "
            f"{cpu['folder'] / cpu['shards']:.2f} (decode CPU, folder/shards)"
        )
    ratio = loader_rate / train_rate if train_rate > 0 else math.inf
    print(f"loader/train ratio: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
