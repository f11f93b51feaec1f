"""The engine checks what plugins return where it first meets it, and says so in one line.

- a dataset's first decoded example (`ulframe.data.first_example`, which a run and `ulframe
  eval` call before building networks): `ContractError` naming the plugin, what it returned and
  what is expected;
- a weighting's output on a log-SNR grid (`check_weighting`, called where a stage takes one);
- a sample metric that cannot judge the data (`judge_samples`): skipped with one WARNING line.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch

from ulframe.data import first_example
from ulframe.data.pipeline import example_problem
from ulframe.diffusion.weighting import SigmoidWeighting, check_weighting
from ulframe.errors import ContractError, UserError
from ulframe.eval.metrics import PSNR
from ulframe.eval.samples import judge_samples


class _Source:
    def __init__(self, x: Any, label: Any = 0) -> None:
        self.items = [0]
        self.x, self.label = x, label

    def decode(self, item: int) -> dict[str, Any]:
        return {"x": self.x, "label": self.label}


GOOD = torch.zeros(3, 8, 8)


@pytest.mark.parametrize(
    ("x", "label", "said"),
    [
        (np.zeros((16, 16, 3), np.uint8), 0, "returned numpy.ndarray (16, 16, 3) uint8; expected"),
        (torch.zeros(16, 16, 3), 0, "(16, 16, 3) float32, channels last"),
        (torch.zeros(3, 8, 8, dtype=torch.float64), 0, "torch.Tensor (3, 8, 8) float64"),
        (torch.zeros(8, 8), 0, "torch.Tensor (8, 8) float32; expected"),
        (torch.full((3, 8, 8), 255.0), 0, "in [255, 255]; expected"),
        (torch.full((3, 8, 8), float("nan")), 0, "holding nan or inf"),
        (GOOD, 1.5, "label float 1.5; expected an int"),
    ],
)
def test_first_example_names_the_plugin_what_it_returned_and_what_is_expected(
    x: Any, label: Any, said: str
) -> None:
    with pytest.raises(ContractError) as err:
        first_example(_Source(x, label))
    message = str(err.value)
    assert "\n" not in message and said in message
    assert message.startswith("the Source _Source (")  # no registered dataset defines it
    assert isinstance(err.value, UserError)  # the CLI prints one line, exit 2


def test_well_formed_examples_pass_and_labels_are_checked_against_num_classes() -> None:
    assert first_example(_Source(GOOD, 1))["label"] == 1
    assert first_example(_Source(torch.zeros(3, 4, 8, 8), torch.tensor(2)))["x"].dim() == 4
    assert example_problem({"x": GOOD, "label": 3}, num_classes=3) is not None
    assert example_problem({"x": GOOD, "label": 0}, num_classes=0) is None
    with pytest.raises(ContractError, match="returned label 5; expected 0 <= label < 2"):
        first_example(_Source(GOOD, 5), num_classes=2)


def test_a_builtin_dataset_is_named_by_its_plugin_name() -> None:
    from ulframe_plugins.datasets.digits import Digits

    source = Digits(resolution=8).source("eval")
    bad = type("Bad", (), {"items": source.items, "decode": lambda self, i: {"x": 1}})()
    bad.__class__.__module__ = Digits.__module__
    with pytest.raises(
        ContractError, match=r"^datasets\.digits \(from ulframe\): decode returned int"
    ):
        first_example(bad)


def test_check_weighting_refuses_nan_negative_and_misshapen_weights() -> None:
    assert isinstance(check_weighting(SigmoidWeighting(2.0)), SigmoidWeighting)
    cases = [
        (lambda lam: torch.where(lam > 0, torch.nan, 1.0), "w(λ) returned nan at λ = 0.5"),
        (lambda lam: -torch.ones_like(lam), "returned -1.0 at λ = -20"),
        (lambda lam: torch.ones(3), "returned Tensor (3,); expected a tensor of λ's shape (81,)"),
        (lambda lam: lam.numpy(), "returned ndarray"),
    ]
    for w, said in cases:
        with pytest.raises(ContractError, match=r"\(as ul_joint\.decoder_weighting\)") as err:
            check_weighting(w, "ul_joint.decoder_weighting")
        assert said in str(err.value) and "\n" not in str(err.value)


class _ImagesOnly:
    """A metric that raises on anything but (N, 3, H, W): as a Fréchet metric on clips."""

    name = "images_only"

    def __call__(self, reference: torch.Tensor, estimate: torch.Tensor) -> dict[str, float]:
        if reference.dim() != 4 or reference.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W); got {tuple(reference.shape)}")
        return {self.name: float((reference - estimate).abs().mean())}


class _NeedsWeights:
    name = "needs_weights"

    def __call__(self, reference: torch.Tensor, estimate: torch.Tensor) -> dict[str, float]:
        raise UserError("metrics.needs_weights.weights is not set")


def test_a_metric_that_cannot_judge_the_data_is_skipped_with_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    grey = torch.rand(4, 1, 8, 8) * 2 - 1
    with caplog.at_level(logging.WARNING, logger="ulframe.eval.samples"):
        out = judge_samples(_ImagesOnly(), grey, grey.flip(0), real=grey)
    assert set(out) == {"fd_samples", "speckle"}
    (record,) = caplog.records
    assert "metric images_only skipped: it cannot judge examples of shape (1, 8, 8)" in (
        record.getMessage()
    )
    clips = torch.rand(4, 3, 2, 8, 8)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ulframe.eval.samples"):
        assert judge_samples(PSNR(), clips, clips) == {"fd_samples": 4}  # an image metric
    assert len(caplog.records) == 1
    rgb = torch.rand(4, 3, 8, 8) * 2 - 1
    assert judge_samples(_ImagesOnly(), rgb, rgb)["fd"] == 0.0  # applies: judged
    with pytest.raises(UserError, match="weights is not set"):  # asks the user: stops
        judge_samples(_NeedsWeights(), rgb, rgb)
