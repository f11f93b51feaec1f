"""ulframe.train.posthoc_ema: EDM2's power-function EMA and its post-hoc reconstruction.

Against closed forms: σ_rel(γ) and its inverse, the discrete EMA's weights as the profile
integrated over each step, the profiles' inner product, a tracked profile reconstructed exactly
from the snapshots, an untracked one within the error stated in docs/posthoc_ema.md. Then the
training state (an exact resume; a format-1 checkpoint loads), the run files (`ulframe ema`
replaces the EMA that sample/eval/export load, a stage built on it is named stale) and bad
input (one line, exit 2).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from toy_training import Model

from ulframe.cli import main
from ulframe.errors import ConfigError, UserError
from ulframe.protocols import BuildContext
from ulframe.train import checkpoint, posthoc_ema
from ulframe.train.distributed import World
from ulframe.train.posthoc_ema import PowerEMAs
from ulframe.train.settings import TrainSettings
from ulframe.train.state import TrainState
from ulframe.train.step import Trainer, train_step

CPU = World(0, 1, 0, torch.device("cpu"))
FORMAT1 = Path(__file__).resolve().parent / "data" / "format1_stage"  # see its README.md
TRACKED = (0.05, 0.1)


# ---- the profile, closed forms --------------------------------------------------------------------
def test_sigma_rel_and_gamma_are_inverse_with_edm2s_values() -> None:
    # EDM2 (Section 3) quotes γ = 16.97 for σ_rel = 0.05 and γ = 6.94 for σ_rel = 0.10.
    assert posthoc_ema.gamma_from_sigma_rel(0.05) == pytest.approx(16.97, abs=5e-3)
    assert posthoc_ema.gamma_from_sigma_rel(0.10) == pytest.approx(6.94, abs=5e-3)
    assert posthoc_ema.sigma_rel_from_gamma(0.0) == pytest.approx(1 / math.sqrt(12), rel=1e-15)
    assert posthoc_ema.gamma_from_sigma_rel(posthoc_ema.SIGMA_REL_MAX) == pytest.approx(0, abs=1e-7)
    for sigma_rel in (0.003, 0.01, 0.05, 0.1, 0.2, 0.28):
        gamma = posthoc_ema.gamma_from_sigma_rel(sigma_rel)
        assert posthoc_ema.sigma_rel_from_gamma(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    for bad in (0.0, -0.1, 0.29):
        with pytest.raises(ValueError, match="sigma_rel must be in"):
            posthoc_ema.gamma_from_sigma_rel(bad)


def test_the_ema_weighs_each_step_by_the_profile_integrated_over_it() -> None:
    """Unrolling θ̂(t) = β θ̂(t - Δ) + (1 - β) θ(t), β = (1 - Δ/t)^(γ+1): the weights after step
    k (of n) count (t_k^(γ+1) - t_(k-1)^(γ+1)) / t_n^(γ+1), the integral of
    p(τ) = (γ+1) τ^γ / t_n^(γ+1) over the step."""
    gamma, batch, steps = posthoc_ema.gamma_from_sigma_rel(0.1), 8, 50
    weights = np.zeros(steps)
    for k in range(1, steps + 1):
        beta = posthoc_ema.power_beta(gamma, k * batch, batch)
        weights *= beta
        weights[k - 1] = 1.0 - beta
    t = batch * np.arange(steps + 1, dtype=np.float64)
    expected = np.diff(t ** (gamma + 1)) / t[-1] ** (gamma + 1)
    np.testing.assert_allclose(weights, expected, rtol=1e-12, atol=1e-300)
    assert weights.sum() == pytest.approx(1.0, rel=1e-12)


def test_the_inner_product_of_two_profiles_is_the_integral() -> None:
    def profile(gamma: float, t: float, tau: np.ndarray) -> np.ndarray:
        return np.where(tau <= t, (gamma + 1) * tau**gamma / t ** (gamma + 1), 0.0)

    for (ga, ta), (gb, tb) in [((6.94, 1.0), (16.97, 0.5)), ((0.5, 0.3), (2.0, 0.9))]:
        tau = np.linspace(0.0, min(ta, tb), 200_001)  # the product is 0 after the first end
        numeric = np.trapezoid(profile(ga, ta, tau) * profile(gb, tb, tau), tau)
        closed = float(posthoc_ema.profile_inner(ga, ta, gb, tb))
        assert closed == pytest.approx(numeric, rel=1e-5)
        assert closed == pytest.approx(float(posthoc_ema.profile_inner(gb, tb, ga, ta)), rel=1e-14)


# ---- reconstruction against directly accumulated EMAs -----------------------------------------
STEPS, BATCH, EVERY = 512, 4, 16 * 4  # 32 snapshots of two profiles: the quickstart's density


def _trajectory(dim: int = 256) -> Iterator[torch.Tensor]:
    """Weights after each step: a random walk with a drift (as SGD's weights move)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(dim, generator=gen, dtype=torch.float64)
    drift = torch.randn(dim, generator=gen, dtype=torch.float64) / STEPS
    for _ in range(STEPS):
        w = w + drift + 0.05 * torch.randn(dim, generator=gen, dtype=torch.float64)
        yield w


def _direct(sigma_rel: float) -> torch.Tensor:
    """The power-function EMA of σ_rel accumulated step by step, in float64."""
    gamma = posthoc_ema.gamma_from_sigma_rel(sigma_rel)
    ema = torch.zeros(256, dtype=torch.float64)
    for k, w in enumerate(_trajectory(), start=1):
        ema.lerp_(w, 1.0 - posthoc_ema.power_beta(gamma, k * BATCH, BATCH))
    return ema


def _snapshotted_run(stage_dir: Path) -> PowerEMAs:
    """PowerEMAs of a linear layer (weight (16, 16) = the trajectory, float32) tracked along
    the trajectory, with snapshots every EVERY samples."""
    layer = torch.nn.Linear(16, 16, bias=False)
    power = PowerEMAs(layer, TRACKED)
    for k, w in enumerate(_trajectory(), start=1):
        with torch.no_grad():
            layer.weight.copy_(w.reshape(16, 16))
        power.update(layer, k * BATCH, BATCH)
        if (k * BATCH) % EVERY == 0:
            posthoc_ema.write_snapshot(power, stage_dir, k * BATCH, BATCH, is_main=True)
    return power


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PowerEMAs]:
    stage_dir = tmp_path_factory.mktemp("run") / "stages" / "s"
    return stage_dir, _snapshotted_run(stage_dir)


