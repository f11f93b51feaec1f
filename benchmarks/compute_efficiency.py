"""Paper claim 6 (UL paper, Fig. 4: compute efficiency) at toy scale: the same base model,
trained for the same FLOPs on UL latents and on the latents of an SD-style KL autoencoder,
compared by the Fréchet distance of end-to-end samples (and, on digits, their class accuracy).

    python benchmarks/compute_efficiency.py --quick     # under 10 minutes on 2 CPU cores
    python benchmarks/compute_efficiency.py             # the full setting (~40+ minutes)
    python benchmarks/compute_efficiency.py --data photos   # the photo quickstarts

`--data digits` (default): gin/quickstart.gin and gin/quickstart_kl_ae.gin (handwritten digits;
FD on the shipped digit judge's features, `metrics.fd_digits`, and the judge's class accuracy of
the guided samples); `--data photos`: gin/quickstart_photos.gin and gin/quickstart_kl_ae_photos.gin
(FD on `metrics.fd_photos` features). The metric is the experiment's own `Experiment.sample_metric`
(fd_photos where it names none).

Runs (one at a time, `ulframe run` in a subprocess with OMP_NUM_THREADS=1, each in
`SWEEP_DIR/<data>/<quick|full>/<name>`; a finished stage is reused, not trained again, and every
measurement is kept in `<name>/compute_efficiency.json`, so a rerun computes only what is new):

- `ul`: the UL quickstart: UL stage 1 (encoder, diffusion prior, diffusion decoder), then the
  base model on its z_clean (λ ∈ [-15, λ_z(0) = 5]).
- `kl-ae`: the KL-AE quickstart: `stages.kl_ae` (same encoder architecture with 2·Cz
  channels, mirrored conv decoder, L1 + 1e-6·KL; no perceptual or GAN loss) for the same number
  of stage-1 samples, batch and optimizer (comparable training cost), then the same base model,
  optimizer, batch, schedule family and weighting on its posterior means scaled to unit
  variance (λ ∈ [-15, 7], SD's endpoint).
- `kl-ae-rate` (matched rate): the same KL autoencoder with a KL weight large enough
  (`--matched-kl-weight`) that its rate (KL, bits/pixel) is near the UL latent's (the bound of
  its prior), so both base models model latents carrying about as many bits; its
  reconstruction quality is reported beside UL's (rFD, PSNR): at equal samples, equal FLOPs and
  about equal rate, the comparison the paper's claim is about.
- full setting only (`--ablation` adds the first to --quick): `kl-ae@5`, the same KL stage 1
  (copied) with the base model stopping at λ = 5 as UL's does; `ul/s1` and `kl-ae/s1`, both
  base models trained again with `Experiment.seed = 1` on the same stage 1 (a second training
  seed: initialisation, noise, data order).

Both latents are 4 x 8 x 8, so the base model costs the same FLOPs per training sample on each
(counted with torch.utils.flop_counter: linear layers, convolutions and attention matmuls;
training = 3 x forward, the paper's convention): equal FLOPs are equal samples. The base models'
EMA weights are read from the checkpoints at several budgets; at each, FD (offline
`metrics.fd_photos` features, not FID) between held-out crops and as many guided end-to-end samples (w = the
quickstart's 1.5, class labels in turn; the same for every run). At the largest budget the FD
is the mean over `final_seeds` sample sets (seeds), the unconditional FD (null label) is printed
as well, and every stage 1 is measured by the FD and PSNR of its reconstructions of the same
crops (rFD: the floor an end-to-end FD can reach with a perfect base model).

Prints a table; writes a PNG plot (FD against training FLOPs, rFD floors dotted) to `--plot`
(default docs/results/compute_efficiency.png for the full setting, SWEEP_DIR/quick/... for
--quick). Last line: `fd ratio ul/kl-ae at equal flops: X.XX` at the largest budget, FDs averaged
over the training seeds of each arm (below 1: UL samples better).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _sweep import add_data_argument, judge, open_trained, sample_metric, split_examples
from _sweep import draw as draw_stage

from ulframe.diffusion.logsnr import diffuse
from ulframe.eval.metrics import psnr
from ulframe.train import checkpoint

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SWEEP_DIR = ROOT / "runs" / "compute_efficiency"
RESULTS_DIR = ROOT / "docs" / "results"
UL_GIN = {"digits": "gin/quickstart.gin", "photos": "gin/quickstart_photos.gin"}
KL_GIN = {"digits": "gin/quickstart_kl_ae.gin", "photos": "gin/quickstart_kl_ae_photos.gin"}
# KL weight of the matched-rate KL autoencoder: its KL lands near the UL latent's rate (~0.1
# bits/pixel at 16384 samples on digits); calibrated with short stage-1 runs (docs/results.md).
MATCHED_KL_WEIGHT = {"digits": 0.3, "photos": 0.3}


@dataclass(frozen=True)
class Setting:
    """Samples of each stage, the budgets (base-model samples) FD is measured at, FD samples."""

    stage1_samples: int
    budgets: tuple[int, ...]  # base-model training samples, increasing; the last is the total
    fd_samples: int
    ablation: bool
    final_seeds: int  # sample sets (seeds) whose FDs are averaged at the largest budget
    replicates: bool  # also train both base models again with Experiment.seed = 1


QUICK = Setting(
    stage1_samples=4096,
    budgets=(2048, 4096, 8192),
    fd_samples=128,
    ablation=False,
    final_seeds=1,
    replicates=False,
)
FULL = Setting(
    stage1_samples=16384,
    budgets=(5120, 10240, 20480, 40960),
    fd_samples=256,
    ablation=True,
    final_seeds=3,
    replicates=True,
)


@dataclass(frozen=True)
class Variant:
    name: str
    gin: str
    overrides: tuple[str, ...] = ()
    stage1_from: str | None = None  # copy this variant's finished stage 1 instead of training
    group: str = ""  # the replicates of one comparison arm share a group ("" = its own name)
    replicate: bool = False  # a second training seed of the base model
    always: bool = False  # in every setting (the ablations and replicates are full-only)

    @property
    def arm(self) -> str:
        return self.group or self.name


def variants_for(data: str, matched_kl_weight: float) -> tuple[Variant, ...]:
    """The runs of one comparison on `data` (see the module docstring)."""
    ul, kl = UL_GIN[data], KL_GIN[data]
    return (
        Variant("ul", ul),
        Variant("kl-ae", kl),
        Variant(
            "kl-ae-rate",
            kl,
            (f"stage1/stages.kl_ae.kl_weight = {matched_kl_weight!r}",),
            always=True,
        ),
        Variant(
            "kl-ae@5", kl, ("stage1/stages.kl_ae.latent_logsnr_max = 5.0",), stage1_from="kl-ae"
        ),
        Variant("ul/s1", ul, ("Experiment.seed = 1",), "ul", "ul", True),
        Variant("kl-ae/s1", kl, ("Experiment.seed = 1",), "kl-ae", "kl-ae", True),
    )


def overrides(setting: Setting) -> list[str]:
    """gin bindings every run of `setting` gets (on top of its gin file)."""
    every = setting.budgets[0]
    total = setting.budgets[-1]
    if any(b % every for b in setting.budgets):
        raise ValueError(f"budgets {setting.budgets} must be multiples of the first")
    return [
        f"TRAIN_SAMPLES = {setting.stage1_samples}",
        f"BASE_TRAIN_SAMPLES = {total}",
        "stage1/TrainSettings.eval_every_samples = 0",
        "stage2/TrainSettings.eval_every_samples = 0",
        f"stage2/TrainSettings.checkpoint_every_samples = {every}",
        f"stage2/TrainSettings.keep_checkpoints = {total // every + 1}",
        "Experiment.hooks = [@hooks.console()]",
    ]


def train(variant: Variant, bindings: Sequence[str], workdir: Path, sweep: Path) -> float:
    """`ulframe run` of the variant into `workdir` (finished stages are skipped); wall seconds.
    The run's log goes to `workdir/benchmark_stdout.txt`."""
    if variant.stage1_from and not (workdir / "stages" / "stage1" / "DONE.json").is_file():
        source = sweep / variant.stage1_from.replace("/", "_") / "stages" / "stage1"
        shutil.copytree(source, workdir / "stages" / "stage1", dirs_exist_ok=True)
    args = [sys.executable, "-m", "ulframe", "run", variant.gin, "--workdir", str(workdir)]
    for b in bindings:
        args += ["--gin_param", b]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with (workdir / "benchmark_stdout.txt").open("a") as out:
        done = subprocess.run(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = (workdir / "benchmark_stdout.txt").read_text()[-3000:]
        raise SystemExit(f"{variant.name}: `{' '.join(args)}` failed ({done.returncode}):\n{tail}")
    return time.perf_counter() - t0


def forward_flops(module: torch.nn.Module, *inputs: Any) -> int:
    """FLOPs of one forward pass (torch.utils.flop_counter: matmuls, convolutions, attention)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return int(counter.get_total_flops())


def base_training_flops(model2: Any) -> int:
    """Training FLOPs of the base model per example: 3 x the forward of one example."""
    z = torch.zeros((1, *model2.latent_shape))
    logsnr = torch.zeros(1)
    label = torch.zeros(1, dtype=torch.long) if model2.num_classes else None
    return 3 * forward_flops(model2.base.eval(), z, logsnr, label)


def stage1_training_flops(model2: Any) -> int:
    """Training FLOPs of stage 1 per example (3 x forward of its networks on one example): UL
    encoder + prior + diffusion decoder (one noise level each), KL-AE encoder + decoder."""
    stage1 = model2.stage1.eval()
    x = torch.zeros((1, *model2.image_shape))
    z = torch.zeros((1, *model2.latent_shape))
    logsnr = torch.zeros(1)
    total = forward_flops(stage1.encoder, x)
    if hasattr(stage1, "prior"):  # UL: ULJointModel
        total += forward_flops(stage1.prior, z, logsnr)
        total += forward_flops(stage1.decoder, x, logsnr, z)
    else:  # KL-AE: KLAEModel
        total += forward_flops(stage1.decoder, z)
    return 3 * total


def sample_labels(stage: Any, n: int, num_classes: int) -> torch.Tensor | None:
    """The labels guided samples are drawn for: the classes in turn, in chunks of 64 (the
    order the photo results were measured with)."""
    parts = [
        stage.sample_labels(min(64, n - start), torch.device("cpu"), num_classes)
        for start in range(0, n, 64)
    ]
    return None if parts[0] is None else torch.cat(parts)


@torch.no_grad()
def draw_samples(
    stage: Any, model: Any, n: int, num_classes: int, seed: int, guided: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n end-to-end samples and their labels: guided (the stage's w, labels in turn) or
    unconditional (labels None)."""
    labels = sample_labels(stage, n, num_classes) if guided else None
    w = stage.guidance_scale if guided else 1.0
    return draw_stage(stage, model, n, labels, w, seed), labels


@torch.no_grad()
def reconstructions(stage: Any, model: Any, x: torch.Tensor, seed: int) -> torch.Tensor:
    """Stage-1 reconstructions through the latent interface: decode_latents of the encoded x,
    with the encoding noise at λ = latent_logsnr_max added first where the decoder takes the
    noisy latent (UL's z_0; `LatentModel.noisy_latent`), as in training and sampling."""
    latents = model.latents()
    g = torch.Generator().manual_seed(seed)
    steps = stage.decoder_sample_steps or stage.sample_steps

    def latent(part: torch.Tensor) -> torch.Tensor:
        z = latents.encode_clean(part)
        if not latents.noisy_latent:
            return z
        logsnr = torch.full((len(z),), float(latents.latent_logsnr_max))
        return diffuse(z, logsnr, torch.randn(z.shape, generator=g))

    return torch.cat(
        [
            latents.decode_latents(latent(x[i : i + 64]), g, stage.sampler, steps)
            for i in range(0, len(x), 64)
        ]
    )


def fd(metric: Any, reference: torch.Tensor, images: torch.Tensor) -> float:
    return judge(metric, reference, images)["fd"]


class Measured:
    """Measurements of one run kept in `workdir/compute_efficiency.json`, so that a rerun on the
    same sweep dir computes only what is missing (the checkpoints it measures do not change)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.values: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str, compute: Any) -> float:
        if key not in self.values:
            self.values[key] = float(compute())
            self.path.write_text(json.dumps(self.values, indent=1) + "\n")
        return self.values[key]

    def get_many(self, key: str, compute: Any) -> dict[str, float]:
        """Several values under `key:NAME`, computed together by `compute() -> {NAME: value}`;
        recomputed only when `key:fd` is missing."""
        if f"{key}:fd" not in self.values:
            for name, value in compute().items():
                self.values[f"{key}:{name}"] = float(value)
            self.path.write_text(json.dumps(self.values, indent=1) + "\n")
        prefix = f"{key}:"
        return {k[len(prefix) :]: v for k, v in self.values.items() if k.startswith(prefix)}


def evaluate(variant: Variant, bindings: Sequence[str], workdir: Path, setting: Setting) -> dict:
    """FD at every budget, unconditional FD, rFD/PSNR, FLOPs and latent statistics of a run."""
    opened = open_trained(workdir, [str(ROOT / variant.gin)], list(bindings))
    experiment = opened.experiment
    stage2, model2, stage2_dir = opened.stages[-1]
    metric, metric_name = sample_metric(opened)
    reference = split_examples(experiment, "eval", setting.fd_samples)
    num_classes, seed = experiment.dataset.num_classes, experiment.seed
    result: dict[str, Any] = {"name": variant.name, "fd": {}, "class_accuracy": {}}
    result["metric"] = metric_name
    result["flops_per_sample"] = base_training_flops(model2)
    result["stage1_flops_per_sample"] = stage1_training_flops(model2)
    result["latent_shape"] = list(model2.latent_shape)
    result["logsnr_max"] = model2.latent_logsnr_max
    z = model2.encode_clean(reference)
    result["latent_std"] = float(z.std())
    stage1_done = json.loads((workdir / "stages" / "stage1" / "DONE.json").read_text())["scalars"]
    result["stage1"] = {k: stage1_done.get(k) for k in ("bits_per_pixel", "psnr", "ssim")}
    if "posterior_logsnr" in stage1_done:
        result["stage1"]["posterior_logsnr"] = stage1_done["posterior_logsnr"]
    n = len(reference)
    measured = Measured(workdir / "compute_efficiency.json")
    model2.load_state_dict(checkpoint.load_latest(stage2_dir / "checkpoints")["ema"])
    x_hat: list[torch.Tensor] = []

    def recon() -> torch.Tensor:
        if not x_hat:
            x_hat.append(reconstructions(stage2, model2, reference, seed))
        return x_hat[0]

    result["rfd"] = measured.get(f"rfd:{seed}:{n}", lambda: fd(metric, reference, recon()))
    result["fd_real"] = measured.get(
        f"fd_real:{n}", lambda: fd(metric, reference, split_examples(experiment, "train", n))
    )
    result["recon_psnr"] = measured.get(
        f"recon_psnr:{seed}:{n}", lambda: psnr(reference, recon()).mean()
    )
    ckpts = {
        int(checkpoint.load(p)["samples_seen"]): p
        for p in checkpoint.list_checkpoints(stage2_dir / "checkpoints")
    }

    def sample_scores(sample_seed: int, guided: bool) -> dict[str, float]:
        t0 = time.perf_counter()
        images, labels = draw_samples(stage2, model2, n, num_classes, sample_seed, guided)
        scores = judge(metric, reference, images, labels)
        kind = "guided" if guided else "unconditional"
        acc = (
            f", class accuracy {scores['class_accuracy']:.3f}" if "class_accuracy" in scores else ""
        )
        print(
            f"  {variant.name}: {budget} samples, seed {sample_seed}, {kind}: fd "
            f"{scores['fd']:.2f}{acc} ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        return scores

    result["fd_seeds"] = []
    for budget in setting.budgets:
        if budget not in ckpts:
            raise SystemExit(f"{variant.name}: no stage-2 checkpoint at {budget} samples")
        model2.load_state_dict(checkpoint.load(ckpts[budget])["ema"])
        model2.eval()
        final = budget == setting.budgets[-1] and not variant.replicate  # replicates: 1 set
        seeds = range(seed, seed + (setting.final_seeds if final else 1))
        scores = [
            measured.get_many(f"{budget}:{s}:guided:{n}", lambda s=s: sample_scores(s, True))
            for s in seeds
        ]
        values = [v["fd"] for v in scores]
        result["fd"][budget] = sum(values) / len(values)
        result["fd_seeds"] = values  # of the last (largest) budget
        accs = [v["class_accuracy"] for v in scores if "class_accuracy" in v]
        if accs:
            result["class_accuracy"][budget] = sum(accs) / len(accs)
    result["fd_unconditional"] = measured.get_many(
        f"{budget}:{seed}:unconditional:{n}", lambda: sample_scores(seed, False)
    )["fd"]
    result["fd_samples"] = n
    return result


# ------------------------------------------------------------------------------ the plot
def plot(
    series: dict[str, list[tuple[float, float]]],
    title: str,
    path: Path,
    floors: dict[str, float] | None = None,
    metric_name: str = "fd_photos",
) -> Path:
    """FD (y) against base-model training FLOPs (x, log scale) per series, as a PNG drawn with
    matplotlib; `floors` (per series, e.g. the FD of its stage-1 reconstructions) are drawn as
    dotted lines."""
    from ulframe_plugins.hooks.tensorboard import figure_image, new_figure

    colours = ["#285ac8", "#c83c28", "#e6961e", "#3ca050"]
    fig = new_figure((560, 400))
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("base-model training FLOPs", fontsize=8)
    ax.set_ylabel(f"FD ({metric_name})", fontsize=8)
    ax.set_xscale("log")
    ax.tick_params(labelsize=7)
    ax.grid(True, color="0.9")
    floors = floors or {}
    budgets = sorted({p[0] for s in series.values() for p in s})
    for i, (name, pts) in enumerate(series.items()):
        colour = colours[i % len(colours)]
        xs, ys = zip(*sorted(pts), strict=True) if pts else ((), ())
        width = max(1, 3 - i)  # thinner lines drawn later: overlapping series stay visible
        ax.plot(xs, ys, color=colour, linewidth=width, marker="o", markersize=max(3, 6 - i),
                markeredgecolor="black", markeredgewidth=0.5, label=name)  # fmt: skip
        if name in floors:
            ax.axhline(floors[name], color=colour, linestyle=":", linewidth=1, label=f"{name} rFD")
    ax.set_xticks(budgets, [f"{f:.1e}" for f in budgets])  # a tick at every budget
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure_image(fig).save(path)
    return path


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="short runs, 128 FD samples (<10 min)")
    add_data_argument(p)
    p.add_argument("--sweep-dir", type=Path, default=DEFAULT_SWEEP_DIR)
    p.add_argument("--plot", type=Path, default=None, help="PNG path of the FD-vs-FLOPs plot")
    p.add_argument("--ablation", action="store_true", help="also kl-ae@5 (on in the full setting)")
    p.add_argument(
        "--no-replicates",
        action="store_true",
        help="full setting without the seed-1 base models (ul/s1, kl-ae/s1) and kl-ae@5",
    )
    p.add_argument(
        "--matched-kl-weight",
        type=float,
        default=None,
        help="KL weight of the matched-rate KL autoencoder (default: per --data, see "
        "MATCHED_KL_WEIGHT); 0 leaves that run out",
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    setting = QUICK if args.quick else FULL
    if args.no_replicates:
        setting = replace(setting, replicates=False, ablation=False)
    mode = "quick" if args.quick else "full"
    sweep = args.sweep_dir / args.data / mode
    bindings = overrides(setting)
    kl_weight = (
        MATCHED_KL_WEIGHT[args.data] if args.matched_kl_weight is None else args.matched_kl_weight
    )
    variants = [
        v
        for v in variants_for(args.data, kl_weight or 1.0)
        if (v.always and kl_weight > 0)
        or (
            not v.always
            and (setting.replicates if v.replicate else v.stage1_from is None or setting.ablation)
        )
        or (args.ablation and v.name == "kl-ae@5")
    ]
    t_start = time.perf_counter()
    results = []
    for v in variants:
        workdir = sweep / v.name.replace("/", "_")
        run_bindings = [*bindings, *v.overrides]
        seconds = train(v, run_bindings, workdir, sweep)
        print(f"{v.name}: trained (or reused) {workdir} in {seconds:.0f} s", flush=True)
        results.append(evaluate(v, run_bindings, workdir, setting))
        results[-1]["train_s"] = seconds
        results[-1]["arm"] = v.arm
    (sweep / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    flops = {r["name"]: r["flops_per_sample"] for r in results}
    shapes = {r["name"]: tuple(r["latent_shape"]) for r in results}
    print()
    metric_name = results[0]["metric"]
    print(f"setting: {mode}   data: {args.data}   runs: {sweep}   FD: metrics.{metric_name} "
          f"(not FID), {results[0]['fd_samples']} held-out images vs as many guided samples; "
          f"fd_real (train vs held-out images) {results[0]['fd_real']:.2f}")  # fmt: skip
    for name in flops:
        print(f"base model on {name:<10} latent {shapes[name]}: {flops[name]:,} training FLOPs "
              f"per sample (3 x forward)")  # fmt: skip
    for r in results:
        print(f"stage 1 {r['name']:<10}: {r['stage1_flops_per_sample']:,} training FLOPs per "
              f"sample, {setting.stage1_samples} samples")  # fmt: skip
    if len(set(flops.values())) == 1:
        print("same latent shape, same FLOPs per sample: equal FLOPs = equal training samples")
    print()
    print(f"{'stage 1':<10} {'λ_max':>5} {'bpp':>7} {'PSNR':>6} {'SSIM':>5} {'rFD':>7} "
          f"{'rPSNR':>6} {'latent std':>10} {'uncond FD':>9}")  # fmt: skip
    for r in results:
        s = r["stage1"]
        print(f"{r['name']:<10} {r['logsnr_max']:>5.1f} {s['bits_per_pixel']:>7.3f} "
              f"{s['psnr']:>6.2f} {s['ssim']:>5.3f} {r['rfd']:>7.2f} {r['recon_psnr']:>6.2f} "
              f"{r['latent_std']:>10.3f} {r['fd_unconditional']:>9.2f}")  # fmt: skip
    print(
        "bpp: UL the prior's bound of z_0, KL-AE the KL; PSNR: the stage's own evaluation; "
        "rFD / rPSNR: decode(encode(x)) of the held-out images (the floor of the end-to-end FD)"
    )
    print()
    names = [r["name"] for r in results]
    arms: dict[str, list[dict]] = {}
    for r in results:
        arms.setdefault(r["arm"], []).append(r)

    def arm_fd(arm: str, budget: int) -> float:  # mean over the arm's training seeds
        return sum(r["fd"][budget] for r in arms[arm]) / len(arms[arm])

    rate = "kl-ae-rate" in arms
    print(f"{'base samples':>12} {'train FLOPs':>12} " + " ".join(f"{n:>10}" for n in names)
          + f" {'ul/kl-ae':>9}" + (f" {'ul/rate':>8}" if rate else ""))  # fmt: skip
    for budget in setting.budgets:
        row = [r["fd"][budget] for r in results]  # the last row: mean over sample sets
        ratio = arm_fd("ul", budget) / arm_fd("kl-ae", budget)
        extra = f" {arm_fd('ul', budget) / arm_fd('kl-ae-rate', budget):>8.2f}" if rate else ""
        print(f"{budget:>12} {budget * flops['ul']:>12.3e} "
              + " ".join(f"{v:>10.2f}" for v in row) + f" {ratio:>9.2f}" + extra)  # fmt: skip
    if any(len(members) > 1 for members in arms.values()):
        print("ul/kl-ae: ratio of the FDs averaged over the training seeds of each arm")
    if any(r["class_accuracy"] for r in results):
        print()
        print("class accuracy of the guided samples (the metric's classifier):")
        print(f"{'base samples':>12} " + " ".join(f"{n:>10}" for n in names))
        for budget in setting.budgets:
            print(f"{budget:>12} "
                  + " ".join(f"{r['class_accuracy'].get(budget, math.nan):>10.3f}"
                             for r in results))  # fmt: skip
    final = setting.budgets[-1]
    for r in results:
        seeds = ", ".join(f"{v:.2f}" for v in r["fd_seeds"])
        print(f"{r['name']} at {final} samples, FD of {len(r['fd_seeds'])} sample sets: {seeds}")
    series = {
        arm + (f" ({len(m)} seeds)" if len(m) > 1 else ""): [
            (b * flops[m[0]["name"]], arm_fd(arm, b)) for b in setting.budgets
        ]
        for arm, m in arms.items()
    }
    default_plot = RESULTS_DIR / (
        "compute_efficiency.png" if args.data == "photos" else f"compute_efficiency_{args.data}.png"
    )
    path = args.plot or (default_plot if not args.quick else sweep / "compute_efficiency.png")
    floors = {
        name: arms[name.split(" ")[0]][0]["rfd"] for name in series if not name.startswith("kl-ae@")
    }
    title = f"FD ({metric_name}) of guided samples vs base-model FLOPs ({args.data}, {mode})"
    plot(series, title, path, floors, metric_name)
    print(f"plot: {path}   total wall time {time.perf_counter() - t_start:.0f} s")
    line = (
        f"fd ratio ul/kl-ae at equal flops ({args.data}): "
        f"{arm_fd('ul', final) / arm_fd('kl-ae', final):.2f}"
    )
    if rate:
        line += f"; at matched rate: {arm_fd('ul', final) / arm_fd('kl-ae-rate', final):.2f}"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
