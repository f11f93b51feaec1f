"""datasets.moving_digits: Moving-MNIST-style clips of scikit-learn's digits."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from ulframe.data import EmptyDatasetError, first_example
from ulframe.errors import ConfigError
from ulframe_plugins.datasets.digits import load_digits, resize_digit, split_indices
from ulframe_plugins.datasets.moving_digits import MovingDigits, trajectory

TINY = dict(resolution=16, num_frames=6, clips_per_epoch=20, eval_clips=12)


def test_default_clips_are_grey_16_frames_at_32x32_in_range() -> None:
    source = MovingDigits(clips_per_epoch=4, eval_clips=4).source("eval")
    example = source.decode(source.items[0])
    x = example["x"]
    assert x.shape == (1, 16, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) == -1.0  # black background
    assert 0.5 < float(x.max()) <= 1.0  # white strokes
    assert isinstance(example["label"], int) and 0 <= example["label"] < 10
    assert MovingDigits().num_classes == 10


@pytest.mark.parametrize("split", ["train", "eval"])
def test_shapes_and_range_of_both_splits(split: str) -> None:
    dataset = MovingDigits(**TINY, num_digits=2, digit_size=6)
    source = dataset.source(split)
    assert len(source.items) == (20 if split == "train" else 12)
    for item in source.items[:5]:
        x = source.decode(item)["x"]
        assert x.shape == (1, 6, 16, 16)
        assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    clone = pickle.loads(pickle.dumps(source))  # sources go to worker processes
    assert clone.items == source.items and clone.pool == source.pool
    if split == "eval":  # train clips are drawn from the engine's per-sample RNG
        assert torch.equal(clone.decode(clone.items[3])["x"], source.decode(source.items[3])["x"])


def test_eval_clips_are_fixed_per_index_and_by_seed() -> None:
    a = MovingDigits(**TINY).source("eval")
    b = MovingDigits(**TINY).source("eval")
    first = [a.decode(item)["x"] for item in a.items]
    for i, item in enumerate(b.items):
        assert torch.equal(b.decode(item)["x"], first[i])  # same index, same clip
        assert torch.equal(a.decode(a.items[i])["x"], first[i])  # and again
    assert not torch.equal(first[0], first[10])  # same class, another digit and path
    other = MovingDigits(**TINY, seed=1).source("eval")
    assert not torch.equal(other.decode(other.items[0])["x"], first[0])


def test_train_clips_come_from_the_engines_per_sample_rng() -> None:
    dataset = MovingDigits(**TINY)
    one = first_example(dataset.source("train"))
    two = first_example(MovingDigits(**TINY).source("train"))
    assert torch.equal(one["x"], two["x"]) and one["label"] == two["label"]


def test_labels_are_the_first_digits_class_balanced_over_classes() -> None:
    _, labels = load_digits()
    for split in ("train", "eval"):
        source = MovingDigits(**TINY, num_digits=2).source(split)
        assert [int(labels[item.digit]) for item in source.items[:10]] == list(range(10))
        for item in source.items[:10]:
            assert source.decode(item)["label"] == int(labels[item.digit])


def test_train_and_eval_clips_use_disjoint_digits() -> None:
    dataset = MovingDigits(resolution=16, num_frames=2, num_digits=3, clips_per_epoch=400,
                           eval_clips=400)  # fmt: skip
    used = {}
    for split in ("train", "eval"):
        source = dataset.source(split)
        assert source.pool == split_indices(split)
        rng = np.random.default_rng(0)  # train: what sample_rng would give; eval: its own seed
        used[split] = {
            digit
            for item in source.items
            for digit, _, _ in source.layout(item, None if item.key is not None else rng)
        }
        assert used[split] <= set(split_indices(split))
    assert used["train"] and used["eval"] and not used["train"] & used["eval"]


def test_a_single_digit_bounces_and_never_leaves_the_frame() -> None:
    """With one digit every frame holds all of its ink, however fast it moves."""
    size, resolution = 8, 16
    dataset = MovingDigits(resolution=resolution, num_frames=24, num_digits=1, digit_size=size,
                           max_speed=5.0, eval_clips=8)  # fmt: skip
    source = dataset.source("eval")
    images, _ = load_digits()
    reversals = 0
    for item in source.items:
        ((digit, left, top),) = source.layout(item)
        assert left.min() >= 0 and top.min() >= 0
        assert left.max() <= resolution - size and top.max() <= resolution - size
        reversals += int(np.any(np.diff(np.sign(np.diff(left))) != 0))
        reversals += int(np.any(np.diff(np.sign(np.diff(top))) != 0))
        ink = (source.decode(item)["x"][0] + 1) / 2  # (T, R, R) in [0, 1]
        expected = float(resize_digit(images[digit], size).sum())
        torch.testing.assert_close(
            ink.sum((1, 2)), torch.full((24,), expected), rtol=1e-5, atol=1e-4
        )
    assert reversals >= 4  # the paths do bounce


def test_trajectory_stays_inside_and_moves_at_constant_speed_between_bounces() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        x, y = trajectory(rng, span=10, num_frames=40, max_speed=3.0)
        assert x.min() >= 0 and y.min() >= 0 and x.max() <= 10 and y.max() <= 10
    x, y = trajectory(np.random.default_rng(0), span=10, num_frames=5, max_speed=0.0)
    assert len(set(x.tolist())) == 1 and len(set(y.tolist())) == 1  # speed 0: still


def test_overlapping_digits_combine_by_pixelwise_max() -> None:
    dataset = MovingDigits(resolution=8, num_frames=1, num_digits=2, digit_size=8, eval_clips=4)
    source = dataset.source("eval")  # 8x8 digits in an 8x8 frame: they overlap entirely
    images, _ = load_digits()
    for item in source.items:
        (a, _, _), (b, _, _) = source.layout(item)
        x = (source.decode(item)["x"][0, 0] + 1) / 2
        torch.testing.assert_close(x, torch.from_numpy(np.maximum(images[a], images[b])))


def test_three_channels_repeat_the_grey_one() -> None:
    grey = MovingDigits(**TINY).source("eval")
    rgb = MovingDigits(**TINY, channels=3).source("eval")
    x1 = grey.decode(grey.items[2])["x"]
    x3 = rgb.decode(rgb.items[2])["x"]
    assert x3.shape == (3, 6, 16, 16)
    for c in range(3):
        assert torch.equal(x3[c], x1[0])


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("resolution", 4),
        ("num_frames", 0),
        ("num_digits", 0),
        ("digit_size", 40),
        ("channels", 2),
        ("max_speed", -1.0),
    ],
)
def test_bad_parameters_name_themselves(param: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"datasets.moving_digits.{param}"):
        MovingDigits(**{param: value})  # type: ignore[arg-type]


def test_empty_split_says_what_to_set() -> None:
    with pytest.raises(EmptyDatasetError, match=r"datasets\.moving_digits\.eval_clips"):
        MovingDigits(eval_clips=0).source("eval")
