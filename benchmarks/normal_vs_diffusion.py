"""Claim 4 (UL paper Table 5): at the same reconstruction quality a diffusion prior needs fewer
bits than a Normal prior.

Two loss-factor sweeps of stage 1 of the quickstart (`--data digits|photos`, benchmarks/_sweep.py): the diffusion prior (`priors.vit`, the
quickstart's) and the Normal prior N(0, I) (`priors.normal`: the same objective with a network
that predicts v = 0, so the prior loss is KL(q(z_0|x) || N(0, I)); plugins/networks/normal_prior.py).
Each sweep gives a bits/pixel–PSNR curve; bits/pixel of each curve is interpolated (linearly
between neighbouring runs, in PSNR) at a PSNR both curves reach.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/normal_vs_diffusion.py           # docs/results.md
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/normal_vs_diffusion.py --quick   # smoke

The diffusion sweep shares its runs with lf_sweep.py (same overrides, same runs).
Writes `normal_vs_diffusion.md` and `normal_vs_diffusion.png` into --out-dir (`*_digits.*` for
--data digits).
Last line: `bpp at psnr X dB: diffusion A, normal B (ratio B/A)`.
"""

from __future__ import annotations

import argparse
import math
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

BIAS = 2.0
DIFFUSION_LOSS_FACTORS = (1.3, 1.5, 1.7, 1.9, 2.1, 3.0, 5.0)
NORMAL_LOSS_FACTORS = (0.3, 0.6, 1.0, 1.7)
QUICK_DIFFUSION = (3.0, 5.0)
QUICK_NORMAL = (0.3, 1.7)
NORMAL = "@priors.normal"
PRIOR_KEY = "stage1/stages.ul_joint.prior"
LATENT_DIMS_PER_PIXEL = 4 * 8 * 8 / (32 * 32)  # the quickstarts' 4x8x8 latent of 32x32 images


def normal_prior_floor_bpp(latent_logsnr_max: float = 5.0) -> float:
    """Bits/pixel the Normal prior charges for a latent that carries nothing (z_clean = 0):
    ½ (sigma_0² − 1 − log sigma_0²) nats per latent dimension (tests/unit/test_normal_prior.py)."""
    sigma2 = 1 / (1 + math.exp(latent_logsnr_max))
    return 0.5 * (sigma2 - 1 - math.log(sigma2)) * LATENT_DIMS_PER_PIXEL / math.log(2)


def common_psnr(a: list[Result], b: list[Result]) -> float:
    """The middle of the PSNR range both curves cover (NaN if they do not overlap)."""
    lo = max(min(r.psnr for r in a), min(r.psnr for r in b))
    hi = min(max(r.psnr for r in a), max(r.psnr for r in b))
    return 0.5 * (lo + hi) if lo <= hi else math.nan


def bpp_at(results: list[Result], psnr: float) -> float:
    return interpolate([r.psnr for r in results], [r.bits_per_pixel for r in results], psnr)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(p)
    p.add_argument("--bias", type=float, default=BIAS)
    p.add_argument("--diffusion-loss-factors", type=float, nargs="+", default=None)
    p.add_argument("--normal-loss-factors", type=float, nargs="+", default=None)
    p.add_argument("--psnr", type=float, default=None, help="compare at this PSNR (dB)")
    args = p.parse_args()
    sweep = Sweep.from_args(args)
    diff_c = args.diffusion_loss_factors or (
        QUICK_DIFFUSION if args.quick else DIFFUSION_LOSS_FACTORS
    )
    norm_c = args.normal_loss_factors or (QUICK_NORMAL if args.quick else NORMAL_LOSS_FACTORS)
    out_dir = output_dir(args)

    print(
        f"diffusion vs Normal prior on {args.data}, bias {args.bias:g}: {sweep.budget}", flush=True
    )
    diffusion = [
        sweep.run({"LOSS_FACTOR": c, "weightings.sigmoid.bias": args.bias}) for c in diff_c
    ]
    normal = [
        sweep.run({"LOSS_FACTOR": c, "weightings.sigmoid.bias": args.bias, PRIOR_KEY: NORMAL})
        for c in norm_c
    ]

    rows = [
        ("diffusion (priors.vit)", f"{c:g}", f"{r.bits_per_pixel:.4f}", f"{r.psnr:.2f}",
         f"{r.ssim:.3f}", r.name)
        for c, r in zip(diff_c, diffusion, strict=True)
    ] + [
        ("Normal (priors.normal)", f"{c:g}", f"{r.bits_per_pixel:.4f}", f"{r.psnr:.2f}",
         f"{r.ssim:.3f}", r.name)
        for c, r in zip(norm_c, normal, strict=True)
    ]  # fmt: skip
    table = markdown_table(("prior", "c_lf", "bits/pixel", "PSNR (dB)", "SSIM", "run"), rows)
    psnr = args.psnr if args.psnr is not None else common_psnr(diffusion, normal)
    a, b = bpp_at(diffusion, psnr), bpp_at(normal, psnr)
    floor = normal_prior_floor_bpp()
    if math.isnan(psnr):
        where = "The two curves reach no common PSNR: widen the sweeps (--*-loss-factors).\n"
    else:
        where = (
            f"At PSNR {psnr:.2f} dB (interpolated): diffusion {a:.4f} bits/pixel, Normal "
            f"{b:.4f} bits/pixel, ratio Normal/diffusion {b / a:.2f}.\n"
        )
    summary = (
        "\n" + where
        + f"The Normal prior's floor (a latent that carries nothing) is {floor:.4f} bits/pixel.\n"
    )  # fmt: skip
    names = {n: artifact(args, n) for n in ("normal_vs_diffusion.md", "normal_vs_diffusion.png")}
    (out_dir / names["normal_vs_diffusion.md"]).write_text(table + summary)
    xy_figure(
        [
            Series(
                "diffusion prior",
                [(r.bits_per_pixel, r.psnr) for r in diffusion],
                [f"c={c:g}" for c in diff_c],
            ),
            Series(
                "Normal prior",
                [(r.bits_per_pixel, r.psnr) for r in normal],
                [f"c={c:g}" for c in norm_c],
            ),
        ],
        f"diffusion vs Normal prior, {data_label(args)} (bias {args.bias:g}, "
        f"{sweep.budget.train_samples} samples; dashed: Normal floor)",
        "bits/pixel (log scale)",
        "PSNR (dB)",
        logx=True,
        vlines=[(floor, "Normal floor")],
        hlines=[] if math.isnan(psnr) else [(psnr, f"compared at {psnr:.2f} dB")],
    ).save(out_dir / names["normal_vs_diffusion.png"])

    print()
    print(table + summary)
    print(f"wrote {', '.join(str(out_dir / n) for n in names.values())}")
    print(f"training wall time of these runs: {sweep.total_train_s() / 60:.1f} min")
    print(
        f"bpp at psnr {psnr:.2f} dB ({args.data}): diffusion {a:.4f}, normal {b:.4f} (ratio {b / a:.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
