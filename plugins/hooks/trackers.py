"""Experiment trackers: Weights & Biases (`hooks.wandb`) and MLflow (`hooks.mlflow`), rank 0 only.

Both log what `hooks.tensorboard` logs, at the same hooks: the training and evaluation scalars,
the evaluation images (grids), videos (looping GIFs of their grid), latents (a grayscale tile per
channel), the rate–distortion trajectory, the operative config and the hyperparameters. One
ulframe run is one tracker run; every key starts with the stage name (`stage1/train/loss_nats`,
`stage1/eval/psnr`), the stage's samples seen being the x axis. TensorBoard keeps stages apart as
separate runs (`tb/<stage>`) instead.

The tracker's run id is kept in the workdir (`wandb_run_id.txt`, `mlflow_run_id.txt`), so a
resumed ulframe run goes on logging to the same tracker run. Each tracker is an optional extra
(`pip install 'ulframe[wandb]'`, `'ulframe[mlflow]'`); a config that names a hook whose package
is missing fails when the hook is built, with the install command.

    Experiment.hooks = [@hooks.console(), @hooks.wandb()]
    hooks.wandb.project = 'ul-imagenet'
"""

from __future__ import annotations

import importlib
import io
import logging
import os
import tempfile
import time
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Literal

import numpy as np

from ulframe import rundir
from ulframe.errors import ConfigError, UserError
from ulframe.eval.video import DEFAULT_FPS, encode_gif
from ulframe.hookspecs import RunInfo, StageInfo, StepInfo, hookimpl
from ulframe_plugins.hooks.tensorboard import (
    DEFAULT_HPARAMS,
    DrawnEval,
    EvalLogger,
    config_hparams,
    perf_scalars,
    rate_distortion_figure,
)
from ulframe_plugins.hooks.tensorboard import eval_media as eval_media  # re-exported

log = logging.getLogger(__name__)

Status = Literal["finished", "failed", "killed"]


def require(package: str, hook: str, extra: str) -> ModuleType:
    """Import `package`, or raise a one-line `ConfigError` with the command that installs it."""
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise ConfigError(
            f"hooks.{hook} needs the '{package}' package, which is not installed: "
            f"pip install 'ulframe[{extra}]'"
        ) from err


def first_line(err: BaseException) -> str:
    """The first line of an error's message (a tracker's errors may run to many)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@dataclass(frozen=True)
class Row:
    """What a tracker logs at once: keys `<stage>/<section>/<name>`, at the stage's samples seen."""

    stage: str
    samples_seen: int
    scalars: dict[str, float]
    images: dict[str, np.ndarray] = field(default_factory=dict)  # (H, W, 3) uint8
    gifs: dict[str, bytes] = field(default_factory=dict)  # encoded animated GIFs


