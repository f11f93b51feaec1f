"""Post-hoc EMA: power-function EMA profiles tracked during training, reconstructed afterwards.

Karras et al. 2024 ("Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2,
Section 3): instead of fixing the length of the weights' average before training, the loop
keeps a few power-function EMAs and saves them every `posthoc_ema_every_samples`; any other
length is then synthesised from those snapshots by least squares (`ulframe ema`).

Conventions. Time t is counted in training samples seen (the loop's `samples_seen`); a step of
Δ samples (the global batch) takes the weights from t - Δ to t.

The power-function EMA of exponent γ > 0 updates, after the step that ends at t,

    θ̂(t) = β(t) θ̂(t - Δ) + (1 - β(t)) θ(t),        β(t) = (1 - Δ / t) ** (γ + 1)     (`power_beta`)

so β = 0 at the first step. Unrolled, θ̂(t_n) gives the weights after step k (ending at
t_k = kΔ) the weight (t_k^(γ+1) - t_(k-1)^(γ+1)) / t_n^(γ+1): exactly the integral over that
step of the *profile*

    p_(γ, t)(τ) = (γ + 1) τ^γ / t^(γ+1)   on [0, t]   (0 after t),   ∫ p = 1,

applied to weights held constant over each step. Its relative standard deviation (the width of
the average as a fraction of t, EDM2's σ_rel) is

    σ_rel(γ) = sqrt((γ + 1) / ((γ + 2)² (γ + 3)))                     (`sigma_rel_from_gamma`)

and γ from σ_rel is the largest real root of the cubic
γ³ + 7γ² + (16 - σ_rel⁻²) γ + (12 - σ_rel⁻²) = 0 (`gamma_from_sigma_rel`). σ_rel decreases
from 1/√12 at γ = 0 (the plain average of all of training) to 0 as γ grows: `SIGMA_REL_MAX`.

Reconstruction. The inner product of two profiles is closed-form (`profile_inner`):

    <p_(γa, ta), p_(γb, tb)> = (γa + 1)(γb + 1) / (γa + γb + 1) · m^(γa+γb+1) / (ta^(γa+1) tb^(γb+1)),
    m = min(ta, tb).

Given the snapshots' profiles p_i (every tracked γ at every snapshot time), the weights x that
minimise || Σ_i x_i p_i - p_target ||² in L2([0, ∞)) solve the normal equations A x = b with
A_ij = <p_i, p_j>, b_i = <p_i, p_target> (`solve_weights`: float64, `numpy.linalg.lstsq`, times
divided by the last snapshot's). The reconstructed average is Σ_i x_i θ̂_i; by Cauchy-Schwarz its
error is at most the profile's L2 residual times the L2 norm of the weights' trajectory, so the
relative residual (`Fit.profile_error`) is what decides whether a σ_rel can be reconstructed
from a run's snapshots: at most `MAX_PROFILE_ERROR` (`reconstructible_range`).

Files, under a stage's folder:

    ema_snapshots/snapshot-<samples:012d>.pt   one snapshot: every tracked profile (`write_snapshot`)
    posthoc_ema.pt                             a reconstruction `ulframe ema` chose: sample, eval
                                               and export use its weights (`checkpoint.load_stage_ema`)
    ema_sources.json                           which EMA of each earlier stage this stage was built
                                               on (`note_source`): replacing it marks the stage stale

Parallelism: like `optim.EMA` (which each profile is), under FSDP2 every rank averages its own
shards (no communication per step); a snapshot and a checkpoint gather them.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ulframe import rundir
from ulframe.errors import UserError
from ulframe.train.optim import EMA, local_part, without_compile_prefix

log = logging.getLogger(__name__)

SIGMA_REL_MAX = 1.0 / math.sqrt(12.0)
"""σ_rel at γ = 0, the uniform average of all of training: the longest average a power
function of exponent γ >= 0 gives (σ_rel(γ) rises again for -1 < γ < 0, where γ from σ_rel
is not unique and the average weights early weights more than late ones)."""
MAX_PROFILE_ERROR = 0.05
"""The largest relative L2 residual of a reconstructed profile (`Fit.profile_error`) that
`ulframe ema` accepts: beyond it the snapshots do not hold the average asked for."""
SNAPSHOT_FORMAT = 1
SNAPSHOT_DIR = "ema_snapshots"
SNAPSHOT_PATTERN = "snapshot-{samples:012d}.pt"
POSTHOC_FILE = "posthoc_ema.pt"
SOURCES_FILE = "ema_sources.json"
_SCAN_POINTS = 200  # σ_rel values scanned by `reconstructible_range`


# ---- the power-function profile -----------------------------------------------------------------
def sigma_rel_from_gamma(gamma: float) -> float:
    """EDM2's relative standard deviation of the profile of exponent `gamma` (> -1)."""
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """The exponent γ >= 0 whose profile has relative standard deviation `sigma_rel`, in
    (0, SIGMA_REL_MAX]: the largest real root of (γ+2)²(γ+3) σ_rel² = γ + 1. Raises ValueError
    outside that range."""
    if not 0.0 < sigma_rel <= SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}], got {sigma_rel}")
    s = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    real = roots[np.abs(roots.imag) <= 1e-9 * np.maximum(1.0, np.abs(roots))].real
    return max(float(real.max()), 0.0)


