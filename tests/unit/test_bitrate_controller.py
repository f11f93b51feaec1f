"""`hooks.bitrate_controller` (plugins/hooks/bitrate_controller.py) and the loss-factor buffer of
`ULJointModel` it steers.

(a) the PI update on synthetic bits/pixel sequences: it settles within 10% of the target on a
    lagged, noisy plant bpp ∝ c_lf^γ, clamps c_lf to its range, bounds each step, ignores
    non-finite measurements;
(b) the buffer: a float32 0-d buffer in the state dict, restored by load_state_dict, copied into
    the EMA model, defaulted for state dicts written before it existed; the crossing point and
    the decoder term follow it;
(c) the hook: updates the buffer from StepInfo.scalars, is a no-op for other models, restores its
    memory on resume so a resumed controller continues exactly as an uninterrupted one;
(d) `ulframe run` with the hook (tiny settings): the run finishes, the controller's file and the
    metrics record c_lf, and the checkpoint's model and EMA hold the controller's last value.
"""

from __future__ import annotations

import json
import math
import random
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ulframe.hookspecs import RunInfo, StageInfo, StepInfo
from ulframe.protocols import BuildContext
from ulframe.train import checkpoint
from ulframe.train.optim import EMA
from ulframe.train.settings import TrainSettings
from ulframe_plugins.hooks.bitrate_controller import (
    STATE_FILE,
    BitrateController,
    ControllerState,
    PIController,
)
from ulframe_plugins.networks.decoders import UViTDecoder
from ulframe_plugins.networks.encoders import ResNetEncoder
from ulframe_plugins.networks.priors import ViT
from ulframe_plugins.stages.ul_joint import ULJoint, ULJointModel

SHAPE = (3, 16, 16)  # (C, H, W)
TARGET = 0.05  # bits/pixel
SETTLE_TOLERANCE = 0.10  # the claim: within 10% of the target
UPDATES = 80


# ---------------------------------------------------------------------------------- helpers


def lagged_plant(
    controller: PIController,
    gamma: float,
    start: float = 1.5,
    updates: int = UPDATES,
    lag: float = 0.3,
    noise: float = 0.05,
    drift: float = 0.005,
    seed: int = 0,
) -> tuple[list[float], list[float]]:
    """A synthetic training run: log bpp relaxes (rate `lag` per update) towards
    log(a_k c^gamma), a_k drifting down as a training run's rate does; measured with log-normal
    noise. Returns (true bpp, c_lf) after each update."""
    rng = random.Random(seed)
    state = ControllerState(start)
    log_bpp = math.log(0.02 * start**gamma)
    bpp, loss_factor = [], []
    for k in range(updates):
        equilibrium = math.log(0.02) - drift * k + gamma * math.log(state.loss_factor)
        log_bpp += lag * (equilibrium - log_bpp)
        state = controller.update(state, math.exp(log_bpp + rng.gauss(0.0, noise)), k)
        bpp.append(math.exp(log_bpp))
        loss_factor.append(state.loss_factor)
    return bpp, loss_factor


def make_stage(loss_factor: float = 1.5) -> ULJoint:
    return ULJoint(
        encoder=partial(
            ResNetEncoder, latent_channels=4, channels=(8, 16), blocks_per_stage=(1, 1),
            patch_size=2,
        ),
        prior=partial(ViT, widths=(32,), depths=(1,), heads=2, patch_size=1),
        decoder=partial(
            UViTDecoder, channels=(16,), blocks_per_stage=1, width=32, depth=1, heads=2,
            patch_size=2,
        ),
        train=TrainSettings(batch_size=2, warmup_samples=0),
        loss_factor=loss_factor,
    )  # fmt: skip


def build(loss_factor: float = 1.5, seed: int = 0) -> ULJointModel:
    torch.manual_seed(seed)
    example: dict[str, Any] = {"x": torch.zeros(SHAPE), "label": torch.tensor(0)}
    return make_stage(loss_factor).build(BuildContext(example, 0, torch.device("cpu"), Path(".")))


def run_info(tmp_path: Path) -> RunInfo:
    return RunInfo(tmp_path, ["stage1"], "")


def stage_info(tmp_path: Path, samples_seen: int = 0, name: str = "stage1") -> StageInfo:
    stage_dir = tmp_path / "stages" / name
    stage_dir.mkdir(parents=True, exist_ok=True)
    return StageInfo(name, 0, stage_dir, 10_000, samples_seen, 16)


