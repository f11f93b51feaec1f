"""The third-party example (plugins/examples/ulframe-example), installed into a temporary target.

It extends ulframe through entry points only: `ulframe plugins` lists it, a gin file binds it, a
run uses it, with no change to ulframe. The commands run in this process with the target on
sys.path (`cli`, conftest.py); test_check_plugins.py runs a pytest of its own on it.
"""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_GIN = Path(__file__).parent / "data" / "example_plugin.gin"

RunCli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def example_modules(example_plugin: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(example_plugin.target))
    import ulframe_example.hooks
    import ulframe_example.weighting

    return ulframe_example


def test_plugins_lists_the_example_with_distribution_and_version(
    cli: RunCli, example_plugin: Any
) -> None:
    done = cli("plugins", sys_path=[example_plugin.target])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    edm = next(line for line in lines if line.startswith("  edm "))
    assert edm.split()[:3] == ["edm", "ulframe-example", "0.1.0"]
    assert "EDM weighting on log-SNR" in edm
    assert "                   p_mean=-1.2, p_std=1.2, sigma_data=0.5" in lines
    counter = next(line for line in lines if line.startswith("  example_counter "))
    assert counter.split()[:3] == ["example_counter", "ulframe-example", "0.1.0"]
    # listed under their kinds
    assert lines.index(edm) < lines.index("schedules  (bind as @schedules.NAME)")
    assert lines.index(counter) > lines.index("hooks  (bind as @hooks.NAME())")


def test_edm_weighting_matches_its_formula(example_modules: Any) -> None:
    w = example_modules.weighting.EDMWeighting()  # P_mean -1.2, P_std 1.2, sigma_data 0.5
    logsnr = torch.tensor([-15.0, -5.0, 0.0, 2.4, 10.0, 15.0], dtype=torch.float64)
    # w(λ) = N(λ; 2.4, 2.4²) (e^-λ + 0.25) / 0.25, written out independently
    expected = [
        math.exp(-0.5 * ((lam - 2.4) / 2.4) ** 2)
        / (2.4 * math.sqrt(2 * math.pi))
        * (math.exp(-lam) + 0.25)
        / 0.25
        for lam in logsnr.tolist()
    ]
    got = w(logsnr)
    assert got.shape == logsnr.shape and got.dtype == logsnr.dtype
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    batch = torch.linspace(-15, 15, 8).reshape(2, 4)  # float32, any shape
    assert w(batch).shape == (2, 4) and torch.isfinite(w(batch)).all() and (w(batch) > 0).all()
    with pytest.raises(ValueError, match="p_std > 0 and sigma_data > 0"):
        example_modules.weighting.EDMWeighting(sigma_data=0.0)


def test_example_counter_counts_and_writes(example_modules: Any, tmp_path: Path) -> None:
    from types import SimpleNamespace

    counter = example_modules.hooks.ExampleCounter(filename="c.json")
    run = SimpleNamespace(workdir=tmp_path, is_main=True)
    for samples in (4, 8):
        step = SimpleNamespace(stage=SimpleNamespace(name="stage1"), samples_seen=samples)
        counter.ulframe_train_step_end(run=run, step=step)
    counter.ulframe_run_end(run=run, results={})
    assert json.loads((tmp_path / "c.json").read_text()) == {
        "train_step_end_calls": 2,
        "per_stage": {"stage1": 2},
        "last_samples_seen": {"stage1": 8},
    }
    # a process other than rank 0 writes nothing
    counter.ulframe_run_end(run=SimpleNamespace(workdir=tmp_path / "x", is_main=False), results={})
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_gin_file_uses_the_example_in_a_run(
    cli: RunCli, example_plugin: Any, tmp_path: Path, tiny_run: list[str]
) -> None:
    workdir = tmp_path / "run"
    done = cli(
        "run", EXAMPLE_GIN, "--workdir", workdir, *tiny_run, sys_path=[example_plugin.target]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((workdir / "example_counter.json").read_text())
    # 8 samples in batches of 4, logged every 4 samples: two logged steps
    assert record == {
        "train_step_end_calls": 2,
        "per_stage": {"stage1": 2},
        "last_samples_seen": {"stage1": 8},
    }
    operative = (workdir / "operative_config.gin").read_text()
    assert "stage1/ul_joint.decoder_weighting = @weightings.edm()" in operative
    assert "edm.sigma_data = 0.5" in operative
    versions = json.loads((workdir / "versions.json").read_text())
    assert versions["ulframe-example"] == "0.1.0"
