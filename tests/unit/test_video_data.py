"""Video data: datasets.kinetics on real files written with PyAV, datasets.moving_photos, and the
engine's loader (sharding, skipping, process workers) on video sources.

The test videos are gray frames whose value is 8 x the frame index, so the frames a clip holds
can be read back from its pixels (codecs are set to near-lossless quality).
"""

from __future__ import annotations

import csv
import itertools
import logging
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import ulframe_plugins.datasets.moving_photos as moving_photos
from ulframe.data import EmptyDatasetError, build_loader, first_example
from ulframe_plugins.datasets.kinetics import Kinetics, annotation_key
from ulframe_plugins.datasets.moving_photos import MovingPhotos, region_columns
from ulframe_plugins.datasets.video import ClipSpec, read_clip

FPS = 25
STEP = 8  # gray value per frame index

# (codec, container suffix, pixel format, encoder options) of the test videos: MPEG-4 Part 2 is
# in every FFmpeg build; the others are used where this PyAV build can encode them.
MPEG4 = ("mpeg4", ".mp4", "yuv420p", {"g": "6"})
OTHERS = [
    ("libx264", ".mp4", "yuv420p", {"crf": "0", "g": "10"}),
    ("libvpx-vp9", ".webm", "yuv420p", {"lossless": "1"}),
    ("mjpeg", ".avi", "yuvj420p", {"qscale": "1"}),
]
AVAILABLE = [spec for spec in OTHERS if spec[0] in av.codecs_available] or [MPEG4]


def write_video(
    path: Path,
    frames: int,
    size: tuple[int, int] = (64, 48),
    codec: tuple[str, str, str, dict[str, str]] = MPEG4,
    pixels: Callable[[int, int, int], np.ndarray] | None = None,
) -> Path:
    """A real video file of ``frames`` frames of ``size`` = (width, height); frame i is gray
    ``STEP * i`` unless ``pixels(i, width, height)`` gives its uint8 (H, W, 3) RGB array."""
    name, _, pix_fmt, options = codec
    width, height = size
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(name, rate=FPS, options=dict(options))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if name == "mpeg4":
            stream.bit_rate = 10_000_000  # near lossless: gray levels within 1
        for i in range(frames):
            array = (
                pixels(i, width, height)
                if pixels is not None
                else np.full((height, width, 3), STEP * i, dtype=np.uint8)
            )
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def take(loader, count: int) -> list[dict[str, torch.Tensor]]:
    return list(itertools.islice(iter(loader), count))


def clip_indices(clip: np.ndarray) -> list[int]:
    """The frame index each frame of a gray uint8 clip (T, H, W, 3) was made from."""
    return [round(float(v) / STEP) for v in clip.reshape(len(clip), -1).mean(axis=1)]


GOOD = {  # relative path -> (frames, (width, height), codec)
    "train/cats/a.mp4": (30, (64, 48), MPEG4),
    "train/dogs/d.mkv": (30, (72, 40), MPEG4),  # no frame count in the header
    **{  # one video per other codec, portrait, square or landscape
        f"train/{('cats', 'dogs')[i % 2]}/{codec[0]}{codec[1]}": (28 - i, size, codec)
        for i, (codec, size) in enumerate(zip(AVAILABLE, ((48, 64), (40, 40), (56, 48))))
    },
    "val/cats/e.mp4": (24, (64, 48), MPEG4),
    "val/dogs/f.mp4": (24, (48, 48), MPEG4),
}
BAD = (  # zero bytes; an MP4 cut in half (no index); an MKV cut short; 5 frames
    "train/birds/zero.mp4",
    "train/birds/truncated.mp4",
    "train/cats/truncated.mkv",
    "train/dogs/short.mp4",
)
TRAIN_GOOD = sum(relative.startswith("train") for relative in GOOD)


