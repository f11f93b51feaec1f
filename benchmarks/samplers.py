"""Fast samplers on a trained run: sample quality against network calls, and the decoder alone.

For every sampler (`--samplers`, registered names) at every step count (`--steps`, the same for
the base model's chain and the decoder's), and for a DDIM reference at `--reference-steps`, this
draws `--samples` end-to-end samples (UL paper, Algorithm 2) per sample seed (`--seeds`: seeds
0, 1, ...) at classifier-free guidance `--guidance` on every step (no guidance interval,
whatever the run's config says), labels covering the classes evenly, and reports:

- **fd**: the run's sample metric (`Experiment.sample_metric`, e.g. `metrics.fd_digits`: the
  Fréchet distance of the digit judge's features) of the samples against as many eval
  examples, and **class accuracy** (the judge's label is the label drawn for), both as mean ±
  spread (standard deviation) over the seeds;
- **speckle**: the samples' mean absolute Laplacian over the eval examples' (1: as clean as the
  data), mean over the seeds;
- **calls**: network calls per sample, counted (a guided call of the base model is two: the
  conditional and the unconditional pass), and the **wall time** per sample (indicative: CPU
  time on whatever else shares the machine);
- **decoder alone**: the PSNR and speckle of reconstructions of held-out eval examples (encode,
  draw z_0, decode from pure noise) against the decoder's steps, for each sampler and the
  reference.

Every configuration of one seed starts from the same noise (the deterministic samplers draw
none of their own), so differences between samplers are the samplers'.

    OMP_NUM_THREADS=1 python benchmarks/samplers.py --workdir runs/quickstart --json out/samplers.json
    OMP_NUM_THREADS=1 python benchmarks/samplers.py --workdir runs/quickstart --json /tmp/s.json \\
        --samples 100 --seeds 1 --steps 4 8                                  # a quick try

Writes the JSON (`--json`), beside it the plot of fd against calls (`NAME.png`) and of the
decoder's PSNR against steps (`NAME_decoder.png`). The budget of the last line is the calls of
DDIM at a quarter of 32 steps (8 steps: 2 · 8 guided base calls + 9 decoder calls = 25, about a
quarter of DDIM-32's 97). A configuration meets the target when, within that budget, its fd is
within the larger of twice the seed spread (the larger of its own and DDIM-32's) and 5% of
DDIM-32's, its class accuracy is at least 0.99 and its speckle within ±0.05 of DDIM-32's.
`--split B:D` adds rows where the base model takes B steps and the decoder D (e.g. `7:10`: 14
guided base calls and 11 decoder calls, 25 in all); they are judged against the target too, and
the last line names the best of the rows with one step count for both chains.

Last line: `samplers: best at <= 1/4 the calls of ddim-32: NAME-N fd X (ddim-32 Y), class
accuracy A` (the lowest mean fd within the budget).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ulframe import trained, wiring
from ulframe.eval.metrics import psnr, speckle
from ulframe.eval.samples import judge_samples

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _plot import Series, xy_figure

BASELINE = "ddim"
BASELINE_STEPS = 32
BUDGET_STEPS = BASELINE_STEPS // 4
TARGET_ACCURACY = 0.99
TARGET_SPECKLE = 0.05
TARGET_FD_REL = 0.05
CHUNK = 250


@contextmanager
def counting(obj: Any, method: str, tally: list[int]) -> Iterator[None]:
    """Count the rows `obj.method` is called on (into `tally[0]`) while the block runs."""
    original = getattr(obj, method)

    def counted(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        tally[0] += x.shape[0]
        return original(x, *args, **kwargs)

    setattr(obj, method, counted)
    try:
        yield
    finally:
        delattr(obj, method)  # the instance attribute; the class's method shows again


def draw(
    model: Any,
    sampler: Callable[..., Tensor],
    steps: int,
    n: int,
    labels: Tensor | None,
    guidance: float,
    seed: int,
    device: torch.device,
    decoder_steps: int | None = None,
) -> tuple[Tensor, float, float]:
    """n end-to-end samples of the base model `model` for `labels` (n,) or None, guided on every
    step, `steps` for both chains (`decoder_steps`: the decoder's instead); (samples on CPU,
    network calls per sample, wall seconds per sample)."""
    generator = torch.Generator(device).manual_seed(seed)
    tally = [0]
    parts = []
    start = time.perf_counter()
    with counting(model, "base_eps", tally), counting(model.latents(), "decoder_eps", tally):
        for lo in range(0, n, CHUNK):
            chunk = None if labels is None else labels[lo : lo + CHUNK]
            count = min(CHUNK, n - lo)
            x = model.sample(
                count,
                generator,
                chunk,
                sampler,
                steps,
                decoder_steps or steps,
                guidance,
                interval=None,
            )
            parts.append(x.cpu())
    seconds = time.perf_counter() - start
    return torch.cat(parts), tally[0] / n, seconds / n


def spread(values: Sequence[float]) -> float:
    """Standard deviation over the seeds (0 for one seed)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def configurations(
    samplers: Sequence[str], steps: Sequence[int], reference_steps: int
) -> list[tuple[str, int]]:
    """(sampler, steps) pairs: every sampler at every step count (fewest steps first), then the
    DDIM reference."""
    pairs = [(name, n) for n in steps for name in samplers]
    if reference_steps and (BASELINE, reference_steps) not in pairs:
        pairs.append((BASELINE, reference_steps))
    return pairs


