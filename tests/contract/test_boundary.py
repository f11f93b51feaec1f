"""The engine checks what plugins return where it first meets it, and says so in one line.

- a dataset's first decoded example (`ulframe.data.first_example`, which a run and `ulframe
  eval` call before building networks, with the dataset's `num_classes`): `ContractError`
  naming the plugin, what it returned and what is expected;
- a weighting's output on a log-SNR grid (`check_weighting`, called where a stage takes one,
  over the stage's log-SNR range);
- a sample metric that declares it cannot judge the data (`judge_samples`): skipped with one
  WARNING line; anything else it raises propagates.

What a run reads of the data and the model before its first step (a probe batch, the FLOPs
count) neither crashes it nor changes the model; `ulframe config` counts a later stage's
parameters without reading the earlier stage's weights.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_RUN, TINY_STAGE2, gin_args, run_cli

from ulframe.data import first_example, sample_rng
from ulframe.data.pipeline import example_problem
from ulframe.diffusion.weighting import SigmoidWeighting, check_weighting
from ulframe.errors import ContractError, UserError
from ulframe.eval.metrics import PSNR
from ulframe.eval.samples import judge_samples
from ulframe.registry import naming_plugins
from ulframe.train.distributed import World


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


def test_the_engine_names_a_builtin_dataset_by_its_plugin_name() -> None:
    from ulframe_plugins.datasets.digits import Digits

    dataset = Digits(resolution=8)
    source = dataset.source("eval")
    bad = type("Bad", (), {"items": source.items, "decode": lambda self, i: {"x": 1}})()
    with pytest.raises(ContractError, match=r"^the Source Bad \(.*\): decode returned int"):
        first_example(bad)  # the data layer knows no registry: it names the Source's class
    with (
        pytest.raises(
            ContractError, match=r"^datasets\.digits \(from ulframe\): decode returned int"
        ) as err,
        naming_plugins(source_of=dataset),
    ):  # the engine knows where the Source came from
        first_example(bad)
    assert "\n" not in str(err.value) and err.value.kind == "datasets"
    with pytest.raises(ContractError, match=r"^the Source Bad \("), naming_plugins():
        first_example(bad)  # nothing registered made it: the class stays


def test_the_engine_names_a_weighting_by_its_plugin_name() -> None:
    nan = SigmoidWeighting(bias=float("nan"))
    said = r"\(as ul_joint\.decoder_weighting\): w\(λ\) = nan"
    with pytest.raises(ContractError, match=rf"^the weighting SigmoidWeighting \(.*\) {said}"):
        check_weighting(nan, "ul_joint.decoder_weighting")
    with pytest.raises(ContractError, match=rf"^weightings\.sigmoid \(from ulframe\) {said}"):
        with naming_plugins():
            check_weighting(nan, "ul_joint.decoder_weighting")


def test_a_configured_stage_names_the_weighting_plugin_and_its_binding() -> None:
    import gin

    from ulframe import wiring
    from ulframe.train.settings import CONFIGURABLES

    wiring.load([REPO / "gin" / "quickstart.gin"], TINY_RUN, engine=CONFIGURABLES)
    try:
        gin.bind_parameter("weightings.sigmoid.bias", float("nan"))
        with pytest.raises(ContractError) as err:
            wiring.experiment()  # gin calls the stage, which checks its weighting
    finally:
        gin.clear_config()
    line = wiring.describe(err.value)  # what the CLI prints
    said = "weightings.sigmoid (from ulframe) (as ul_joint.decoder_weighting): w(λ) = nan"
    assert re.match(rf".*quickstart\.gin:\d+: {re.escape(said)}", line) and "\n" not in line


def test_labels_are_checked_against_the_datasets_num_classes_where_a_run_starts(
    tmp_path: Path,
) -> None:
    from ulframe import parameters
    from ulframe.train import loop

    dataset = SimpleNamespace(num_classes=10, source=lambda split: _Source(GOOD, 10))
    stage = SimpleNamespace(name="s", train=SimpleNamespace(batch_size=1))
    ctx = SimpleNamespace(world=World(0, 1, 0, torch.device("cpu")), seed=0)
    said = "decode returned label 10; expected 0 <= label < 10"
    with pytest.raises(ContractError, match=said) as err:
        loop._build(stage, dataset, tmp_path, {}, ctx)  # before any network is built
    assert "\n" not in str(err.value)
    with pytest.raises(ContractError, match=said):  # `ulframe config`
        parameters.stage_parameters(SimpleNamespace(dataset=dataset, stages=[stage]), tmp_path)


def test_check_weighting_refuses_nan_negative_and_misshapen_weights() -> None:
    assert isinstance(check_weighting(SigmoidWeighting(2.0)), SigmoidWeighting)
    cases = [
        (lambda lam: torch.where(lam > 0, torch.nan, 1.0), "w(λ) = nan at λ = 0.5 (40 of 81"),
        (lambda lam: -torch.ones_like(lam), "w(λ) = -1.0 at λ = -20"),
        (lambda lam: torch.ones(3), "returned Tensor (3,); expected a tensor of λ's shape (81,)"),
        (lambda lam: lam.numpy(), "returned ndarray"),
    ]
    for w, said in cases:
        with pytest.raises(ContractError, match=r"\(as ul_joint\.decoder_weighting\)") as err:
            check_weighting(w, "ul_joint.decoder_weighting")
        assert said in str(err.value) and "\n" not in str(err.value)


def test_check_weighting_checks_the_stages_own_log_snr_range() -> None:
    def overflows(lam: torch.Tensor) -> torch.Tensor:  # inf below λ = -16
        return torch.where(lam < -16, torch.inf, 1.0)

    assert check_weighting(overflows, "ul_base.weighting", -15.0, 15.0) is overflows
    with pytest.raises(ContractError, match=r"w\(λ\) = inf at λ = -20 .* λ ∈ \[-20, 15\]"):
        check_weighting(overflows, "ul_base.weighting", logsnr_max=15.0)  # λ_min: the default
    from ulframe.train.settings import TrainSettings
    from ulframe_plugins.stages.ul_joint import ULJoint

    nets = (torch.nn.Identity,) * 3
    with pytest.raises(ContractError, match=r"λ ∈ \[-17, 15\]"):  # the decoder's range
        ULJoint(*nets, TrainSettings(), decoder_weighting=overflows, decoder_logsnr_min=-17.0)
    ULJoint(*nets, TrainSettings(), decoder_weighting=overflows)  # [-15, 15] by default


class _ImagesOnly:
    """An image metric of RGB images (N, 3, H, W) that cannot adapt other channel counts."""

    name = "images_only"
    in_channels = 3

    def __call__(self, reference: torch.Tensor, estimate: torch.Tensor) -> dict[str, float]:
        if reference.dim() != 4 or reference.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W); got {tuple(reference.shape)}")
        return {self.name: float((reference - estimate).abs().mean())}


class _NeedsWeights:
    name = "needs_weights"

    def __call__(self, reference: torch.Tensor, estimate: torch.Tensor) -> dict[str, float]:
        raise UserError("metrics.needs_weights.weights is not set")


class _Broken:
    """A metric that declares nothing against the data and fails on it: a bug, or out of memory."""

    name = "broken"

    def __call__(self, reference: torch.Tensor, estimate: torch.Tensor) -> dict[str, float]:
        raise RuntimeError("CUDA out of memory")


def test_a_metric_that_cannot_judge_the_data_is_skipped_with_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    grey = torch.rand(4, 1, 8, 8) * 2 - 1
    with caplog.at_level(logging.WARNING, logger="ulframe.eval.samples"):
        out = judge_samples(_ImagesOnly(), grey, grey.flip(0), real=grey)
    assert set(out) == {"fd_samples", "speckle"}
    (record,) = caplog.records
    assert record.getMessage() == (
        "metric images_only skipped: it cannot judge examples of shape (1, 8, 8) "
        "(it takes 3-channel inputs)"
    )
    clips = torch.rand(4, 3, 2, 8, 8)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ulframe.eval.samples"):
        assert judge_samples(PSNR(), clips, clips) == {"fd_samples": 4}  # an image metric
    assert len(caplog.records) == 1 and "(it compares images)" in caplog.records[0].getMessage()
    rgb = torch.rand(4, 3, 8, 8) * 2 - 1
    assert judge_samples(_ImagesOnly(), rgb, rgb)["fd"] == 0.0  # applies: judged


def test_a_metric_failing_on_data_it_takes_stops_the_evaluation() -> None:
    rgb = torch.rand(4, 3, 8, 8) * 2 - 1
    with pytest.raises(UserError, match="weights is not set"):  # asks the user: stops
        judge_samples(_NeedsWeights(), rgb, rgb)
    with pytest.raises(RuntimeError, match="out of memory"):  # not a WARNING line
        judge_samples(_Broken(), rgb, rgb)


# ---- what a run reads before its first step --------------------------------------------------
class _Shapes:
    """Items of two shapes (no batch), decoded with the per-sample generator."""

    def __init__(self, items: tuple[int, ...] = (8, 8, 6)) -> None:
        self.items = list(items)

    def decode(self, item: int) -> dict[str, Any]:
        noise = sample_rng().uniform(-1, 1, (1, item, item)).astype(np.float32)
        return {"x": torch.from_numpy(noise), "label": 0}


def test_the_probe_batch_is_decoded_as_the_loader_decodes_and_never_fails_the_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from ulframe.train.perf import probe_batch

    first, again = probe_batch(_Shapes()), probe_batch(_Shapes())
    assert first is not None and again is not None
    assert first["x"].shape == (2, 1, 8, 8) and torch.equal(first["x"], again["x"])  # seeded
    assert torch.equal(first["x"][0], first_example(_Shapes())["x"])
    with caplog.at_level(logging.WARNING, logger="ulframe.train.perf"):
        assert probe_batch(_Shapes(), size=3) is None  # 8x8 and 6x6 examples: no batch
    (record,) = caplog.records
    assert "perf/mfu is not logged" in record.getMessage()


class _Tracking(torch.nn.Module):
    """A stage's model whose training forward updates buffers (running statistics)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(4)
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, batch: dict[str, torch.Tensor], noise: Any) -> Any:
        y = self.linear(self.norm(batch["x"].flatten(1)[:, :4]))
        return SimpleNamespace(total_nats=lambda: y.square().sum(1))


