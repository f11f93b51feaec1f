"""The Fréchet-distance metric plugins: ``metrics.fid_inception`` and ``metrics.fd_photos``."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ulframe.errors import UserError
from ulframe_plugins.metrics import fd_photos
from ulframe_plugins.metrics.fd_photos import DEFAULT_WEIGHTS, FDPhotos, load_photo_net
from ulframe_plugins.metrics.fid_inception import FIDInception, FIDInceptionV3

REPO = Path(__file__).resolve().parents[2]


def _train_judges() -> ModuleType:
    """tools/train_judges.py (a script of the checkout, not an installed module)."""
    spec = importlib.util.spec_from_file_location(
        "train_judges", REPO / "tools" / "train_judges.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# torchvision's Inception3(num_classes=1008, aux_logits=False), the module pytorch-fid loads
# pt_inception-2015-12-05 into, has this many parameters (27 161 264 with the auxiliary head
# and 1000 classes, minus the head's 3 326 696, plus 8 x 2049 for the 8 extra classes).
FID_INCEPTION_PARAMETERS = 23_850_960


def images(n: int, size: int, seed: int) -> torch.Tensor:
    """(n, 3, size, size) uniform in [-1, 1]."""
    return torch.rand((n, 3, size, size), generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------ fid_inception


@pytest.fixture(scope="module")
def inception() -> FIDInceptionV3:
    """A randomly initialised FID Inception whose activations keep their scale (He init)."""
    torch.manual_seed(0)
    network = FIDInceptionV3()
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return network.eval()


@pytest.fixture(scope="module")
def inception_file(inception: FIDInceptionV3, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fid") / "inception.pt"
    torch.save(inception.state_dict(), path)
    return path


def test_fid_missing_weights_file_names_the_parameter(tmp_path: Path):
    missing = tmp_path / "nowhere" / "pt_inception.pth"
    with pytest.raises(UserError) as error:
        FIDInception(weights_path=str(missing))
    text = str(error.value)
    assert "metrics.fid_inception.weights_path" in text
    assert str(missing) in text and "never downloaded" in text


def test_fid_mismatched_keys_name_the_parameter(tmp_path: Path):
    path = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(3), "Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, path)
    with pytest.raises(UserError, match=r"metrics\.fid_inception\.weights_path") as error:
        FIDInception(weights_path=str(path))
    assert "missing keys" in str(error.value) and "unexpected keys" in str(error.value)
    assert "shape keys" in str(error.value)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read"):
        FIDInception(weights_path=str(path))


def test_fid_inception_layout_follows_torchvision_naming(inception: FIDInceptionV3):
    state = inception.state_dict()
    assert sum(p.numel() for p in inception.parameters()) == FID_INCEPTION_PARAMETERS
    for key in (
        "Conv2d_1a_3x3.conv.weight",
        "Conv2d_4a_3x3.bn.running_var",
        "Mixed_5b.branch5x5_1.conv.weight",
        "Mixed_6e.branch7x7dbl_5.bn.bias",
        "Mixed_7a.branch7x7x3_4.conv.weight",
        "Mixed_7c.branch3x3dbl_3b.bn.running_mean",
        "Mixed_7c.branch_pool.conv.weight",
    ):
        assert key in state, key
    assert state["fc.weight"].shape == (1008, 2048)
    assert state["Mixed_5b.branch_pool.conv.weight"].shape == (32, 192, 1, 1)
    assert state["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
    assert not any(k.startswith("AuxLogits") for k in state)


def test_fid_features_and_reload(inception: FIDInceptionV3, inception_file: Path):
    """(N, 3, 32, 32) in [-1, 1] -> (N, 2048) pool3 features at 299 px; the saved state dict
    reloads into the metric and gives the source network's features."""
    metric = FIDInception(weights_path=str(inception_file), quantize=False)
    x = images(2, 32, 0)
    features = metric.features(x)
    assert features.shape == (2, 2048) and features.dtype == torch.float32
    assert torch.isfinite(features).all() and features.abs().max() > 0
    with torch.no_grad():
        direct = inception(F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False))
    torch.testing.assert_close(features, direct, rtol=1e-5, atol=1e-6)


def test_fid_loads_files_without_classifier_or_step_counters(
    inception: FIDInceptionV3, tmp_path: Path
):
    state = {
        k: v
        for k, v in inception.state_dict().items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    path = tmp_path / "trimmed.pt"
    torch.save(state, path)
    metric = FIDInception(weights_path=str(path), input_size=75)
    x, y = images(3, 16, 1), images(3, 16, 2)
    value = metric(x, y)
    assert set(value) == {"fid"} and math.isfinite(value["fid"]) and value["fid"] > 0
    assert metric(x, x)["fid"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(UserError, match="input_size"):
        FIDInception(weights_path=str(path), input_size=64)


# ------------------------------------------------------------------------------ fd_photos


@pytest.fixture(scope="module")
def photo_crops() -> dict[str, torch.Tensor]:
    """Disjoint real crops at 32 px: held-out (eval) pixels and train pixels."""
    crops = _train_judges().photo_crops
    return {"eval": crops("eval", 96, seed=0)[0], "train": crops("train", 96, seed=1)[0]}


def test_fd_photos_ships_small_weights_that_load():
    assert DEFAULT_WEIGHTS.is_file()
    assert DEFAULT_WEIGHTS.stat().st_size < 500_000
    network, meta = load_photo_net(None, "metrics.fd_photos.weights_path")
    assert not network.training
    assert meta["heldout_accuracy"] > 0.5  # 8 classes: chance is 0.125
    assert FDPhotos().meta["heldout_accuracy"] == meta["heldout_accuracy"]


def test_fd_photos_features_are_deterministic():
    x = images(5, 32, 3)
    a, b = FDPhotos(), FDPhotos()
    first = a.features(x)
    assert first.shape == (5, fd_photos.FEATURE_DIM)
    assert torch.equal(first, a.features(x.clone()))
    assert torch.equal(first, b.features(x))
    small = a.features(images(5, 16, 3))  # other resolutions are resized to 32
    assert small.shape == first.shape


def test_fd_photos_real_vs_real_is_much_smaller_than_real_vs_noise(photo_crops):
    metric = FDPhotos()
    real, other_real = photo_crops["eval"], photo_crops["train"]
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    real_real = metric(real, other_real)["fd_photos"]
    real_noise = metric(real, noise)["fd_photos"]
    assert 0 < real_real < 0.25 * real_noise, (real_real, real_noise)
    assert metric(real, real)["fd_photos"] == pytest.approx(0.0, abs=1e-6)


def test_fd_photos_bad_weights_path(tmp_path: Path):
    with pytest.raises(UserError, match=r"metrics\.fd_photos\.weights_path"):
        FDPhotos(weights_path=str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.pt"
    torch.save({"state_dict": {}}, junk)
    with pytest.raises(UserError, match="not an fd_photos weights file"):
        FDPhotos(weights_path=str(junk))


def test_fd_photos_training_command_writes_loadable_weights(tmp_path: Path):
    """tools/train_judges.py --judge photos, shrunk to seconds: its file loads as the metric's
    weights."""
    out = tmp_path / "fd.pt"
    argv = ["--judge", "photos", "--out", str(out), "--train-crops", "32", "--eval-crops", "8"]
    assert _train_judges().main([*argv, "--epochs", "1"]) == 0
    metric = FDPhotos(weights_path=str(out))
    assert metric.meta["train_crops"] == 32 and 0 <= metric.meta["heldout_accuracy"] <= 1
    assert math.isfinite(metric(images(4, 32, 4), images(4, 32, 5))["fd_photos"])
