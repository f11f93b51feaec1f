"""``metrics.fvd_i3d``: the loader and feature machinery, with a *test detector*.

The real ``i3d_torchscript.pt`` is not available offline, so a small TorchScript module with the
real detector's call signature, ``detector(x, rescale=False, resize=False,
return_features=True)``, is scripted and saved here (:class:`I3DTestDetector`; its features mean
nothing). It refuses the calls the metric must not make (``rescale``/``resize`` on, inputs outside
[-1, 1], a layout other than (N, 3, T, S, S)), so those conventions are checked too.
"""

from __future__ import annotations

import importlib
import math
import tomllib
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from ulframe.errors import UserError
from ulframe.eval.frechet import frechet_distance_features
from ulframe_plugins.metrics.fvd_i3d import (
    DETECTOR_KWARGS,
    FVDI3D,
    MIN_FRAMES,
    WEIGHTS_PARAMETER,
    preprocess_videos,
)

ROOT = Path(__file__).resolve().parents[2]
SIZE = 16  # the test detector's input side (the real one: 224)
FEATURES = 24


class I3DTestDetector(nn.Module):
    """A TEST stand-in for the I3D TorchScript detector: same call, meaningless features.

    (N, 3, T, S, S) in [-1, 1] -> (N, FEATURES) with ``return_features``, else (N, 400) softmax.
    """

    def __init__(self, size: int = SIZE) -> None:
        super().__init__()
        self.size = size
        self.repeats = FEATURES // 3
        self.conv = nn.Conv3d(3, 6, kernel_size=3, stride=(1, 2, 2), padding=1)
        self.pool = nn.AdaptiveAvgPool3d((1, 2, 2))
        self.head = nn.Linear(FEATURES, 400)

    def forward(
        self, x: Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False
    ) -> Tensor:
        if rescale or resize:
            raise RuntimeError("test detector: the metric preprocesses; rescale/resize must be off")
        if x.dim() != 5 or x.shape[1] != 3 or x.shape[3] != self.size or x.shape[4] != self.size:
            raise RuntimeError("test detector: expected (N, 3, T, S, S)")
        if bool(x.min() < -1.0) or bool(x.max() > 1.0):
            raise RuntimeError("test detector: inputs must be in [-1, 1]")
        h = self.pool(torch.relu(self.conv(x))).flatten(1)  # (N, 6 * 2 * 2) = (N, FEATURES)
        h = h + 0.1 * x.mean((2, 3, 4)).repeat(1, self.repeats)  # colour-sensitive features
        if return_features:
            return h
        return torch.softmax(self.head(h), dim=1)


@pytest.fixture(scope="module")
def detector_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated
        scripted = torch.jit.script(I3DTestDetector().eval())
        path = tmp_path_factory.mktemp("fvd") / "i3d_test_detector.pt"
        scripted.save(str(path))
    return path


