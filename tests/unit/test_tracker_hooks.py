"""The tracking hooks `hooks.wandb` and `hooks.mlflow`, offline: W&B in offline mode (its
transaction log read back record by record), MLflow with a local `file:` store (read back with its
client). Each is driven in this process through the real hookspecs by a two-step fake stage, then
resumed in the same workdir, which must continue the same tracker run.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from ulframe import cli
from ulframe.errors import ConfigError, UserError
from ulframe.eval.images import grid
from ulframe.eval.video import video_grid_frames
from ulframe.hookspecs import RunInfo, StageInfo, StepInfo, plugin_manager
from ulframe_plugins.hooks import trackers
from ulframe_plugins.hooks.tensorboard import latent_channels
from ulframe_plugins.hooks.trackers import MLflowLogger, Tracker, WandbLogger, eval_media

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "gin" / "quickstart.gin"
CONFIG = """LOSS_FACTOR = 1.5
stage1/ul_joint.loss_factor = %LOSS_FACTOR
stage1/TrainSettings.batch_size = 4
"""
FINAL = {"bits_per_pixel": 0.5, "psnr": 21.0}


def media() -> dict[str, torch.Tensor]:
    """An evaluation's entries: 4 reconstruction tiles, 4-channel latents, 2 clips of 3 frames."""
    g = torch.Generator().manual_seed(0)
    return {
        "reconstructions": torch.rand(4, 3, 8, 8, generator=g) * 2 - 1,
        "latents": torch.rand(2, 4, 4, 4, generator=g) * 2 - 1,
        "samples": torch.rand(2, 3, 3, 8, 8, generator=g) * 2 - 1,
    }