def power_beta(gamma: float, samples_seen: int, batch_size: int) -> float:
    """β of the update after the step of `batch_size` samples that ends at `samples_seen`:
    (1 - Δ/t)^(γ+1) (0 at the first step: the average starts at the first weights)."""
    return (1.0 - batch_size / samples_seen) ** (gamma + 1.0)


def profile_inner(
    gamma_a: np.ndarray | float,
    t_a: np.ndarray | float,
    gamma_b: np.ndarray | float,
    t_b: np.ndarray | float,
) -> np.ndarray:
    """<p_(γa, ta), p_(γb, tb)> in L2, closed-form (module docstring), broadcast over the
    arguments; float64, computed in log space (γ of hundreds and t of billions stay finite)."""
    ga, ta = np.asarray(gamma_a, np.float64), np.asarray(t_a, np.float64)
    gb, tb = np.asarray(gamma_b, np.float64), np.asarray(t_b, np.float64)
    m = np.minimum(ta, tb)
    log_value = (
        np.log(ga + 1) + np.log(gb + 1) - np.log(ga + gb + 1)
        + (ga + gb + 1) * np.log(m) - (ga + 1) * np.log(ta) - (gb + 1) * np.log(tb)
    )  # fmt: skip
    return np.exp(log_value)


@dataclass(frozen=True)
class Fit:
    """The least-squares combination of snapshot profiles that best matches a target."""

    weights: np.ndarray  # (N,) float64, one per (snapshot, profile), in `solve_weights`' order
    profile_error: float  # || Σ x_i p_i - p_target || / || p_target || (L2)


def solve_weights(
    gammas: Sequence[float], times: Sequence[float], gamma: float, time: float
) -> Fit:
    """The weights x of the profiles (gammas[i], times[i]) whose sum best matches the profile
    (gamma, time) in L2 (the normal equations, by `numpy.linalg.lstsq` in float64), and the
    relative residual of that match."""
    g = np.asarray(gammas, np.float64)
    scale = max(float(np.max(times)), float(time))
    t = np.asarray(times, np.float64) / scale
    target_t = time / scale
    a = profile_inner(g[:, None], t[:, None], g[None, :], t[None, :])  # (N, N)
    b = profile_inner(g, t, gamma, target_t)  # (N,)
    c = float(profile_inner(gamma, target_t, gamma, target_t))
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    residual = float(x @ a @ x - 2.0 * x @ b + c)
    return Fit(x, math.sqrt(max(residual, 0.0) / c))


def reconstructible_range(
    gammas: Sequence[float], times: Sequence[float], time: float,
    max_error: float = MAX_PROFILE_ERROR,
) -> tuple[float, float] | None:  # fmt: skip
    """The smallest and largest σ_rel in (0, SIGMA_REL_MAX] (scanned on a log grid) whose
    profile at `time` the profiles (gammas, times) reconstruct within `max_error`; None when
    none is."""
    grid = np.geomspace(1e-3, SIGMA_REL_MAX, _SCAN_POINTS)
    ok = [
        float(s)
        for s in grid
        if solve_weights(gammas, times, gamma_from_sigma_rel(float(s)), time).profile_error
        <= max_error
    ]
    return (min(ok), max(ok)) if ok else None