def step(stage: StageInfo, samples_seen: int, bpp: float) -> StepInfo:
    return StepInfo(stage, samples_seen // 16, samples_seen, {"bits_per_pixel": bpp}, 0.1, 0.0)


# ------------------------------------------------------------------ (a) the controller logic


@pytest.mark.parametrize("gamma", [1.0, 2.5, 5.0])
def test_settles_within_ten_percent_of_the_target(gamma: float):
    """Whatever the (unknown) sensitivity of the rate to c_lf, the rate ends near the target."""
    controller = PIController(TARGET)
    bpp, loss_factor = lagged_plant(controller, gamma)
    last = bpp[-20:]
    assert all(abs(b / TARGET - 1) < SETTLE_TOLERANCE for b in last), last
    # and c_lf is where the plant (without noise) gives the target
    expected = (TARGET / (0.02 * math.exp(-0.005 * (UPDATES - 1)))) ** (1 / gamma)
    assert loss_factor[-1] == pytest.approx(expected, rel=0.1)


def test_too_many_bits_lower_the_loss_factor_and_too_few_raise_it():
    controller = PIController(TARGET)
    high = controller.update(ControllerState(2.0), 4 * TARGET)
    low = controller.update(ControllerState(2.0), TARGET / 4)
    assert high.loss_factor < 2.0 < low.loss_factor
    assert controller.update(ControllerState(2.0), TARGET).loss_factor == pytest.approx(2.0)


@pytest.mark.parametrize(("bpp", "bound"), [(1e-4, 3.0), (10.0, 1.2)])
def test_clamps_to_the_loss_factor_range(bpp: float, bound: float):
    """An unreachable target pins c_lf at the nearer end of its range, and never past it."""
    controller = PIController(TARGET, min_loss_factor=1.2, max_loss_factor=3.0)
    state = ControllerState(2.0)
    for k in range(200):
        state = controller.update(state, bpp, k)
        assert 1.2 <= state.loss_factor <= 3.0
    assert state.loss_factor == bound


def test_each_update_moves_log_loss_factor_at_most_max_step():
    controller = PIController(TARGET, kp=50.0, ki=50.0, max_step=0.05)
    state = ControllerState(2.0)
    for k, bpp in enumerate([1.0, 1e-5, 1.0, 1e-5, 0.3]):
        new = controller.update(state, bpp, k)
        assert abs(math.log(new.loss_factor / state.loss_factor)) <= 0.05 + 1e-12
        state = new


@pytest.mark.parametrize("bad", [math.nan, math.inf, 0.0, -0.1])
def test_unusable_measurements_change_nothing(bad: float):
    controller = PIController(TARGET)
    state = ControllerState(2.0, math.log(0.06), 0.1, 64)
    assert controller.update(state, bad, 80) is state


def test_first_update_has_no_proportional_kick():
    """The velocity form needs the previous error; the first update uses the integral only."""
    controller = PIController(TARGET, kp=1.0, ki=0.1, smoothing=1.0)
    state = controller.update(ControllerState(2.0), 2 * TARGET)
    assert math.log(state.loss_factor / 2.0) == pytest.approx(-0.1 * math.log(2.0))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(target_bits_per_pixel=0.0),
        dict(smoothing=0.0),
        dict(smoothing=1.5),
        dict(ki=-1.0),
        dict(max_step=0.0),
        dict(min_loss_factor=3.0, max_loss_factor=2.0),
    ],
)
def test_rejects_bad_settings(kwargs: dict[str, float]):
    with pytest.raises(ValueError):
        PIController(**kwargs)


# ---------------------------------------------------------------------- (b) the buffer


def test_loss_factor_is_a_float32_scalar_buffer_in_the_state_dict():
    model = build(1.7)
    assert isinstance(model.loss_factor, torch.Tensor)
    assert model.loss_factor.shape == () and model.loss_factor.dtype == torch.float32
    assert "loss_factor" in dict(model.named_buffers())
    assert float(model.state_dict()["loss_factor"]) == pytest.approx(1.7)