class Tracker(EvalLogger):
    """What a tracker logs and when; a subclass says how (`_open` ... `_close`).

    Acts on rank 0 only. The run is opened at `ulframe_run_start` (continuing the one whose id
    is in `workdir/<NAME>_run_id.txt`), and closed at `ulframe_run_end` (finished) or
    `ulframe_error` (failed; killed for a KeyboardInterrupt). At each stage's start: the
    operative config so far and the stage's hyperparameters (the operative-config parameters
    named in `hparams`, matched by suffix, under `<stage>/<name>`); at each logged step:
    `<stage>/train/*` and `<stage>/perf/*`; after each evaluation (drawn by `EvalLogger`):
    `<stage>/eval/*` scalars and media and, when it has bits/pixel and PSNR, the figure
    `<stage>/eval/rate_distortion`; at the stage's end its final evaluation as
    `<stage>/hparam/*`.
    """

    NAME: ClassVar[str]  # the gin name hooks.NAME, the package it imports and its pip extra

    def __init__(self, hparams: Sequence[str], fps: float) -> None:
        if not fps > 0:
            raise ConfigError(f"hooks.{self.NAME}.fps must be > 0; got {fps}")
        self.hparams = tuple(hparams)
        self.fps = fps
        super().__init__()
        self._module = require(self.NAME, self.NAME, self.NAME)
        self._running: bool = False

    # ---- what a tracker implements -------------------------------------------------------------
    @abstractmethod
    def _open(self, workdir: Path, run_id: str | None) -> str | None:
        """Start a run, or continue the run `run_id`; its id (None: a run that records nothing,
        whose id is not worth keeping)."""

    @abstractmethod
    def _stage(self, stage: str) -> None:
        """A stage starts: its keys `<stage>/*` are to be plotted against its samples seen."""

    @abstractmethod
    def _log(self, row: Row) -> None:
        """Scalars, (H, W, 3) uint8 images and GIF bytes at the stage's samples seen."""

    @abstractmethod
    def _config(self, text: str) -> None:
        """The operative config (gin text), replacing the one logged before."""

    @abstractmethod
    def _params(self, params: dict[str, Any]) -> None:
        """Hyperparameters (`<stage>/<name>`: value)."""

    @abstractmethod
    def _final(self, stage: str, samples_seen: int, metrics: dict[str, float]) -> None:
        """The stage's final evaluation (`<stage>/hparam/<name>`: value)."""

    @abstractmethod
    def _close(self, status: Status) -> None:
        """End the run: finished, failed, or killed (interrupted)."""

    # ---- the hooks -----------------------------------------------------------------------------
    @hookimpl
    def ulframe_run_start(self, run: RunInfo) -> None:
        if not run.is_main:
            return
        id_file = run.workdir / f"{self.NAME}_run_id.txt"
        previous = id_file.read_text().strip() if id_file.is_file() else None
        run_id = self._open(run.workdir, previous or None)
        self._running = True
        if run_id is not None and run_id != previous:
            rundir.write_text(id_file, run_id + "\n")

    @hookimpl
    def ulframe_stage_start(self, run: RunInfo, stage: StageInfo) -> None:
        if not run.is_main:
            return
        self._stage(stage.name)
        self._config(run.operative_config)
        found = config_hparams(run.operative_config, self.hparams, stage.name)
        if found:
            self._params({f"{stage.name}/{k}": v for k, v in found.items()})

    @hookimpl
    def ulframe_train_step_end(self, run: RunInfo, step: StepInfo) -> None:
        if not run.is_main:
            return
        name = step.stage.name
        scalars = {f"{name}/train/{k}": float(v) for k, v in step.scalars.items()}
        scalars |= {f"{name}/perf/{k}": v for k, v in perf_scalars(step).items()}
        self._log(Row(name, step.samples_seen, scalars))

    def _log_eval(self, run: RunInfo, stage: StageInfo, drawn: DrawnEval) -> None:
        prefix = f"{stage.name}/eval/"
        stills = {prefix + k: v for k, v in drawn.media.items() if v.ndim == 3}
        gifs = {prefix + k: encode_gif(v, self.fps) for k, v in drawn.media.items() if v.ndim != 3}
        if drawn.trajectory is not None:
            figure = rate_distortion_figure(drawn.trajectory, drawn.trajectory_title(stage))
            stills[prefix + "rate_distortion"] = np.asarray(figure)
        values = {prefix + k: float(v) for k, v in drawn.scalars.items()}
        self._log(Row(stage.name, drawn.samples_seen, values, stills, gifs))

    @hookimpl
    def ulframe_stage_end(self, run: RunInfo, stage: StageInfo, scalars: dict[str, float]) -> None:
        if run.is_main and scalars:
            metrics = {f"{stage.name}/hparam/{k}": float(v) for k, v in scalars.items()}
            self._final(stage.name, stage.total_samples, metrics)

    @hookimpl
    def ulframe_run_end(self, run: RunInfo, results: dict[str, dict[str, float]]) -> None:
        if self._running:
            self._running = False
            self._close("finished")

    @hookimpl
    def ulframe_error(self, run: RunInfo, error: BaseException) -> None:
        if self._running:
            self._running = False
            self._close("killed" if isinstance(error, KeyboardInterrupt) else "failed")


# ---- Weights & Biases --------------------------------------------------------------------------
WANDB_MODES = ("online", "offline", "disabled")


