"""Framework overhead of a stage-1 training step: ulframe's training loop vs plain PyTorch.

    .venv/bin/python benchmarks/overhead.py            # tiny_image preset, 32x32, batch 16
    .venv/bin/python benchmarks/overhead.py --quick    # a few seconds: tiny networks, 16x16

Three ways to train the same networks (same classes, same initial weights, same data, same loss)
are timed in one process, interleaved round by round (A B C, C B A, ...; the first round is a
warm-up and is dropped), and each is reported as the median over rounds of its mean time per step:

- ``ulframe train_stage``: the real path. ``ulframe.train.loop.train_stage`` runs a ``ULJoint``
  stage (``ULJoint.build`` -> ``ULJointModel``) for ``steps * batch_size`` samples with no hooks
  but a start timestamp, logging and intermediate evaluations/checkpoints off. The timed window
  runs from the ``ulframe_after_build`` hook (the networks, optimizer, EMA and data loader are
  built) to the moment the loop calls the stage's final ``evaluate`` (replaced by a timestamp:
  evaluation is not per-step work). It includes the loop's data pipeline (torchdata: sampler,
  decode = an index into preloaded examples, batching, a prefetch thread) and every call of
  ``train_step`` (per-step reseeding from (seed, rank, samples seen), the learning-rate update,
  the autocast context, forward, backward, gradient clipping, the skip check, AdamW, the EMA
  update) and the accumulation of the logged metrics. The fixed cost of a ``train_stage`` call
  (building, first example, final checkpoint) is reported separately.
- ``plain PyTorch``: a hand-written loop over the same modules: preloaded batches, one
  generator, the UL loss written inline with torch only (docs/method.md, "Stage 1"), AdamW,
  clipping, the same warm-up of the learning rate and an EMA of the weights
  (``torch._foreach_lerp_``).
- ``ulframe step, no loader``: the loop's own step function, ``ulframe.train.step.train_step``
  (on a ``Trainer`` built as ``train_stage`` builds it), called on the preloaded batches: it
  separates the cost of the data pipeline from that of the model, loss record, seeding and EMA.

Before timing, the inline loss is checked against ``ULJointModel`` (same weights, same
generator): the three variants compute the same objective. Two clocks are reported: wall-clock
time and this process's CPU time (all its threads; far less sensitive to other processes on a
shared CPU; on CUDA it is host time only). The last line printed is ``overhead ratio: X.XX`` =
ulframe train_stage / plain PyTorch, medians of the time per step on ``--clock`` (default wall).
Torch runs one intra-op thread by default (``--threads``): on a small CPU shared with other jobs
two spinning threads make wall-clock timings swing by several times.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ulframe.hookspecs import RunInfo, hookimpl, plugin_manager
from ulframe.protocols import BuildContext, EvalReport
from ulframe.rundir import MetricsFile
from ulframe.train.distributed import World, pick_device
from ulframe.train.loop import RunContext, train_stage
from ulframe.train.settings import TrainSettings
from ulframe.train.step import Trainer, seed_for, train_step
from ulframe_plugins.datasets.photos import Photos
from ulframe_plugins.networks.decoders import UViTDecoder
from ulframe_plugins.networks.encoders import ResNetEncoder
from ulframe_plugins.networks.priors import ViT
from ulframe_plugins.stages.ul_joint import ULJoint, ULJointModel

SEED = 0
# prior: λ_min .. λ_z(0) (docs/method.md, "Stage 1")
LATENT_LOGSNR_MIN, LATENT_LOGSNR_MAX = -15.0, 5.0
DECODER_LOGSNR_MIN, DECODER_LOGSNR_MAX = -15.0, 15.0
REFERENCE_RESOLUTION = 64  # ShiftedCosineSchedule's default
LOSS_FACTOR, BIAS = 1.5, 0.0  # c_lf and b of the decoder weighting sigmoid(b - λ)
LR, BETAS, WARMUP_SAMPLES = 1e-3, (0.9, 0.99), 2048  # gin/quickstart.gin
GRAD_CLIP, EMA_HALFLIFE_SAMPLES = 1.0, 2000
BATCHES_IN_MEMORY = 8  # distinct preloaded batches, cycled
LOSS_CHECK_RTOL = 1e-4
NOISY_SPREAD = 0.25  # (max - min) / median of plain's round times above which we warn
PLAIN, ULFRAME = "plain PyTorch loop", "ulframe train_stage"


@dataclass(frozen=True)
class Size:
    """Network hyperparameters at one input resolution."""

    resolution: int
    encoder: dict[str, Any]
    prior: dict[str, Any]
    decoder: dict[str, Any]


SIZES = {
    # gin/presets/tiny_image.gin (32x32 photos, as in gin/quickstart.gin)
    "preset": Size(
        32,
        encoder=dict(latent_channels=4, channels=(32, 64), blocks_per_stage=(1, 1), patch_size=2),
        prior=dict(widths=(96,), depths=(2,), heads=4, patch_size=1),
        decoder=dict(
            channels=(48,),
            blocks_per_stage=1,
            width=96,
            depth=2,
            heads=4,
            patch_size=2,
            dropout=0.0,
        ),
    ),
    # the sizes of the unit and contract tests (16x16)
    "tiny": Size(
        16,
        encoder=dict(latent_channels=4, channels=(8, 16), blocks_per_stage=(1, 1), patch_size=2),
        prior=dict(widths=(32,), depths=(1,), heads=2, patch_size=1),
        decoder=dict(
            channels=(16,),
            blocks_per_stage=1,
            width=32,
            depth=1,
            heads=2,
            patch_size=2,
            dropout=0.0,
        ),
    ),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Clock:
    """Wall-clock time and this process's CPU time (all threads), in seconds."""

    wall: float
    cpu: float

    @staticmethod
    def now(device: torch.device) -> Clock:
        sync(device)
        return Clock(time.perf_counter(), time.process_time())

    def __sub__(self, other: Clock) -> Clock:
        return Clock(self.wall - other.wall, self.cpu - other.cpu)

    def __truediv__(self, n: int) -> Clock:
        return Clock(self.wall / n, self.cpu / n)

    def __add__(self, other: Clock) -> Clock:
        return Clock(self.wall + other.wall, self.cpu + other.cpu)