def videos(n: int, t: int = MIN_FRAMES, h: int = SIZE, w: int = SIZE, seed: int = 0) -> Tensor:
    """(n, 3, t, h, w) uniform in [-1, 1]."""
    return torch.rand((n, 3, t, h, w), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def metric(path: Path, **kwargs: object) -> FVDI3D:
    return FVDI3D(weights=str(path), input_size=SIZE, **kwargs)  # type: ignore[arg-type]


def test_fvd_is_the_metric_pyproject_registers():
    """The entry point `metrics.fvd_i3d` (read from pyproject.toml, so that a stale editable
    install does not matter) resolves to FVDI3D, whose output key is "fvd"."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    target = project["project"]["entry-points"]["ulframe.metrics"]["fvd_i3d"]
    module, _, attr = target.partition(":")
    assert getattr(importlib.import_module(module), attr) is FVDI3D
    assert FVDI3D.name == "fvd"


def test_identical_sets_give_zero(detector_file: Path):
    x = videos(6, seed=1)
    value = metric(detector_file)(x, x.clone())
    assert set(value) == {"fvd"} and isinstance(value["fvd"], float)
    assert value["fvd"] == pytest.approx(0.0, abs=1e-6)


def test_shifted_sets_match_the_frechet_distance_of_direct_features(detector_file: Path):
    """FVD = frechet_distance_features of the detector's features, called here directly with the
    documented convention (inputs already S x S, so no resize; quantisation off)."""
    reference = videos(7, seed=2)
    estimate = (videos(7, seed=3) + 0.4).clamp(-1, 1)
    fvd = metric(detector_file, quantize=False)(reference, estimate)["fvd"]
    assert fvd > 0 and math.isfinite(fvd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        detector = torch.jit.load(str(detector_file))
    with torch.no_grad():
        f_ref = detector(reference, rescale=False, resize=False, return_features=True)
        f_est = detector(estimate, rescale=False, resize=False, return_features=True)
    assert f_ref.shape == (7, FEATURES)
    assert fvd == pytest.approx(frechet_distance_features(f_ref, f_est), rel=1e-6, abs=1e-9)
    assert DETECTOR_KWARGS == {"rescale": False, "resize": False, "return_features": True}


def test_features_do_not_depend_on_the_batch_size(detector_file: Path):
    x = videos(5, t=12, h=20, w=13, seed=4)  # resized and centre-cropped to 16 x 16
    one = metric(detector_file, batch_size=1).features(x)
    two = metric(detector_file, batch_size=2).features(x)
    all_ = metric(detector_file, batch_size=64).features(x)
    assert one.shape == (5, FEATURES) and one.dtype == torch.float32
    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one, all_, rtol=1e-5, atol=1e-6)


def test_preprocessing_resizes_the_shorter_side_and_crops_the_centre():
    x = videos(2, t=3, h=8, w=32, seed=5)
    out = preprocess_videos(x, input_size=16, quantize=False)
    assert out.shape == (2, 3, 3, 16, 16)
    # 8 x 32 -> 16 x 64 (bilinear), then columns 24..39: the centre of the upscaled frame
    frames = x.permute(0, 2, 1, 3, 4).reshape(6, 3, 8, 32)
    up = torch.nn.functional.interpolate(frames, size=(16, 64), mode="bilinear")
    expected = up[..., 24:40].reshape(2, 3, 3, 16, 16).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(out, expected)
    levels = preprocess_videos(x, input_size=8, quantize=True)[..., :8]  # 8-bit levels
    codes = (levels + 1) * 127.5
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    gray = preprocess_videos(x[:, :1], input_size=16)
    assert gray.shape == (2, 3, 3, 16, 16) and torch.equal(gray[:, 0], gray[:, 2])


def test_input_checks(detector_file: Path):
    fvd = metric(detector_file)
    with pytest.raises(ValueError, match="at least 10 frames"):
        fvd(videos(3, t=8), videos(3, t=8))
    with pytest.raises(ValueError, match=r"\(N, 3, T, H, W\)"):
        fvd(videos(3)[:, :, 0], videos(3)[:, :, 0])


@pytest.mark.parametrize("weights", [None, "", "nowhere/i3d_torchscript.pt"])
def test_missing_weights_name_the_gin_parameter_and_the_file(weights: str | None, tmp_path: Path):
    if weights:
        weights = str(tmp_path / weights)
    with pytest.raises(UserError) as error:
        FVDI3D(weights=weights)
    text = str(error.value)
    assert WEIGHTS_PARAMETER == "metrics.fvd_i3d.weights"
    assert WEIGHTS_PARAMETER in text and "i3d_torchscript.pt" in text
    assert "never downloaded" in text
    if weights:
        assert weights in text and "no such file" in text
    else:
        assert "not set" in text


def test_a_file_that_is_not_torchscript_is_a_user_error(tmp_path: Path):
    path = tmp_path / "i3d_torchscript.pt"
    torch.save({"weight": torch.zeros(2)}, path)  # a state dict, not TorchScript
    with pytest.raises(UserError, match=r"metrics\.fvd_i3d\.weights.*TorchScript"):
        FVDI3D(weights=str(path))
