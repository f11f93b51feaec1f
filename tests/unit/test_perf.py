"""ulframe.train.perf: FLOPs of a training step, the matmul rate, and the MFU a run logs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ulframe import cli
from ulframe.errors import ConfigError
from ulframe.train import perf
from ulframe.train.settings import TrainSettings

QUICKSTART = Path(__file__).resolve().parents[2] / "gin" / "quickstart.gin"


def test_flops_of_a_linear_layer_forward_and_backward_are_six_in_out_batch() -> None:
    batch, n_in, n_out = 8, 12, 5
    layer = torch.nn.Linear(n_in, n_out)
    x = torch.randn(batch, n_in, requires_grad=True)  # so the input's gradient is computed too
    flops = perf.train_flops(lambda: layer(x).square().sum())
    # forward 2·B·in·out, backward: the weight's and the input's gradients, 2·B·in·out each
    assert flops == 6 * n_in * n_out * batch
    assert layer.weight.grad is not None and x.grad is not None


def test_attention_on_cpu_is_counted_as_torch_counts_it_on_cuda() -> None:
    # torch's sdpa formulas: forward two matmuls, Q·Kᵀ and P·V, 2·B·H·L·S·D each; backward
    # five (the scores recomputed, then the gradients of P, V, Q and K)
    batch, heads, length, source, dim = 2, 3, 5, 7, 8
    q = torch.randn(batch, heads, length, dim, requires_grad=True)
    k = torch.randn(batch, heads, source, dim, requires_grad=True)
    v = torch.randn(batch, heads, source, dim, requires_grad=True)
    unit = batch * heads * length * source * dim
    counter = FlopCounterMode(display=False)
    with counter:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 4 * unit
    flops = perf.train_flops(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v).sum()
    )
    assert flops == (4 + 10) * unit
    assert out.shape == (batch, heads, length, dim)


def test_the_matmul_rate_is_a_positive_flop_rate() -> None:
    rate = perf.measure_matmul_rate(torch.device("cpu"), torch.float32, seconds=0.02)
    assert math.isfinite(rate) and rate > 1e6


def test_mfu_is_model_flops_per_device_over_the_peak() -> None:
    scalars = perf.mfu_scalars(2e9, samples_per_s=100.0, world_size=2, peak_flops=1e12)
    assert scalars["perf/model_tflops_per_s"] == pytest.approx(0.1)  # 2e9 · 100 / 2 devices
    assert scalars["perf/mfu"] == pytest.approx(0.1)
    assert perf.mfu_scalars(0.0, 100.0, 1, 1e12) == {}  # FLOPs unknown: nothing logged


def test_peak_flops_must_not_be_negative() -> None:
    with pytest.raises(ConfigError, match="peak_flops"):
        TrainSettings(peak_flops=-1.0)


def test_a_run_logs_model_flops_and_mfu_with_the_training_scalars(
    tmp_path: Path, tiny_run: list[str], tiny_threads: None, restore_logging: None
) -> None:
    workdir = tmp_path / "run"
    args = ["run", str(QUICKSTART), "--workdir", str(workdir), *tiny_run]
    args += ["--gin_param", "Experiment.hooks = []"]
    args += ["--gin_param", "stage1/TrainSettings.measure_mfu = True"]  # (tiny runs: off)
    args += ["--gin_param", "stage1/TrainSettings.peak_flops = 1e9"]  # a given peak: no probe
    assert cli.main(args) == 0
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert train
    for row in train:
        assert row["perf/model_tflops_per_s"] > 0
        # one process: MFU = model FLOP/s / the peak given
        assert row["perf/mfu"] == pytest.approx(row["perf/model_tflops_per_s"] * 1e12 / 1e9)


def test_a_run_without_measure_mfu_neither_counts_nor_probes(
    tmp_path: Path,
    tiny_run: list[str],
    tiny_threads: None,
    restore_logging: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("measured although TrainSettings.measure_mfu = False")

    monkeypatch.setattr(perf, "train_flops", refuse)
    monkeypatch.setattr(perf, "matmul_rate", refuse)
    workdir = tmp_path / "run"
    args = ["run", str(QUICKSTART), "--workdir", str(workdir), *tiny_run]
    args += ["--gin_param", "Experiment.hooks = []", "--gin_param", "TRAIN_SAMPLES = 4"]
    assert "TrainSettings.measure_mfu = False" in " ".join(tiny_run)
    assert cli.main(args) == 0
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert train and not any(k.startswith("perf/") for r in train for k in r)