# ---- tracking the profiles while training ---------------------------------------------------------
def profile_key(sigma_rel: float) -> str:
    """The name of a profile in checkpoints and snapshots: σ_rel as `%g` (e.g. "0.05")."""
    return f"{sigma_rel:g}"


class PowerEMAs(torch.nn.Module):
    """Power-function EMAs of a model's weights, one per σ_rel (`TrainSettings.posthoc_ema_sigma_rels`).

    Each profile is an `optim.EMA` (an eager, full copy of the model; its local shards under
    FSDP2, `track_sharded`), updated with the power-function β (`power_beta`) instead of a
    half-life; buffers are copied, not averaged. `state_dict()` is {profile_key: the profile's
    state dict}; under a sharded model it gathers (every rank must call it).
    """

    def __init__(self, model: torch.nn.Module, sigma_rels: Sequence[float]) -> None:
        super().__init__()
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(gamma_from_sigma_rel(s) for s in self.sigma_rels)
        self.profiles = torch.nn.ModuleList(EMA(model, halflife_samples=0) for _ in sigma_rels)

    def track_sharded(self, model: torch.nn.Module) -> None:
        """Average the local shards of `model`'s (sharded) parameters from now on."""
        for profile in self._emas():
            profile.track_sharded(model)

    def _emas(self) -> list[EMA]:
        return [p for p in self.profiles if isinstance(p, EMA)]

    def profiles_by_key(self) -> dict[str, EMA]:
        """Each profile under its key (`profile_key` of its σ_rel), as `state_dict` keys them."""
        return {profile_key(s): p for s, p in zip(self.sigma_rels, self._emas(), strict=True)}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, samples_seen: int, batch_size: int) -> None:
        """Average in `model`'s weights after the step of `batch_size` samples that ends at
        `samples_seen` (one `torch._foreach_lerp_` per profile, on the local shards)."""
        params = [local_part(p.detach()) for p in model.parameters() if p.is_floating_point()]
        buffers = [local_part(b) for b in model.buffers()]
        for profile, gamma in zip(self._emas(), self.gammas, strict=True):
            beta = power_beta(gamma, samples_seen, batch_size)
            # the profile's tensors: its full copy, or its local shards under FSDP2
            torch._foreach_lerp_(profile.targets(), params, 1.0 - beta)
            if buffers:
                torch._foreach_copy_(list(profile.model.buffers()), buffers)

    def sync(self) -> None:
        """Gather every profile's shards into its full copy (every rank must call it)."""
        for profile in self._emas():
            profile.sync()

    def averaged_names(self) -> list[str]:
        """The state-dict keys the profiles average (floating-point parameters); every other
        key (buffers, integer tensors) is copied from the model."""
        first = self._emas()[0].model
        return [n for n, p in first.named_parameters() if p.is_floating_point()]

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return {
            profile_key(s): p.state_dict()
            for s, p in zip(self.sigma_rels, self._emas(), strict=True)
        }

    def load_state_dict(  # type: ignore[override]
        self, state_dict: Mapping[str, Any] | None, strict: bool = True, assign: bool = False,
        model_state: Mapping[str, Any] | None = None,
    ) -> Any:  # fmt: skip
        """The inverse of `state_dict`. A profile the state lacks (a checkpoint written without
        it, or with other σ_rel) restarts from `model_state` (the training weights), with a
        warning: its snapshots then average only the training from here."""
        del assign
        state_dict = state_dict or {}
        for sigma_rel, profile in zip(self.sigma_rels, self._emas(), strict=True):
            key = profile_key(sigma_rel)
            if key in state_dict:
                profile.load_state_dict(state_dict[key], strict=strict)
            elif model_state is not None:
                log.warning(
                    "the checkpoint holds no power-function EMA of sigma_rel %s: it restarts "
                    "from the current weights (its post-hoc EMA covers only the training from "
                    "here)", key,
                )  # fmt: skip
                profile.load_state_dict(model_state, strict=strict)
            else:
                raise KeyError(f"no power-function EMA of sigma_rel {key} in the state")


