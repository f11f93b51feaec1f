"""The paper's stage-2 claim (App. B): a sigmoid-weighted base model samples better than the
stage-1 ELBO prior.

Both draw the same number of latents from N(0, I) with the same sampler and steps; both sets of
latents are decoded by the same stage-1 decoder; the Fréchet distance of each set of images to
held-out images is measured with the experiment's own sample metric (`Experiment.sample_metric`:
`metrics.fd_digits`, the shipped digit judge, for `--data digits`; `metrics.fd_photos` for
`--data photos`; offline features, not FID). Where the metric classifies (the digit judge), the
guided samples also get their class accuracy (the fraction the judge labels as the class they
were drawn for). `fd_real` (as many real train images against the held-out ones) is what a
perfect generator would reach.

    python benchmarks/stage2_vs_prior.py                    # trains the quickstart if needed
    python benchmarks/stage2_vs_prior.py --quick            # a short run first (minutes)
    python benchmarks/stage2_vs_prior.py --data photos      # gin/quickstart_photos.gin

The run: `ulframe run GIN --workdir WORKDIR` (gin/quickstart.gin for digits, 16384 stage-1 and
20480 stage-2 samples, what `make demo` trains; finished stages are reused, so an existing
`make demo` workdir is measured as it is). Default workdirs: runs/quickstart (digits),
runs/quickstart_photos (photos), runs/stage2_vs_prior_quick_<data> (--quick).

The base model is class-conditional; the ratio on the last line uses it *unconditionally*
(the null label), like the unconditional prior. The guided samples are printed as well.
Last line: `fd ratio base/prior (DATA): X.XX` (below 1: the base model samples better).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _sweep import (
    DATA_SETS,
    DEFAULT_DATA,
    GIN_FILES,
    add_data_argument,
    draw,
    judge,
    open_trained,
    sample_metric,
    split_examples,
)

ROOT = Path(__file__).resolve().parents[1]
QUICK_OVERRIDES = [
    "TRAIN_SAMPLES = 4096",
    "BASE_TRAIN_SAMPLES = 4096",
    "stage1/TrainSettings.eval_every_samples = 0",
    "stage2/TrainSettings.eval_every_samples = 0",
]
DEFAULT_WORKDIRS = {
    "digits": ROOT / "runs" / "quickstart",
    "photos": ROOT / "runs" / "quickstart_photos",
}
assert set(DEFAULT_WORKDIRS) == set(DATA_SETS)


def train(gin: list[str], workdir: Path, bindings: list[str]) -> float:
    """`ulframe run` in a subprocess (1 thread); finished stages are skipped. Wall seconds."""
    args = [sys.executable, "-m", "ulframe", "run", *gin, "--workdir", str(workdir)]
    for b in bindings:
        args += ["--gin_param", b]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    done = subprocess.run(args, cwd=ROOT, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"`{' '.join(args)}` failed ({done.returncode})")
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_data_argument(p)
    p.add_argument("--workdir", type=Path, default=None, help="the run (default: see above)")
    p.add_argument("--gin", nargs="+", default=None, help="gin files (default: the --data's)")
    p.add_argument("--samples", type=int, default=256, help="images per set")
    p.add_argument(
        "--quick",
        action="store_true",
        help="train a short run (4096 + 4096 samples) first (minutes), 128 samples per set",
    )
    p.add_argument(
        "--no-train", action="store_true", help="measure --workdir as it is (train nothing)"
    )
    p.add_argument(
        "--grid",
        type=Path,
        default=None,
        help="also write a PNG: one row of 16 samples per set (held-out images first; the "
        "guided row spread over the classes)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON")
    p.add_argument(
        "--gin-param",
        action="append",
        default=[],
        help="extra gin binding for the run (repeatable; after the --quick ones)",
    )
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = args.data or DEFAULT_DATA
    gin = args.gin or [str(GIN_FILES[data])]
    bindings = (list(QUICK_OVERRIDES) if args.quick else []) + list(args.gin_param)
    if args.quick:
        args.samples = min(args.samples, 128)
    workdir = args.workdir or (
        ROOT / "runs" / f"stage2_vs_prior_quick_{data}" if args.quick else DEFAULT_WORKDIRS[data]
    )
    train_s = None
    if not args.no_train:
        train_s = train(gin, workdir, bindings)
        print(f"trained (or reused) {workdir} in {train_s:.0f} s", flush=True)

    t0 = time.perf_counter()
    opened = open_trained(workdir, gin, bindings)
    experiment = opened.experiment
    stage1, model1, _ = next(r for r in opened.stages if hasattr(r[1], "sample_latents"))
    stage2, model2, _ = next(r for r in opened.stages if hasattr(r[1], "sample"))
    metric, metric_name = sample_metric(opened)
    reference = split_examples(experiment, "eval", args.samples)
    n = len(reference)
    real = split_examples(experiment, "train", n)
    num_classes = experiment.dataset.num_classes
    labels = stage2.sample_labels(n, torch.device("cpu"), num_classes)
    sets: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        g = torch.Generator().manual_seed(experiment.seed)
        chunks = []
        for start in range(0, n, 64):
            k = min(64, n - start)
            z_0 = model1.sample_latents(k, g, stage1.sampler, stage1.sample_steps)
            chunks.append(model1.decode_latents(z_0, g, stage1.sampler, stage1.sample_steps))
        sets["stage-1 ELBO prior"] = torch.cat(chunks).cpu()
    sets["stage-2 base, unconditional"] = draw(stage2, model2, n, None, 1.0, experiment.seed)
    guided = f"stage-2 base, guided w={stage2.guidance_scale}"
    sets[guided] = draw(stage2, model2, n, labels, stage2.guidance_scale, experiment.seed)
    scores = {
        name: judge(metric, reference, x, labels if name == guided else None)
        for name, x in sets.items()
    }
    fd_real = judge(metric, reference, real)["fd"]
    print(
        f"workdir: {workdir}   data: {data}   images per set: {n}   features: metrics."
        f"{metric_name} (not FID)   measured in {time.perf_counter() - t0:.0f} s"
    )
    print(f"{'samples from':<36} {metric_name:>10} {'class acc.':>10}")
    for name, s in scores.items():
        acc = f"{s['class_accuracy']:.3f}" if "class_accuracy" in s else "—"
        print(f"{name:<36} {s['fd']:>10.2f} {acc:>10}")
    print(f"{'real train images (fd_real)':<36} {fd_real:>10.2f}")
    if args.grid is not None:
        from ulframe.eval.images import save_grid

        # 16 per row; the guided row spread over the classes (its samples are in class order)
        spread = torch.linspace(0, n - 1, 16).round().long()
        rows = [reference[:16], *(x[spread] if k == guided else x[:16] for k, x in sets.items())]
        path = save_grid(torch.cat(rows), args.grid, ncols=16, scale=2)
        print(f"grid: {path} (rows: held-out images, {', '.join(sets)})")
    ratio = scores["stage-2 base, unconditional"]["fd"] / scores["stage-1 ELBO prior"]["fd"]
    if args.json is not None:
        record = {
            "data": data, "workdir": str(workdir), "metric": metric_name, "samples": n,
            "scores": scores, "fd_real": fd_real, "ratio": ratio, "train_s": train_s,
        }  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"fd ratio base/prior ({data}): {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
