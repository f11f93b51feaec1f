"""The higher-order samplers (dpmpp_2m, heun, unipc, dpmpp_2m_sde) against closed forms, and how
they are used.

For data ``x ~ N(mu, s² I)`` under the variance-preserving process (``alpha² = sigmoid(λ)``,
``sigma² = sigmoid(-λ)``) the exact denoiser is ``E[x | z] = mu + c (z - alpha mu)`` with
``c = alpha s² / v``, ``v = alpha² s² + sigma²`` the marginal variance, and the probability-flow
ODE maps ``z_t`` to ``z_s = alpha_s mu + sqrt(v_s / v_t) (z_t - alpha_t mu)`` exactly (its
vector field is affine in z, so its flow is the affine map between the two Gaussian marginals
that keeps their orientation). Every deterministic solver is measured against that map.

Guidance of two such models with one variance is again such a model: ``eps_u + w (eps_c -
eps_u)`` is the exact eps of ``N(mu_u + w (mu_c - mu_u), s²)``, so guided sampling has a closed
form too.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch

from ulframe import cli, trained
from ulframe.diffusion import (
    CosineSchedule,
    EpsFn,
    LinearSchedule,
    Sampler,
    ShiftedCosineSchedule,
    alpha_sigma,
    eps_from_x,
    expand_like,
    logsnr_grid,
    sample_ancestral,
    sample_ddim,
    x_from_eps,
)
from ulframe.diffusion.samplers import (
    ancestral_step,
    logsnr_uniform_grid,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_heun,
    sample_unipc,
    sampler_grid,
)
from ulframe.errors import ConfigError, UserError
from ulframe.train.settings import TrainSettings
from ulframe_plugins.stages.sampling import guided_eps_fn, sample_latents
from ulframe_plugins.stages.ul_base import ULBase, ULBaseModel

F64 = torch.float64
MU, STD = 0.3, 0.5
SOLVERS: dict[str, Sampler] = {
    "dpmpp_2m": sample_dpmpp_2m,
    "heun": sample_heun,
    "unipc": sample_unipc,
}
DETERMINISTIC: dict[str, Sampler] = {"ddim": sample_ddim, **SOLVERS}
# Two chains of UL: the decoder's (λ from -15 to 15, ends on x_hat) and a latent chain's
# (the prior's or the base model's, λ from -15 to λ_z(0) = 5, ends on its state).
DECODER = (CosineSchedule(-15.0, 15.0), "x_hat")
LATENT = (CosineSchedule(-15.0, 5.0), "state")
# Orders seen on the decoder's chain as steps double 32 -> 64 -> 128. Every solver's last step
# is first order, but there (λ >= 13) the exact denoiser's estimate barely moves (its change is
# of order sigma² ~ e^-λ), so UniPC's third order (UniP-2 with its UniC corrector) shows.
ORDERS = {"ddim": 1.0, "dpmpp_2m": 2.0, "heun": 2.0, "unipc": 3.0}
# Largest error at 64 steps against the exact solution (data std 0.5; the x_1 of |x_1| < 3.5).
TOLERANCE_64 = {
    ("dpmpp_2m", "x_hat"): 1e-2,
    ("heun", "x_hat"): 2e-2,
    ("unipc", "x_hat"): 3e-3,
    ("dpmpp_2m", "state"): 3e-3,
    ("heun", "state"): 1e-2,
    ("unipc", "state"): 1e-3,
}


def gaussian_eps_fn(mu: float = MU, s: float = STD) -> EpsFn:
    """Exact eps prediction for data N(mu, s² I)."""

    def eps_fn(z_t: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        assert logsnr.shape == (z_t.shape[0],)
        alpha, sigma = alpha_sigma(expand_like(logsnr, z_t))
        x_hat = mu + alpha * s**2 / (alpha**2 * s**2 + sigma**2) * (z_t - alpha * mu)
        return eps_from_x(z_t, x_hat, logsnr)

    return eps_fn


def exact_flow(
    z_1: torch.Tensor, logsnr_1: float, logsnr_0: float, final: str, mu: float = MU
) -> torch.Tensor:
    """The probability-flow ODE's exact solution at λ_0 from z_1 at λ_1, for N(mu, STD²) data;
    its state there (``final="state"``) or the exact denoiser's estimate of it (``"x_hat"``)."""
    ends = torch.tensor([logsnr_1, logsnr_0], dtype=F64)
    alpha, sigma = alpha_sigma(ends)
    var = alpha**2 * STD**2 + sigma**2
    z_0 = alpha[1] * mu + (var[1] / var[0]).sqrt() * (z_1 - alpha[0] * mu)
    if final == "state":
        return z_0
    logsnr = torch.full((z_1.shape[0],), logsnr_0, dtype=F64)
    return x_from_eps(z_0, gaussian_eps_fn(mu)(z_0, logsnr), logsnr)


