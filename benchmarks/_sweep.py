"""Shared harness of the claim benchmarks: stage-1 runs of the quickstart, reused by name.

`--data digits` (the default) runs gin/quickstart.gin (scikit-learn's handwritten digits, 32x32
grey, cosine learning-rate decay); `--data photos` runs gin/quickstart_photos.gin (32x32 crops of
the embedded photographs, constant learning rate: the setting of the photo results in
docs/results.md). Each run is `ulframe run GIN --workdir SWEEP_DIR/<data>/<name> --gin_param ...`
in a subprocess with OMP_NUM_THREADS=1 and `--threads` torch threads, one at a time. `<name>`
encodes the overrides (`lf1.7_b2_n8192_eb8`), so the same override set on the same data is the
same run in every benchmark: a finished run (its stage wrote DONE.json with the final evaluation)
is read back, not trained again. Runs of the two data sets live in different folders and never
mix. `sweep.json` beside each run records the gin file, the overrides and the wall time.

    from _sweep import Sweep, add_arguments
    sweep = Sweep.from_args(args)                 # --data, --sweep-dir, --threads, --quick
    result = sweep.run({"LOSS_FACTOR": 1.7, "weightings.sigmoid.bias": 2.0})
    result.bits_per_pixel, result.psnr, result.ssim

Every benchmark takes `--quick` (fewer samples, fewer eval batches: minutes) and otherwise uses the
full settings the numbers in docs/results.md come from.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The stage-1 experiment of each data set (--data).
GIN_FILES: dict[str, Path] = {
    "digits": ROOT / "gin" / "quickstart.gin",
    "photos": ROOT / "gin" / "quickstart_photos.gin",
}
DATA_SETS = tuple(GIN_FILES)
DEFAULT_DATA = "digits"
GIN_FILE = GIN_FILES[DEFAULT_DATA]
DEFAULT_SWEEP_DIR = ROOT / "runs" / "sweep"
RESULTS_DIR = ROOT / "docs" / "results"

# What every run of the harness binds: stage 1 only, console output, one final evaluation.
FIXED: dict[str, str] = {
    "Experiment.stages": "[@stage1/stages.ul_joint()]",
    "stage1/TrainSettings.eval_every_samples": "0",
}
DEFAULT_HOOKS = "[@hooks.console()]"


@dataclass(frozen=True)
class Budget:
    """Training samples and evaluation batches (16 crops each) of every run."""

    train_samples: int
    eval_batches: int


FULL = Budget(train_samples=8192, eval_batches=8)
QUICK = Budget(train_samples=4096, eval_batches=2)

# Short names of the overrides in run names, in the order they appear there.
ALIASES: dict[str, str] = {
    "stage1/stages.ul_joint.prior": "prior",
    "LOSS_FACTOR": "lf",
    "weightings.sigmoid.bias": "b",
    "stage1/stages.ul_joint.latent_logsnr_max": "lz",
    "Experiment.hooks": "hooks",
    "hooks.bitrate_controller.target_bits_per_pixel": "target",
    "hooks.bitrate_controller.start_samples": "start",
    "stage1/TrainSettings.log_every_samples": "log",
    "Experiment.seed": "seed",
    "TRAIN_SAMPLES": "n",
    "stage1/TrainSettings.eval_batches": "eb",
}
MAX_NAME = 120


def gin_value(value: Any) -> str:
    """A gin literal for `value`; floats in one canonical spelling (1.50 and 1.5 are one run)."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(float(value))
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if re.fullmatch(r"[+-]?\d+", text) else repr(number)


def _short(value: str) -> str:
    """A file-name-safe spelling of a gin value: `@priors.normal` -> `normal`, 2.0 -> `2`."""
    try:
        number = float(value)
        return f"{number:g}"
    except ValueError:
        pass
    text = value.replace("@hooks.", "").replace("@priors.", "").replace("@", "")
    text = text.replace("()", "")
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-")


def run_name(overrides: Mapping[str, str]) -> str:
    """The folder name of a run: its overrides in ALIASES order, then any others."""
    order = {k: i for i, k in enumerate(ALIASES)}
    keys = sorted(overrides, key=lambda k: (order.get(k, len(order)), k))
    parts = []
    for key in keys:
        alias = ALIASES.get(key) or re.sub(r"[^A-Za-z0-9]+", "-", key.split("/")[-1])
        parts.append(f"{alias}{_short(overrides[key])}")
    name = "_".join(parts)
    if len(name) > MAX_NAME:
        import hashlib

        digest = hashlib.sha256(json.dumps(sorted(overrides.items())).encode()).hexdigest()[:10]
        name = f"{name[: MAX_NAME - 11]}-{digest}"
    return name