# ---- the ulframe side --------------------------------------------------------------------------


def make_stage(size: Size, batch_size: int, steps: int) -> ULJoint:
    train = TrainSettings(
        batch_size=batch_size,
        train_samples=steps * batch_size,
        optimizer=partial(torch.optim.AdamW, betas=BETAS, weight_decay=0.0),
        lr=LR,
        warmup_samples=WARMUP_SAMPLES,
        grad_clip=GRAD_CLIP,
        ema_halflife_samples=EMA_HALFLIFE_SAMPLES,
        log_every_samples=10**15,  # no logging inside the timed window
        eval_every_samples=0,
        eval_batches=1,
        checkpoint_every_samples=0,
        keep_checkpoints=1,
    )
    return ULJoint(
        encoder=partial(ResNetEncoder, **size.encoder),
        prior=partial(ViT, **size.prior),
        decoder=partial(UViTDecoder, **size.decoder),
        train=train,
        loss_factor=LOSS_FACTOR,
        latent_logsnr_min=LATENT_LOGSNR_MIN,
        latent_logsnr_max=LATENT_LOGSNR_MAX,
        decoder_logsnr_min=DECODER_LOGSNR_MIN,
        decoder_logsnr_max=DECODER_LOGSNR_MAX,
    )


class InMemorySource:
    """A Source whose items index examples decoded once, before timing."""

    def __init__(self, examples: list[dict[str, Any]]) -> None:
        self.items = list(range(len(examples)))
        self.examples = examples

    def decode(self, item: int) -> dict[str, Any]:
        return self.examples[item]


class InMemoryDataset:
    """The ulframe side's dataset: the same preloaded examples as the plain loop's batches."""

    def __init__(self, examples: list[dict[str, Any]], num_classes: int) -> None:
        self.examples = examples
        self.num_classes = num_classes

    def source(self, split: str) -> InMemorySource:
        return InMemorySource(self.examples)