def _x_1(shape: tuple[int, ...] = (1000, 1), seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _error(name: str, steps: int, schedule: CosineSchedule, final: str) -> float:
    sampler = DETERMINISTIC[name]
    x_1 = _x_1()
    grid = sampler_grid(sampler, schedule, steps)
    out = sampler(gaussian_eps_fn(), x_1, grid, final=final)
    exact = exact_flow(x_1, schedule.logsnr_min, schedule.logsnr_max, final)
    return float((out - exact).abs().max())


# ----------------------------------------------------------------------------- grids


def test_grids_ddim_and_ancestral_keep_the_time_grid() -> None:
    """ddim / ancestral step on λ(t) at t evenly spaced, exactly as before: run numbers hold."""
    for sampler in (sample_ddim, sample_ancestral):
        assert torch.equal(sampler_grid(sampler, DECODER[0], 8), logsnr_grid(DECODER[0], 8))


@pytest.mark.parametrize(
    "schedule",
    [CosineSchedule(-15.0, 5.0), ShiftedCosineSchedule(-15.0, 15.0, 32), LinearSchedule(-9, 3)],
    ids=["cosine", "shifted", "linear"],
)
def test_grids_solvers_step_evenly_in_logsnr(schedule: Any) -> None:
    for sampler in SOLVERS.values():
        assert sampler.grid == "logsnr"  # type: ignore[attr-defined]
        grid = sampler_grid(sampler, schedule, 8)
        assert grid.shape == (9,) and grid.dtype == F64
        ends = schedule.logsnr(torch.tensor([1.0, 0.0], dtype=F64))
        assert grid[0].item() == ends[0].item() and grid[-1].item() == pytest.approx(ends[1].item())
        step = (ends[1] - ends[0]).item() / 8
        torch.testing.assert_close(grid.diff(), torch.full((8,), step, dtype=F64))


def test_grids_bad_steps_and_bad_declaration() -> None:
    with pytest.raises(ConfigError, match="steps must be >= 1, got 0"):
        logsnr_uniform_grid(DECODER[0], 0)

    def odd(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError

    odd.grid = "karras"  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="grid 'karras'; a grid must be one of"):
        sampler_grid(odd, DECODER[0], 4)


# ----------------------------------------------------------------------------- Gaussian data


@pytest.mark.parametrize("name", list(DETERMINISTIC))
def test_error_falls_at_the_solvers_order(name: str) -> None:
    errors = [_error(name, steps, *DECODER) for steps in (32, 64, 128)]
    slopes = [math.log2(a / b) for a, b in itertools.pairwise(errors)]
    assert all(abs(slope - ORDERS[name]) < 0.3 for slope in slopes), (errors, slopes)


@pytest.mark.parametrize("chain", [DECODER, LATENT], ids=["decoder", "latent"])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_64_steps_match_the_exact_probability_flow(name: str, chain: tuple[Any, str]) -> None:
    schedule, final = chain
    assert _error(name, 64, schedule, final) < TOLERANCE_64[(name, final)]
    # The multistep solvers make one model call per step, as DDIM does (on its grid even in t):
    # at 64 calls they are at least 4 times closer. (Heun's 64 calls, 32 steps, are not.)
    if name != "heun":
        assert _error(name, 64, schedule, final) < _error("ddim", 64, schedule, final) / 4


@pytest.mark.parametrize("name", list(SOLVERS))
def test_one_step_is_the_ddim_step(name: str) -> None:
    """A single step is both the first and the last: first order, i.e. DDIM's step."""
    x_1 = _x_1((16, 2, 3))
    grid = torch.tensor([-6.0, 1.5], dtype=F64)
    for final in ("state", "x_hat"):
        expected = sample_ddim(gaussian_eps_fn(), x_1, grid, final=final)
        got = SOLVERS[name](gaussian_eps_fn(), x_1, grid, final=final)
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_float32_and_an_uneven_grid(name: str) -> None:
    """Any increasing grid works (the kit's is even in t), in float32 too."""
    x_1 = _x_1((500, 1, 2, 2)).float()
    schedule, final = DECODER
    grid = logsnr_grid(schedule, 96).float()
    out = SOLVERS[name](gaussian_eps_fn(), x_1, grid, final=final)
    assert out.dtype == torch.float32
    exact = exact_flow(x_1.double(), -15.0, 15.0, final)
    assert float((out.double() - exact).abs().max()) < 2e-2


# ----------------------------------------------------------------------------- the SDE solver


def test_sde_solver_without_noise_is_2m_and_its_first_step_is_ancestral() -> None:
    """eta = 0 is DPM-Solver++ 2M (on the same grid); with eta = 1 a single step (first order)
    is the ancestral step, drawing the same noise."""
    x_1 = _x_1((64, 2))
    schedule, final = LATENT
    grid = logsnr_grid(schedule, 12)
    got = sample_dpmpp_2m_sde(gaussian_eps_fn(), x_1, grid, final=final, eta=0.0)
    expected = sample_dpmpp_2m(gaussian_eps_fn(), x_1, grid, final=final)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)

    one = torch.tensor([-6.0, 1.5], dtype=F64)
    got = sample_dpmpp_2m_sde(gaussian_eps_fn(), x_1, one, torch.Generator().manual_seed(3),
                              final="state")  # fmt: skip
    noise = torch.randn(x_1.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    x_hat = x_from_eps(x_1, gaussian_eps_fn()(x_1, one[:1].expand(64)), one[0])
    expected = ancestral_step(x_1, x_hat, one[:1].expand(64), one[1:].expand(64), noise)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("chain", [DECODER, LATENT], ids=["decoder", "latent"])
def test_sde_solver_samples_the_gaussian(chain: tuple[Any, str], eta: float) -> None:
    """For data N(mu, s²) the chain's output is N(mu, s²) (``x_hat`` at λ = 15) or the marginal
    at λ_z(0) = 5 (``state``): at 64 steps within the Monte-Carlo error of 100k draws plus a
    small discretisation error, which is smaller than at 16 steps."""
    schedule, final = chain
    ends = alpha_sigma(torch.tensor(schedule.logsnr_max, dtype=F64))
    mean = MU if final == "x_hat" else float(ends[0]) * MU
    var = STD**2 if final == "x_hat" else float(ends[0] ** 2 * STD**2 + ends[1] ** 2)
    errors = []
    for steps in (16, 64):
        generator = torch.Generator().manual_seed(0)
        x_1 = torch.randn(100_000, 1, generator=generator, dtype=F64)
        grid = sampler_grid(sample_dpmpp_2m_sde, schedule, steps)
        out = sample_dpmpp_2m_sde(gaussian_eps_fn(), x_1, grid, generator, final=final, eta=eta)
        assert abs(float(out.mean()) - mean) < 0.005
        errors.append(abs(float(out.var()) - var))
    assert errors[1] < errors[0] and errors[1] < 0.012, errors


def test_sde_solver_is_seeded_and_checks_eta() -> None:
    x_1 = _x_1((8, 1))
    grid = logsnr_grid(DECODER[0], 4)
    draws = [sample_dpmpp_2m_sde(gaussian_eps_fn(), x_1, grid, torch.Generator().manual_seed(s))
             for s in (1, 1, 2)]  # fmt: skip
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert sample_dpmpp_2m_sde.grid == "time"  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"eta must be in \[0, 1\], got 1.5"):
        sample_dpmpp_2m_sde(gaussian_eps_fn(), x_1, grid, eta=1.5)


