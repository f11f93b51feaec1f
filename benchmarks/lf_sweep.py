"""Claim 1 (UL paper Table 2): raising the loss factor c_lf raises both bits/pixel and PSNR.

Stage 1 of the quickstart (`--data digits`, the default: gin/quickstart.gin, handwritten digits;
`--data photos`: gin/quickstart_photos.gin, photo crops; both 32x32) at c_lf in
{1.3, 1.5, 1.7, 1.9, 2.1} and a fixed sigmoid bias b, one run each (benchmarks/_sweep.py: runs are reused by name across the
claim benchmarks). The final evaluation (EMA weights, `eval_batches` x 16 held-out crops, 32 t per
example for the rate) gives bits/pixel, PSNR and SSIM. The full setting also trains
c_lf 1.7 and 3.0 with another seed: the seed-to-seed spread is the noise the differences are read
against. c_lf 3 and 5 (beyond the paper's range) are trained too and shown, outside the verdict.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lf_sweep.py            # docs/results.md
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lf_sweep.py --quick    # smoke: c_lf 1.7, 3

Writes `lf_sweep.md` (tables), `lf_sweep.png` (bits/pixel vs PSNR) and `lf_sweep_training.png`
(training bits/pixel against samples seen, one curve per c_lf) into --out-dir (`lf_sweep_digits.*`
for --data digits).
Last line: `lf sweep monotone: yes|no (bpp ..., psnr ...)`.
"""

from __future__ import annotations

import argparse
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
    markdown_table,
    monotone,
    output_dir,
)

from ulframe_plugins.hooks.tensorboard import rate_distortion_figure

PAPER_LOSS_FACTORS = (1.3, 1.5, 1.7, 1.9, 2.1)
QUICK_LOSS_FACTORS = (1.7, 3.0)
EXTRA_LOSS_FACTORS = (3.0, 5.0)  # beyond the paper's range (runs shared with the claim-4 sweep)
BIAS = 2.0  # the quickstart's sigmoid bias
NOISE_SEEDS = (1,)  # extra seeds (full setting only) at NOISE_LOSS_FACTORS
NOISE_LOSS_FACTORS = (1.7, 3.0)  # one in the collapsed regime, one where the latent carries content