class WandbLogger(Tracker):
    """Logs to Weights & Biases (rank 0 only); needs `pip install 'ulframe[wandb]'`.

    The run's files go to `workdir/wandb/`. Images are `wandb.Image`s, videos `wandb.Video` GIFs
    (`fps` frames per second), the operative config the run file `operative_config.gin`, the
    hyperparameters the run's config and the final evaluations its summary.

    Args:
        project: the W&B project.
        entity: the team or user that owns the project (None: your default entity).
        name: the run's display name (None: the workdir's name).
        group: W&B run group, e.g. a sweep's name (None: none).
        tags: W&B run tags.
        mode: "online", "offline" (sync later with `wandb sync workdir/wandb/offline-run-*`)
            or "disabled"; None: the `WANDB_MODE` environment variable, else online.
        hparams: operative-config parameters logged as the run's config (matched by suffix).
        fps: frames per second of the videos' GIFs.
    """

    NAME = "wandb"

    def __init__(
        self,
        project: str = "ulframe",
        entity: str | None = None,
        name: str | None = None,
        group: str | None = None,
        tags: Sequence[str] = (),
        mode: str | None = None,
        hparams: Sequence[str] = DEFAULT_HPARAMS,
        fps: float = DEFAULT_FPS,
    ) -> None:
        if mode is not None and mode not in WANDB_MODES:
            raise ConfigError(
                f"hooks.wandb.mode must be one of {', '.join(WANDB_MODES)} or None; got {mode!r}"
            )
        super().__init__(hparams, fps)
        self.project, self.entity, self.name, self.group = project, entity, name, group
        self.tags, self.mode = list(tags), mode
        self._run: Any = None

    def _open(self, workdir: Path, run_id: str | None) -> str | None:
        wandb = self._module
        try:
            self._run = wandb.init(
                project=self.project, entity=self.entity, name=self.name or workdir.name,
                group=self.group, tags=self.tags, mode=self.mode, dir=str(workdir),
                id=run_id, resume="allow",
            )  # fmt: skip
        except wandb.errors.Error as err:  # no API key, no connection, an unknown entity
            raise UserError(
                f"hooks.wandb could not start a W&B run: {first_line(err)} "
                "(to log without W&B's servers: hooks.wandb.mode = 'offline')"
            ) from err
        return None if self._run.disabled else str(self._run.id)

    def _stage(self, stage: str) -> None:
        self._run.define_metric(f"{stage}/samples_seen")
        self._run.define_metric(f"{stage}/*", step_metric=f"{stage}/samples_seen")

    def _log(self, row: Row) -> None:
        wandb = self._module
        values: dict[str, Any] = {f"{row.stage}/samples_seen": row.samples_seen, **row.scalars}
        values |= {k: wandb.Image(v) for k, v in row.images.items()}
        values |= {k: wandb.Video(io.BytesIO(v), format="gif") for k, v in row.gifs.items()}
        self._run.log(values)

    def _config(self, text: str) -> None:
        if self._run.disabled:  # no run folder
            return
        path = Path(self._run.dir) / "operative_config.gin"
        path.write_text(text)
        self._run.save(str(path), base_path=self._run.dir, policy="live")

    def _params(self, params: dict[str, Any]) -> None:
        self._run.config.update(params, allow_val_change=True)

    def _final(self, stage: str, samples_seen: int, metrics: dict[str, float]) -> None:
        self._run.summary.update(metrics)

    def _close(self, status: Status) -> None:
        self._run.finish(exit_code=0 if status == "finished" else 1)
        self._run = None


# ---- MLflow ------------------------------------------------------------------------------------
MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}


def metric_key(key: str) -> str:
    """`<stage>/<section>/<name>` with the slashes inside the scalar's name written as dots:
    `stage1/train/grad_norm/encoder` -> `stage1/train/grad_norm.encoder`.

    MLflow's file store keeps each metric in a file at its key's path, so a key cannot also be
    the folder of others (`grad_norm` beside `grad_norm/encoder`); the same keys go to every
    store, so runs compare whatever the store.
    """
    stage, section, name = key.split("/", 2)
    return f"{stage}/{section}/{name.replace('/', '.')}"