class TimedStage:
    """A ULJoint whose final evaluation is replaced by a timestamp (the end of the window)."""

    def __init__(self, inner: ULJoint, device: torch.device) -> None:
        self.inner = inner
        self.name = inner.name
        self.train = inner.train
        self.device = device
        self.end = Clock(math.nan, math.nan)

    def build(self, ctx: BuildContext) -> nn.Module:
        return self.inner.build(ctx)

    def train_source(self, source: Any) -> Any:
        return self.inner.train_source(source)

    def evaluate(self, model: nn.Module, batches: Any, generator: torch.Generator) -> EvalReport:
        self.end = Clock.now(self.device)
        return EvalReport({})


class StartTimer:
    """The only hook: marks the start of the window once everything is built."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = Clock(math.nan, math.nan)

    @hookimpl
    def ulframe_after_build(self, run: RunInfo, stage: Any, model: nn.Module) -> None:
        self.start = Clock.now(self.device)


@dataclass
class Bench:
    """Everything the three variants share."""

    size: Size
    batch_size: int
    steps: int
    device: torch.device
    workdir: Path
    examples: list[dict[str, Any]]
    batches: list[dict[str, Tensor]]  # preloaded, in CPU memory
    num_classes: int
    initial: ULJointModel  # the initial weights train_stage builds (same seed)
    fixed_costs: list[float] = field(default_factory=list)  # wall seconds per train_stage call

    def ulframe_train_stage(self, round_index: int) -> Clock:
        stage = TimedStage(make_stage(self.size, self.batch_size, self.steps), self.device)
        timer = StartTimer(self.device)
        info = RunInfo(self.workdir, [stage.name], "")
        ctx = RunContext(
            self.workdir,
            World(0, 1, 0, self.device),
            plugin_manager([timer]),
            info,
            MetricsFile(self.workdir / "metrics.jsonl", enabled=False),
            seed=SEED,
        )
        stage_dir = self.workdir / f"round{round_index}"  # fresh: train_stage would resume
        dataset = InMemoryDataset(self.examples, self.num_classes)
        t0 = time.perf_counter()
        train_stage(stage, 0, dataset, stage_dir, {}, ctx)
        total = time.perf_counter() - t0
        window = stage.end - timer.start
        self.fixed_costs.append(total - window.wall)
        return window / self.steps

    def ulframe_step_no_loader(self, round_index: int) -> Clock:
        """`ulframe.train.step.train_step` (the loop's own step) on preloaded batches."""
        settings = make_stage(self.size, self.batch_size, self.steps).train
        world = World(0, 1, 0, self.device)
        trainer = Trainer.build(copy.deepcopy(self.initial), settings, world, SEED)
        trainer.wrapped.train()
        sums: dict[str, Tensor] = {}
        samples_seen = 0
        t0 = Clock.now(self.device)
        for step in range(self.steps):
            cpu_batch = self.batches[step % len(self.batches)]
            batch = {k: v.to(self.device, non_blocking=True) for k, v in cpu_batch.items()}
            result = train_step(trainer, batch, samples_seen)
            samples_seen += settings.batch_size
            for k, v in result.scalars.items():  # what the loop accumulates for its log
                sums[k] = sums.get(k, 0.0) + v.float()
        return (Clock.now(self.device) - t0) / self.steps

    def plain(self, round_index: int) -> Clock:
        model = copy.deepcopy(self.initial)
        encoder, prior, decoder = model.encoder, model.prior, model.decoder
        loss_fn = PlainULLoss(self.size.resolution)
        params = [*encoder.parameters(), *prior.parameters(), *decoder.parameters()]
        opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=0.0)
        ema_params = [p.detach().clone() for p in params]
        ema_weight = 1.0 - 0.5 ** (self.batch_size / EMA_HALFLIFE_SAMPLES)
        generator = torch.Generator(self.device).manual_seed(SEED)
        loss_sum = torch.zeros((), device=self.device)
        for module in (encoder, prior, decoder):
            module.train()
        t0 = Clock.now(self.device)
        for step in range(self.steps):
            x = self.batches[step % len(self.batches)]["x"].to(self.device, non_blocking=True)
            for group in opt.param_groups:
                group["lr"] = LR * min(1.0, (step * self.batch_size + 1) / WARMUP_SAMPLES)
            loss = loss_fn(encoder, prior, decoder, x, generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, ema_weight)
            loss_sum += loss.detach()
        return (Clock.now(self.device) - t0) / self.steps