def parse_split(text: str) -> tuple[int, int]:
    """`B:D` of `--split`: B base-model steps and D decoder steps."""
    try:
        base, decoder = (int(v) for v in text.split(":"))
    except ValueError:
        raise SystemExit(f"--split takes BASE:DECODER steps, e.g. 7:10; got {text!r}") from None
    trained.check_sampling(None, base, decoder)
    return base, decoder


def end_to_end(args: argparse.Namespace, run: Any) -> list[dict[str, Any]]:
    """The table of end-to-end samples: one row per (sampler, steps), over the seeds."""
    sampling = run.sampling()
    if sampling is None:
        raise SystemExit(f"{args.workdir}: no stage of this run draws samples")
    stage, model, device = sampling.stage, sampling.model, run.device
    experiment = run.experiment
    reference = trained.split_examples(experiment, "eval", args.samples)
    n = len(reference)
    labels = stage.sample_labels(n, device, experiment.dataset.num_classes)
    if experiment.sample_metric is None:
        raise SystemExit(f"{args.workdir}: the run names no Experiment.sample_metric")
    metric = wiring.call(experiment.sample_metric)
    rows = []
    runs: list[tuple[str, int, int | None]] = [
        (name, steps, None)
        for name, steps in configurations(args.samplers, args.steps, args.reference_steps)
    ]
    runs += [(name, b, d) for b, d in args.split for name in args.samplers]
    for name, steps, decoder_steps in runs:
        sampler = trained.resolve_sampler(name)
        assert sampler is not None
        per_seed: dict[str, list[float]] = {}
        for seed in range(args.seeds):
            samples, calls, seconds = draw(
                model, sampler, steps, n, labels, args.guidance, seed, device, decoder_steps
            )
            judged = judge_samples(metric, reference, samples, labels)
            for key, value in (
                ("fd", judged["fd"]),
                ("class_accuracy", judged.get("class_accuracy", math.nan)),
                ("speckle", judged["speckle"]),
                ("calls", calls),
                ("seconds", seconds),
            ):
                per_seed.setdefault(key, []).append(float(value))
        row: dict[str, Any] = {"sampler": name, "steps": steps, "samples": n}
        if decoder_steps is not None:
            row["decoder_steps"] = decoder_steps
        for key, values in per_seed.items():
            row[key] = statistics.fmean(values)
            row[f"{key}_spread"] = spread(values)
            row[f"{key}_seeds"] = values
        rows.append(row)
        label = f"{steps}" if decoder_steps is None else f"{steps}:{decoder_steps}"
        print(
            f"{name:>10}-{label:<5} calls {row['calls']:6.1f}  fd {row['fd']:.3f} ± "
            f"{row['fd_spread']:.3f}  class acc {row['class_accuracy']:.4f}  speckle "
            f"{row['speckle']:.3f}  {1e3 * row['seconds']:.1f} ms/sample",
            flush=True,
        )
    return rows


def decoder_alone(args: argparse.Namespace, run: Any) -> list[dict[str, Any]]:
    """PSNR of the decoder's reconstructions of held-out examples against its steps."""
    joint = next(r for r in run.stages if hasattr(r.model, "reconstruct"))
    x = trained.split_examples(run.experiment, "eval", args.decoder_samples).to(run.device)
    rows = []
    for name, steps in configurations(args.samplers, args.steps, args.reference_steps):
        sampler = trained.resolve_sampler(name)
        generator = torch.Generator(run.device).manual_seed(0)
        start = time.perf_counter()
        recons = []
        with torch.no_grad():
            for lo in range(0, len(x), CHUNK):
                chunk = x[lo : lo + CHUNK]
                recons.append(joint.model.reconstruct(chunk, generator, sampler, steps).to(x.dtype))
        seconds = (time.perf_counter() - start) / len(x)
        recon = torch.cat(recons)
        value, grain = float(psnr(x, recon).mean()), speckle(x, recon)
        rows.append(
            {"sampler": name, "steps": steps, "psnr": value, "speckle": grain, "seconds": seconds}
        )
        print(f"decoder {name:>10}-{steps:<4} psnr {value:.2f} dB  speckle {grain:.3f}", flush=True)
    return rows


