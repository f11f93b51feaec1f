"""Claim 2 (UL paper Fig. 8): the sigmoid bias b and the loss factor c_lf both set the bitrate.

A grid of stage-1 runs of the quickstart (`--data digits|photos`, benchmarks/_sweep.py) over b (`weightings.sigmoid.bias`) and c_lf. The
decoder weight c_lf · sigmoid(b − λ) crosses the prior's ELBO weight 1 at λ* = b + log(c_lf − 1)
(docs/method.md): content coarser than λ* is cheaper in the latent. Raising either knob moves λ*
up, so both should raise bits/pixel (and PSNR); if λ* were all that mattered, bits/pixel would be
one function of λ* across the grid. The b = 2 row is the lf_sweep run set (reused by name).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bias_lf_grid.py           # docs/results.md
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bias_lf_grid.py --quick   # smoke: 2 x 2 grid

Writes `bias_lf_grid.md` (tables), `bias_lf_grid.png` (bits/pixel vs c_lf, one curve per b) and
`bias_lf_crossing.png` (bits/pixel vs λ*) into --out-dir (`*_digits.*` for --data digits).
Last line: `bias x lf grid: bpp rises with b: yes|no, with c_lf: yes|no (...)`.
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
    markdown_table,
    monotone,
    output_dir,
)

BIASES = (0.0, 2.0, 4.0)
LOSS_FACTORS = (1.7, 2.1, 3.0)
QUICK_BIASES = (0.0, 2.0)
QUICK_LOSS_FACTORS = (1.7, 3.0)


def crossing(bias: float, loss_factor: float) -> float:
    """λ* = b + log(c_lf − 1): where c_lf · sigmoid(b − λ) = 1."""
    return bias + math.log(loss_factor - 1.0)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(p)
    p.add_argument("--biases", type=float, nargs="+", default=None)
    p.add_argument("--loss-factors", type=float, nargs="+", default=None)
    args = p.parse_args()
    sweep = Sweep.from_args(args)
    biases = args.biases or (QUICK_BIASES if args.quick else BIASES)
    factors = args.loss_factors or (QUICK_LOSS_FACTORS if args.quick else LOSS_FACTORS)
    out_dir = output_dir(args)

    print(
        f"bias x loss factor grid on {args.data}: b {biases}, c_lf {factors}: {sweep.budget}",
        flush=True,
    )
    grid: dict[tuple[float, float], Result] = {}
    for b in biases:
        for c in factors:
            grid[b, c] = sweep.run({"LOSS_FACTOR": c, "weightings.sigmoid.bias": b})

    header = ("b \\ c_lf", *(f"{c:g}" for c in factors))
    bpp_table = markdown_table(
        header, [(f"{b:g}", *(f"{grid[b, c].bits_per_pixel:.4f}" for c in factors)) for b in biases]
    )
    psnr_table = markdown_table(
        header, [(f"{b:g}", *(f"{grid[b, c].psnr:.2f}" for c in factors)) for b in biases]
    )
    cross_table = markdown_table(
        header, [(f"{b:g}", *(f"{crossing(b, c):.2f}" for c in factors)) for b in biases]
    )
    text = (
        "bits/pixel:\n\n" + bpp_table + "\nPSNR (dB):\n\n" + psnr_table
        + "\ncrossing point λ* = b + log(c_lf − 1):\n\n" + cross_table
    )  # fmt: skip
    names = {
        n: artifact(args, n)
        for n in ("bias_lf_grid.md", "bias_lf_grid.png", "bias_lf_crossing.png")
    }
    (out_dir / names["bias_lf_grid.md"]).write_text(text)

    by_bias = [
        Series(
            f"b = {b:g}",
            [(c, grid[b, c].bits_per_pixel) for c in factors],
            [f"{grid[b, c].psnr:.1f} dB" for c in factors],
        )
        for b in biases
    ]
    xy_figure(
        by_bias,
        f"bits/pixel vs loss factor, {data_label(args)}, one curve per bias (labels: PSNR; "
        f"{sweep.budget.train_samples} samples)",
        "loss factor c_lf",
        "bits/pixel",
    ).save(out_dir / names["bias_lf_grid.png"])
    by_crossing = [
        Series(
            f"b = {b:g}",
            [(crossing(b, c), grid[b, c].bits_per_pixel) for c in factors],
            [f"c={c:g}" for c in factors],
        )
        for b in biases
    ]
    xy_figure(
        by_crossing,
        f"bits/pixel vs crossing point lambda* = b + log(c_lf - 1), {data_label(args)}",
        "crossing log-SNR lambda*",
        "bits/pixel",
    ).save(out_dir / names["bias_lf_crossing.png"])

    print()
    print(text)
    print(f"wrote {', '.join(str(out_dir / n) for n in names.values())}")
    print(f"training wall time of these runs: {sweep.total_train_s() / 60:.1f} min")
    with_b = all(monotone(grid[b, c].bits_per_pixel for b in biases) for c in factors)
    with_c = all(monotone(grid[b, c].bits_per_pixel for c in factors) for b in biases)
    psnr_b = all(monotone(grid[b, c].psnr for b in biases) for c in factors)
    psnr_c = all(monotone(grid[b, c].psnr for c in factors) for b in biases)
    yes = {True: "yes", False: "no"}
    print(
        f"bias x lf grid ({args.data}): bpp rises with b: {yes[with_b]}, with c_lf: {yes[with_c]} "
        f"(psnr with b: {yes[psnr_b]}, with c_lf: {yes[psnr_c]}; bpp "
        + ", ".join(
            f"b{b:g}/c{c:g} {grid[b, c].bits_per_pixel:.4f}" for b in biases for c in factors
        )
        + ")"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