@dataclass
class Result:
    """A finished run: its final evaluation (EMA weights) and where it lives."""

    name: str
    workdir: Path
    overrides: dict[str, str]
    scalars: dict[str, float]
    elapsed_s: float | None  # wall time of the training subprocess (None: unknown)
    reused: bool  # read back from an earlier invocation

    @property
    def bits_per_pixel(self) -> float:
        return float(self.scalars["bits_per_pixel"])

    @property
    def psnr(self) -> float:
        return float(self.scalars["psnr"])

    @property
    def ssim(self) -> float:
        return float(self.scalars.get("ssim", math.nan))

    def train_records(self) -> list[dict[str, Any]]:
        """The training records of metrics.jsonl (one per logged step), in order."""
        path = self.workdir / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in records if r.get("kind") == "train"]

    def stage_file(self, name: str) -> Path:
        return self.workdir / "stages" / "stage1" / name


@dataclass
class Sweep:
    """Runs (or reads back) stage-1 runs under `sweep_dir`, one at a time."""

    sweep_dir: Path = DEFAULT_SWEEP_DIR
    threads: int = 1
    budget: Budget = FULL
    verbose: bool = True
    log: list[Result] = field(default_factory=list)
    data: str = DEFAULT_DATA

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Sweep:
        budget = QUICK if args.quick else FULL
        if getattr(args, "train_samples", None):
            budget = Budget(args.train_samples, budget.eval_batches)
        data = getattr(args, "data", DEFAULT_DATA)
        return cls(Path(args.sweep_dir), args.threads, budget, data=data)

    @property
    def gin_file(self) -> Path:
        """The experiment every run of this sweep starts from (--data)."""
        return GIN_FILES[self.data]

    @property
    def runs_dir(self) -> Path:
        """Where this data set's runs live: SWEEP_DIR/<data>."""
        return self.sweep_dir / self.data

    def overrides(self, settings: Mapping[str, Any]) -> dict[str, str]:
        """The run's overrides: the budget, then `settings` (which may replace the budget)."""
        out = {
            "TRAIN_SAMPLES": str(self.budget.train_samples),
            "stage1/TrainSettings.eval_batches": str(self.budget.eval_batches),
            "Experiment.hooks": DEFAULT_HOOKS,
        }
        out.update({k: gin_value(v) for k, v in settings.items()})
        if out["Experiment.hooks"] == DEFAULT_HOOKS:
            del out["Experiment.hooks"]  # the default: not part of the name
        return out

    def run(self, settings: Mapping[str, Any]) -> Result:
        """Train the run of `settings` unless it finished before; its final evaluation."""
        overrides = self.overrides(settings)
        name = run_name(overrides)
        workdir = self.runs_dir / name
        done = workdir / "stages" / "stage1" / "DONE.json"
        meta_path = workdir / "sweep.json"
        bindings = {**FIXED, "Experiment.hooks": DEFAULT_HOOKS, **overrides}
        gin = str(self.gin_file.relative_to(ROOT))
        if meta_path.is_file():
            recorded_meta = json.loads(meta_path.read_text())
            recorded = recorded_meta.get("bindings")
            recorded_gin = recorded_meta.get("gin", gin)
            if recorded != bindings or recorded_gin != gin:
                raise SystemExit(
                    f"{workdir} holds a run of other bindings ({recorded_gin}: {recorded}); "
                    "delete it or pick another --sweep-dir"
                )
        reused = done.is_file()
        elapsed = None
        if not reused:
            elapsed = self._train(workdir, bindings)
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        if elapsed is not None:
            meta = {
                "gin": gin,
                "bindings": bindings,
                "elapsed_s": elapsed,
                "threads": self.threads,
            }
            meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        scalars = json.loads(done.read_text())["scalars"]
        result = Result(name, workdir, overrides, scalars, meta.get("elapsed_s"), reused)
        self.log.append(result)
        if self.verbose:
            took = "reused" if reused else f"{elapsed:.0f} s"
            print(
                f"  {name}: bits/pixel {result.bits_per_pixel:.4f}, PSNR {result.psnr:.2f} dB "
                f"({took})",
                flush=True,
            )
        return result

    def _train(self, workdir: Path, bindings: Mapping[str, str]) -> float:
        workdir.parent.mkdir(parents=True, exist_ok=True)
        args = ["run", str(self.gin_file), "--workdir", str(workdir)]
        for key, value in bindings.items():
            args += ["--gin_param", f"{key} = {value}"]
        code = (
            "import sys, torch; torch.set_num_threads(int(sys.argv[1])); "
            "from ulframe.cli import main; sys.exit(main(sys.argv[2:]))"
        )
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        if self.verbose:
            print(f"  training {workdir.name} ...", flush=True)
        workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with (workdir / "sweep_stdout.txt").open("w") as out:
            done = subprocess.run(
                [sys.executable, "-c", code, str(self.threads), *args],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )
        elapsed = time.perf_counter() - t0
        if done.returncode != 0:
            tail = (workdir / "sweep_stdout.txt").read_text()[-3000:]
            raise SystemExit(f"run {workdir.name} failed (exit {done.returncode}):\n{tail}")
        return elapsed

    def total_train_s(self) -> float:
        """Wall time of every run this process used (trained now or recorded before)."""
        return sum(r.elapsed_s or 0.0 for r in {r.name: r for r in self.log}.values())


