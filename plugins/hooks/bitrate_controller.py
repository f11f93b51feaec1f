"""Bitrate controller: adjusts the loss factor c_lf of stage 1 so bits/pixel settles at a target.

In Unified Latents the loss factor sets the latent's bitrate (UL paper Table 2: c_lf 1.3 -> 2.1
takes bits/pixel 0.035 -> 0.116), but the rate a given c_lf yields depends on the data, the
networks and the training time. This hook turns the knob for you: a PI controller in log space,

    y_k     = log(bits/pixel of logged window k)          (training estimate, StepInfo.scalars)
    s_k     = s_{k-1} + a (y_k - s_{k-1})                 (smoothed; s_0 = y_0)
    e_k     = s_k - log(target)
    Δ_k     = -(k_p (e_k - e_{k-1}) + k_i e_k),  |Δ_k| <= max_step
    log c_k = clip(log c_{k-1} + Δ_k, log c_min, log c_max)

(the velocity form of `log c = -k_p e - k_i Σ e + const`: the clip cannot wind the integral up).
Too many bits (e > 0) lower c_lf, too few raise it. One update per logged step
(`TrainSettings.log_every_samples`): the gains are per update.

The value lives in the model: `ULJointModel.loss_factor` is a registered buffer, so it is saved in
checkpoints, restored on resume and copied into the EMA model; it is logged by the stage itself
(`loss_factor` in the train records of metrics.jsonl and in TensorBoard). The controller's own
memory (s, e) is written, one JSON line per update, to `<stage_dir>/bitrate_controller.jsonl`
(rank 0); on resume the line at the checkpoint is read back, so a resumed run updates as an
uninterrupted one would (without the file, s and e restart from the next measurement).

It acts only on stages whose model is a `ULJointModel` (stage 1); in any other stage (ul_base) it
does nothing. Switch it on in gin:

    Experiment.hooks = [@hooks.console(), @hooks.bitrate_controller()]
    hooks.bitrate_controller.target_bits_per_pixel = 0.05
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ulframe.errors import ConfigError
from ulframe.hookspecs import RunInfo, StageInfo, StepInfo, hookimpl
from ulframe_plugins.stages.ul_joint import ULJointModel

log = logging.getLogger(__name__)
STATE_FILE = "bitrate_controller.jsonl"
BITS_KEY = "bits_per_pixel"  # the training estimate in StepInfo.scalars
SAME_VALUE_RTOL = 1e-5  # a logged state belongs to the restored buffer when c_lf agrees this well


@dataclass(frozen=True)
class ControllerState:
    """What the controller carries from one update to the next.

    Attributes:
        loss_factor: c_lf after the update (the value written into the model's buffer).
        smoothed_log_bpp: s, the smoothed log bits/pixel; None before the first measurement.
        error: e = s - log(target) of the last update; None before the first.
        samples_seen: samples seen at the update (0 before the first).
    """

    loss_factor: float
    smoothed_log_bpp: float | None = None
    error: float | None = None
    samples_seen: int = 0


@dataclass(frozen=True)
class PIController:
    """The update rule, a pure function of (state, measurement): see the module docstring.

    Attributes:
        target_bits_per_pixel: the rate to settle at (bits per pixel, H·W normaliser).
        kp: proportional gain on the change of the log error (per update).
        ki: integral gain on the log error (per update).
        smoothing: a in (0, 1], weight of the new measurement in s (1: no smoothing).
        max_step: largest change of log c_lf in one update.
        min_loss_factor, max_loss_factor: the range c_lf is clipped to.
    """

    target_bits_per_pixel: float = 0.05
    kp: float = 0.5
    ki: float = 0.15
    smoothing: float = 0.5
    max_step: float = 0.1
    min_loss_factor: float = 1.0
    max_loss_factor: float = 10.0

    def __post_init__(self) -> None:
        if not self.target_bits_per_pixel > 0:
            raise ConfigError(
                f"target_bits_per_pixel must be > 0, got {self.target_bits_per_pixel}"
            )
        if not 0 < self.smoothing <= 1:
            raise ConfigError(f"smoothing must be in (0, 1], got {self.smoothing}")
        if self.kp < 0 or self.ki < 0 or self.max_step <= 0:
            raise ConfigError(
                f"kp, ki must be >= 0 and max_step > 0, got {self.kp}, {self.ki}, {self.max_step}"
            )
        if not 0 < self.min_loss_factor <= self.max_loss_factor:
            raise ConfigError(
                f"need 0 < min_loss_factor <= max_loss_factor, got "
                f"{self.min_loss_factor}, {self.max_loss_factor}"
            )

    def clip(self, loss_factor: float) -> float:
        """c_lf clipped to [min_loss_factor, max_loss_factor]."""
        return min(max(loss_factor, self.min_loss_factor), self.max_loss_factor)

    def update(
        self, state: ControllerState, bits_per_pixel: float, samples_seen: int = 0
    ) -> ControllerState:
        """The state after measuring `bits_per_pixel`; a non-finite or non-positive measurement
        changes nothing (returned as is)."""
        if not (math.isfinite(bits_per_pixel) and bits_per_pixel > 0):
            return state
        y = math.log(bits_per_pixel)
        s = y if state.smoothed_log_bpp is None else state.smoothed_log_bpp
        s = s + self.smoothing * (y - s)
        error = s - math.log(self.target_bits_per_pixel)
        previous = error if state.error is None else state.error  # no kick at the first update
        step = -(self.kp * (error - previous) + self.ki * error)
        step = min(max(step, -self.max_step), self.max_step)
        loss_factor = self.clip(math.exp(math.log(state.loss_factor) + step))
        return ControllerState(loss_factor, s, error, samples_seen)


class BitrateController:
    """Hook: steers `ULJointModel.loss_factor` so the training bits/pixel settles at a target."""

    # Its gin parameters, one keyword each (deliberately: a list of defaults that looks like other
    # constructors' shares nothing with them).
    def __init__(
        self,
        target_bits_per_pixel: float = 0.05,
        kp: float = 0.5,
        ki: float = 0.15,
        smoothing: float = 0.5,
        max_step: float = 0.1,
        min_loss_factor: float = 1.0,
        max_loss_factor: float = 10.0,
        start_samples: int = 0,
        stage: str | None = None,
    ) -> None:
        """
        Args:
            target_bits_per_pixel: the bitrate to reach (bits per pixel, H·W normaliser).
            kp: proportional gain on the change of log(bpp / target), per update.
            ki: integral gain on log(bpp / target), per update.
            smoothing: weight in (0, 1] of a new measurement in the smoothed log bits/pixel.
            max_step: largest change of log c_lf per update.
            min_loss_factor, max_loss_factor: c_lf is kept in this range.
            start_samples: no update before this many samples (the first windows of a fresh
                network measure the initialisation, not the loss factor).
            stage: only this stage (by name); None: every stage whose model is a ULJointModel.
        """
        self.controller = PIController(
            target_bits_per_pixel, kp, ki, smoothing, max_step, min_loss_factor, max_loss_factor
        )
        self.start_samples = start_samples
        self.stage = stage
        self.model: ULJointModel | None = None
        self.state: ControllerState | None = None
        self.path: Path | None = None
        self.is_main = True

    # -- lifecycle -------------------------------------------------------------------------------
    @hookimpl
    def ulframe_after_build(self, run: RunInfo, stage: StageInfo, model: torch.nn.Module) -> None:
        """Take hold of a stage-1 model (its buffer holds c_lf, restored on resume)."""
        self.model, self.state, self.path = None, None, None
        if not isinstance(model, ULJointModel) or self.stage not in (None, stage.name):
            return  # not stage 1 (ul_base, ...): a no-op
        self.model = model
        self.is_main = run.is_main
        self.path = stage.stage_dir / STATE_FILE
        current = float(model.loss_factor)
        self.state = self._restore(stage.samples_seen, current) or ControllerState(
            current, samples_seen=stage.samples_seen
        )
        log.info(
            "bitrate_controller: stage %s at %d samples, loss_factor %.4f, target %.4f bits/pixel",
            stage.name, stage.samples_seen, current, self.controller.target_bits_per_pixel,
        )  # fmt: skip

    @hookimpl
    def ulframe_train_step_end(self, run: RunInfo, step: StepInfo) -> None:
        """One controller update from the window's mean training bits/pixel."""
        if self.model is None or self.state is None or BITS_KEY not in step.scalars:
            return
        if step.samples_seen < self.start_samples:
            return
        bpp = float(step.scalars[BITS_KEY])
        new = self.controller.update(self.state, bpp, step.samples_seen)
        if new is self.state:
            log.warning("bitrate_controller: bits/pixel %r not usable: no update", bpp)
            return
        with torch.no_grad():
            self.model.loss_factor.fill_(new.loss_factor)
        # Carry the float32 value the model holds, as a resumed run reads it from the buffer.
        self.state = new = replace(new, loss_factor=float(self.model.loss_factor))
        self._write(new, bpp)
        log.info(
            "bitrate_controller: %d samples: bits/pixel %.4f (smoothed %.4f, target %.4f) -> "
            "loss_factor %.4f",
            step.samples_seen, bpp, math.exp(new.smoothed_log_bpp or 0.0),
            self.controller.target_bits_per_pixel, new.loss_factor,
        )  # fmt: skip

    @hookimpl
    def ulframe_stage_end(self, run: RunInfo, stage: StageInfo, scalars: dict[str, float]) -> None:
        if self.model is not None and self.state is not None:
            log.info(
                "bitrate_controller: stage %s ended with loss_factor %.4f",
                stage.name, self.state.loss_factor,
            )  # fmt: skip
        self.model, self.state, self.path = None, None, None

    # -- the state file --------------------------------------------------------------------------
    def _restore(self, samples_seen: int, loss_factor: float) -> ControllerState | None:
        """The logged state at `samples_seen` if it belongs to the restored c_lf; rank 0 drops
        the lines written after it (a run killed after its last checkpoint)."""
        assert self.path is not None
        kept: list[str] = []
        state = None
        if samples_seen > 0 and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut by a kill: nothing after it is valid
                if int(record["samples_seen"]) > samples_seen:
                    break
                kept.append(line)
                state = record
        if self.is_main:
            self.path.write_text("".join(line + "\n" for line in kept))
        if state is None or not math.isclose(
            state["loss_factor"], loss_factor, rel_tol=SAME_VALUE_RTOL
        ):
            return None
        return ControllerState(
            loss_factor, state["smoothed_log_bpp"], state["error"], int(state["samples_seen"])
        )

    def _write(self, state: ControllerState, bits_per_pixel: float) -> None:
        if not self.is_main or self.path is None:
            return
        record = asdict(state) | {
            "bits_per_pixel": bits_per_pixel,
            "target_bits_per_pixel": self.controller.target_bits_per_pixel,
        }
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