def test_a_tracked_profile_is_reconstructed_exactly(snapshots: tuple[Path, PowerEMAs]) -> None:
    stage_dir, power = snapshots
    assert len(posthoc_ema.read_snapshots(stage_dir)) == STEPS * BATCH // EVERY
    for sigma_rel in TRACKED:
        rec = posthoc_ema.reconstruct(stage_dir, sigma_rel, "s")
        assert rec.fit.profile_error < 1e-6 and rec.samples_seen == STEPS * BATCH
        direct = _direct(sigma_rel).reshape(16, 16)
        tracked = power.state_dict()[posthoc_ema.profile_key(sigma_rel)]["weight"]
        assert (tracked.double() - direct).abs().max() < 1e-5  # float32 accumulation
        assert (rec.ema["weight"].double() - direct).abs().max() < 1e-5


def test_an_untracked_sigma_rel_is_reconstructed_within_the_stated_error(
    snapshots: tuple[Path, PowerEMAs],
) -> None:
    """docs/posthoc_ema.md states these errors (relative to the distance of the directly
    accumulated EMA from the last weights, i.e. to what averaging changes)."""
    stage_dir, _ = snapshots
    last = list(_trajectory())[-1]
    # (σ_rel, bound of the profile error, of the weights' error): about twice what was measured
    cases = ((0.02, 8e-2, 2e-2), (0.075, 1.8e-3, 1.2e-4), (0.15, 4.6e-3, 2.8e-4))
    for sigma_rel, profile_bound, weights_bound in cases:
        rec = posthoc_ema.reconstruct(stage_dir, sigma_rel, "s")
        direct = _direct(sigma_rel)
        error = (rec.ema["weight"].double().flatten() - direct).norm() / (direct - last).norm()
        assert rec.fit.profile_error < profile_bound
        assert error < weights_bound, (sigma_rel, float(error))


# ---- training state: exact resume, checkpoints of format 1 ------------------------------------


def _settings(sigma_rels: tuple[float, ...] = TRACKED) -> TrainSettings:
    return TrainSettings(
        batch_size=8, train_samples=64, optimizer=partial(torch.optim.Adam), lr=0.01,
        warmup_samples=0, ema_halflife_samples=8, measure_mfu=False,
        posthoc_ema_sigma_rels=sigma_rels, posthoc_ema_every_samples=16,
    )  # fmt: skip


def _batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    return [{"x": torch.randn(8, 4, generator=gen)} for _ in range(6)]


def _trainer(sigma_rels: tuple[float, ...] = TRACKED, seed: int = 0) -> Trainer:
    torch.manual_seed(seed)
    return Trainer.build(Model(), _settings(sigma_rels), CPU, seed=3)