def load_model(result: Result) -> tuple[Any, Any, list[dict[str, Any]]]:
    """(stage, ULJointModel with the EMA weights of the run's last checkpoint, eval batches):
    the run's experiment rebuilt in this process from its gin file (sweep.json) and overrides."""
    import torch

    from ulframe import wiring
    from ulframe.data.pipeline import build_loader, first_example
    from ulframe.protocols import BuildContext
    from ulframe.train import checkpoint
    from ulframe.train.settings import CONFIGURABLES

    meta_path = result.workdir / "sweep.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    gin_file = ROOT / meta.get("gin", str(GIN_FILE.relative_to(ROOT)))
    bindings = [f"{k} = {v}" for k, v in {**FIXED, **result.overrides}.items()]
    wiring.load([str(gin_file)], bindings, engine=CONFIGURABLES)
    experiment = wiring.experiment()
    stage = experiment.stages[0]
    source = experiment.dataset.source("eval")
    stage_dir = result.workdir / "stages" / "stage1"
    ctx = BuildContext(
        first_example(source), experiment.dataset.num_classes, torch.device("cpu"), stage_dir
    )
    model = stage.build(ctx)
    state = checkpoint.load_latest(stage_dir / "checkpoints", map_location="cpu")
    if state is None:
        raise SystemExit(f"no checkpoint in {stage_dir}")
    model.load_state_dict(state["ema"])
    model.eval()
    loader = build_loader(
        source, batch_size=16, shuffle=False, repeat=False, drop_last=False, num_workers=0
    )
    batches = [b for _, b in zip(range(stage.train.eval_batches), loader)]
    return stage, model, batches


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags every claim benchmark shares."""
    p.add_argument("--quick", action="store_true", help="smoke settings: minutes, not the docs'")
    add_data_argument(p)
    p.add_argument(
        "--sweep-dir", default=str(DEFAULT_SWEEP_DIR), help="where runs live (reused by name)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run (runs go one at a time; 1: see benchmarks/README.md)",
    )
    p.add_argument(
        "--train-samples",
        type=int,
        default=None,
        help="stage-1 samples of every run instead of the setting's (8192 full, 4096 quick): "
        "e.g. 32768 to tell scale from method where a claim does not hold",
    )
    p.add_argument(
        "--out-dir",
        default=None,
        help="where plots (PNG) and tables (Markdown) go (default: docs/results; with --quick "
        "runs/sweep-quick-results/<data>, so a smoke run never overwrites the published results)",
    )


def add_data_argument(p: argparse.ArgumentParser) -> None:
    """`--data {digits,photos}`: which quickstart the benchmark runs (default digits)."""
    p.add_argument(
        "--data",
        choices=DATA_SETS,
        default=DEFAULT_DATA,
        help="digits: gin/quickstart.gin (handwritten digits, the default); photos: "
        "gin/quickstart_photos.gin (the embedded photographs, the older setting)",
    )


def output_dir(args: argparse.Namespace) -> Path:
    """--out-dir, or its default for the setting; created."""
    quick = DEFAULT_SWEEP_DIR.parent / "sweep-quick-results" / getattr(args, "data", DEFAULT_DATA)
    default = quick if args.quick else RESULTS_DIR
    out = Path(args.out_dir) if args.out_dir else default
    out.mkdir(parents=True, exist_ok=True)
    return out


def artifact(args: argparse.Namespace, filename: str) -> str:
    """The file name of a table or plot for --data: photos keep the published names
    (`lf_sweep.png`), digits get a suffix (`lf_sweep_digits.png`), so neither overwrites the
    other in docs/results."""
    data = getattr(args, "data", DEFAULT_DATA)
    if data == "photos":
        return filename
    stem, dot, ext = filename.rpartition(".")
    return f"{stem}_{data}{dot}{ext}" if dot else f"{filename}_{data}"


def data_label(args: argparse.Namespace) -> str:
    """A short name of the data for titles and printed lines."""
    return {"digits": "digits", "photos": "photo crops"}[getattr(args, "data", DEFAULT_DATA)]


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear y(x) through the points sorted by x; NaN outside their range."""
    pts = sorted(zip(xs, ys, strict=True))
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return math.nan


