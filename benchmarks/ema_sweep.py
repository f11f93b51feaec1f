"""Post-hoc EMA sweep: which EMA length gives the last stage of a run its best samples.

For the last stage of `--workdir` (trained with `TrainSettings.posthoc_ema_sigma_rels`, so it has
EMA snapshots), this reconstructs the post-hoc EMA (`ulframe.train.posthoc_ema`, EDM2's least
squares over the snapshots) at every σ_rel of `--sigma-rels` that the snapshots can reconstruct
(profile error at most `posthoc_ema.MAX_PROFILE_ERROR`; the others are listed as skipped), loads
it into the stage in memory and measures the run's sample metric (`Experiment.sample_metric`,
e.g. `metrics.fd_digits`: the Fréchet distance, and the class accuracy when the metric has a
classifier) of `--fd-samples` end-to-end samples against as many eval examples, as
`ulframe eval` does. The run's own EMA (the half-life EMA its checkpoint holds, or the post-hoc
EMA `ulframe ema` wrote into it) is measured the same way. Every configuration draws from the
same seeds (`--seeds`: 0, 1, ...), so differences are the EMA's; fd is the mean over the seeds,
`fd_spread` its standard deviation over them. The run is read, never changed.

    OMP_NUM_THREADS=1 python benchmarks/ema_sweep.py --workdir RUN --json /tmp/ema_sweep.json
    OMP_NUM_THREADS=1 python benchmarks/ema_sweep.py --workdir RUN --sigma-rels 0.05 0.1 \\
        --fd-samples 128 --seeds 1 --json /tmp/ema_sweep.json          # a quick try

Last line: `ema_sweep: best sigma_rel S: fd X vs the run's EMA Y (gain G ± s over the seeds,
P%)`: G = Y - X, s the standard deviation of the seeds' paired gains.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ulframe import trained
from ulframe.errors import UserError
from ulframe.train import checkpoint, posthoc_ema

DEFAULT_SIGMA_RELS = (0.02, 0.03, 0.05, 0.075, 0.1, 0.13, 0.16, 0.2, 0.25)


def measure(run: trained.TrainedRun, n: int, seeds: int) -> dict[str, Any]:
    """The run's sample metrics of its last sampling stage, averaged over `seeds` seeds;
    `fd_per_seed` (a list) and `fd_spread`, their standard deviation (0 with one seed)."""
    base_seed = run.experiment.seed
    rows = []
    try:
        for seed in range(seeds):
            run.experiment.seed = base_seed + seed
            rows.append(trained.sample_metrics(run, n))
    finally:
        run.experiment.seed = base_seed
    keys = [k for k, v in rows[0].items() if isinstance(v, int | float)]
    means = {k: sum(float(r[k]) for r in rows) / len(rows) for k in keys}
    fds = [float(r["fd"]) for r in rows]
    return means | {"fd_per_seed": fds, "fd_spread": _spread(fds)}


def _spread(values: Sequence[float]) -> float:
    """The sample standard deviation (0 for fewer than two values)."""
    as_tensor = torch.tensor(values, dtype=torch.float64)
    return float(as_tensor.std()) if len(values) > 1 else 0.0


def sweep(workdir: Path, sigma_rels: Sequence[float], n: int, seeds: int) -> dict[str, Any]:
    """The metrics of the run's own EMA and of each reconstructible σ_rel (see the module)."""
    run = trained.open_run(workdir, trained.config_files(workdir))
    last = run.stages[-1]
    snapshots = posthoc_ema.read_snapshots(last.stage_dir)
    if not snapshots:
        raise SystemExit(
            f"ema_sweep: stage {last.stage.name} of {workdir} has no EMA snapshots: train it "
            "with TrainSettings.posthoc_ema_sigma_rels and posthoc_ema_every_samples"
        )
    state = checkpoint.load_latest(checkpoint.checkpoint_dir(last.stage_dir))
    assert state is not None  # open_run loaded it
    own_weights, which = checkpoint.stage_ema(last.stage_dir, state)
    own = posthoc_ema.describe(which)
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "workdir": str(workdir), "stage": last.stage.name, "fd_samples": n, "seeds": seeds,
        "snapshots": len(snapshots), "own": own, "own_metrics": measure(run, n, seeds),
        "sweep": [], "skipped": [],
    }  # fmt: skip
    print(f"{own}: {_shown(result['own_metrics'])} ({time.perf_counter() - t0:.0f} s)", flush=True)
    for sigma_rel in sigma_rels:
        try:
            rec = posthoc_ema.reconstruct(last.stage_dir, sigma_rel, last.stage.name)
        except UserError as err:
            result["skipped"].append({"sigma_rel": sigma_rel, "why": str(err)})
            print(f"sigma_rel {sigma_rel:g}: skipped ({err})", flush=True)
            continue
        t0 = time.perf_counter()
        last.model.load_state_dict(rec.ema)
        metrics = measure(run, n, seeds)
        row = {"sigma_rel": sigma_rel, "profile_error": rec.fit.profile_error} | metrics
        result["sweep"].append(row)
        print(
            f"sigma_rel {sigma_rel:g} (profile error {rec.fit.profile_error:.1e}): "
            f"{_shown(metrics)} ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    last.model.load_state_dict(own_weights)
    return result


def _shown(metrics: dict[str, Any]) -> str:
    shown = {k: v for k, v in metrics.items() if k not in ("fd_samples", "fd_per_seed")}
    return ", ".join(f"{k} {v:.4g}" for k, v in shown.items())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="a run with EMA snapshots")
    parser.add_argument(
        "--sigma-rels", type=float, nargs="+", default=list(DEFAULT_SIGMA_RELS),
        help=f"the σ_rel to try (default {' '.join(map(str, DEFAULT_SIGMA_RELS))})",
    )  # fmt: skip
    parser.add_argument("--fd-samples", type=int, default=256, help="samples per fd (256)")
    parser.add_argument("--seeds", type=int, default=2, help="sample seeds averaged (2)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname).1s %(name)s: %(message)s")
    torch.set_grad_enabled(False)
    result = sweep(args.workdir, args.sigma_rels, args.fd_samples, args.seeds)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if not result["sweep"]:
        print("ema_sweep: no sigma_rel could be reconstructed from the snapshots")
        return 1
    best = min(result["sweep"], key=lambda r: r["fd"])
    own = result["own_metrics"]
    # Paired by seed: both drew from the same noise.
    gains = [a - b for a, b in zip(own["fd_per_seed"], best["fd_per_seed"], strict=True)]
    gain = sum(gains) / len(gains)
    print(
        f"ema_sweep: best sigma_rel {best['sigma_rel']:g}: fd {best['fd']:.4g} vs the run's "
        f"EMA {own['fd']:.4g} (gain {gain:.4g} ± {_spread(gains):.2g} over the seeds, "
        f"{100 * gain / own['fd']:.1f}%)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
