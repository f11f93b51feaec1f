"""Stage 2 end to end through the CLI: `ulframe run` (both stages), again, `sample`, `eval`.

One tiny two-stage run of gin/quickstart.gin (conftest.TINY_RUN + TINY_STAGE2), its commands run
in this process (conftest.in_process_cli), shared by the tests of this module: stage order and skip-on-resume, frozen stage-1 networks bit-identical
through stage 2, the latent cache, `ulframe sample` (PNG + npz) and `ulframe eval` (JSON keys).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TINY_RUN, TINY_STAGE2, gin_args, in_process_cli

from ulframe.train import checkpoint

# One worker runs the module (`make test`: --dist loadgroup): the trained run is made once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("stage2")]
SAMPLES_N = 3
CLASS = 2


@dataclass(frozen=True)
class Trained:
    workdir: Path
    first: subprocess.CompletedProcess[str]
    again: subprocess.CompletedProcess[str]
    sample: subprocess.CompletedProcess[str]
    evaluation: subprocess.CompletedProcess[str]
    records_after_first: int


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    workdir = tmp_path_factory.mktemp("stage2") / "run"
    config = ["gin/quickstart.gin", "--workdir", str(workdir), *gin_args(TINY_RUN + TINY_STAGE2)]
    with in_process_cli() as cli:
        first = cli("run", *config)
        assert first.returncode == 0, first.stderr[-3000:]
        records = (workdir / "metrics.jsonl").read_text().count("\n")
        again = cli("run", *config)
        # The run directory describes itself: `sample WORKDIR` reads its config.gin (overrides
        # included); `eval` keeps the older form that names the gin files and overrides.
        sample = cli(
            "sample", workdir, "-n", str(SAMPLES_N), "--class", str(CLASS), "--guidance", "2",
            "--steps", "2",
        )  # fmt: skip
        evaluation = cli("eval", *config, "--batches", "1", "--fd_samples", "8")
    return Trained(workdir, first, again, sample, evaluation, records)


def test_stages_run_in_order_and_are_skipped_on_resume(trained: Trained) -> None:
    records = [
        json.loads(line) for line in (trained.workdir / "metrics.jsonl").read_text().splitlines()
    ]
    stages = [r["stage"] for r in records]
    assert stages == sorted(stages) and {"stage1", "stage2"} == set(stages)  # stage 1 first
    stage2 = [r for r in records if r["stage"] == "stage2"]
    assert any({"base_nats", "bits_per_pixel_base", "loss_nats"} <= set(r) for r in stage2)
    evals = [r for r in stage2 if r["kind"] == "eval"]
    assert evals and {"eval/base_nats", "eval/bits_per_pixel_base"} <= set(evals[-1])
    for name in ("stage1", "stage2"):
        assert (trained.workdir / "stages" / name / "DONE.json").is_file()
    assert list((trained.workdir / "stages" / "stage2" / "images").glob("samples-*.png"))

    again = trained.again
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stage stage1 already finished: skipping" in again.stderr
    assert "stage stage2 already finished: skipping" in again.stderr
    assert (trained.workdir / "metrics.jsonl").read_text().count(
        "\n"
    ) == trained.records_after_first


def test_frozen_networks_bit_identical_through_stage2(trained: Trained) -> None:
    stage1 = checkpoint.load_latest(trained.workdir / "stages" / "stage1" / "checkpoints")
    stage2 = checkpoint.load_latest(trained.workdir / "stages" / "stage2" / "checkpoints")
    assert stage1 is not None and stage2 is not None
    for copy in ("model", "ema"):
        frozen = {
            k[len("stage1.") :]: v for k, v in stage2[copy].items() if k.startswith("stage1.")
        }
        assert frozen.keys() == stage1["ema"].keys()
        for k, v in frozen.items():
            assert v.dtype == stage1["ema"][k].dtype and v.equal(stage1["ema"][k]), (copy, k)
    # Only the base model is optimised.
    n_base = sum(1 for k in stage2["model"] if k.startswith("base."))
    assert len(stage2["optimizer"]["state"]) <= n_base


def test_latent_cache_written_once(trained: Trained) -> None:
    cache = trained.workdir / "stages" / "stage2" / "latent_cache"
    assert len(list(cache.glob("latents-*.pt"))) == 1
    assert len(list(cache.glob("latents-*.json"))) == 1
    assert not list(cache.glob("*.tmp"))
    assert "encoding the train split" in trained.first.stderr


def test_sample_writes_png_and_npz(trained: Trained) -> None:
    done = trained.sample
    assert done.returncode == 0, done.stderr[-3000:]
    out = trained.workdir / "samples"
    assert (out / "samples.png").is_file()
    data = np.load(out / "samples.npz")
    images = data["images"]  # (N, H, W, C) of the quickstart's data
    assert images.shape[0] == SAMPLES_N and images.ndim == 4 and images.dtype == np.uint8
    assert data["labels"].tolist() == [CLASS] * SAMPLES_N
    assert float(data["guidance"]) == 2.0
    assert json.loads(done.stdout.strip().splitlines()[-1])["n"] == SAMPLES_N


def test_eval_prints_and_writes_the_json(trained: Trained) -> None:
    done = trained.evaluation
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"bits_per_pixel", "bits_per_pixel_base", "psnr", "ssim"} <= printed.keys()
    assert {"stage1", "stage2"} == printed["stages"].keys()
    # "fd": metrics.fd_photos between eval images and as many end-to-end samples.
    assert printed["fd_samples"] == 8 and printed["fd"] >= 0.0
    assert json.loads((trained.workdir / "eval.json").read_text()) == printed


def test_next_line_names_the_workdir_alone(trained: Trained) -> None:
    """The "next:" line of a run can be copied as it is: the workdir names its own config."""
    (line,) = [ln for ln in trained.first.stderr.splitlines() if "next: " in ln]
    commands = line.split("next: ", 1)[1]
    assert commands == f"ulframe sample {trained.workdir} -n 16 && ulframe eval {trained.workdir}"


def test_sample_and_eval_need_a_trained_workdir(cli: Any, tmp_path: Path) -> None:
    done = cli("eval", "gin/quickstart.gin", "--workdir", tmp_path / "nothing")
    assert done.returncode == 2
    assert "train it first" in done.stderr
    done = cli("sample", tmp_path, "-n", "2")  # a folder that is no run: it says so
    assert done.returncode == 2
    assert "has no config.gin" in done.stderr
