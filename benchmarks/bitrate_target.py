"""Claim 7: a target bitrate. `hooks.bitrate_controller` steers c_lf so bits/pixel settles at a
target, and the model it ends with matches a run trained at its final c_lf from the start.

Stage-1 runs of the quickstart (`--data digits|photos`, benchmarks/_sweep.py):

1. controlled: starts at c_lf = --start-loss-factor (the quickstart's 3.0, far from the answer) with
   `hooks.bitrate_controller` (target --target bits/pixel; one update per logged window of
   `log_every_samples` = 256 samples, from `start_samples` on);
2. fixed: c_lf = the controller's final value from the start, everything else the same;
3. (full setting) fixed at the same rate: the c_lf whose run from scratch reaches the controlled
   run's evaluated rate, interpolated between the sweep runs at c_lf 2.1 and 3 (reused).

It reports (a) whether the controlled run's training bits/pixel (mean of the last windows) and its
final evaluation (EMA weights, held-out crops) are within 10% of the target, and (b) bits/pixel and
PSNR of the two final models side by side. The seed-to-seed noise of these numbers is measured by
lf_sweep.py (docs/results.md, claim 1).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bitrate_target.py           # docs/results.md
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bitrate_target.py --quick   # smoke

Writes `bitrate_target.md`, `bitrate_target_bpp.png` (training bits/pixel of both runs and the
target) and `bitrate_target_lf.png` (c_lf over training) into --out-dir (`*_digits.*` for
--data digits).
Last line: `bitrate target T: ... final c_lf C; fixed c_lf C: bpp A vs B, psnr X vs Y dB`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _plot import Series, xy_figure
from _sweep import (
    Result,
    Sweep,
    add_arguments,
    artifact,
    data_label,
    interpolate,
    markdown_table,
    output_dir,
)

TARGET = {"photos": 0.08, "digits": 0.15}  # per --data: inside the range a c_lf sweep reaches
START_LOSS_FACTOR = 3.0
BIAS = 2.0
LOG_EVERY = 256  # samples per controller update
START_SAMPLES = 3072  # no update while the fresh prior learns (its rate falls from ~0.6)
QUICK_START_SAMPLES = 1024
TOLERANCE = 0.10
REFERENCE_LOSS_FACTORS = (2.1, 3.0)  # sweep runs bracketing the target's rate (docs/results.md)
LAST_WINDOWS = 8  # training windows averaged for "where it settled" (8 x 256 = 2048 samples)
CONTROLLER_HOOKS = "[@hooks.console(), @hooks.bitrate_controller()]"
STATE_FILE = "bitrate_controller.jsonl"


def training_bpp(result: Result) -> list[tuple[float, float]]:
    """(samples seen, mean training bits/pixel of the window) of every logged window."""
    return [(r["samples_seen"], r["bits_per_pixel"]) for r in result.train_records()]


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(p)
    p.add_argument(
        "--target",
        type=float,
        default=None,
        help="bits/pixel to reach (default: 0.08 for photos, 0.15 for digits)",
    )
    p.add_argument("--start-loss-factor", type=float, default=START_LOSS_FACTOR)
    p.add_argument("--bias", type=float, default=BIAS)
    args = p.parse_args()
    if args.target is None:
        args.target = TARGET[args.data]
    sweep = Sweep.from_args(args)
    out_dir = output_dir(args)
    common = {
        "weightings.sigmoid.bias": args.bias,
        "stage1/TrainSettings.log_every_samples": LOG_EVERY,
    }

    print(f"bitrate target {args.target:g} bits/pixel on {args.data}: {sweep.budget}", flush=True)
    controlled = sweep.run(
        common
        | {
            "LOSS_FACTOR": args.start_loss_factor,
            "Experiment.hooks": CONTROLLER_HOOKS,
            "hooks.bitrate_controller.target_bits_per_pixel": args.target,
            "hooks.bitrate_controller.start_samples": QUICK_START_SAMPLES
            if args.quick
            else START_SAMPLES,
        }
    )
    states = [
        json.loads(line) for line in controlled.stage_file(STATE_FILE).read_text().splitlines()
    ]
    final_c = float(f"{states[-1]['loss_factor']:.4g}")
    fixed = sweep.run(common | {"LOSS_FACTOR": final_c})
    # A fixed c_lf that reaches the controlled run's rate from scratch: interpolated between two
    # runs of the loss-factor sweep (the same runs as lf_sweep.py), then trained to check.
    same_rate = None
    if not args.quick:
        refs = [
            sweep.run({"LOSS_FACTOR": c, "weightings.sigmoid.bias": args.bias})
            for c in REFERENCE_LOSS_FACTORS
        ]
        c_same = interpolate(
            [r.bits_per_pixel for r in refs], REFERENCE_LOSS_FACTORS, controlled.bits_per_pixel
        )
        if math.isfinite(c_same):
            same_rate = sweep.run(common | {"LOSS_FACTOR": round(c_same, 2)})

    def row(label: str, c: str, r: Result) -> tuple[str, ...]:
        train = statistics.fmean(b for _, b in training_bpp(r)[-LAST_WINDOWS:])
        return (label, c, f"{train:.4f}", f"{r.bits_per_pixel:.4f}", f"{r.psnr:.2f}",
                f"{r.ssim:.3f}", r.name)  # fmt: skip

    ctl_bpp = training_bpp(controlled)
    settled = statistics.fmean(b for _, b in ctl_bpp[-LAST_WINDOWS:])
    train_err = settled / args.target - 1
    eval_err = controlled.bits_per_pixel / args.target - 1
    smoothed_err = math.exp(states[-1]["smoothed_log_bpp"]) / args.target - 1
    rows = [
        row(f"controlled (c_lf {args.start_loss_factor:g} -> {final_c:g})", f"{final_c:g} (final)",
            controlled),
        row("fixed at the final c_lf", f"{final_c:g}", fixed),
    ]  # fmt: skip
    if same_rate is not None:
        rows.append(row("fixed at the same rate", same_rate.overrides["LOSS_FACTOR"], same_rate))
    table = markdown_table(
        (
            "run", "c_lf", f"train bits/pixel (last {LAST_WINDOWS * LOG_EVERY} samples)",
            "eval bits/pixel", "eval PSNR (dB)", "SSIM", "run dir",
        ),
        rows,
    )  # fmt: skip
    summary = (
        f"\nTarget {args.target:g} bits/pixel: training rate {settled:.4f} ({train_err:+.1%}) over "
        f"the last {LAST_WINDOWS * LOG_EVERY} samples, the controller's smoothed estimate at the "
        f"end {math.exp(states[-1]['smoothed_log_bpp']):.4f} ({smoothed_err:+.1%}), final "
        f"evaluation {controlled.bits_per_pixel:.4f} ({eval_err:+.1%}); {len(states)} controller "
        f"updates, c_lf {args.start_loss_factor:g} -> {final_c:g}.\n"
    )
    names = {
        n: artifact(args, n)
        for n in ("bitrate_target.md", "bitrate_target_bpp.png", "bitrate_target_lf.png")
    }
    (out_dir / names["bitrate_target.md"]).write_text(table + summary)
    curves = [
        Series("controlled: training bits/pixel", ctl_bpp, markers=False),
        Series(
            "controlled: smoothed (controller)",
            [(s["samples_seen"], math.exp(s["smoothed_log_bpp"])) for s in states],
            markers=False,
            dashed=True,
        ),
        Series(f"fixed c_lf = {final_c:g}", training_bpp(fixed), markers=False),
    ]
    if same_rate is not None:
        curves.append(
            Series(
                f"fixed c_lf = {same_rate.overrides['LOSS_FACTOR']}",
                training_bpp(same_rate),
                markers=False,
            )
        )
    xy_figure(
        curves,
        f"training bits/pixel, {data_label(args)} (windows of {LOG_EVERY} samples; log scale), "
        f"target {args.target:g}",
        "samples seen",
        "bits/pixel",
        hlines=[(args.target, "target")],
        logy=True,
        legend="upper right",
    ).save(out_dir / names["bitrate_target_bpp.png"])
    xy_figure(
        [
            Series(
                "c_lf (controller)",
                [(0.0, args.start_loss_factor), (states[0]["samples_seen"], args.start_loss_factor)]
                + [(s["samples_seen"], s["loss_factor"]) for s in states],
                markers=False,
            )
        ],
        f"loss factor set by the controller, {data_label(args)}",
        "samples seen",
        "c_lf",
        hlines=[(final_c, f"final {final_c:g}")],
        legend="upper right",
    ).save(out_dir / names["bitrate_target_lf.png"])

    print()
    print(table + summary)
    print(f"wrote {', '.join(str(out_dir / n) for n in names.values())}")
    print(f"training wall time of these runs: {sweep.total_train_s() / 60:.1f} min")
    within = "yes" if abs(train_err) <= TOLERANCE and abs(eval_err) <= TOLERANCE else "no"
    line = (
        f"bitrate target {args.target:g} ({args.data}): within 10%: {within} (train {settled:.4f}, eval "
        f"{controlled.bits_per_pixel:.4f}), final c_lf {final_c:g}; fixed c_lf {final_c:g}: "
        f"bpp {fixed.bits_per_pixel:.4f} vs {controlled.bits_per_pixel:.4f}, psnr "
        f"{fixed.psnr:.2f} vs {controlled.psnr:.2f} dB"
    )
    if same_rate is not None:
        line += (
            f"; fixed c_lf {same_rate.overrides['LOSS_FACTOR']} (same rate): bpp "
            f"{same_rate.bits_per_pixel:.4f}, psnr {same_rate.psnr:.2f} dB"
        )
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
