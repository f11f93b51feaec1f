"""Claim 7: a target bitrate. `hooks.bitrate_controller` steers c_lf so bits/pixel settles at a
target, and the model it ends with matches a run trained at its final c_lf from the start.

Two stage-1 runs of gin/quickstart.gin:

1. controlled: starts at c_lf = --start-loss-factor (the quickstart's 3.0, far from the answer) with
   `hooks.bitrate_controller` (target --target bits/pixel; one update per logged window of
   `log_every_samples` = 256 samples, from `start_samples` on);
2. fixed: c_lf = the controller's final value from the start, everything else the same.

It reports (a) whether the controlled run's training bits/pixel (mean of the last windows) and its
final evaluation (EMA weights, held-out crops) are within 10% of the target, and (b) bits/pixel and
PSNR of the two final models side by side. The seed-to-seed noise of these numbers is measured by
lf_sweep.py (docs/results.md, claim 1).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bitrate_target.py           # docs/results.md
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bitrate_target.py --quick   # smoke

Writes `bitrate_target.md`, `bitrate_target_bpp.png` (training bits/pixel of both runs and the
target) and `bitrate_target_lf.png` (c_lf over training) into --out-dir.
Last line: `bitrate target T: ... final c_lf C; fixed c_lf C: bpp A vs B, psnr X vs Y dB`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _plot import Series, xy_figure
from _sweep import Result, Sweep, add_arguments, markdown_table

TARGET = 0.08
START_LOSS_FACTOR = 3.0
BIAS = 2.0
LOG_EVERY = 256  # samples per controller update
START_SAMPLES = 3072  # no update while the fresh prior learns (its rate falls from ~0.6)
QUICK_START_SAMPLES = 1024
TOLERANCE = 0.10
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
    p.add_argument("--target", type=float, default=TARGET, help="bits/pixel to reach")
    p.add_argument("--start-loss-factor", type=float, default=START_LOSS_FACTOR)
    p.add_argument("--bias", type=float, default=BIAS)
    args = p.parse_args()
    sweep = Sweep.from_args(args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    common = {
        "weightings.sigmoid.bias": args.bias,
        "stage1/TrainSettings.log_every_samples": LOG_EVERY,
    }

    print(f"bitrate target {args.target:g} bits/pixel: {sweep.budget}", flush=True)
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

    ctl_bpp, fix_bpp = training_bpp(controlled), training_bpp(fixed)
    settled = statistics.fmean(b for _, b in ctl_bpp[-LAST_WINDOWS:])
    settled_fixed = statistics.fmean(b for _, b in fix_bpp[-LAST_WINDOWS:])
    train_err = settled / args.target - 1
    eval_err = controlled.bits_per_pixel / args.target - 1
    rows = [
        (f"controlled (start c_lf {args.start_loss_factor:g})", f"{final_c:g} (final)",
         f"{settled:.4f}", f"{controlled.bits_per_pixel:.4f}", f"{controlled.psnr:.2f}",
         f"{controlled.ssim:.3f}", controlled.name),
        ("fixed", f"{final_c:g}", f"{settled_fixed:.4f}", f"{fixed.bits_per_pixel:.4f}",
         f"{fixed.psnr:.2f}", f"{fixed.ssim:.3f}", fixed.name),
    ]  # fmt: skip
    table = markdown_table(
        (
            "run", "c_lf", f"train bits/pixel (last {LAST_WINDOWS * LOG_EVERY} samples)",
            "eval bits/pixel", "eval PSNR (dB)", "SSIM", "run dir",
        ),
        rows,
    )  # fmt: skip
    summary = (
        f"\nTarget {args.target:g} bits/pixel: training rate {settled:.4f} ({train_err:+.1%}), "
        f"final evaluation {controlled.bits_per_pixel:.4f} ({eval_err:+.1%}); "
        f"{len(states)} controller updates, c_lf {args.start_loss_factor:g} -> {final_c:g}.\n"
    )
    (out_dir / "bitrate_target.md").write_text(table + summary)
    xy_figure(
        [
            Series("controlled: training bits/pixel", ctl_bpp, markers=False),
            Series(
                "controlled: smoothed (controller)",
                [(s["samples_seen"], 2.718281828459045 ** s["smoothed_log_bpp"]) for s in states],
                markers=False,
                dashed=True,
            ),
            Series(f"fixed c_lf = {final_c:g}", fix_bpp, markers=False),
        ],
        f"bits/pixel while training (target {args.target:g}, dashed grey; windows of {LOG_EVERY})",
        "samples seen",
        "bits/pixel",
        hlines=[(args.target, "target")],
    ).save(out_dir / "bitrate_target_bpp.png")
    xy_figure(
        [
            Series(
                "c_lf (controller)",
                [(0.0, args.start_loss_factor)]
                + [(s["samples_seen"], s["loss_factor"]) for s in states],
                markers=False,
            )
        ],
        "loss factor set by the controller",
        "samples seen",
        "c_lf",
        hlines=[(final_c, f"final {final_c:g}")],
    ).save(out_dir / "bitrate_target_lf.png")

    print()
    print(table + summary)
    print(f"wrote {out_dir}/bitrate_target.md, bitrate_target_bpp.png, bitrate_target_lf.png")
    print(f"training wall time of these runs: {sweep.total_train_s() / 60:.1f} min")
    within = "yes" if abs(train_err) <= TOLERANCE and abs(eval_err) <= TOLERANCE else "no"
    print(
        f"bitrate target {args.target:g}: within 10%: {within} (train {settled:.4f}, eval "
        f"{controlled.bits_per_pixel:.4f}), final c_lf {final_c:g}; fixed c_lf {final_c:g}: "
        f"bpp {fixed.bits_per_pixel:.4f} vs {controlled.bits_per_pixel:.4f}, psnr "
        f"{fixed.psnr:.2f} vs {controlled.psnr:.2f} dB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