def test_counting_the_flops_leaves_the_models_buffers_as_they_were() -> None:
    from ulframe.train.perf import count_example_flops

    model = _Tracking()
    batch = {"x": torch.randn(2, 1, 4, 4), "label": torch.zeros(2, dtype=torch.long)}
    before = {k: v.clone() for k, v in model.named_buffers()}
    assert count_example_flops(model, batch) > 0
    for name, value in model.named_buffers():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters())
    model(batch, None)  # (what the count's forward did to them)
    assert not torch.equal(model.norm.running_mean, before["norm.running_mean"])


def test_the_kit_finds_a_datasets_first_example_as_a_run_does() -> None:
    from ulframe.testing.kit import Kit, _Built

    class Unreadable(_Shapes):
        def decode(self, item: int) -> dict[str, Any] | None:
            return None if item == 6 else super().decode(item)

    # the first item cannot be read: skipped, as the loader skips it
    dataset = SimpleNamespace(num_classes=1, source=lambda split: Unreadable((6, 8)))
    with Kit() as kit:
        built = _Built(product=dataset)
        kit._layout(None, built)  # type: ignore[arg-type]
        kit._labels(None, built)  # type: ignore[arg-type]


@pytest.mark.slow
def test_config_counts_a_later_stage_without_reading_the_earlier_stages_weights(
    cli: Any, tmp_path: Path
) -> None:
    workdir = tmp_path / "run"
    stage1 = ["gin/quickstart.gin", "--workdir", workdir, *gin_args(TINY_RUN)]
    trained = cli("run", *stage1, "--gin.TRAIN_SAMPLES=4")
    assert trained.returncode == 0, trained.stderr[-3000:]
    # `config` in a process of its own: the warnings it prints are those a user sees.
    done = run_cli(
        "config", "gin/quickstart.gin", "--workdir", workdir, *gin_args(TINY_RUN + TINY_STAGE2)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    start = lines.index("# parameters (networks built from one train example, on the meta device):")
    counted = [line for line in lines[start + 1 :] if line.startswith("#   stage")]
    assert [line.split(":")[0] for line in counted] == ["#   stage1", "#   stage2"]
    assert "not built" not in counted[1] and "frozen" in counted[1], counted[1]
    assert "no-op" not in done.stderr and "Warning" not in done.stderr, done.stderr[-2000:]