def monotone(values: Iterable[float]) -> bool:
    """Strictly increasing."""
    v = list(values)
    return all(b > a for a, b in itertools.pairwise(v))


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table; floats as given (format them first)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ---- trained runs with a sampling stage (claims 5 and 6) ---------------------------------------
@dataclass
class Opened:
    """A trained run read back: its experiment, every stage with its EMA model, the registry."""

    experiment: Any
    stages: list[tuple[Any, Any, Path]]  # (stage, model in eval mode, stage dir)
    device: Any
    registry: Any


def open_trained(workdir: Path, files: Sequence[str], bindings: Sequence[str] = ()) -> Opened:
    """Every stage of the run in `workdir` rebuilt from `files` + `bindings` with its EMA weights
    (`ulframe.trained.open_run`)."""
    from ulframe.trained import open_run

    run = open_run(Path(workdir), list(files), list(bindings))
    stages = [(r.stage, r.model, r.stage_dir) for r in run.stages]
    return Opened(run.experiment, stages, run.device, run.registry)


def split_examples(experiment: Any, split: str, n: int) -> Any:
    """Up to n examples' `x` of a split (N, C, *S), in the split's own order, on CPU."""
    from ulframe.trained import split_examples as split_x

    return split_x(experiment, split, n)


def sample_metric(opened: Opened) -> tuple[Any, str]:
    """(metric, name): the experiment's own `Experiment.sample_metric` (metrics.fd_digits for
    digits), else metrics.fd_photos (the photo quickstart names none)."""
    from ulframe import wiring

    factory = getattr(opened.experiment, "sample_metric", None)
    if factory is None:
        return opened.registry.get("metrics", "fd_photos").factory(), "fd_photos"
    metric = wiring.call(factory)
    return metric, str(getattr(metric, "name", getattr(factory, "__name__", "fd")))


def judge(metric: Any, reference: Any, samples: Any, labels: Any = None) -> dict[str, float]:
    """{"fd": Fréchet distance of `samples` to `reference`} and, when the metric classifies and
    `labels` (the classes the samples were drawn for) are given, {"class_accuracy": ...}."""
    if labels is not None and callable(getattr(metric, "classify", None)):
        values = dict(metric(reference, samples, labels=labels))
    else:
        values = dict(metric(reference, samples))
    first = next(iter(values))
    out = {"fd": float(values.pop(first))}
    out.update({k: float(v) for k, v in values.items()})
    return out


def draw(
    stage: Any,
    model: Any,
    n: int,
    labels: Any,
    guidance: float,
    seed: int,
    chunk: int = 64,
) -> Any:
    """n end-to-end samples of a sampling stage (labels (n,) or None: unconditional), in chunks,
    with one generator seeded `seed`; through the stage's `sample` (protocols.SamplingStage), or
    the model's where the stage has none yet."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for start in range(0, n, chunk):
            k = min(chunk, n - start)
            part = None if labels is None else labels[start : start + k]
            if callable(getattr(stage, "sample_settings", None)):
                x = stage.sample(model, k, part, guidance, generator)
            else:
                x = model.sample(
                    k, generator, part, stage.sampler, stage.sample_steps,
                    stage.decoder_sample_steps, guidance, stage.guidance_interval,
                )  # fmt: skip
            out.append(x.cpu())
    return torch.cat(out)
