"""The paper's stage-2 claim (App. B): a sigmoid-weighted base model samples better than the
stage-1 ELBO prior.

Both draw the same number of latents from N(0, I) with the same sampler and steps; both sets of
latents are decoded by the same stage-1 decoder; the Fréchet distance of each set of images to
held-out images is measured with the offline `metrics.fd_photos` features (not FID).

    python benchmarks/stage2_vs_prior.py --workdir runs/quickstart        # a finished `make demo`
    python benchmarks/stage2_vs_prior.py --quick                          # trains a short run first

The base model is class-conditional; the ratio on the last line uses it *unconditionally*
(the null label), like the unconditional prior. The guided samples are printed as well.
Last line: `fd ratio base/prior: X.XX` (below 1: the base model samples better).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ulframe import cli
from ulframe.diffusion import logsnr_grid

ROOT = Path(__file__).resolve().parents[1]
QUICK_OVERRIDES = [
    "TRAIN_SAMPLES = 4096",
    "BASE_TRAIN_SAMPLES = 4096",
    "stage1/TrainSettings.eval_every_samples = 0",
    "stage2/TrainSettings.eval_every_samples = 0",
]


def decode(
    model: object,
    z_0: torch.Tensor,
    shape: tuple[int, ...],
    sampler: object,
    steps: int,
    generator: torch.Generator,
) -> torch.Tensor:
    x_1 = torch.randn((z_0.shape[0], *shape), generator=generator)
    grid = logsnr_grid(model.decoder_schedule, steps).float()  # type: ignore[attr-defined]
    return sampler(
        lambda x_t, logsnr: model.decoder_eps(x_t, logsnr, z_0),
        x_1,
        grid,
        generator=generator,
        clip_x=1.0,
    )  # type: ignore[operator, attr-defined]


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "quickstart")
    p.add_argument("--gin", nargs="+", default=[str(ROOT / "gin" / "quickstart.gin")])
    p.add_argument("--samples", type=int, default=256, help="images per set")
    p.add_argument(
        "--quick",
        action="store_true",
        help="train a short run into --workdir first (minutes), 128 samples",
    )
    p.add_argument(
        "--grid",
        type=Path,
        default=None,
        help="also write a PNG: one row of 16 samples per set (held-out crops first)",
    )
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    bindings = list(QUICK_OVERRIDES) if args.quick else []
    if args.quick:
        args.samples = min(args.samples, 128)
        args.workdir = (
            args.workdir
            if args.workdir != ROOT / "runs" / "quickstart"
            else ROOT / "runs" / "stage2_vs_prior_quick"
        )
        run_args = ["run", *args.gin, "--workdir", str(args.workdir)]
        for b in bindings:
            run_args += ["--gin_param", b]
        t0 = time.perf_counter()
        if cli.main(run_args) != 0:
            return 1
        print(f"trained {args.workdir} in {time.perf_counter() - t0:.0f} s")

    ns = argparse.Namespace(files=args.gin, workdir=args.workdir)
    experiment, restored, device, registry = cli._restore_stages(ns, bindings)
    stage1, model1, _ = next(r for r in restored if hasattr(r[1], "sample_latents"))
    stage2, model2, _ = next(r for r in restored if hasattr(r[1], "sample"))
    metric = registry.get("metrics", "fd_photos").factory()
    reference = cli._eval_images(experiment, args.samples)
    n = len(reference)
    shape = tuple(reference.shape[1:])
    sets: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        g = torch.Generator().manual_seed(experiment.seed)
        chunks = []
        for start in range(0, n, 64):
            k = min(64, n - start)
            z_0 = model1.sample_latents(
                k, stage1.latent_shape, g, stage1.sampler, stage1.sample_steps
            )
            chunks.append(decode(model1, z_0, shape, stage1.sampler, stage1.sample_steps, g))
        sets["stage-1 ELBO prior"] = torch.cat(chunks)
        for name, guidance in (
            ("stage-2 base, unconditional", None),
            (f"stage-2 base, guided w={stage2.guidance_scale}", stage2.guidance_scale),
        ):
            g = torch.Generator().manual_seed(experiment.seed)
            chunks = []
            for start in range(0, n, 64):
                k = min(64, n - start)
                labels = (
                    None
                    if guidance is None
                    else stage2.sample_labels(k, device, experiment.dataset.num_classes)
                )
                chunks.append(
                    model2.sample(k, g, labels, stage2.sampler, stage2.sample_steps, stage2.decoder_sample_steps,
                                  1.0 if guidance is None else guidance, stage2.guidance_interval).cpu()
                )  # fmt: skip
            sets[name] = torch.cat(chunks)
    fds = {name: float(next(iter(metric(reference, x).values()))) for name, x in sets.items()}
    print(f"workdir: {args.workdir}   images per set: {n}   features: metrics.fd_photos (not FID)")
    print(f"{'samples from':<36} {'fd_photos':>10}")
    for name, fd in fds.items():
        print(f"{name:<36} {fd:>10.2f}")
    if args.grid is not None:
        from ulframe.eval.images import save_grid

        rows = [reference[:16], *(x[:16] for x in sets.values())]
        path = save_grid(torch.cat(rows), args.grid, ncols=16, scale=2)
        print(f"grid: {path} (rows: held-out crops, {', '.join(sets)})")
    ratio = fds["stage-2 base, unconditional"] / fds["stage-1 ELBO prior"]
    print(f"fd ratio base/prior: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