def test_buffer_value_is_restored_by_load_state_dict():
    model = build(1.5)
    model.loss_factor.fill_(2.25)
    fresh = build(1.5, seed=1)
    fresh.load_state_dict(model.state_dict())
    assert float(fresh.loss_factor) == 2.25
    assert fresh.crossing_logsnr() == pytest.approx(math.log(1.25))  # b = 0: log(c - 1)


def test_state_dict_without_the_buffer_is_refused():
    """c_lf is part of the model's state: a state dict that lacks it does not load strictly."""
    state = {k: v for k, v in build(1.5).state_dict().items() if k != "loss_factor"}
    with pytest.raises(RuntimeError, match="loss_factor"):
        build(1.8).load_state_dict(state)


def test_ema_model_gets_the_buffer_value():
    model = build(1.5)
    ema = EMA(model, halflife_samples=1000)
    model.loss_factor.fill_(3.0)
    ema.update(model, batch_size=16)
    assert float(ema.model.loss_factor) == 3.0
    assert float(ema.model.state_dict()["loss_factor"]) == 3.0


def test_decoder_term_and_metrics_follow_the_buffer():
    model = build(1.5)
    x = torch.rand(2, *SHAPE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        before = model({"x": x}, torch.Generator().manual_seed(0))
        model.loss_factor.fill_(3.0)
        after = model({"x": x}, torch.Generator().manual_seed(0))
    torch.testing.assert_close(after.decoder_nats, 2.0 * before.decoder_nats)
    torch.testing.assert_close(after.prior_nats, before.prior_nats)
    assert float(after.metrics()["loss_factor"]) == 3.0
    assert float(after.metrics()["crossing_logsnr"]) == pytest.approx(math.log(2.0))
    assert float(before.metrics()["loss_factor"]) == 1.5  # a copy, not a view of the buffer


# ------------------------------------------------------------------------- (c) the hook


def test_hook_updates_the_buffer_and_writes_its_state(tmp_path: Path):
    model = build(1.5)
    hook = BitrateController(target_bits_per_pixel=TARGET)
    stage = stage_info(tmp_path)
    hook.ulframe_after_build(run=run_info(tmp_path), stage=stage, model=model)
    hook.ulframe_train_step_end(run=run_info(tmp_path), step=step(stage, 256, 4 * TARGET))
    assert float(model.loss_factor) < 1.5
    lines = (stage.stage_dir / STATE_FILE).read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["loss_factor"] == float(model.loss_factor)
    assert record["samples_seen"] == 256 and record["bits_per_pixel"] == 4 * TARGET


def test_hook_waits_for_start_samples(tmp_path: Path):
    model = build(1.5)
    hook = BitrateController(target_bits_per_pixel=TARGET, start_samples=1024)
    stage = stage_info(tmp_path)
    hook.ulframe_after_build(run=run_info(tmp_path), stage=stage, model=model)
    hook.ulframe_train_step_end(run=run_info(tmp_path), step=step(stage, 512, 4 * TARGET))
    assert float(model.loss_factor) == 1.5
    hook.ulframe_train_step_end(run=run_info(tmp_path), step=step(stage, 1024, 4 * TARGET))
    assert float(model.loss_factor) < 1.5


class NotStageOne(nn.Module):
    """A model of another stage, holding a stage-1 model inside it (as ul_base's does)."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = build(1.5)


def test_hook_is_a_no_op_in_other_stages(tmp_path: Path):
    model = NotStageOne()
    hook = BitrateController(target_bits_per_pixel=TARGET)
    stage = stage_info(tmp_path, name="stage2")
    hook.ulframe_after_build(run=run_info(tmp_path), stage=stage, model=model)
    hook.ulframe_train_step_end(run=run_info(tmp_path), step=step(stage, 256, 4 * TARGET))
    assert float(model.stage1.loss_factor) == 1.5
    assert not (stage.stage_dir / STATE_FILE).exists()


def test_hook_acts_only_in_the_named_stage(tmp_path: Path):
    model = build(1.5)
    hook = BitrateController(target_bits_per_pixel=TARGET, stage="other")
    stage = stage_info(tmp_path)
    hook.ulframe_after_build(run=run_info(tmp_path), stage=stage, model=model)
    hook.ulframe_train_step_end(run=run_info(tmp_path), step=step(stage, 256, 4 * TARGET))
    assert float(model.loss_factor) == 1.5


def drive(hook: BitrateController, stage: StageInfo, run: RunInfo, steps: list[int]) -> None:
    """Feed the hook a deterministic bits/pixel sequence at the given samples_seen values."""
    for samples in steps:
        bpp = TARGET * (2.0 + math.sin(samples / 300.0))
        hook.ulframe_train_step_end(run=run, step=step(stage, samples, bpp))


def test_resumed_controller_continues_like_an_uninterrupted_one(tmp_path: Path):
    """Kill after the checkpoint at 1024 samples (the hook saw 1280 too), restore the model from
    that checkpoint, and the controller's next updates equal the uninterrupted run's."""
    steps = list(range(256, 2049, 256))
    run = run_info(tmp_path / "a")
    straight = build(1.5)
    hook = BitrateController(target_bits_per_pixel=TARGET)
    stage_a = stage_info(tmp_path / "a")
    hook.ulframe_after_build(run=run, stage=stage_a, model=straight)
    drive(hook, stage_a, run, steps)

    run_b = run_info(tmp_path / "b")
    stage_b = stage_info(tmp_path / "b")
    first = build(1.5)
    hook_b = BitrateController(target_bits_per_pixel=TARGET)
    hook_b.ulframe_after_build(run=run_b, stage=stage_b, model=first)
    drive(hook_b, stage_b, run_b, steps[:4])  # up to 1024: the checkpoint
    checkpoint = {k: v.clone() for k, v in first.state_dict().items()}
    drive(hook_b, stage_b, run_b, steps[4:5])  # 1280: lost with the kill

    resumed = build(1.5, seed=3)
    resumed.load_state_dict(checkpoint)
    hook_c = BitrateController(target_bits_per_pixel=TARGET)
    hook_c.ulframe_after_build(run=run_b, stage=stage_info(tmp_path / "b", 1024), model=resumed)
    assert hook_c.state is not None and hook_c.state.error is not None  # memory restored
    drive(hook_c, stage_b, run_b, steps[4:])
    assert float(resumed.loss_factor) == float(straight.loss_factor)
    assert (stage_b.stage_dir / STATE_FILE).read_text() == (
        stage_a.stage_dir / STATE_FILE
    ).read_text()


def test_resume_without_the_state_file_starts_from_the_buffer(tmp_path: Path):
    model = build(1.5)
    model.loss_factor.fill_(2.5)  # as restored from a checkpoint
    hook = BitrateController(target_bits_per_pixel=TARGET)
    hook.ulframe_after_build(run=run_info(tmp_path), stage=stage_info(tmp_path, 4096), model=model)
    assert hook.state == ControllerState(2.5, None, None, 4096)


# ------------------------------------------------------------- (d) inside `ulframe run`


@pytest.mark.slow
def test_runs_inside_ulframe_run(tmp_path: Path, cli, tiny_run: list[str]):
    from conftest import gin_args

    workdir = tmp_path / "run"
    extra = gin_args(
        [
            "TRAIN_SAMPLES = 16",
            "Experiment.hooks = [@hooks.console(), @hooks.bitrate_controller()]",
            "hooks.bitrate_controller.target_bits_per_pixel = 0.01",
            "stage1/TrainSettings.eval_every_samples = 0",
        ]
    )
    done = cli("run", "gin/quickstart.gin", *tiny_run, *extra, "--workdir", workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    stage_dir = workdir / "stages" / "stage1"
    records = [json.loads(line) for line in (stage_dir / STATE_FILE).read_text().splitlines()]
    assert [r["samples_seen"] for r in records] == [4, 8, 12, 16]
    last = records[-1]["loss_factor"]
    assert last < 3.0  # the tiny net's rate is far above 0.01 bits/pixel: c_lf went down
    train = [
        json.loads(line)
        for line in (workdir / "metrics.jsonl").read_text().splitlines()
        if '"train"' in line
    ]
    assert "loss_factor" in train[-1] and train[0]["loss_factor"] == pytest.approx(3.0)
    (ckpt,) = sorted((stage_dir / "checkpoints").glob("ckpt-*16"))
    state = checkpoint.load(ckpt)
    assert float(state["model"]["loss_factor"]) == last
    # the EMA took the buffer at the last optimizer step, before the hook's last update
    assert float(state["ema"]["loss_factor"]) == records[-2]["loss_factor"]
    assert "bitrate_controller" in (workdir / "log.txt").read_text()