def test_a_resumed_run_keeps_the_power_emas_bit_for_bit(tmp_path: Path) -> None:
    batches = _batches()
    whole = _trainer()
    for i, batch in enumerate(batches):
        train_step(whole, batch, 8 * i)
    first = _trainer()
    state = TrainState(first.model, first.ema, first.opt, power_ema=first.power_ema)
    for i, batch in enumerate(batches[:3]):
        train_step(first, batch, 8 * i)
    state.samples_seen = 24
    saved = state.state_dict()
    assert set(saved["power_ema"]) == {"0.05", "0.1"}
    checkpoint.save(tmp_path, 24, saved)
    resumed = _trainer(seed=1)  # other initial weights: everything comes from the checkpoint
    fresh = TrainState(resumed.model, resumed.ema, resumed.opt, power_ema=resumed.power_ema)
    loaded = checkpoint.load_latest(tmp_path)
    assert loaded is not None
    fresh.load_state_dict(loaded)
    for i, batch in enumerate(batches[3:], start=3):
        train_step(resumed, batch, 8 * i)
    assert whole.power_ema is not None and resumed.power_ema is not None
    a, b = whole.power_ema.state_dict(), resumed.power_ema.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][n], b[key][n]) for n in a[key])
    assert int(b["0.1"]["calls"]) == 6  # buffers are copied, not averaged


def test_a_format_1_checkpoint_still_loads(caplog: pytest.LogCaptureFixture) -> None:
    """tests/unit/data/format1_stage/: written before the power EMAs (no "power_ema")."""
    path = FORMAT1 / "checkpoints" / "ckpt-000000000016.pt"
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == 1 and "power_ema" not in raw
    loaded = checkpoint.load_latest(FORMAT1 / "checkpoints")
    assert loaded is not None and loaded["format"] == checkpoint.FORMAT_VERSION
    assert loaded["power_ema"] is None
    without = _trainer(sigma_rels=())
    state = TrainState(without.model, without.ema, without.opt)
    state.load_state_dict(loaded)
    assert state.samples_seen == 16 and state.state_dict()["power_ema"] is None
    assert all(torch.equal(v, raw["ema"][k]) for k, v in state.ema.state_dict().items())
    # With power EMAs on (a changed config), they restart from the checkpoint's model weights.
    with_power = _trainer()
    state = TrainState(
        with_power.model, with_power.ema, with_power.opt, power_ema=with_power.power_ema
    )
    with caplog.at_level(logging.WARNING, logger="ulframe.train.posthoc_ema"):
        state.load_state_dict(loaded)
    assert "holds no power-function EMA of sigma_rel 0.05" in caplog.text
    assert with_power.power_ema is not None
    for profile in with_power.power_ema.state_dict().values():
        assert all(torch.equal(v, raw["model"][k]) for k, v in profile.items())


def test_settings_refuse_what_cannot_be_tracked() -> None:
    with pytest.raises(ConfigError, match=r"posthoc_ema_sigma_rels: 0.3 is not in \(0, 0.2887\]"):
        TrainSettings(posthoc_ema_sigma_rels=(0.05, 0.3), posthoc_ema_every_samples=8)
    with pytest.raises(ConfigError, match="repeats a value"):
        TrainSettings(posthoc_ema_sigma_rels=(0.1, 0.1), posthoc_ema_every_samples=8)
    with pytest.raises(ConfigError, match="posthoc_ema_every_samples must be positive"):
        TrainSettings(posthoc_ema_sigma_rels=(0.1,))


# ---- the run: `ulframe ema`, what sample/eval/export load, stale stages -----------------------
class _Stage:
    """A stage whose model is `Model`; `on` names an earlier stage it is built on (loading
    that stage's EMA, as UL's stage 2 loads stage 1's encoder)."""

    def __init__(self, name: str, on: _Stage | None = None) -> None:
        self.name, self.on = name, on

    def build(self, ctx: BuildContext) -> torch.nn.Module:
        if self.on is not None:
            checkpoint.load_stage_ema(self.on, ctx, ctx.previous[self.on.name])
        return Model()


def _context(stage_dir: Path, previous: dict[str, Path]) -> BuildContext:
    return BuildContext({"x": torch.zeros(4)}, 1, torch.device("cpu"), stage_dir, previous)