def training_curve(result: Result) -> list[tuple[float, float]]:
    """(samples seen, training bits/pixel of the window) of every logged window of a run."""
    return [(r["samples_seen"], r["bits_per_pixel"]) for r in result.train_records()]


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(p)
    p.add_argument("--bias", type=float, default=BIAS, help="sigmoid bias b (fixed)")
    p.add_argument("--loss-factors", type=float, nargs="+", default=None)
    p.add_argument("--noise-seeds", type=int, nargs="*", default=None)
    p.add_argument("--noise-loss-factors", type=float, nargs="+", default=None)
    p.add_argument(
        "--extra-loss-factors",
        type=float,
        nargs="*",
        default=None,
        help="also train these (shown, not part of the monotone verdict); default 3 5, none "
        "with --quick",
    )
    args = p.parse_args()
    sweep = Sweep.from_args(args)
    factors = args.loss_factors or (QUICK_LOSS_FACTORS if args.quick else PAPER_LOSS_FACTORS)
    seeds = (
        args.noise_seeds if args.noise_seeds is not None else (() if args.quick else NOISE_SEEDS)
    )
    out_dir = output_dir(args)

    print(f"loss factor sweep at bias {args.bias:g} on {args.data}: {sweep.budget}", flush=True)
    results = [sweep.run({"LOSS_FACTOR": c, "weightings.sigmoid.bias": args.bias}) for c in factors]
    extra_c = (
        args.extra_loss_factors
        if args.extra_loss_factors is not None
        else (() if args.quick else EXTRA_LOSS_FACTORS)
    )
    extra = [sweep.run({"LOSS_FACTOR": c, "weightings.sigmoid.bias": args.bias}) for c in extra_c]
    noise_c = args.noise_loss_factors or NOISE_LOSS_FACTORS
    repeats = {
        c: [
            sweep.run(
                {"LOSS_FACTOR": c, "weightings.sigmoid.bias": args.bias, "Experiment.seed": s}
            )
            for s in seeds
        ]
        for c in noise_c
    }
    by_c = dict(zip([*factors, *extra_c], [*results, *extra], strict=True))

    rows = [
        (f"{c:g}", f"{r.bits_per_pixel:.4f}", f"{r.psnr:.2f}", f"{r.ssim:.3f}", r.name)
        for c, r in zip(factors, results, strict=True)
    ] + [
        (f"{c:g} (beyond the paper's range)", f"{r.bits_per_pixel:.4f}", f"{r.psnr:.2f}",
         f"{r.ssim:.3f}", r.name)
        for c, r in zip(extra_c, extra, strict=True)
    ]  # fmt: skip
    table = markdown_table(("c_lf", "bits/pixel", "PSNR (dB)", "SSIM", "run"), rows)
    noise = ""
    if seeds:
        noise_rows = []
        for c in noise_c:
            seed_0 = by_c.get(c) or sweep.run(
                {"LOSS_FACTOR": c, "weightings.sigmoid.bias": args.bias}
            )
            same = [seed_0, *repeats[c]]
            bpps, psnrs = [r.bits_per_pixel for r in same], [r.psnr for r in same]
            noise_rows.append(
                (
                    f"{c:g}",
                    ", ".join(f"{b:.4f}" for b in bpps),
                    f"{max(bpps) - min(bpps):.4f} ({(max(bpps) - min(bpps)) / min(bpps):.0%})",
                    ", ".join(f"{q:.2f}" for q in psnrs),
                    f"{max(psnrs) - min(psnrs):.2f}",
                )
            )
        noise = (
            f"\nSeed-to-seed noise (seeds 0, {', '.join(map(str, seeds))}; the seed changes the "
            "initial weights, the data order and every noise draw):\n\n"
            + markdown_table(
                ("c_lf", "bits/pixel", "bpp range", "PSNR (dB)", "PSNR range (dB)"), noise_rows
            )
        )
    names = {n: artifact(args, n) for n in ("lf_sweep.md", "lf_sweep.png", "lf_sweep_training.png")}
    (out_dir / names["lf_sweep.md"]).write_text(table + noise)
    all_c, all_r = [*factors, *extra_c], [*results, *extra]
    figure = rate_distortion_figure(
        [(r.bits_per_pixel, r.psnr, f"c={c:g}") for c, r in zip(all_c, all_r, strict=True)],
        title=f"loss factor sweep, {data_label(args)} (bias {args.bias:g}, "
        f"{sweep.budget.train_samples} samples)",
    )
    figure.save(out_dir / names["lf_sweep.png"])
    xy_figure(
        [
            Series(f"c_lf = {c:g}", training_curve(r), markers=False)
            for c, r in zip(all_c, all_r, strict=True)
        ],
        "training bits/pixel (windows of 1024 samples; log scale)",
        "samples seen",
        "bits/pixel",
        logy=True,
        legend="upper right",
    ).save(out_dir / names["lf_sweep_training.png"])
    print()
    print(table + noise)
    print(f"wrote {', '.join(str(out_dir / n) for n in names.values())}")
    print(f"training wall time of these runs: {sweep.total_train_s() / 60:.1f} min")
    bpps = [r.bits_per_pixel for r in results]
    psnrs = [r.psnr for r in results]
    verdict = "yes" if monotone(bpps) and monotone(psnrs) else "no"
    print(
        f"lf sweep monotone ({args.data}): {verdict} (bpp {', '.join(f'{b:.4f}' for b in bpps)}, "
        f"psnr {', '.join(f'{q:.2f}' for q in psnrs)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