@pytest.fixture(scope="module")
def video_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/{train,val}/<class>/<video>: the GOOD and BAD videos and a non-video file."""
    root = tmp_path_factory.mktemp("kinetics")
    for relative, (frames, size, codec) in GOOD.items():
        write_video(root / relative, frames, size, codec)
    (root / "train/birds").mkdir(parents=True)
    (root / "train/birds/zero.mp4").write_bytes(b"")
    data = (root / "train/cats/a.mp4").read_bytes()
    (root / "train/birds/truncated.mp4").write_bytes(data[: len(data) // 2])
    data = (root / "train/dogs/d.mkv").read_bytes()
    (root / "train/cats/truncated.mkv").write_bytes(data[: len(data) * 2 // 5])
    write_video(root / "train/dogs/short.mp4", 5)
    (root / "train/cats/notes.txt").write_text("not a video")
    return root


def kinetics(root: Path, **kwargs) -> Kinetics:
    return Kinetics(root=str(root), **{"num_frames": 8, "resolution": 16, **kwargs})


# ---- datasets.kinetics ------------------------------------------------------------------------


def test_labels_from_sorted_class_folders(video_root: Path):
    dataset = kinetics(video_root)
    assert dataset.classes == ["birds", "cats", "dogs"] and dataset.num_classes == 3
    train = dataset.source("train").items
    assert len(train) == TRAIN_GOOD + len(BAD)  # notes.txt is not a video
    for path, label in train:
        assert label == dataset.classes.index(Path(path).parent.name)
    assert [(Path(p).name, label) for p, label in dataset.source("eval").items] == [
        ("e.mp4", 1),
        ("f.mp4", 2),
    ]


def test_clips_have_the_engine_shape_dtype_and_range(video_root: Path):
    dataset = kinetics(video_root, num_frames=6, resolution=20)
    for split in ("train", "eval"):
        source = dataset.source(split)
        for item in source.items:
            if item[0].endswith(BAD):
                continue
            example = source.decode(item)
            x = example["x"]
            assert x.shape == (3, 6, 20, 20) and x.dtype == torch.float32, item
            assert x.is_contiguous() and -1.0 <= float(x.min()) <= float(x.max()) <= 1.0
            assert example["label"] == item[1]


@pytest.mark.parametrize("relative", [r for r in GOOD if r.startswith("train")])
def test_frame_stride_and_fps_pick_the_right_frames(video_root: Path, relative: str):
    frames = GOOD[relative][0]
    path = str(video_root / relative)
    rng = np.random.default_rng(0)
    # Centered clip of 8 frames, 3 apart: span 22, starts at (frames - 1 - 21) // 2.
    clip = read_clip(path, ClipSpec(8, frame_stride=3, resolution=8), rng)
    start = (frames - 1 - 21) // 2
    assert clip_indices(clip) == [start + 3 * k for k in range(8)]
    # Random starts (seeking into the file): always 3 apart, in range, and not all the same.
    starts = set()
    for seed in range(6):
        clip = read_clip(
            path, ClipSpec(8, 3, resolution=8, random_clip=True), np.random.default_rng(seed)
        )
        indices = clip_indices(clip)
        assert np.diff(indices).tolist() == [3] * 7 and 0 <= indices[0] <= frames - 22
        starts.add(indices[0])
    assert len(starts) > 1
    # fps = 12.5 on a 25 fps video: every other frame, by timestamps; 50 fps repeats frames.
    clip = read_clip(path, ClipSpec(5, fps=12.5, resolution=8, random_clip=True), rng)
    indices = clip_indices(clip)
    assert np.diff(indices).tolist() == [2] * 4
    clip = read_clip(path, ClipSpec(6, fps=37.5, resolution=8), rng)  # 2/3 of a frame apart
    assert np.diff(clip_indices(clip)).tolist() == [1, 0, 1, 1, 0]  # the nearest frames
    # The whole video is one clip; one more frame is too many.
    clip = read_clip(path, ClipSpec(frames, resolution=8), rng)
    assert clip_indices(clip) == list(range(frames))
    assert read_clip(path, ClipSpec(frames + 1, resolution=8), rng) is None


def test_train_clips_are_cropped_and_mirrored_at_random_but_reproducibly(tmp_path: Path):
    def ramp(i: int, width: int, height: int) -> np.ndarray:  # dark left, bright right
        row = np.linspace(0, 255, width).astype(np.uint8)
        return np.repeat(np.tile(row[None, :, None], (height, 1, 1)), 3, axis=2)

    for i in range(10):
        write_video(tmp_path / "train" / "ramp" / f"{i}.mp4", 12, (64, 32), pixels=ramp)
    dataset = Kinetics(root=str(tmp_path), num_frames=4, resolution=16)
    source = dataset.source("train")  # 9 videos: one is held out for eval

    def run(num_workers: int) -> torch.Tensor:  # one pass (a thread pool is fully drained)
        loader = build_loader(source, batch_size=3, seed=7, num_workers=num_workers, repeat=False)
        return torch.cat([batch["x"] for batch in loader])

    x = run(0)  # (N, 3, T, 16, 16)
    assert torch.equal(x, run(2))  # per-sample RNG: same clips whatever the worker count
    left_is_dark = x[:, 0, 0, 0, 0] < x[:, 0, 0, 0, -1]
    assert 0 < int(left_is_dark.sum()) < len(x)  # some mirrored, some not
    assert len({round(float(v), 3) for v in x[:, 0, 0, 0, 8]}) > 1  # crops at several places
    eval_x = first_example(dataset.source("eval"))["x"]  # centered, never mirrored
    assert float(eval_x[0, 0, 0, 0]) < float(eval_x[0, 0, 0, -1])


def test_unreadable_and_short_videos_are_skipped_and_counted(video_root: Path, caplog):
    source = kinetics(video_root).source("train")
    loader = build_loader(source, batch_size=2, repeat=False, drop_last=False, num_workers=2)
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    assert sum(len(batch["label"]) for batch in batches) == TRAIN_GOOD
    assert all(batch["x"].shape[1:] == (3, 8, 16, 16) for batch in batches)
    assert loader.skipped == len(BAD)
    for relative in BAD:
        assert str(video_root / relative) in caplog.text
    assert "too short" in caplog.text and "truncated?" in caplog.text


def test_resumed_loader_gives_the_same_next_clips(video_root: Path):
    """Random clips, crops and flips of a resumed loader repeat the uninterrupted stream."""
    source = kinetics(video_root).source("train")  # bad files included: skips are resumed too

    def make():
        return build_loader(source, batch_size=3, seed=4, prefetch=0)

    loader = make()
    it = iter(loader)
    for _ in range(3):  # 9 clips: into the second epoch
        next(it)
    state = loader.state_dict()
    expected = [next(it) for _ in range(3)]
    resumed = make()
    resumed.load_state_dict(state)
    for a, b in zip(take(resumed, 3), expected):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["label"], b["label"])


def test_two_ranks_share_the_videos_without_overlap(video_root: Path):
    class Tagged:
        """The Kinetics source with the item index added to every example."""

        def __init__(self, inner):
            self.inner = inner
            self.items = list(enumerate(inner.items))

        def decode(self, item):
            index, inner_item = item
            example = self.inner.decode(inner_item)
            return None if example is None else {**example, "index": index}

    source = Tagged(kinetics(video_root).source("train"))
    seen = []
    for rank in (0, 1):
        loader = build_loader(
            source, batch_size=1, rank=rank, world_size=2, seed=3, repeat=False, drop_last=False
        )
        seen.append({int(i) for batch in loader for i in batch["index"]})
    good = {i for i, (path, _) in source.items if not path.endswith(BAD)}
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == good
    assert seen[0] and seen[1]


def test_source_pickles_and_process_workers_decode_it(video_root: Path):
    source = kinetics(video_root).source("eval")
    clone = pickle.loads(pickle.dumps(source))
    assert clone.items == source.items and clone.clip == source.clip
    kwargs = {"batch_size": 2, "seed": 1, "repeat": False}
    reference = list(build_loader(source, **kwargs))
    spawned = list(build_loader(source, num_workers=2, method="process", **kwargs))
    assert len(spawned) == len(reference) == 1
    assert torch.equal(spawned[0]["x"], reference[0]["x"])
    assert torch.equal(spawned[0]["label"], reference[0]["label"])


def test_empty_or_unusable_roots_name_the_gin_parameter(tmp_path: Path, video_root: Path):
    missing = tmp_path / "nowhere"
    with pytest.raises(EmptyDatasetError, match=r"datasets\.kinetics\.root") as error:
        Kinetics(root=str(missing)).source("train")
    assert str(missing) in str(error.value)

    (tmp_path / "empty" / "train" / "ant").mkdir(parents=True)
    with pytest.raises(EmptyDatasetError, match=r"datasets\.kinetics\.root"):
        Kinetics(root=str(tmp_path / "empty")).source("train")

    only_bad = tmp_path / "bad"
    for relative in BAD:
        (only_bad / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(video_root / relative, only_bad / relative)
    source = kinetics(only_bad).source("train")
    with pytest.raises(EmptyDatasetError, match=r"datasets\.kinetics\.root"):
        first_example(source)
    with pytest.raises(EmptyDatasetError, match=r"datasets\.kinetics\.root"):
        next(iter(build_loader(source, batch_size=2)))


def test_labels_from_kinetics_annotations(tmp_path: Path, video_root: Path):
    rows = [
        ("riding a bike", "abc", 10, 20, "train"),
        ("abseiling", "x-Y_z", 0, 10, "train"),
        ("abseiling", "qqq", 3, 13, "validate"),
        ("", "test1", 0, 10, "test"),
    ]
    with open(tmp_path / "train.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
        writer.writerows(rows)
    source_video = video_root / "train/cats/a.mp4"
    for label, youtube_id, start, end, _ in rows[:2]:
        target = tmp_path / "root/train" / label / f"{annotation_key(youtube_id, start, end)}.mp4"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source_video, target)
    shutil.copy(source_video, tmp_path / "root/train/abseiling/unlisted.mp4")
    (tmp_path / "root/val/somewhere").mkdir(parents=True)
    shutil.copy(source_video, tmp_path / "root/val/somewhere/qqq_000003_000013.mp4")

    dataset = kinetics(tmp_path / "root", annotations=str(tmp_path / "train.csv"))
    assert dataset.classes == ["abseiling", "riding a bike"]
    train = {Path(p).name: label for p, label in dataset.source("train").items}
    assert train == {"abc_000010_000020.mp4": 1, "x-Y_z_000000_000010.mp4": 0}
    assert [label for _, label in dataset.source("eval").items] == [0]
    with pytest.raises(EmptyDatasetError, match=r"datasets\.kinetics\.annotations"):
        _ = kinetics(tmp_path / "root", annotations=str(tmp_path / "nope.csv")).num_classes


def test_without_val_a_deterministic_share_of_train_is_held_out(tmp_path: Path, video_root: Path):
    for i in range(3):
        for cls in ("a", "b"):
            os.makedirs(tmp_path / "train" / cls, exist_ok=True)
            shutil.copy(video_root / "train/cats/a.mp4", tmp_path / "train" / cls / f"{i}.mp4")
    dataset = kinetics(tmp_path)
    train, held = dataset.source("train").items, dataset.source("eval").items
    assert len(held) == 1 and not set(held) & set(train) and len(train) == 5
    assert kinetics(tmp_path).source("eval").items == held


# ---- datasets.moving_photos -------------------------------------------------------------------


def test_moving_photos_are_deterministic_clips_of_real_pixels():
    dataset = MovingPhotos(resolution=8, num_frames=5, clips_per_epoch=16, eval_clips=8)
    assert dataset.num_classes == 8
    eval_source = dataset.source("eval")
    first = eval_source.decode(eval_source.items[3])
    again = MovingPhotos(resolution=8, num_frames=5, eval_clips=8).source("eval")
    assert torch.equal(first["x"], again.decode(again.items[3])["x"])  # fixed eval clips
    assert first["x"].shape == (3, 5, 8, 8) and first["x"].dtype == torch.float32
    assert first["label"] == 3 and float(first["x"].std()) > 0.01

    train = dataset.source("train")
    kwargs = {"batch_size": 4, "seed": 2, "repeat": False}
    batches = list(build_loader(train, **kwargs))
    threaded = list(build_loader(train, num_workers=2, **kwargs))
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(batches, threaded))
    x = torch.cat([b["x"] for b in batches])  # (16, 3, 5, 8, 8)
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert (x[:, :, 1:] != x[:, :, :-1]).flatten(1).any(1).float().mean() > 0.9  # they move
    # The next epoch draws new trajectories for the same items.
    ordered = take(build_loader(train, batch_size=16, seed=2, shuffle=False), 2)
    assert torch.equal(ordered[0]["label"], ordered[1]["label"])
    assert not torch.equal(ordered[0]["x"], ordered[1]["x"])


def test_moving_photos_train_and_eval_windows_come_from_disjoint_columns(monkeypatch):
    """Photographs replaced by arrays whose pixels hold their column: every frame's columns are
    read back from the clip."""
    real = moving_photos.scaled_photographs

    def columns(short_side: int) -> tuple[np.ndarray, ...]:
        out = []
        for photo in real(short_side):
            height, width = photo.shape[:2]
            coded = np.zeros((height, width, 3), dtype=np.uint8)
            coded[..., 0] = np.arange(width) % 256
            coded[..., 1] = np.arange(width) // 256
            out.append(coded)
        return tuple(out)

    monkeypatch.setattr(moving_photos, "scaled_photographs", columns)
    dataset = MovingPhotos(resolution=8, num_frames=6, clips_per_epoch=64, eval_clips=64)
    widths = [photo.shape[1] for photo in real(dataset.short_side)]
    spans = {}  # (split, photograph) -> (first column, last column) any window covered
    for split in ("train", "eval"):
        source = dataset.source(split)
        loader = build_loader(source, batch_size=16, seed=5, repeat=False, shuffle=False)
        for batch in loader:
            rgb = torch.round((batch["x"] + 1) * 127.5).long()  # (B, 3, T, R, R)
            col = rgb[:, 0] + 256 * rgb[:, 1]  # (B, T, R, R)
            for x, label in zip(col, batch["label"].tolist()):
                low, high = spans.get((split, label), (10**9, -1))
                spans[split, label] = (min(low, int(x.min())), max(high, int(x.max())))
                assert bool((x[:, :, 1:] - x[:, :, :-1] == 1).all())  # unflipped, unscaled
                left = x[:, 0, 0].float()  # (T,) the window's left column per frame
                assert float((left[1:] - left[:-1]).abs().max()) <= dataset.max_speed + 1
    for label, width in enumerate(widths):
        train, held_out = spans["train", label], spans["eval", label]
        assert train[1] < held_out[0], label  # no eval pixel is ever trained on
        assert train[0] >= 0 and held_out[1] < width
        assert held_out[0] >= region_columns(width, 8, "eval")[0]
        assert held_out[1] - held_out[0] >= 8  # eval windows move (room for 1.5 windows)


def test_moving_photos_reject_bad_parameters():
    with pytest.raises(EmptyDatasetError, match="eval_clips"):
        MovingPhotos(eval_clips=0).source("eval")
    with pytest.raises(ValueError, match="scale"):
        MovingPhotos(resolution=16, scale=1.5)