@pytest.fixture(name="run")
def run_fixture(tmp_path: Path) -> Path:
    """A run: stage `first` trained with snapshots, stage `second` built on its EMA."""
    first_dir, second_dir = tmp_path / "stages" / "first", tmp_path / "stages" / "second"
    trainer = _trainer()
    state = TrainState(trainer.model, trainer.ema, trainer.opt, power_ema=trainer.power_ema)
    assert trainer.power_ema is not None
    for i, batch in enumerate(_batches()):
        train_step(trainer, batch, 8 * i)
        if i % 2:
            posthoc_ema.write_snapshot(trainer.power_ema, first_dir, 8 * i + 8, 8, True)
    state.samples_seen = 48
    checkpoint.save(checkpoint.checkpoint_dir(first_dir), 48, state.state_dict())
    second_dir.mkdir(parents=True)
    first, second = _Stage("first"), _Stage("second", on=_Stage("first"))
    second.build(_context(second_dir, {"first": first_dir}))  # before `second` trains
    checkpoint.save(checkpoint.checkpoint_dir(second_dir), 8, state.state_dict())
    assert first.name == "first"
    return tmp_path


def test_ulframe_ema_replaces_the_ema_that_sample_eval_and_export_load(
    run: Path, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    first_dir, second_dir = run / "stages" / "first", run / "stages" / "second"
    ctx = _context(first_dir, {})
    before = checkpoint.load_stage_ema(_Stage("first"), ctx, first_dir).state_dict()
    assert main(["ema", str(run), "--sigma-rel", "0.1", "--stage", "first"]) == 0
    out, err = capsys.readouterr()
    assert '"stage": "first", "sigma_rel": 0.1, "samples_seen": 48, "snapshots": 3' in out
    assert (
        err.strip()
        .splitlines()[-1]
        .endswith(
            "stage second is stale: it was trained on first's EMA at 48 samples, now replaced by "
            "first's post-hoc EMA sigma_rel=0.1 at 48 samples; retrain second (remove its folder "
            "and re-run `ulframe run`)"
        )
    )
    after = checkpoint.load_stage_ema(_Stage("first"), ctx, first_dir).state_dict()
    rec = posthoc_ema.reconstruct(first_dir, 0.1, "first")
    assert all(torch.equal(after[k], rec.ema[k]) for k in after)
    assert not torch.equal(after["a.weight"], before["a.weight"])
    out = run / "first.safetensors"
    assert main(["export", str(run), "--stage", "first", "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as exported:
        assert exported.metadata()["ema"] == "post-hoc EMA sigma_rel=0.1 at 48 samples"
        assert all(torch.equal(exported.get_tensor(k), rec.ema[k]) for k in rec.ema)
    capsys.readouterr()
    # The tracked profile at the last snapshot: the reconstruction is that profile.
    last = torch.load(posthoc_ema.read_snapshots(first_dir)[-1].path, weights_only=True)
    assert (after["a.weight"] - last["emas"]["0.1"]["a.weight"]).abs().max() < 1e-6
    # A build of the stage trained on the replaced EMA says, in one line, that it is stale.
    _Stage("second", on=_Stage("first")).build(_context(second_dir, {"first": first_dir}))
    stale = err.strip().split(" W ulframe: ")[-1]
    assert capsys.readouterr().err.strip().endswith(f" W ulframe.train.posthoc_ema: {stale}")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--sigma-rel", "0.5", "--stage", "first"],
            "--sigma-rel 0.5: a power-function EMA has sigma_rel in (0, 0.2887] (1/sqrt(12): "
            "the average of all of training)",
        ),
        (
            ["--sigma-rel", "0.01", "--stage", "first"],
            "--sigma-rel 0.01: the 3 EMA snapshots of stage first reconstruct it with a",
        ),
        (["--sigma-rel", "0.1", "--stage", "third"], "--stage 'third' is not a stage of"),
        (["--sigma-rel", "0.1", "--stage", "second"], "stage second has no EMA snapshots in"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    run: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str],
    restore_logging: None,
) -> None:  # fmt: skip
    assert main(["ema", str(run), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ulframe: error: {message}") and err.count("\n") == 1
    if "0.01" in args:  # names what is allowed
        assert "profile error (at most 5%); they reconstruct sigma_rel " in err


def test_a_run_without_snapshots_is_refused(tmp_path: Path) -> None:
    (tmp_path / "stages" / "only").mkdir(parents=True)
    with pytest.raises(UserError, match=r"no stage of .* has EMA snapshots \(ema_snapshots/\)"):
        posthoc_ema.replace_stage_ema(tmp_path, 0.1)
    with pytest.raises(UserError, match="holds no run"):
        posthoc_ema.replace_stage_ema(tmp_path / "nothing", 0.1)