# ----------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("name", list(SOLVERS))
def test_final_state_and_x_hat_and_their_calls(name: str) -> None:
    """`final="state"`: the chain's z at the last grid point; `"x_hat"`: one more model call,
    denoise(z) there. Calls: N (heun 2N - 1) and one more for x_hat."""
    steps = 6
    grid = logsnr_uniform_grid(LATENT[0], steps)
    calls: list[float] = []
    eps = gaussian_eps_fn()

    def counting(z_t: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        calls.append(float(logsnr[0]))
        return eps(z_t, logsnr)

    x_1 = _x_1((64, 1))
    sampler = SOLVERS[name]
    z = sampler(counting, x_1, grid, final="state")
    per_state = 2 * steps - 1 if name == "heun" else steps
    assert len(calls) == per_state and calls[0] == grid[0].item()
    assert set(calls) <= set(grid.tolist())  # the model is only asked at grid points
    calls.clear()
    x_hat = sampler(counting, x_1, grid)
    assert len(calls) == per_state + 1
    torch.testing.assert_close(x_hat, x_from_eps(z, eps(z, grid[-1].expand(64)), grid[-1]))
    with pytest.raises(ConfigError, match="final"):
        sampler(eps, x_1, grid, final="z")
    with pytest.raises(ValueError, match="increase"):
        sampler(eps, x_1, grid.flip(0))


@pytest.mark.parametrize("name", list(SOLVERS))
def test_clip_x_bounds_the_estimate(name: str) -> None:
    x_1 = _x_1((32, 1))
    grid = logsnr_uniform_grid(DECODER[0], 5)
    out = SOLVERS[name](gaussian_eps_fn(mu=3.0, s=0.0), x_1, grid, clip_x=1.0)  # a point mass
    torch.testing.assert_close(out, torch.ones(32, 1, dtype=F64))


@pytest.mark.parametrize("interval", [None, (-20.0, 20.0)], ids=["always", "interval"])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_guidance_is_the_guided_gaussian(name: str, interval: tuple[float, float] | None) -> None:
    """Guided sampling through `sample_latents` (the base model's path) lands on the exact flow
    of N(mu_u + w (mu_c - mu_u), s²); an interval outside the grid turns guidance off."""
    mu_c, mu_u, w = 0.4, -0.2, 1.5
    schedule, final = LATENT
    x_1 = _x_1((200, 1))
    cond, uncond = gaussian_eps_fn(mu_c), gaussian_eps_fn(mu_u)
    sampler = SOLVERS[name]
    out = sample_latents(cond, uncond, x_1, schedule, sampler, 64, None, w, interval, final)
    exact = exact_flow(x_1, -15.0, 5.0, final, mu=mu_u + w * (mu_c - mu_u))
    assert float((out - exact).abs().max()) < TOLERANCE_64[(name, final)]
    outside = sample_latents(cond, uncond, x_1, schedule, sampler, 8, None, w, (10.0, 20.0))
    unguided = sampler(cond, x_1, sampler_grid(sampler, schedule, 8), final="state")
    torch.testing.assert_close(outside, unguided)
    torch.testing.assert_close(
        guided_eps_fn(cond, uncond, w, interval)(x_1, torch.zeros(200, dtype=F64)),
        gaussian_eps_fn(mu_u + w * (mu_c - mu_u))(x_1, torch.zeros(200, dtype=F64)),
    )


# ----------------------------------------------------------------------------- the stage


class _ZeroV(torch.nn.Module):
    """A v-predictor that outputs 0: eps_hat = sigma z_t, the exact denoiser of N(0, I) data."""

    num_classes = 0

    def forward(self, z_t: torch.Tensor, logsnr: torch.Tensor, label: Any = None) -> torch.Tensor:
        return torch.zeros_like(z_t)


class _Latents(torch.nn.Module):
    """A stage-1 model (LatentModel) that records what its decoder is handed."""

    noisy_latent = True
    latent_logsnr_max = 5.0
    latent_shape = (2, 2, 2)

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.decoded: list[tuple[torch.Tensor, Any, int]] = []

    def encode_clean(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros((x.shape[0], *self.latent_shape))

    def decode_latents(self, z: torch.Tensor, generator: Any, sampler: Any, steps: int) -> Any:
        self.decoded.append((z, sampler, steps))
        return torch.zeros((z.shape[0], 1, 4, 4))

    def latent_state(self) -> dict[str, torch.Tensor]:
        return {}


def test_the_stage_takes_a_sampler_and_decoder_steps() -> None:
    """`ULBase.sample(..., sampler=, decoder_steps=)`: the base chain runs that sampler on its
    grid for `steps`; the decoder gets the same sampler and `decoder_steps` (else `steps`)."""
    latents = _Latents()
    schedule = CosineSchedule(-15.0, 5.0)
    model = ULBaseModel(
        latents, _ZeroV(), schedule, torch.ones_like, 0.0, 0, latents.latent_shape, (1, 4, 4)
    )
    stage = ULBase(
        stage1=lambda: None, base=lambda: None, train=TrainSettings(batch_size=2), sample_steps=5
    )
    stage.sample(model, 3, None, 1.0, torch.Generator().manual_seed(0), steps=7,
                 sampler=sample_unipc, decoder_steps=4)  # fmt: skip
    stage.sample(model, 3, None, 1.0, torch.Generator().manual_seed(0), steps=7)
    stage.sample(model, 3, None, 1.0, torch.Generator().manual_seed(0))
    (z_0, sampler, steps), again, default = latents.decoded
    assert (sampler, steps) == (sample_unipc, 4)
    assert again[1:] == (stage.sampler, 7) and default[1:] == (stage.sampler, 5)
    z_1 = torch.randn((3, 2, 2, 2), generator=torch.Generator().manual_seed(0))
    grid = logsnr_uniform_grid(schedule, 7).float()
    expected = sample_unipc(lambda z, lam: expand_like(alpha_sigma(lam)[1], z) * z, z_1, grid,
                            final="state")  # fmt: skip
    torch.testing.assert_close(z_0, expected)


# ----------------------------------------------------------------------------- the command line


class _Stage:
    name = "stage2"

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def sample(self, model: Any, n: int, labels: Any = None, guidance: Any = None,
               generator: Any = None, steps: Any = None, context: Any = None,
               sampler: Any = None, decoder_steps: Any = None) -> str:  # fmt: skip
        self.calls.append({"steps": steps, "sampler": sampler, "decoder_steps": decoder_steps})
        return "samples"


def test_overrides_reach_the_stage() -> None:
    stage = _Stage()
    overrides = trained.sampling_overrides(stage, "heun", 3)
    assert overrides == {"sampler": sample_heun, "decoder_steps": 3}
    proxy = trained._Overridden(stage, 9, overrides)
    assert proxy.name == "stage2"
    assert proxy.sample(None, 2, None, generator=None, context=None) == "samples"
    assert stage.calls == [{"steps": 9, "sampler": sample_heun, "decoder_steps": 3}]
    assert trained.sampling_overrides(stage) == {}

    class Older:
        name = "old"

        def sample(self, model: Any, n: int, steps: Any = None) -> None: ...

    with pytest.raises(UserError, match="--sampler: stage old draws samples without a sampler"):
        trained.sampling_overrides(Older(), "ddim")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sampler", "dpm2"], "--sampler 'dpm2' is not a registered sampler; one of: "),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--decoder-steps", "-2"], "--decoder-steps must be >= 1, got -2"),
    ],
)
@pytest.mark.parametrize("command", ["sample", "eval"])
def test_bad_sampler_or_steps_is_one_line(
    command: str, argv: list[str], message: str, tmp_path: Any, capsys: Any
) -> None:
    assert cli.main([command, str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    if "registered" in message:
        assert "ddim, dpmpp_2m, dpmpp_2m_sde, heun, unipc" in err