def verdict(rows: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(the best row within the budget, the DDIM-32 row); each row gets `meets_target`. Both
    None when the run has no DDIM-32 to compare with."""
    base = next((r for r in rows if (r["sampler"], r["steps"]) == (BASELINE, BASELINE_STEPS)), None)
    if base is None:
        return None, None
    budget = next(
        (r["calls"] for r in rows if (r["sampler"], r["steps"]) == (BASELINE, BUDGET_STEPS)),
        base["calls"] / 4,
    )
    within = [r for r in rows if r["calls"] <= budget + 1e-9 and "decoder_steps" not in r]
    for r in rows:
        tolerance = max(2 * max(r["fd_spread"], base["fd_spread"]), TARGET_FD_REL * base["fd"])
        r["meets_target"] = bool(
            r["calls"] <= budget + 1e-9
            and r["fd"] <= base["fd"] + tolerance
            and r["class_accuracy"] >= TARGET_ACCURACY
            and abs(r["speckle"] - base["speckle"]) <= TARGET_SPECKLE
        )
    best = min(within, key=lambda r: r["fd"]) if within else None
    return best, base


def plots(path: Path, rows: list[dict[str, Any]], decoder: list[dict[str, Any]]) -> None:
    """fd against calls (PNG beside the JSON) and the decoder's PSNR against steps."""
    names = list(dict.fromkeys(r["sampler"] for r in rows))
    series = [
        Series(
            name,
            [(r["calls"], r["fd"]) for r in rows if r["sampler"] == name],
            [str(r["steps"]) for r in rows if r["sampler"] == name],
        )
        for name in names
    ]
    fig = xy_figure(
        series, "end-to-end samples: fd against network calls (labels: steps)",
        "network calls per sample", "fd (mean over seeds)", logx=True, logy=True,
        legend="upper right",
    )  # fmt: skip
    fig.save(path.with_suffix(".png"))
    if decoder:
        series = [
            Series(
                name,
                [(r["steps"], r["psnr"]) for r in decoder if r["sampler"] == name],
            )
            for name in names
        ]
        fig = xy_figure(
            series, "decoder alone: PSNR of held-out reconstructions", "decoder steps",
            "PSNR (dB)", logx=True, legend="lower right",
        )  # fmt: skip
        fig.save(path.with_name(path.stem + "_decoder.png"))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", type=Path, required=True, help="a trained run (read only)")
    p.add_argument("--json", type=Path, default=Path("samplers.json"), help="the output")
    p.add_argument("--samplers", nargs="+", default=["ddim", "dpmpp_2m", "heun", "unipc"])
    p.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--reference-steps", type=int, default=256, help="DDIM reference; 0: none")
    p.add_argument(
        "--split", nargs="+", type=parse_split, default=[], metavar="B:D",
        help="also every sampler with B base-model steps and D decoder steps (end to end only)",
    )  # fmt: skip
    p.add_argument("--seeds", type=int, default=3, help="sample seeds 0 .. S-1")
    p.add_argument("--samples", type=int, default=500, help="guided samples per seed")
    p.add_argument("--decoder-samples", type=int, default=500, help="0: skip the decoder")
    p.add_argument("--guidance", type=float, default=1.5)
    args = p.parse_args(argv)
    for flag, value in (("--seeds", args.seeds), ("--samples", args.samples)):
        if value < 1:
            raise SystemExit(f"{flag} must be >= 1, got {value}")
    for steps in args.steps:
        trained.check_sampling(None, steps)
    for name in args.samplers:
        trained.check_sampling(name)
    torch.set_grad_enabled(False)
    run = trained.open_run(args.workdir, trained.config_files(args.workdir))
    t0 = time.perf_counter()
    rows = end_to_end(args, run)
    decoder = decoder_alone(args, run) if args.decoder_samples > 0 else []
    best, base = verdict(rows)
    result = {
        "workdir": str(args.workdir),
        "guidance": args.guidance,
        "seeds": args.seeds,
        "samples": rows[0]["samples"],
        "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - t0,
        "end_to_end": rows,
        "decoder": decoder,
        "best": None if best is None else f"{best['sampler']}-{best['steps']}",
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    plots(args.json, rows, decoder)
    if base is None:
        print(f"samplers: no {BASELINE}-{BASELINE_STEPS} in this run to compare with")
        return 1
    meeting = [
        f"{r['sampler']}-{r['steps']}" + (f":{r['decoder_steps']}" if "decoder_steps" in r else "")
        for r in rows
        if r["meets_target"]
    ]
    print(f"meet the target: {', '.join(meeting) or 'none'}")
    if best is None:
        print(f"samplers: no configuration within {BUDGET_STEPS}-step DDIM's calls")
        return 1
    print(
        f"samplers: best at <= 1/4 the calls of {BASELINE}-{BASELINE_STEPS}: "
        f"{best['sampler']}-{best['steps']} fd {best['fd']:.3f} ({BASELINE}-{BASELINE_STEPS} "
        f"{base['fd']:.3f}), class accuracy {best['class_accuracy']:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
