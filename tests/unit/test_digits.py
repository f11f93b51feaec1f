"""`datasets.digits`, the shipped digit judge (`metrics.fd_digits`) and the sample judgements.

The judge's numbers are checked on the held-out eval digits it never trained on, so a broken
weights file, preprocessing or split fails here.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from ulframe.errors import ConfigError
from ulframe.eval.metrics import laplacian_energy, speckle
from ulframe.eval.samples import judge_samples
from ulframe_plugins.datasets.digits import NUM_CLASSES, Digits, load_digits, split_indices
from ulframe_plugins.metrics.fd_digits import FDDigits, load_digit_judge

SKLEARN_DIGITS = 1797  # sklearn.datasets.load_digits: 1,797 images
JUDGE_MIN_ACCURACY = 0.97  # the target for the judge on held-out digits


def _split(split: str, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    source = Digits(**kwargs).source(split)
    examples = [source.decode(i) for i in source.items]
    return torch.stack([e["x"] for e in examples]), torch.tensor([e["label"] for e in examples])


@pytest.fixture(scope="module")
def eval_digits() -> tuple[torch.Tensor, torch.Tensor]:
    return _split("eval")


# SHA-256 of `sklearn.datasets.load_digits()`'s arrays as `load_digits` returns them:
# `images.astype(float32) / 16` and `target.astype(int64)`, C order (scikit-learn 1.x).
SKLEARN_IMAGES_SHA256 = "9f578524b6cec1fc800cc52dfc87ebe56264983d490aa72a4bd928ba2570ec77"
SKLEARN_LABELS_SHA256 = "a3c91c262eddcf7ba8f0e37507c30284493c9b20412ffe4af30d536401f7ba21"


def test_the_digits_are_scikit_learns_to_the_bit() -> None:
    """`load_digits` reads scikit-learn's file itself (no sklearn import): the same arrays."""
    images, labels = load_digits()
    assert images.dtype == np.float32 and images.shape == (SKLEARN_DIGITS, 8, 8)
    assert labels.dtype == np.int64 and labels.shape == (SKLEARN_DIGITS,)
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest() == (
        SKLEARN_IMAGES_SHA256
    )
    assert hashlib.sha256(labels.tobytes()).hexdigest() == SKLEARN_LABELS_SHA256


def test_split_is_fixed_stratified_and_disjoint() -> None:
    train, held = split_indices("train"), split_indices("eval")
    assert len(train) + len(held) == SKLEARN_DIGITS
    assert not set(train) & set(held)
    assert split_indices("eval") == held  # fixed: no seed from the experiment
    _, labels = _split("eval")
    counts = torch.bincount(labels, minlength=NUM_CLASSES)
    assert counts.min() >= 30 and counts.max() - counts.min() <= 2  # every class, ~20% each


def test_examples_are_grey_32x32_in_range(eval_digits) -> None:
    x, labels = eval_digits
    assert x.shape[1:] == (1, 32, 32) and x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() <= 1.0 and x.max() > 0.9
    assert set(labels.tolist()) == set(range(NUM_CLASSES))
    assert Digits().num_classes == NUM_CLASSES


def test_channels_and_resolution() -> None:
    grey = Digits(resolution=16).source("train")
    rgb = Digits(resolution=16, channels=3).source("train")
    g, c = grey.decode(grey.items[5])["x"], rgb.decode(rgb.items[5])["x"]
    assert g.shape == (1, 16, 16) and c.shape == (3, 16, 16)
    assert torch.equal(c, g.expand(3, -1, -1))


@pytest.mark.parametrize("kwargs", [{"resolution": 4}, {"channels": 2}])
def test_bad_parameters_name_themselves(kwargs) -> None:
    with pytest.raises(ConfigError, match=f"datasets.digits.{next(iter(kwargs))}"):
        Digits(**kwargs)


def test_judge_knows_held_out_digits(eval_digits) -> None:
    network, meta = load_digit_judge()
    assert meta["heldout_accuracy"] >= JUDGE_MIN_ACCURACY
    x, labels = eval_digits
    accuracy = float((network.classify(x) == labels).float().mean())
    assert accuracy >= JUDGE_MIN_ACCURACY
    assert accuracy == pytest.approx(meta["heldout_accuracy"], abs=1e-6)
    # any channel count and size: RGB at 64x64 is judged like grey at 32x32
    big = torch.nn.functional.interpolate(x[:64], size=(64, 64), mode="bilinear")
    rgb_accuracy = (network.classify(big.expand(-1, 3, -1, -1)) == labels[:64]).float().mean()
    assert float(rgb_accuracy) >= JUDGE_MIN_ACCURACY - 0.02


def test_fd_digits_and_class_accuracy(eval_digits) -> None:
    x, labels = eval_digits
    metric = FDDigits()
    same = metric(x, x, labels=labels)
    assert same["fd_digits"] == pytest.approx(0.0, abs=1e-3)
    assert same["class_accuracy"] >= JUDGE_MIN_ACCURACY
    wrong = metric(x, x, labels=(labels + 1) % NUM_CLASSES)["class_accuracy"]
    assert wrong < 0.05
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    train, _ = _split("train")
    real = metric(x, train[: len(x)])["fd_digits"]
    assert 0 < real < metric(x, noise)["fd_digits"] / 10  # real vs real is far below noise


def test_speckle_is_one_for_data_and_grows_with_noise(eval_digits) -> None:
    x, _ = eval_digits
    assert speckle(x, x) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    noisy = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert speckle(x, noisy) > 1.5
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    blurred = torch.nn.functional.avg_pool2d(padded, 3, stride=1)
    assert speckle(x, blurred) < 1.0
    assert laplacian_energy(torch.zeros(2, 1, 8, 8)).tolist() == [0.0, 0.0]


def test_judge_samples_reports_everything(eval_digits) -> None:
    x, labels = eval_digits
    out = judge_samples(FDDigits(), x[:100], x[100:200], labels[100:200], real=x[200:300])
    assert out["fd_metric"] == "fd_digits" and out["fd_samples"] == 100
    assert out["class_accuracy"] >= JUDGE_MIN_ACCURACY
    assert out["fd"] > 0 and out["fd_real"] > 0 and out["speckle"] > 0


def test_rgb_feature_metric_adapts_to_grey(eval_digits) -> None:
    """A metric whose network takes RGB (fd_photos) repeats a grey channel, never crashes."""
    from ulframe_plugins.metrics.fd_photos import FDPhotos

    x, _ = eval_digits
    value = FDPhotos()(x[:32], x[32:64])["fd_photos"]
    assert value >= 0