class MLflowLogger(Tracker):
    """Logs to MLflow (rank 0 only); needs `pip install 'ulframe[mlflow]'` (the skinny client).

    Scalars are metrics at step = the stage's samples seen, a slash inside a scalar's name
    written as a dot (`stage1/train/grad_norm.encoder`: `metric_key`); images are logged with
    `log_image(key=..., step=...)` (the UI's step slider); videos are GIF artifacts
    `<stage>/eval/<name>-<samples seen>.gif`; the operative config is the artifact
    `operative_config.gin`; the hyperparameters are run parameters (MLflow keeps a parameter's
    first value: one changed by a resume with another config is not updated, with a warning).

    Args:
        tracking_uri: where runs are stored: a server (`http://host:5000`), a database, or a
            local `file:` folder. None: the `MLFLOW_TRACKING_URI` environment variable, else
            `file:<workdir>/mlruns`. The file store needs `MLFLOW_ALLOW_FILE_STORE=true` since
            MLflow 3 (which keeps it in maintenance); the hook sets it for a `file:` URI.
        experiment: the MLflow experiment (created if missing).
        run_name: the run's name (None: the workdir's name).
        hparams: operative-config parameters logged as run parameters (matched by suffix).
        fps: frames per second of the videos' GIFs.
    """

    NAME = "mlflow"

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "ulframe",
        run_name: str | None = None,
        hparams: Sequence[str] = DEFAULT_HPARAMS,
        fps: float = DEFAULT_FPS,
    ) -> None:
        super().__init__(hparams, fps)
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self._client: Any = None
        self._run_id = ""

    def _open(self, workdir: Path, run_id: str | None) -> str:
        from mlflow.exceptions import MlflowException

        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        uri = uri or (workdir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            self._run_id = self._start(uri, workdir, run_id)
        except MlflowException as err:  # no server there, a store MLflow refuses
            raise UserError(
                f"hooks.mlflow could not start a run at {uri}: {first_line(err)}"
            ) from err
        return self._run_id

    def _start(self, uri: str, workdir: Path, run_id: str | None) -> str:
        """The run `run_id` set running again, or, when the store has no such run, a new one."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self._client = client = MlflowClient(tracking_uri=uri)
        if run_id is not None:
            try:
                client.update_run(run_id, status="RUNNING")
                return run_id
            except MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning("MLflow run %s not found at %s; starting a new run", run_id, uri)
        found = client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(self.experiment)
        tags = {"ulframe.workdir": str(workdir.resolve())}
        created = client.create_run(
            experiment_id, run_name=self.run_name or workdir.name, tags=tags
        )
        return str(created.info.run_id)

    def _stage(self, stage: str) -> None:
        """Nothing to declare: a metric's step is the samples seen it is logged at."""

    def _log(self, row: Row) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(metric_key(k), v, now, row.samples_seen) for k, v in row.scalars.items()]
        self._client.log_batch(self._run_id, metrics=metrics)
        for key, image in row.images.items():
            self._client.log_image(self._run_id, image, key=key, step=row.samples_seen)
        if row.gifs:
            with tempfile.TemporaryDirectory() as tmp:
                for key, data in row.gifs.items():
                    folder, _, name = key.rpartition("/")
                    path = Path(tmp) / f"{name}-{row.samples_seen:09d}.gif"
                    path.write_bytes(data)
                    self._client.log_artifact(self._run_id, str(path), artifact_path=folder)

    def _config(self, text: str) -> None:
        self._client.log_text(self._run_id, text, "operative_config.gin")

    def _params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        try:
            self._client.log_batch(
                self._run_id, params=[Param(k, str(v)) for k, v in params.items()]
            )
        except MlflowException as err:  # a value changed since the run was first logged
            log.warning("MLflow keeps the first value of a parameter; not updated: %s", err)

    def _final(self, stage: str, samples_seen: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(metric_key(k), v, now, samples_seen) for k, v in metrics.items()]
        self._client.log_batch(self._run_id, metrics=batch)

    def _close(self, status: Status) -> None:
        self._client.set_terminated(self._run_id, status=MLFLOW_STATUS[status])
        self._client = None
