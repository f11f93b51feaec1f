"""Eager vs torch.compile'd training steps of the quickstart, and its CPU settings, with MFU.

    .venv/bin/python benchmarks/compile.py            # gin/quickstart.gin: stage 1 and stage 2
    .venv/bin/python benchmarks/compile.py --quick    # tiny networks at 16x16, a few steps

The quickstart's two stages are built from gin/quickstart.gin (its networks, the digits,
stage 1 at batch 16, stage 2 at batch 64 on latents the stage-1 encoder cached; `--quick`
shrinks the networks to the test sizes at 16x16, batches 8 and 16). Each variant is a
`ulframe.train.step.Trainer` on its own copy of the same initial weights, stepped by the loop's
own `train_step` on the same preloaded batches; the variants run interleaved round by round
(A B C, C B A, ...), the first round is a warm-up (it compiles) and is dropped, and each is
reported as the median over rounds of its mean wall time per step, with samples/s and MFU
(`ulframe.train.perf`: model FLOPs per example counted once, over the matmul rate the device
achieves in float32 with the same threads, or `--peak-flops`). The compile time is the first
step of a compiled variant less its median step.

Stage-1 variants:

- ``demo (eager)``: what `make demo` runs today: eager, fp32, torch's default threads
  (``--threads``; the demo leaves torch's default, one per core), contiguous tensors.
- ``compile networks`` / ``compile step``: `TrainSettings.compile` "networks" / "step".
- ``channels-last``: the model and the images in channels-last memory format (eager).
- ``1 thread``: eager on one torch thread (when ``--threads`` is not 1).
- ``bf16 autocast``: `TrainSettings.precision` "bf16" (eager; CPUs with AMX or AVX512-BF16).
- ``best``: the combination of `BEST` (what measured fastest on the 2-core CPU machine).

Stage 2: ``demo (eager)`` and ``compile networks``. The last two lines are
``best/demo samples/s ratio: X.XX`` and ``compile/eager step ratio: X.XX`` (stage 1,
"compile networks" over "demo (eager)"; below 1: compile is faster).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ulframe import wiring
from ulframe.data.pipeline import build_loader, first_example
from ulframe.protocols import BuildContext
from ulframe.train import checkpoint, perf
from ulframe.train.distributed import World, pick_device
from ulframe.train.perf import count_example_flops, probe_batch
from ulframe.train.settings import CONFIGURABLES
from ulframe.train.step import Trainer, seed_for, train_step

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "gin" / "quickstart.gin"
SEED = 0
BATCHES_IN_MEMORY = 4  # distinct preloaded batches, cycled
QUICK = (  # the test sizes (tests/conftest.py, TINY_RUN) on 16x16 digits
    "datasets.digits.resolution = 16",
    "encoders.resnet.channels = (8, 16)",
    "prior/priors.vit.widths = (32,)",
    "prior/priors.vit.depths = (1,)",
    "prior/priors.vit.heads = 2",
    "decoders.uvit.channels = (8,)",
    "decoders.uvit.width = 32",
    "decoders.uvit.depth = 1",
    "decoders.uvit.heads = 2",
    "base/priors.vit.widths = (16, 32)",
    "base/priors.vit.depths = (1, 1)",
    "base/priors.vit.heads = 2",
    "stage1/TrainSettings.batch_size = 8",
    "stage2/TrainSettings.batch_size = 16",
)


@dataclass(frozen=True)
class Variant:
    """How one variant trains: TrainSettings.compile and .precision, memory format, threads."""

    compile: str = "off"
    precision: str = "fp32"
    channels_last: bool = False
    threads: int = 0  # 0: the benchmark's --threads


BEST = Variant(compile="networks", channels_last=True)  # see docs/benchmarks.md, "Compile and MFU"
DEMO, NETWORKS = "demo (eager)", "compile networks"


@dataclass
class Runner:
    """One variant: its trainer, its batches, its timings."""

    trainer: Trainer
    batches: list[dict[str, Tensor]]
    threads: int
    samples_seen: int = 0
    per_step: list[float] = field(default_factory=list)  # seconds, one per timed round
    first_step: float = 0.0  # seconds of the very first step (compiles)

    def round(self, steps: int, device: torch.device, first: bool) -> float:
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            t0 = time.perf_counter()
            for step in range(steps):
                batch = self.batches[step % len(self.batches)]
                result = train_step(self.trainer, batch, self.samples_seen)
                self.samples_seen += self.trainer.settings.batch_size
                if first and step == 0:
                    float(result.scalars["loss_nats"])  # waits for the device
                    self.first_step = time.perf_counter() - t0
            float(result.scalars["loss_nats"])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return (time.perf_counter() - t0) / steps
        finally:
            torch.set_num_threads(before)


def _preload(source: Any, batch_size: int, device: torch.device) -> list[dict[str, Tensor]]:
    loader = build_loader(source, batch_size=batch_size, seed=SEED, num_workers=0, prefetch=0)
    batches = [b for _, b in zip(range(BATCHES_IN_MEMORY), loader)]
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def _runner(
    model: torch.nn.Module,
    settings: Any,
    batches: list[dict[str, Tensor]],
    variant: Variant,
    device: torch.device,
    threads: int,
) -> Runner:
    model = copy.deepcopy(model)
    if variant.channels_last:
        model = model.to(memory_format=torch.channels_last)
        batches = [
            {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
             for k, v in b.items()}
            for b in batches
        ]  # fmt: skip
    settings = dataclasses.replace(settings, compile=variant.compile, precision=variant.precision)
    trainer = Trainer.build(model, settings, World(0, 1, 0, device), SEED)
    trainer.wrapped.train()
    return Runner(trainer, batches, variant.threads or threads)


@dataclass
class StageBench:
    name: str
    batch_size: int
    flops_per_example: float
    runners: dict[str, Runner]


def _stage(
    name: str,
    stage: Any,
    ctx: BuildContext,
    train_source: Any,
    variants: dict[str, Variant],
    device: torch.device,
    threads: int,
) -> tuple[StageBench, torch.nn.Module]:
    torch.manual_seed(seed_for(SEED, 0, 0))
    model = stage.build(ctx).to(device)
    source = stage.train_source(train_source)
    settings = stage.train
    batches = _preload(source, settings.batch_size, device)
    two = probe_batch(source)
    assert two is not None
    flops = count_example_flops(model, {k: v.to(device) for k, v in two.items()})
    runners = {
        k: _runner(model, settings, batches, v, device, threads) for k, v in variants.items()
    }
    return StageBench(name, settings.batch_size, flops, runners), model


def _run_rounds(bench: StageBench, rounds: int, steps: int, device: torch.device) -> None:
    names = list(bench.runners)
    for r in range(rounds + 1):
        for name in names if r % 2 == 0 else reversed(names):
            per_step = bench.runners[name].round(steps, device, first=r == 0)
            if r > 0:  # round 0 warms up (and compiles) every variant
                bench.runners[name].per_step.append(per_step)


def _table(
    bench: StageBench, peak: Callable[[Variant], float], variants: dict[str, Variant]
) -> None:
    print(f"\n{bench.name}: batch {bench.batch_size}, {bench.flops_per_example / 1e6:.1f} MFLOP "
          f"per example (forward + backward)")  # fmt: skip
    print(f"{'variant':<18} {'median ms':>10} {'min':>8} {'max':>8} {'samples/s':>10} "
          f"{'vs demo':>8} {'MFU':>7} {'compile s':>10}")  # fmt: skip
    demo = statistics.median(bench.runners[DEMO].per_step)
    for name, runner in bench.runners.items():
        median = statistics.median(runner.per_step)
        rate = bench.batch_size / median
        mfu = perf.mfu_scalars(bench.flops_per_example, rate, 1, peak(variants[name]))
        compile_s = runner.first_step - median if variants[name].compile != "off" else 0.0
        print(
            f"{name:<18} {1e3 * median:>10.2f} {1e3 * min(runner.per_step):>8.2f} "
            f"{1e3 * max(runner.per_step):>8.2f} {rate:>10.1f} {median / demo:>8.3f} "
            f"{100 * mfu.get('perf/mfu', 0.0):>6.2f}% {compile_s:>10.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny networks at 16x16, few steps")
    parser.add_argument("--steps", type=int, help="optimizer steps per round (default 10; 3 quick)")
    parser.add_argument(
        "--rounds", type=int, help="timed rounds after one warm-up (default 5; 2 quick)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads (default 0: torch's default, one per core, as the demo)",
    )
    parser.add_argument(
        "--peak-flops", type=float, default=0.0, help="MFU's peak FLOP/s (default: measured)"
    )
    parser.add_argument(
        "--no-stage2", action="store_true", help="stage 1 only (stage 2 caches latents first)"
    )
    args = parser.parse_args(argv)
    steps = args.steps or (3 if args.quick else 10)
    rounds = args.rounds or (2 if args.quick else 5)
    device = pick_device(args.device)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)

    stage1_variants = {
        DEMO: Variant(),
        NETWORKS: Variant(compile="networks"),
        "compile step": Variant(compile="step"),
        "channels-last": Variant(channels_last=True),
        "bf16 autocast": Variant(precision="bf16"),
        "best": BEST,
    }
    if threads != 1:
        stage1_variants["1 thread"] = Variant(threads=1)
    if args.quick:  # the compile of each variant dominates a quick run
        for name in ("compile step", "bf16 autocast"):
            stage1_variants.pop(name)
    stage2_variants = {DEMO: Variant(), NETWORKS: Variant(compile="networks")}

    rates: dict[tuple[str, str, int], float] = {}

    def peak(variant: Variant) -> float:
        if args.peak_flops > 0:
            return float(args.peak_flops)
        dtype = torch.bfloat16 if variant.precision == "bf16" else torch.float32
        n = variant.threads or threads
        key = (str(device), str(dtype), n)
        if key not in rates:
            torch.set_num_threads(n)
            rates[key] = perf.measure_matmul_rate(device, dtype)
            torch.set_num_threads(threads)
        return rates[key]

    bindings = [*(QUICK if args.quick else ()), "Experiment.hooks = []"]
    wiring.load([str(QUICKSTART)], bindings, engine=CONFIGURABLES)
    experiment = wiring.experiment()
    stage1, stage2 = experiment.stages[:2]
    dataset = experiment.dataset
    train = dataset.source("train")
    example = first_example(train)
    print(
        f"gin/quickstart.gin{' --quick' if args.quick else ''}: {tuple(example['x'].shape)} digits, "
        f"{steps} steps x {rounds} rounds (+1 warm-up), device {device}, {threads} torch "
        f"threads, torch {torch.__version__}"
    )
    with tempfile.TemporaryDirectory(prefix="ulframe-compile-") as tmp:
        dirs = {name: Path(tmp) / name for name in ("stage1", "stage2")}
        ctx1 = BuildContext(example, dataset.num_classes, device, dirs["stage1"])
        t0 = time.perf_counter()
        bench1, model1 = _stage("stage 1", stage1, ctx1, train, stage1_variants, device, threads)
        _run_rounds(bench1, rounds, steps, device)
        print(f"(stage 1: {time.perf_counter() - t0:.0f} s)")
        _table(bench1, peak, stage1_variants)
        if not args.no_stage2:
            # stage 2 reads stage 1's EMA weights from a checkpoint: the initial ones will do
            state = {"model": model1.state_dict(), "ema": model1.state_dict(), "samples_seen": 0}
            checkpoint.save(checkpoint.checkpoint_dir(dirs["stage1"]), 0, state)
            ctx2 = BuildContext(
                example, dataset.num_classes, device, dirs["stage2"], {"stage1": dirs["stage1"]}
            )
            t0 = time.perf_counter()
            bench2, _ = _stage("stage 2", stage2, ctx2, train, stage2_variants, device, threads)
            _run_rounds(bench2, rounds, steps, device)
            print(f"(stage 2: {time.perf_counter() - t0:.0f} s)")
            _table(bench2, peak, stage2_variants)

    demo = statistics.median(bench1.runners[DEMO].per_step)
    best = statistics.median(bench1.runners["best"].per_step)
    compiled = statistics.median(bench1.runners[NETWORKS].per_step)
    print(f"\nbest = {BEST}")
    print(f"best/demo samples/s ratio: {demo / best:.2f}")
    print(f"compile/eager step ratio: {compiled / demo:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
