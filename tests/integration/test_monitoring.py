"""Monitoring: what the TensorBoard hook writes for a tiny run, and the sweep's rate–distortion PNG.

One tiny run (the `tiny_run` overrides of gin/quickstart.gin), then its event files are read back
with TensorBoard's EventAccumulator. The sweep figure is made from two fabricated metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from ulframe_plugins.hooks.tensorboard import config_hparams, final_eval_point, main

REPO = Path(__file__).resolve().parents[2]
RunCli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.mark.slow
def test_tiny_run_writes_scalars_images_config_hparams_and_rd_figure(
    cli: RunCli, tmp_path: Path, tiny_run: list[str]
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    workdir = tmp_path / "run"
    done = cli("run", "gin/quickstart.gin", "--workdir", workdir, *tiny_run)
    assert done.returncode == 0, done.stderr[-3000:]

    scalars: dict[str, list[float]] = {}
    images: set[str] = set()
    texts: set[str] = set()
    hparams: dict[str, bytes] = {}
    for events in (workdir / "tb" / "stage1").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"tensors": 0, "images": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
        images |= set(acc.Tags()["images"])
        texts |= {t for t in acc.Tags()["tensors"] if t.startswith("config/operative")}
        with contextlib.suppress(KeyError):  # only the file add_hparams wrote has them
            hparams |= acc.PluginTagToContent("hparams")

    expected = {"train/loss_nats", "train/decoder_nats", "train/prior_nats", "train/lr"}
    expected |= {"train/bits_per_pixel", "train/grad_norm", "train/samples_per_s"}
    expected |= {"perf/step_time_s", "eval/psnr", "eval/bits_per_pixel"}
    assert expected <= set(scalars), sorted(scalars)
    for tag in expected:
        assert all(math.isfinite(v) for v in scalars[tag]), (tag, scalars[tag])

    assert {"eval/reconstructions", "eval/prior_samples", "eval/latents"} <= images
    assert "eval/rate_distortion" in images
    assert texts, "the operative config text summary is missing"
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams)
    session = hparams["_hparams_/session_start_info"]
    for name in (b"stage1", b"loss_factor", b"bias", b"latent_logsnr_max", b"lr", b"batch_size"):
        assert name in session, name
    assert any(t.startswith("hparam/") for t in scalars)

    png = workdir / "rate_distortion.png"
    with Image.open(png) as img:
        assert img.size == (480, 360)


def test_config_hparams_match_by_suffix_and_resolve_macros() -> None:
    text = "\n".join(
        [
            "LOSS_FACTOR = 1.5",
            "stage1/sigmoid.bias = 2.0",
            "stage2/sigmoid.bias = -1.0",
            "stage1/stages.ul_joint.loss_factor = %LOSS_FACTOR",
            "stage1/TrainSettings.batch_size = 4",
            "stage1/stages.ul_joint.encoder = @encoders.resnet",
            "stage1/TrainSettings.betas = (",
        ]
    )
    names = ("loss_factor", "bias", "batch_size", "encoder", "betas", "missing")
    assert config_hparams(text, names, "stage2") == {
        "loss_factor": 1.5,
        "bias": -1.0,
        "batch_size": 4,
    }
    assert config_hparams(text, ("bias",), "stage1") == {"bias": 2.0}


def _fake_run(folder: Path, points: list[tuple[float, float]]) -> None:
    folder.mkdir(parents=True)
    lines = [json.dumps({"kind": "train", "stage": "stage1", "bits_per_pixel": 9.0})]
    for i, (bpp, psnr) in enumerate(points):
        record = {"kind": "eval", "stage": "stage1", "samples_seen": 4 * (i + 1)}
        lines.append(json.dumps(record | {"eval/bits_per_pixel": bpp, "eval/psnr": psnr}))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_sweep_command_writes_one_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = tmp_path / "sweep"
    _fake_run(sweep / "lf1.5", [(2.0, 18.0), (0.8, 24.5)])
    _fake_run(sweep / "lf2.1", [(1.5, 20.0), (0.5, 21.0)])
    (sweep / "notes").mkdir()  # no metrics.jsonl: ignored
    assert final_eval_point(sweep / "lf1.5" / "metrics.jsonl") == (0.8, 24.5)

    cmd = [sys.executable, "-m", "ulframe_plugins.hooks.tensorboard", str(sweep)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    out = sweep / "rate_distortion.png"
    assert done.stdout == f"wrote {out}\n"
    with Image.open(out) as img:
        assert img.mode == "RGB" and img.size == (480, 360)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 1  # in-process: no second interpreter start
    assert "error: no run in" in capsys.readouterr().err