# ---- the plain side: the UL loss with torch only ----------------------------------------------


def cosine_angles(logsnr_min: float, logsnr_max: float) -> tuple[float, float]:
    """(t_min, t_max) of λ(t) = -2 log tan(t_min + t (t_max - t_min)) (docs/method.md, Schedules)."""
    return math.atan(math.exp(-logsnr_max / 2)), math.atan(math.exp(-logsnr_min / 2))


class PlainULLoss:
    """Stage-1 loss L_z + L_x written out (docs/method.md, Stage 1), draws in ULJointModel's order."""

    def __init__(self, resolution: int) -> None:
        self.alpha_0 = math.sqrt(1 / (1 + math.exp(-LATENT_LOGSNR_MAX)))  # alpha(5)
        self.sigma_0 = math.sqrt(1 / (1 + math.exp(LATENT_LOGSNR_MAX)))  # sigma(5)
        self.prior_angles = cosine_angles(LATENT_LOGSNR_MIN, LATENT_LOGSNR_MAX)
        self.shift = 2 * math.log(REFERENCE_RESOLUTION / resolution)  # shifted cosine
        self.decoder_angles = cosine_angles(
            DECODER_LOGSNR_MIN - self.shift, DECODER_LOGSNR_MAX - self.shift
        )
        self.alpha2_1 = 1 / (1 + math.exp(-LATENT_LOGSNR_MIN))
        self.sigma2_1 = 1 / (1 + math.exp(LATENT_LOGSNR_MIN))

    @staticmethod
    def cosine(t: Tensor, angles: tuple[float, float]) -> tuple[Tensor, Tensor]:
        """λ(t) and -dλ/dt, computed in float64 (t is float64), returned as float32."""
        t_min, t_max = angles
        u = t_min + t * (t_max - t_min)
        logsnr = -2 * torch.log(torch.tan(u))
        neg_dlogsnr_dt = 4 * (t_max - t_min) / torch.sin(2 * u)
        return logsnr.float(), neg_dlogsnr_dt.float()

    @staticmethod
    def antithetic(b: int, generator: torch.Generator, device: torch.device) -> Tensor:
        u0 = torch.rand((), generator=generator, device=device, dtype=torch.float64)
        return torch.remainder(u0 + torch.arange(b, device=device, dtype=torch.float64) / b, 1.0)

    def __call__(
        self,
        encoder: nn.Module,
        prior: nn.Module,
        decoder: nn.Module,
        x: Tensor,
        g: torch.Generator,
    ) -> Tensor:
        b, device = x.shape[0], x.device
        z_clean = encoder(x)  # (B, Cz, h, w)
        eps_z = torch.randn(z_clean.shape, generator=g, device=device)
        z_0 = self.alpha_0 * z_clean + self.sigma_0 * eps_z
        t_z = self.antithetic(b, g, device)  # independent times for the two terms
        t_x = self.antithetic(b, g, device)

        logsnr_z, neg_dlogsnr_dt_z = self.cosine(t_z, self.prior_angles)  # (B,)
        scale = (b, 1, 1, 1)
        eps = torch.randn(z_clean.shape, generator=g, device=device)
        alpha, sigma = torch.sigmoid(logsnr_z).sqrt(), torch.sigmoid(-logsnr_z).sqrt()
        z_t = alpha.view(scale) * z_clean + sigma.view(scale) * eps
        v_z = prior(z_t, logsnr_z).float()  # the networks predict v: eps_hat = sigma z_t + alpha v
        eps_hat = sigma.view(scale) * z_t + alpha.view(scale) * v_z
        sq = (eps - eps_hat).square().flatten(1).sum(1)  # (B,)
        prior_nats = 0.5 * neg_dlogsnr_dt_z * sq
        kl = 0.5 * (self.alpha2_1 * z_clean.square() + self.sigma2_1 - 1 - math.log(self.sigma2_1))
        prior_nats = prior_nats + kl.flatten(1).sum(1)

        logsnr_x, neg_dlogsnr_dt_x = self.cosine(t_x, self.decoder_angles)
        logsnr_x = logsnr_x + self.shift
        eps_x = torch.randn(x.shape, generator=g, device=device)
        alpha, sigma = torch.sigmoid(logsnr_x).sqrt(), torch.sigmoid(-logsnr_x).sqrt()
        x_t = alpha.view(scale) * x + sigma.view(scale) * eps_x
        v_x = decoder(x_t, logsnr_x, z_0).float()
        eps_hat_x = sigma.view(scale) * x_t + alpha.view(scale) * v_x
        sq = (eps_x - eps_hat_x).square().flatten(1).sum(1)
        weight = LOSS_FACTOR * torch.sigmoid(BIAS - logsnr_x)
        decoder_nats = weight * 0.5 * neg_dlogsnr_dt_x * sq
        return (prior_nats + decoder_nats).mean()