def snapshot_dir(stage_dir: Path) -> Path:
    return stage_dir / SNAPSHOT_DIR


def write_snapshot(
    power: PowerEMAs, stage_dir: Path, samples_seen: int, batch_size: int, is_main: bool
) -> Path | None:
    """Save every profile at `samples_seen` to `stage_dir/ema_snapshots/` (atomically; the same
    count overwrites: a resumed run writes the same snapshot again). Every rank calls it (a
    sharded model is gathered); rank 0 (`is_main`) writes. Returns the path on rank 0."""

    emas = {key: without_compile_prefix(value) for key, value in power.state_dict().items()}
    if not is_main:
        return None
    state = {
        "format": SNAPSHOT_FORMAT,
        "samples_seen": samples_seen,
        "batch_size": batch_size,
        "sigma_rels": list(power.sigma_rels),
        "averaged": power.averaged_names(),
        "emas": emas,
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    path = snapshot_dir(stage_dir) / SNAPSHOT_PATTERN.format(samples=samples_seen)
    rundir.write_bytes(path, buf.getvalue(), durable=True)
    return path


# ---- reconstruction -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    """One snapshot file's facts (its tensors stay on disk until `reconstruct` reads them)."""

    path: Path
    samples_seen: int
    sigma_rels: tuple[float, ...]


def _load(path: Path) -> dict[str, Any]:
    """A snapshot file, its tensors memory-mapped (read when used)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a damaged or foreign file: named, not a traceback
        raise UserError(f"{path}: not a readable EMA snapshot ({type(err).__name__})") from err
    if not isinstance(state, dict) or state.get("format") != SNAPSHOT_FORMAT:
        raise UserError(f"{path}: not an EMA snapshot of format {SNAPSHOT_FORMAT}")
    return state


def read_snapshots(stage_dir: Path) -> list[Snapshot]:
    """The snapshots of a stage, oldest first (only the header of each is kept)."""
    found = []
    for path in sorted(snapshot_dir(stage_dir).glob("snapshot-*.pt")):
        state = _load(path)
        sigma_rels = tuple(float(s) for s in state["sigma_rels"])
        found.append(Snapshot(path, int(state["samples_seen"]), sigma_rels))
    return found


def _basis(snapshots: Sequence[Snapshot]) -> tuple[list[float], list[float]]:
    """(γ, t) of every profile of every snapshot, in snapshot order then profile order."""
    gammas = [gamma_from_sigma_rel(s) for snap in snapshots for s in snap.sigma_rels]
    times = [float(snap.samples_seen) for snap in snapshots for _ in snap.sigma_rels]
    return gammas, times


@dataclass(frozen=True)
class Reconstruction:
    """A post-hoc EMA: its weights (a full state dict) and how it was made."""

    sigma_rel: float
    samples_seen: int  # the time of the average: the newest snapshot's
    ema: dict[str, torch.Tensor]
    fit: Fit
    snapshots: int


def fit_snapshots(snapshots: Sequence[Snapshot], sigma_rel: float, stage: str) -> Fit:
    """The least-squares weights for the average of `sigma_rel` at the newest snapshot's time;
    a UserError of one line when σ_rel is out of (0, SIGMA_REL_MAX] or the snapshots cannot
    reconstruct it within MAX_PROFILE_ERROR (the message names the range they can)."""
    if not 0.0 < sigma_rel <= SIGMA_REL_MAX:
        raise UserError(
            f"--sigma-rel {sigma_rel}: a power-function EMA has sigma_rel in "
            f"(0, {SIGMA_REL_MAX:.4f}] (1/sqrt(12): the average of all of training)"
        )
    gammas, times = _basis(snapshots)
    end = times[-1]
    fit = solve_weights(gammas, times, gamma_from_sigma_rel(sigma_rel), end)
    if fit.profile_error > MAX_PROFILE_ERROR:
        span = reconstructible_range(gammas, times, end)
        allowed = f"{span[0]:.3g} to {span[1]:.3g}" if span else "none"
        raise UserError(
            f"--sigma-rel {sigma_rel}: the {len(snapshots)} EMA snapshots of stage {stage} "
            f"reconstruct it with a {fit.profile_error:.1%} profile error (at most "
            f"{MAX_PROFILE_ERROR:.0%}); they reconstruct sigma_rel {allowed}"
        )
    return fit


def reconstruct(stage_dir: Path, sigma_rel: float, stage: str) -> Reconstruction:
    """The post-hoc EMA of `sigma_rel` at the newest snapshot of the stage in `stage_dir`:
    Σ_i x_i θ̂_i over the averaged tensors (float64 accumulation, stored in each tensor's
    dtype); every other tensor (buffers) is the newest snapshot's. Reads one snapshot at a
    time. UserError (one line) without snapshots or for a σ_rel they cannot reconstruct."""
    snapshots = read_snapshots(stage_dir)
    if not snapshots:
        raise UserError(
            f"stage {stage} has no EMA snapshots in {snapshot_dir(stage_dir)}: train it with "
            "TrainSettings.posthoc_ema_sigma_rels (e.g. (0.05, 0.1)) and "
            "posthoc_ema_every_samples > 0"
        )
    fit = fit_snapshots(snapshots, sigma_rel, stage)
    sums: dict[str, torch.Tensor] = {}
    newest: dict[str, Any] = {}
    averaged: set[str] = set()
    index = 0
    for snap in snapshots:
        state = _load(snap.path)
        averaged = set(state["averaged"])
        for key in snap.sigma_rels:
            weight = float(fit.weights[index])
            index += 1
            newest = state["emas"][profile_key(key)]
            for name, value in newest.items():
                if name in averaged:
                    term = value.to(torch.float64) * weight
                    sums[name] = sums[name] + term if name in sums else term
    ema = {
        name: sums[name].to(value.dtype) if name in averaged else value.clone()
        for name, value in newest.items()
    }
    return Reconstruction(sigma_rel, snapshots[-1].samples_seen, ema, fit, len(snapshots))


def write_posthoc(stage_dir: Path, rec: Reconstruction) -> Path:
    """Store `rec` as the stage's EMA (`POSTHOC_FILE`), atomically."""
    state = {
        "format": SNAPSHOT_FORMAT,
        "sigma_rel": rec.sigma_rel,
        "samples_seen": rec.samples_seen,
        "profile_error": rec.fit.profile_error,
        "snapshots": rec.snapshots,
        "ema": rec.ema,
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    path = stage_dir / POSTHOC_FILE
    rundir.write_bytes(path, buf.getvalue(), durable=True)
    return path


def read_posthoc(stage_dir: Path) -> dict[str, Any] | None:
    """The post-hoc EMA `ulframe ema` wrote into the stage (keys of `write_posthoc`), or None."""
    path = stage_dir / POSTHOC_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(
            f"{path}: damaged post-hoc EMA ({type(err).__name__}); write it again with "
            "`ulframe ema` or remove it to use the run's own EMA"
        ) from err
    return dict(state)


def ema_identity(posthoc: Mapping[str, Any] | None, samples_seen: int) -> dict[str, Any]:
    """Which EMA a stage's weights are: {"sigma_rel": the post-hoc EMA's σ_rel (`posthoc`, from
    `read_posthoc`), or None for the run's own EMA; "samples_seen": the time of the average}."""
    if posthoc is None:
        return {"sigma_rel": None, "samples_seen": int(samples_seen)}
    return {"sigma_rel": float(posthoc["sigma_rel"]), "samples_seen": int(posthoc["samples_seen"])}


def describe(identity: Mapping[str, Any]) -> str:
    """An `ema_identity` in words."""
    at = f"at {identity['samples_seen']} samples"
    if identity["sigma_rel"] is None:
        return f"EMA {at}"
    return f"post-hoc EMA sigma_rel={identity['sigma_rel']:g} {at}"


# ---- stages built on another stage's EMA ------------------------------------------------------------
def note_source(
    stage_dir: Path, source_dir: Path, source_ema: Mapping[str, Any], trained: bool
) -> None:
    """A stage (in `stage_dir`) was built on the EMA `source_ema` (`ema_identity`) of the stage
    in `source_dir`. Before the stage has trained (`trained` False) that EMA is recorded
    (`SOURCES_FILE`); after, a different one is logged as one warning: the stage is stale."""
    if not stage_dir.is_dir():  # not a stage of a run (e.g. `ulframe config` counting)
        return
    path = stage_dir / SOURCES_FILE
    record = rundir.read_json_dict(path, "EMA sources record") or {}
    name, now = source_dir.name, dict(source_ema)
    if not trained:
        if record.get(name) != now:
            rundir.write_text(path, json.dumps(record | {name: now}, indent=2) + "\n")
        return
    trained_on = record.get(name)
    if isinstance(trained_on, dict) and trained_on != now:
        log.warning(stale_line(stage_dir.name, name, trained_on, now))


def stale_line(
    stage: str, source: str, trained_on: Mapping[str, Any], now: Mapping[str, Any]
) -> str:
    """The one line that names a stale stage (`note_source`, `stale_stages`)."""
    return (
        f"stage {stage} is stale: it was trained on {source}'s {describe(trained_on)}, now "
        f"replaced by {source}'s {describe(now)}; retrain {stage} (remove its folder and "
        "re-run `ulframe run`)"
    )


def stale_stages(workdir: Path, source: str, now: Mapping[str, Any]) -> list[str]:
    """One line per stage of the run recorded as built on another EMA of stage `source` than
    `now` (`note_source`)."""
    lines = []
    for path in sorted((workdir / "stages").glob(f"*/{SOURCES_FILE}")):
        record = rundir.read_json_dict(path, "EMA sources record") or {}
        trained_on = record.get(source)
        if isinstance(trained_on, dict) and trained_on != dict(now):
            lines.append(stale_line(path.parent.name, source, trained_on, now))
    return lines


# ---- `ulframe ema` ----------------------------------------------------------------------------------
def pick_stage(workdir: Path, stage: str | None) -> Path:
    """The folder of the stage `ulframe ema` reconstructs: `stage`, or the one stage of the run
    with snapshots. A UserError of one line for a folder that holds no run, an unknown stage,
    or several stages with snapshots and none named."""
    stages = workdir / "stages"
    if not stages.is_dir():
        raise UserError(f"{workdir} holds no run (no stages/ folder): train it with `ulframe run`")
    names = sorted(p.name for p in stages.iterdir() if p.is_dir())
    if stage is not None:
        if stage not in names:
            raise UserError(
                f"--stage {stage!r} is not a stage of {workdir}; its stages: {', '.join(names)}"
            )
        return stages / stage
    with_snapshots = [n for n in names if any(snapshot_dir(stages / n).glob("snapshot-*.pt"))]
    if len(with_snapshots) > 1:
        raise UserError(
            f"several stages of {workdir} have EMA snapshots; pick one with --stage: "
            f"{', '.join(with_snapshots)}"
        )
    if not with_snapshots:
        raise UserError(
            f"no stage of {workdir} has EMA snapshots ({SNAPSHOT_DIR}/): train with "
            "TrainSettings.posthoc_ema_sigma_rels (e.g. (0.05, 0.1)) and posthoc_ema_every_samples > 0"
        )
    return stages / with_snapshots[0]


def replace_stage_ema(
    workdir: Path, sigma_rel: float, stage: str | None = None
) -> tuple[dict[str, Any], list[str]]:
    """`ulframe ema`: reconstruct the post-hoc EMA of `sigma_rel` for a stage of the run in
    `workdir` and store it as the stage's EMA (`POSTHOC_FILE`, which sample, eval and export
    then use). Returns a summary and one line per stage now stale (`stale_stages`)."""
    stage_dir = pick_stage(workdir, stage)
    rec = reconstruct(stage_dir, sigma_rel, stage_dir.name)
    path = write_posthoc(stage_dir, rec)
    summary = {
        "stage": stage_dir.name,
        "sigma_rel": sigma_rel,
        "samples_seen": rec.samples_seen,
        "snapshots": rec.snapshots,
        "profile_error": rec.fit.profile_error,
        "ema": str(path),
    }
    now = ema_identity(read_posthoc(stage_dir), rec.samples_seen)
    return summary, stale_stages(workdir, stage_dir.name, now)