def drive(hook: Tracker, workdir: Path, start: int, end: int, is_main: bool = True) -> None:
    """A run of one stage of batches of 4 from `start` to `end` samples seen (logged every 4:
    loss 100 / samples seen, grad norms 2 and 1.5 for the encoder), evaluated at `end` (bits/pixel
    0.5, PSNR 21), through the hooks."""
    workdir.mkdir(parents=True, exist_ok=True)  # the runner prepares it
    hooks = plugin_manager([hook]).hook
    run = RunInfo(workdir, ["stage1"], CONFIG, is_main=is_main)
    stage = StageInfo("stage1", 0, workdir / "stages" / "stage1", end, start, 4, is_main)
    hooks.ulframe_run_start(run=run)
    hooks.ulframe_stage_start(run=run, stage=stage)
    for seen in range(start + 4, end + 1, 4):
        scalars = {"loss_nats": 100 / seen, "grad_norm": 2.0, "grad_norm/encoder": 1.5}
        hooks.ulframe_train_step_end(
            run=run, step=StepInfo(stage, seen // 4, seen, scalars, 0.25, 0)
        )
    hooks.ulframe_eval_end(run=run, stage=stage, samples_seen=end, scalars=FINAL, images=media())
    hooks.ulframe_stage_end(run=run, stage=stage, scalars=FINAL)
    hooks.ulframe_run_end(run=run, results={"stage1": FINAL})


# ---- what both draw ----------------------------------------------------------------------------
def test_eval_media_draws_images_latents_and_videos_as_tensorboard_does() -> None:
    x = media()
    drawn = dict(eval_media(x | {"scalar_like": torch.zeros(3)}))
    assert sorted(drawn) == ["latents", "reconstructions", "samples"]  # other ranks left out
    assert np.array_equal(drawn["reconstructions"], grid(x["reconstructions"], 8))
    latents = drawn["latents"]  # a row per example, a tile per channel: 2 x 4 tiles of 4 x 4
    assert latents.shape == (2 * 5 + 1, 4 * 5 + 1, 3)
    assert np.array_equal(latents, latent_channels(x["latents"]))
    assert np.array_equal(drawn["samples"], video_grid_frames(x["samples"]))
    assert drawn["samples"].shape == (3, 1 * 9 + 1, 2 * 9 + 1, 3)  # 2 clips side by side


# ---- Weights & Biases --------------------------------------------------------------------------
@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B silent, its settings and caches under tmp_path, no console capture, no git probe."""
    for name in ("CONFIG_DIR", "CACHE_DIR", "DATA_DIR", "ARTIFACT_DIR"):
        monkeypatch.setenv(f"WANDB_{name}", str(tmp_path / "wandb-home" / name.lower()))
    for name, value in (("SILENT", "true"), ("CONSOLE", "off"), ("DISABLE_GIT", "true")):
        monkeypatch.setenv(f"WANDB_{name}", value)
    monkeypatch.delenv("WANDB_MODE", raising=False)


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of a W&B transaction log (`run-<id>.wandb`): after a 7-byte header (":W&B",
    magic, version), LevelDB-log blocks of 32 KiB of chunks (crc 4 bytes, length 2, type 1:
    whole record, 2/3/4: first/middle/last piece), each record a `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, record = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):  # a chunk still being written
            return
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        record = chunk if kind in (1, 2) else record + chunk
        if kind in (1, 4):
            parsed = wandb_internal_pb2.Record()
            parsed.ParseFromString(record)
            yield parsed


def wandb_log(run_dir: Path) -> dict[str, Any]:
    """What one offline run recorded: its id, the history rows (key -> JSON value; media
    fields as `key/field`), its config and summary (but W&B's own entries), the files it saved."""
    (path,) = run_dir.glob("run-*.wandb")
    # W&B's service writes the log after `finish()` returns: wait for its last record, `exit`.
    deadline = time.monotonic() + 30
    while True:
        records = list(wandb_records(path))
        if records and records[-1].WhichOneof("record_type") == "exit":
            break
        assert time.monotonic() < deadline, f"{path}: no exit record after 30 s"
        time.sleep(0.05)
    out: dict[str, Any] = {"history": [], "config": {}, "summary": {}, "files": []}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["id"] = r.run.run_id
        elif kind == "history":
            items = r.history.item
            out["history"].append(
                {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in items}
            )
        elif kind in ("config", "summary"):  # W&B's own entries start with "_"
            updates = getattr(r, kind).update
            out[kind] |= {u.key: json.loads(u.value_json) for u in updates if u.key[:1] not in "_"}
        elif kind == "files":
            out["files"] += [f.path for f in r.files.files]
    return out


def test_wandb_offline_logs_the_series_media_and_hparams_and_resumes_the_run(
    tmp_path: Path, wandb_env: None
) -> None:
    workdir = tmp_path / "run"
    drive(WandbLogger(mode="offline"), workdir, 0, 8)
    run_id = (workdir / "wandb_run_id.txt").read_text().strip()
    (first,) = (workdir / "wandb").glob("offline-run-*")
    logged = wandb_log(first)
    assert logged["id"] == run_id and first.name.endswith(f"-{run_id}")

    rows = logged["history"]
    series = [(r["stage1/samples_seen"], r["stage1/train/loss_nats"]) for r in rows[:2]]
    assert series == [(4, 25.0), (8, 12.5)]
    assert [r["stage1/perf/step_time_s"] for r in rows[:2]] == [0.25, 0.25]
    assert [r["stage1/train/grad_norm/encoder"] for r in rows[:2]] == [1.5, 1.5]
    evaluation = rows[2]
    assert evaluation["stage1/samples_seen"] == 8
    assert (evaluation["stage1/eval/bits_per_pixel"], evaluation["stage1/eval/psnr"]) == (0.5, 21)
    for name in ("reconstructions", "latents", "rate_distortion"):
        assert evaluation[f"stage1/eval/{name}/_type"] == "image-file", name
    assert evaluation["stage1/eval/rate_distortion/width"] == 480
    assert evaluation["stage1/eval/samples/_type"] == "video-file"
    gif = first / "files" / evaluation["stage1/eval/samples/path"]
    with Image.open(gif) as img:  # the grid of the 2 clips, all 3 frames
        assert img.n_frames == 3 and img.size == (19, 10)

    assert logged["config"] == {"stage1/loss_factor": 1.5, "stage1/batch_size": 4}
    assert logged["summary"] == {"stage1/hparam/bits_per_pixel": 0.5, "stage1/hparam/psnr": 21}
    assert "operative_config.gin" in logged["files"]
    assert (first / "files" / "operative_config.gin").read_text() == CONFIG

    # Resumed at 8 samples: the same W&B run goes on.
    drive(WandbLogger(mode="offline"), workdir, 8, 12)
    (second,) = set((workdir / "wandb").glob("offline-run-*")) - {first}
    resumed = wandb_log(second)
    assert resumed["id"] == run_id == (workdir / "wandb_run_id.txt").read_text().strip()
    assert (
        resumed["history"][0]["stage1/samples_seen"],
        resumed["history"][0]["stage1/train/loss_nats"],
    ) == (12, 100 / 12)


# ---- MLflow ------------------------------------------------------------------------------------
@pytest.fixture
def mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No tracking URI from the caller's environment; the file store allowed (restored after)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def artifacts(client: Any, run_id: str, folder: str | None = None) -> list[str]:
    found = []
    for a in client.list_artifacts(run_id, folder):
        found += artifacts(client, run_id, a.path) if a.is_dir else [a.path]
    return found


def test_mlflow_file_store_logs_the_series_media_and_hparams_and_resumes_the_run(
    tmp_path: Path, mlflow_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    workdir = tmp_path / "run"
    drive(MLflowLogger(), workdir, 0, 8)
    client = MlflowClient(tracking_uri=(workdir / "mlruns").as_uri())  # the default store
    run_id = (workdir / "mlflow_run_id.txt").read_text().strip()
    run = client.get_run(run_id)
    assert (run.info.status, run.info.run_name) == ("FINISHED", "run")
    assert client.get_experiment(run.info.experiment_id).name == "ulframe"

    def series(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

    assert series("stage1/train/loss_nats") == [(4, 25.0), (8, 12.5)]
    assert series("stage1/perf/step_time_s") == [(4, 0.25), (8, 0.25)]
    assert series("stage1/train/grad_norm") == [(4, 2.0), (8, 2.0)]  # a file of the store, and
    assert series("stage1/train/grad_norm.encoder") == [(4, 1.5), (8, 1.5)]  # not its folder
    assert series("stage1/eval/psnr") == [(8, 21.0)]
    assert series("stage1/hparam/bits_per_pixel") == [(8, 0.5)]  # at the stage's total samples
    assert run.data.params == {"stage1/loss_factor": "1.5", "stage1/batch_size": "4"}

    files = artifacts(client, run_id)
    for name in ("reconstructions", "latents", "rate_distortion"):  # log_image(key, step)
        assert any(
            f.startswith(f"images/stage1~eval~{name}+step+8+") and f.endswith(".png") for f in files
        ), name
    assert "stage1/eval/samples-000000008.gif" in files
    assert "operative_config.gin" in files
    local = Path(
        client.download_artifacts(run_id, "stage1/eval/samples-000000008.gif", str(tmp_path))
    )
    with Image.open(local) as img:
        assert img.n_frames == 3 and img.size == (19, 10)

    # Resumed at 8 samples: the same MLflow run goes on, its rate–distortion trajectory starting
    # from the evaluations before 8 in metrics.jsonl; an interruption marks the run killed.
    row = {"kind": "eval", "stage": "stage1", "samples_seen": 4}
    row |= {"eval/bits_per_pixel": 0.9, "eval/psnr": 18.0}
    (workdir / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    drawn: list[list[tuple[float, float, str]]] = []
    real = trackers.rate_distortion_figure
    monkeypatch.setattr(
        trackers, "rate_distortion_figure", lambda pts, title: drawn.append(pts) or real(pts, title)
    )
    drive(MLflowLogger(), workdir, 8, 12)
    assert drawn == [[(0.9, 18.0, ""), (0.5, 21.0, "12")]]
    assert (workdir / "mlflow_run_id.txt").read_text().strip() == run_id
    assert series("stage1/train/loss_nats") == [(4, 25.0), (8, 12.5), (12, 100 / 12)]
    assert client.get_run(run_id).info.status == "FINISHED"
    hook = MLflowLogger()
    run_info = RunInfo(workdir, ["stage1"], CONFIG)
    hook.ulframe_run_start(run=run_info)
    assert client.get_run(run_id).info.status == "RUNNING"
    hook.ulframe_error(run=run_info, error=KeyboardInterrupt())
    assert client.get_run(run_id).info.status == "KILLED"


def test_mlflow_starts_a_new_run_when_the_kept_one_is_not_in_the_store(
    tmp_path: Path, mlflow_env: None, caplog: pytest.LogCaptureFixture
) -> None:
    from mlflow.tracking import MlflowClient

    gone = "0" * 32
    (tmp_path / "mlflow_run_id.txt").write_text(gone + "\n")
    hook = MLflowLogger(experiment="elsewhere")
    run_info = RunInfo(tmp_path, ["stage1"], CONFIG)
    hook.ulframe_run_start(run=run_info)
    hook.ulframe_error(run=run_info, error=RuntimeError("boom"))
    run_id = (tmp_path / "mlflow_run_id.txt").read_text().strip()
    assert run_id != gone
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    assert client.get_run(run_id).info.status == "FAILED"
    assert f"MLflow run {gone} not found" in caplog.text


# ---- rank 0 only; missing packages and bad values ----------------------------------------------
@pytest.mark.parametrize("make", [lambda: WandbLogger(mode="offline"), MLflowLogger])
def test_other_ranks_log_nothing(make: Any, tmp_path: Path) -> None:
    drive(make(), tmp_path, 0, 8, is_main=False)
    assert list(tmp_path.iterdir()) == []


def test_wandb_disabled_keeps_no_run_id_and_no_files(tmp_path: Path, wandb_env: None) -> None:
    drive(WandbLogger(mode="disabled"), tmp_path, 0, 8)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("hook, extra", [(WandbLogger, "wandb"), (MLflowLogger, "mlflow")])
def test_a_missing_package_is_a_config_error_with_the_install_command(
    hook: type[Tracker], extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, extra, None)  # `import wandb` raises ImportError
    with pytest.raises(ConfigError) as err:
        hook()
    assert str(err.value) == (
        f"hooks.{extra} needs the '{extra}' package, which is not installed: "
        f"pip install 'ulframe[{extra}]'"
    )


def test_a_gin_file_naming_a_missing_tracker_stops_at_config_time(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    args = ["config", str(QUICKSTART), "--gin_param", "Experiment.hooks = [@hooks.wandb()]"]
    assert cli.main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "ulframe: error: hooks.wandb needs the 'wandb' package, which is not installed: "
        "pip install 'ulframe[wandb]'\n"
    )


def test_a_tracker_that_cannot_start_a_run_is_a_one_line_user_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wandb_env: None, mlflow_env: None
) -> None:
    import wandb
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    def no_key(**kwargs: Any) -> None:
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.\n...")

    def no_server(self: Any, name: str) -> None:
        raise MlflowException("API request to http://127.0.0.1:9 failed: refused\n...")

    monkeypatch.setattr(wandb, "init", no_key)
    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", no_server)
    run = RunInfo(tmp_path, ["stage1"], CONFIG)
    with pytest.raises(UserError) as err:
        WandbLogger().ulframe_run_start(run=run)
    assert str(err.value) == (
        "hooks.wandb could not start a W&B run: No API key configured. Use `wandb login` to log "
        "in. (to log without W&B's servers: hooks.wandb.mode = 'offline')"
    )
    with pytest.raises(UserError) as err:
        MLflowLogger(tracking_uri="http://127.0.0.1:9").ulframe_run_start(run=run)
    assert str(err.value) == (
        "hooks.mlflow could not start a run at http://127.0.0.1:9: "
        "API request to http://127.0.0.1:9 failed: refused"
    )
    assert list(tmp_path.iterdir()) == []  # no run id kept


def test_bad_values_are_one_line_config_errors() -> None:
    with pytest.raises(
        ConfigError,
        match=r"^hooks\.wandb\.mode must be one of online, offline, disabled or None; got 'cloud'$",
    ):
        WandbLogger(mode="cloud")
    with pytest.raises(ConfigError, match=r"^hooks\.mlflow\.fps must be > 0; got 0$"):
        MLflowLogger(fps=0)