# ---- setup, check, run -------------------------------------------------------------------------


def setup(size: Size, batch_size: int, steps: int, device: torch.device, workdir: Path) -> Bench:
    count = batch_size * BATCHES_IN_MEMORY
    photos = Photos(resolution=size.resolution, crops_per_epoch=count, seed=SEED)
    source = photos.source("train")
    examples = [source.decode(item) for item in source.items]
    batches = [
        {
            "x": torch.stack([e["x"] for e in examples[i : i + batch_size]]),
            "label": torch.tensor([e["label"] for e in examples[i : i + batch_size]]),
        }
        for i in range(0, count, batch_size)
    ]
    # The initial weights train_stage builds: it seeds with seed_for(seed, 0, 0) before build.
    torch.manual_seed(seed_for(SEED, 0, 0))
    ctx = BuildContext(examples[0], photos.num_classes, device, workdir)
    initial = make_stage(size, batch_size, steps).build(ctx).to(device)
    return Bench(
        size, batch_size, steps, device, workdir, examples, batches, photos.num_classes, initial
    )


def check_same_loss(bench: Bench) -> tuple[float, float]:
    """ULJointModel's total nats and the inline loss, same weights and generator seed."""
    model = copy.deepcopy(bench.initial)
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.any():  # undo zero init so that every network output matters
                with torch.no_grad():
                    p.normal_(0.0, 0.02, generator=torch.Generator(p.device).manual_seed(1))
    x = bench.batches[0]["x"].to(bench.device)
    with torch.no_grad():
        gen = torch.Generator(bench.device).manual_seed(123)
        ours = float(model({"x": x}, gen).total_nats().mean())
        gen = torch.Generator(bench.device).manual_seed(123)
        plain = float(
            PlainULLoss(bench.size.resolution)(model.encoder, model.prior, model.decoder, x, gen)
        )
    return ours, plain


def table(times: dict[str, list[float]], batch_size: int) -> float:
    """Print one clock's table; return ulframe train_stage's median / plain's median."""
    plain = times[PLAIN]
    plain_median = statistics.median(plain)
    print(
        f"{'variant':<26} {'median ms':>10} {'min':>8} {'max':>8} {'samples/s':>10} "
        f"{'vs plain':>9} {'paired':>7} {'of mins':>8}"
    )
    for name, values in times.items():
        median = statistics.median(values)
        paired = statistics.median(v / p for v, p in zip(values, plain, strict=True))
        print(
            f"{name:<26} {1e3 * median:>10.2f} {1e3 * min(values):>8.2f} {1e3 * max(values):>8.2f} "
            f"{batch_size / median:>10.1f} {median / plain_median:>9.3f} {paired:>7.3f} "
            f"{min(values) / min(plain):>8.3f}"
        )
    return statistics.median(times[ULFRAME]) / plain_median


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: tiny networks, 16x16")
    parser.add_argument("--steps", type=int, help="optimizer steps per round (default 20; 5 quick)")
    parser.add_argument("--batch-size", type=int, help="examples per step (default 16; 8 quick)")
    parser.add_argument(
        "--rounds", type=int, help="timed rounds after one warm-up (default 5; 3 quick)"
    )
    parser.add_argument(
        "--size", choices=sorted(SIZES), help="networks (default preset; tiny quick)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="clock of the last line's ratio (default wall; cpu: this process's CPU time)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: stable timings on a small, shared CPU; 0: leave)",
    )
    args = parser.parse_args(argv)
    steps = args.steps or (5 if args.quick else 20)
    batch_size = args.batch_size or (8 if args.quick else 16)
    rounds = args.rounds or (3 if args.quick else 5)
    size = SIZES[args.size or ("tiny" if args.quick else "preset")]
    device = pick_device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    with tempfile.TemporaryDirectory(prefix="ulframe-overhead-") as tmp:
        bench = setup(size, batch_size, steps, device, Path(tmp))
        ours, plain = check_same_loss(bench)
        rel = abs(ours - plain) / abs(plain)
        params = sum(p.numel() for p in bench.initial.parameters())
        print(
            f"stage-1 step, {args.size or ('tiny' if args.quick else 'preset')} networks "
            f"({params / 1e6:.2f}M parameters) on 3x{size.resolution}x{size.resolution}, "
            f"batch {batch_size}, {steps} steps x {rounds} rounds (+1 warm-up), "
            f"device {device}, {threads} torch threads, torch {torch.__version__}"
        )
        print(f"loss check (same weights and generator): ULJointModel {ours:.4f} nats, "
              f"inline torch {plain:.4f} nats, relative difference {rel:.1e}")  # fmt: skip
        if not rel < LOSS_CHECK_RTOL:
            print("the inline loss differs from ULJointModel's: the comparison is not valid")
            return 1

        variants: dict[str, Callable[[int], Clock]] = {
            PLAIN: bench.plain,
            ULFRAME: bench.ulframe_train_stage,
            "ulframe step, no loader": bench.ulframe_step_no_loader,
        }
        times: dict[str, list[Clock]] = {name: [] for name in variants}
        for r in range(rounds + 1):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                per_step = variants[name](r)
                if r > 0:  # round 0 warms up every variant
                    times[name].append(per_step)
            if torch.get_num_threads() != threads:
                print(f"warning: torch threads changed from {threads} to {torch.get_num_threads()}")
                torch.set_num_threads(threads)

    ratios = {}
    for clock, title in (("wall", "wall-clock time"), ("cpu", "this process's CPU time")):
        print(f"\nper step, {title}:")
        ratios[clock] = table(
            {k: [getattr(c, clock) for c in v] for k, v in times.items()}, batch_size
        )
    print(
        "ratios to plain: 'vs plain' of the medians (the last line), 'paired' median of the "
        "in-round ratios, 'of mins' of the fastest rounds"
    )
    fixed = statistics.median(bench.fixed_costs[1:] or bench.fixed_costs)
    print(f"fixed cost of one train_stage call outside the window (build, loaders, final "
          f"checkpoint): {fixed:.2f} s")  # fmt: skip
    plain_wall = [c.wall for c in times[PLAIN]]
    spread = (max(plain_wall) - min(plain_wall)) / statistics.median(plain_wall)
    if spread > NOISY_SPREAD:
        print(
            f"note: plain's per-round wall times spread over {100 * spread:.0f}% of their median "
            "(a busy CPU?): the ratio is uncertain; compare the CPU-time table and the 'of mins' "
            "column, or rerun with more --rounds on a quiet machine"
        )
    print(f"overhead ratio: {ratios[args.clock]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
