"""GPU check: the paper-size networks and the multi-process, resume and sampling paths on one GPU.

    python benchmarks/gpu_check.py --device cuda --out /kept/gpu_check.json   # one GPU, < 8 min
    OMP_NUM_THREADS=1 python benchmarks/gpu_check.py --device cpu --quick   # the CPU fallback

No dataset is read. The JSON report (`--out`, default gpu_check.json in the working directory) is
rewritten after every check, so a killed run leaves what it measured: for a run whose working
directory is discarded afterwards, give `--out PATH` on storage that is kept (and keep stdout).

First a preflight (seconds): ulframe importable, and the registry finds the plugins the
experiment files name (`encoders.resnet`, `datasets.kinetics`, ...); otherwise one message
("ulframe is not installed in this environment: pip install -e ." / "missing package X") and
exit code 2. Then each check runs on its own; a failure is recorded (error, traceback tail) and
the next check runs. Checks, in order:

- `matmul_rate`: achieved bf16 matmul FLOP/s (`ulframe.train.perf.measure_matmul_rate`: a
  warm-up, then the best of several timed repeats), the reference of MFU.
- `step/imagenet512/stage1/eager`, then `step/imagenet512/stage1/compiled` (the decoder's MFU,
  the headline number), then the eager steps of `imagenet512/stage2`, `kinetics600/stage1` and
  `kinetics600/stage2`: the networks of gin/ul_imagenet512.gin and gin/ul_kinetics.gin (their
  presets, gin/presets/imagenet512.gin and kinetics600.gin), built through ulframe's wiring and
  each stage's `build` (stage 2 on random stage-1 weights), trained on synthetic batches by the
  loop's own `Trainer.build` + `train_step` (bf16 autocast, activation checkpointing as the
  stage configures it, clipping, AdamW, EMA): samples/s, peak memory
  (`torch.cuda.max_memory_allocated`), model FLOPs per step (`perf.train_flops` at batch 2,
  scaled to the batch) and MFU against `matmul_rate`, beside the estimate of
  benchmarks/memory.py for the same batch. Stage 1 is encoder + prior + decoder with the real
  ULJoint loss; stage 2 is the base model (ImageNet: on cached latents; Kinetics: encoding clips
  and their 5 context frames on the fly). `eager` sets `TrainSettings.compile = "off"`,
  `compiled` "networks" (what the experiment files train with); the time of a compiled check's
  warm-up steps is its `compile_s`. A step that runs out of GPU memory is retried once at half
  the batch (`oom_at` records the batch that did not fit).
- `adamw8bit`: the ImageNet stage-1 step with `@optimizers.AdamW8bit` (CUDA only; skipped when
  bitsandbytes is not installed or its CUDA kernels do not run).
- `sampling/{imagenet512,kinetics600}`: images (clips) per second of the stage-1 decoder at the
  experiment's sampler and steps (fp32, as `ulframe sample` runs, and in bf16 autocast), and of
  end-to-end samples of stage 2 (`stage.sample`: its steps, guidance, context frames).
- `wrap/ddp`, `wrap/fsdp`, `wrap/fsdp+compile`: each in its own subprocess, a one-rank process
  group (nccl on CUDA, gloo on CPU); the tiny-preset stage-1 model wrapped as
  `distributed.wrap` wraps it for several processes (DDP, or FSDP2 by `distributed.shard`, the
  sharded blocks then compiled; ulframe itself does not wrap a world of one), three
  `train_step`s, the full state dicts gathered and loaded back (`training_state`,
  `load_training_state`).
- `launch`: `ulframe run gin/quickstart.gin --nproc 1` with `parallelism = 'fsdp'` (torch's
  elastic agent, the workdir lock, the checkpoint layout) for two steps on the device; with one
  process the setting is accepted and nothing is wrapped, which is why `wrap/` exists.
- `sigterm_resume`: a tiny run in a subprocess gets SIGTERM after its first checkpoint; it must
  stop with a checkpoint, and the same command must resume from the samples it saved and finish.
- the other compiled steps: `kinetics600/stage1`, `imagenet512/stage2`, `kinetics600/stage2`.

Sizes (`--quick` replaces them): batch 32 per step for both stages (the configs' per-GPU batch
on 8 GPUs; stage 1 fits with the activation checkpointing the experiment files configure), 3
warm-up and 10 timed steps; sampling 4 decoder images, 2 end-to-end. benchmarks/memory.py
estimates the one-GPU peak at batch 32 at 26.0 / 27.8 GiB (ImageNet / Kinetics stage 1,
activation checkpointing 'blocks'; 16.5 / 18.6 GiB at batch 16) and 25.6 / 22.2 GiB (stage 2,
no checkpointing).

Time: `--budget-s` (default 420, counted from the start of the process; none with `--quick`)
is the whole run's. A check starts only while `MIN_START_S` of it is left, a compiled check
only while `COMPILE_MIN_S` (180 s: a cold inductor compile of the paper networks takes minutes)
is left; each check has one deadline, the smaller of its own limit and what is left of the
budget. An in-process check past its deadline is interrupted (SIGALRM), a subprocess check's
process group killed; both are recorded as errors and the next check runs if time is left. The
summary is printed and the report written however the run ends: all checks done, the budget
spent, SIGTERM/SIGINT (from the `finally` of `main`), or the main thread stuck in a kernel
(a watchdog thread, `GRACE_S` after the budget). `--only`, `--skip`: name prefixes.

`--quick`: the same experiment files with the tiny presets (gin/presets/tiny_image.gin,
tiny_video.gin) at 32x32 images and 16x16 clips, batch 4, 1 warm-up and 2 timed steps, 4
sampler steps, and `torch.compile(backend="aot_eager")` on CPU (graph capture and AOT autograd
without code generation; `--compile-backend inductor` to change), compiled steps for ImageNet
stage 1 and Kinetics stage 2 only, and the subprocess checks (`wrap/`, `launch`,
`sigterm_resume`) running beside the in-process ones (`--serial`: after them, as on a GPU).
CUDA-only checks are skipped with a reason.

The last line is `gpu check: N/M ok, decoder MFU X%`: M checks ran (skipped ones excluded), N
passed; decoder MFU is the ImageNet-512 stage-1 step's (compiled when it ran, else eager).
Exit code 0 when N = M (and the run was not stopped), 1 otherwise, 2 when the preflight fails.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import importlib.util
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

T0 = time.perf_counter()  # the budget counts from the start of the process (imports included)
INSTALL = "pip install -e ."  # in the repository: ulframe, its plugins and requirements


def missing_packages() -> str | None:
    """The preflight's first half (standard library only, before torch is imported): why the
    packages this script imports are not importable, or None."""
    if importlib.util.find_spec("ulframe") is None:
        return f"ulframe is not installed in this environment: {INSTALL}"
    for name in ("torch", "gin", "stevedore", "ulframe_plugins"):
        if importlib.util.find_spec(name) is None:
            return f"missing package {name} ({INSTALL})"
    return None


try:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import memory
except ModuleNotFoundError as _err:  # the preflight: one line, not a traceback
    if __name__ != "__main__":
        raise
    why = missing_packages() or f"missing package {_err.name} ({INSTALL})"
    print(f"gpu_check: {why}", file=sys.stderr)
    sys.exit(2)

REPO = Path(__file__).resolve().parents[1]
RESULT = "GPU_CHECK_RESULT "  # a worker subprocess's result lines start with this
GIB = 2**30
TINY = "gin/quickstart.gin"  # the gin/presets/tiny_image.gin experiment
MIN_START_S = 10.0  # a check starts only while this much of the budget is left
COMPILE_MIN_S = 180.0  # a compiled step: a cold inductor compile of the paper networks
WRAP_COMPILE_MIN_S = 60.0  # wrap/fsdp+compile: the tiny networks
GRACE_S = 20.0  # after the budget, a watchdog thread reports and exits if main has not
DEFAULT_BUDGET_S = 420.0  # under the 8 minutes of a first GPU run, with room to shut down
# The plugins the experiment files (and the tiny runs) name: the preflight's second half.
PLUGINS = (
    "encoders.resnet", "priors.vit", "decoders.uvit", "weightings.sigmoid",
    "schedules.cosine", "schedules.shifted_cosine", "samplers.ddim", "samplers.ancestral",
    "samplers.dpmpp_2m", "samplers.heun", "samplers.unipc", "stages.ul_joint", "stages.ul_base",
    "datasets.image_folder", "datasets.kinetics",
    "datasets.digits", "metrics.fvd_i3d", "metrics.fd_digits", "hooks.console",
)  # fmt: skip
WRAP_VARIANTS = ("ddp", "fsdp", "fsdp+compile")


@dataclass(frozen=True)
class Experiment:
    key: str
    files: tuple[str, ...]
    bindings: tuple[str, ...] = ()


PAPER = (
    Experiment("imagenet512", ("gin/ul_imagenet512.gin",)),
    Experiment("kinetics600", ("gin/ul_kinetics.gin",)),
)
QUICK_STEPS = ("stage1/stages.ul_joint.sample_steps = 4", "stage2/stages.ul_base.sample_steps = 4")
QUICK = (
    Experiment(
        "imagenet512",
        ("gin/ul_imagenet512.gin", "gin/presets/tiny_image.gin"),
        ("datasets.image_folder.resolution = 32", *QUICK_STEPS),
    ),
    Experiment(
        "kinetics600",
        ("gin/ul_kinetics.gin", "gin/presets/tiny_video.gin"),
        ("datasets.kinetics.resolution = 16", *QUICK_STEPS),
    ),
)


@dataclass(frozen=True)
class Sizes:
    batch1: int
    batch2: int
    warmup: int
    steps: int
    decode_n: int
    sample_n: int
    run_samples: int  # samples of the SIGTERM run (it must not finish before the signal)
    limit_s: float  # a check's own time limit (its deadline: this, or less of the budget left)
    compiled_limit_s: float  # a compiled step's, and wrap/fsdp+compile's


FULL_SIZES = Sizes(32, 32, 3, 10, 4, 2, 256, 150, 240)
QUICK_SIZES = Sizes(4, 4, 1, 2, 2, 2, 24, 150, 240)
QUICK_COMPILED = {("imagenet512", 0), ("kinetics600", 1)}  # (experiment, stage index)

# gin/quickstart.gin (tiny_image networks) cut to a few steps: the runs of launch/ and sigterm.
TINY_RUN = (
    "Experiment.stages = [@stage1/stages.ul_joint()]",
    "Experiment.hooks = [@hooks.console()]",
    "Experiment.num_workers = 0",
    "TRAIN_SAMPLES = 8",
    "stage1/TrainSettings.batch_size = 4",
    "stage1/TrainSettings.warmup_samples = 4",
    "stage1/TrainSettings.log_every_samples = 4",
    "stage1/TrainSettings.eval_every_samples = 0",
    "stage1/TrainSettings.eval_batches = 1",
    "stage1/TrainSettings.checkpoint_every_samples = 4",
    "stage1/TrainSettings.precision = 'bf16'",
    "stage1/stages.ul_joint.sample_steps = 2",
    "stage1/stages.ul_joint.eval_t_per_example = 1",
    "stage1/stages.ul_joint.eval_images = 2",
)


class Skip(Exception):
    """A check that does not apply here (the reason is recorded)."""


class OutOfTime(BaseException):
    """Raised in the main thread by SIGALRM: the running check passed its deadline."""


class Stopped(BaseException):
    """Raised in the main thread by SIGTERM or SIGINT: report what ran, then exit."""


def missing_plugins() -> str | None:
    """The preflight's second half: the registry finds every plugin of `PLUGINS`, or why not
    (a plugin whose import failed for want of a package names that package)."""
    from ulframe.errors import PluginError
    from ulframe.registry import Registry

    registry = Registry()
    for selector in PLUGINS:
        kind, name = selector.split(".")
        try:
            registry.get(kind, name)
        except PluginError as err:
            package = re.search(r"No module named '([\w.]+)'", str(err))
            if package:
                root = package[1].split(".")[0]
                return f"missing package {root} (needed by {selector}; {INSTALL})"
            return f"plugin {selector} not found: {err} ({INSTALL})"
    return None


_ARMED = [False]  # the SIGALRM handler raises only while a check runs under its deadline


def _on_alarm(signum: int, frame: Any) -> None:
    if _ARMED[0]:
        _ARMED[0] = False
        raise OutOfTime


def _on_stop(signum: int, frame: Any) -> None:
    _ARMED[0] = False
    raise Stopped(signal.Signals(signum).name)


# ---- the report ---------------------------------------------------------------------------------
class Report:
    """Runs checks one by one, each under its deadline, records each, rewrites the JSON file
    after each."""

    def __init__(self, path: Path, meta: dict[str, Any], budget_s: float) -> None:
        self.path = path
        self.meta = meta
        self.budget_s = budget_s  # 0: no budget
        self.checks: list[dict[str, Any]] = []
        self.only: list[str] = []
        self.skip: list[str] = []
        self.stopped = ""  # why the run ended early, if it did
        self.closed = False  # the summary is out: checks still ending (threads) go unrecorded
        self.lock = threading.Lock()  # checks may finish in two threads (--quick)

    def elapsed(self) -> float:
        return time.perf_counter() - T0

    def left(self) -> float:
        """Seconds of the budget left (infinite without a budget)."""
        return self.budget_s - self.elapsed() if self.budget_s else math.inf

    def wanted(self, name: str) -> bool:
        if self.only and not any(name.startswith(p) for p in self.only):
            return False
        return not any(name.startswith(p) for p in self.skip)

    def startable(self, name: str, min_left_s: float = MIN_START_S) -> bool:
        """Whether `name` may start with the budget left; if not, it is recorded as skipped."""
        left = self.left()
        if left >= min_left_s:
            return True
        why = f"time budget: {max(left, 0):.1f} s of {self.budget_s:.0f} s left, "
        self.record(name, "skipped", reason=why + f"{min_left_s:.0f} s needed")
        return False

    def record(self, name: str, status: str, seconds: float = 0.0, **fields: Any) -> None:
        entry = {"name": name, "status": status, "seconds": round(seconds, 2), **fields}
        detail = fields.get("reason") or fields.get("error") or _short(fields.get("result", {}))
        with self.lock:
            if self.closed:
                return
            self.checks.append(entry)
            line = f"[{self.elapsed():6.0f} s] {name}: {status} ({seconds:.1f} s) {detail}"
            print(line, flush=True)
            self.write()

    def run(
        self,
        name: str,
        fn: Callable[[float], dict[str, Any]],
        limit_s: float,
        cuda_only: bool = False,
        min_left_s: float = MIN_START_S,
    ) -> Any:
        """Run one check, `fn(until)` with `until` its deadline (a `time.perf_counter()` time:
        `limit_s` from now, or the end of the budget if sooner); its result dict, or None when
        it failed or was skipped. In the main thread SIGALRM interrupts it at the deadline."""
        if not self.wanted(name) or self.closed:
            return None
        if cuda_only and self.meta["device"] != "cuda":
            self.record(name, "skipped", reason="CUDA only")
            return None
        if not self.startable(name, min_left_s):
            return None
        seconds = min(limit_s, self.left())
        t0 = time.perf_counter()
        alarm = threading.current_thread() is threading.main_thread()
        try:
            if alarm:
                _ARMED[0] = True
                signal.setitimer(signal.ITIMER_REAL, seconds)
            result = fn(t0 + seconds)
            if alarm:
                _ARMED[0] = False
        except Skip as why:
            self.record(name, "skipped", time.perf_counter() - t0, reason=str(why))
            return None
        except OutOfTime:
            why = "the end of the time budget" if seconds < limit_s else "its own limit"
            error = f"interrupted at its deadline, after {seconds:.1f} s ({why})"
            self.record(name, "error", time.perf_counter() - t0, error=error)
            return None
        except Stopped as why:
            error = f"the run was stopped ({why})"
            self.record(name, "error", time.perf_counter() - t0, error=error)
            raise
        except Exception as err:  # recorded; the next check runs
            tail = traceback.format_exc().strip().splitlines()[-12:]
            self.record(name, "error", time.perf_counter() - t0, error=_error(err), traceback=tail)
            return None
        finally:
            if alarm:
                _ARMED[0] = False
                signal.setitimer(signal.ITIMER_REAL, 0)
            _free()
        self.record(name, "ok", time.perf_counter() - t0, result=result)
        return result

    def summary(self) -> dict[str, Any]:
        checks = list(self.checks)
        ran = [c for c in checks if c["status"] != "skipped"]
        ok = [c for c in ran if c["status"] == "ok"]
        return {
            "ok": len(ok),
            "ran": len(ran),
            "skipped": [c["name"] for c in checks if c["status"] == "skipped"],
            "failed": [c["name"] for c in ran if c["status"] != "ok"],
            "seconds": round(self.elapsed(), 1),
            "stopped": self.stopped or None,
        }

    def write(self, extra: dict[str, Any] | None = None) -> None:
        data = {"meta": self.meta, "checks": list(self.checks), "summary": self.summary()}
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(data | (extra or {}), indent=2, default=str))
        tmp.replace(self.path)


def _error(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) < 2000 else text[:2000] + " ..."


def _short(result: Any) -> str:
    if not isinstance(result, dict):
        return ""
    keys = ("samples_per_s", "mfu", "peak_gib", "tflops", "images_per_s", "resumed_at")
    shown = {k: result[k] for k in keys if k in result and result[k] is not None}
    return ", ".join(
        f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()
    )


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / GIB, 1),
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        }
    from importlib import metadata

    for name in ("bitsandbytes", "triton"):  # versions only: importing bitsandbytes takes seconds
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = "not installed"
    return env


# ---- building a stage on the device -------------------------------------------------------------
@dataclass
class Built:
    experiment: Any
    stage: Any
    model: torch.nn.Module
    example: dict[str, torch.Tensor]
    classes: int
    previous: list[str]


def build(exp: Experiment, index: int, device: torch.device, workdir: Path) -> Built:
    """Stage `index` of `exp`, built by its own `build` directly on `device` (weights random)."""
    experiment = memory.load_experiment(exp.files, exp.bindings)
    example, classes = memory.example_of(experiment.dataset)
    stage = experiment.stages[index]
    previous = [s.name for s in experiment.stages[:index]]
    torch.manual_seed(0)
    with torch.device(device):
        model = memory.build_stage(stage, example, classes, device, workdir, previous)
    return Built(experiment, stage, model.to(device), example, classes, previous)


def synthetic_batch(b: Built, size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random inputs of the shapes the stage trains on (cached latents where it caches them)."""
    gen = torch.Generator(device).manual_seed(1)
    batch = memory.train_batch(b.stage, b.model, {"x": b.example["x"].to(device)}, size)
    if "z" in batch:
        batch["z"] = torch.randn(batch["z"].shape, generator=gen, device=device)
    else:
        batch["x"] = torch.rand(batch["x"].shape, generator=gen, device=device) * 2 - 1
    classes = max(b.classes, 1)
    batch["label"] = torch.randint(0, classes, (size,), generator=gen, device=device)
    return batch


@contextlib.contextmanager
def compile_backend(backend: str) -> Iterator[None]:
    """Within the block `torch.compile` uses `backend` (what ulframe compiles is unchanged)."""
    if backend == "inductor":
        yield
        return
    original = torch.compile
    torch.compile = functools.partial(original, backend=backend)  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.compile = original  # type: ignore[assignment]


def compile_setting(settings: Any, mode: str) -> dict[str, str]:
    """`{"compile": mode}` for `dataclasses.replace` (the experiment files set it); empty for a
    TrainSettings without the field."""
    names = {f.name for f in dataclasses.fields(settings)}
    return {"compile": mode} if "compile" in names else {}


def reset_dynamo() -> None:
    """Forget compiled code and dynamo's counters (each compiled check counts its own)."""
    with contextlib.suppress(Exception):
        import torch._dynamo
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()


def dynamo_counters() -> dict[str, Any]:
    try:
        from torch._dynamo.utils import counters

        return {
            "stats": dict(counters["stats"]),
            "graph_breaks": sum(counters["graph_break"].values()),
            "recompiles": dict(counters.get("recompiles", {})),
        }
    except Exception as err:
        return {"error": _error(err)}


# ---- the checks ---------------------------------------------------------------------------------
@dataclass
class Context:
    device: torch.device
    quick: bool
    sizes: Sizes
    experiments: tuple[Experiment, ...]
    backend: str
    workdir: Path
    args: argparse.Namespace
    matmul_rate: float = 0.0
    flops: dict[str, float] = dataclasses.field(default_factory=dict)  # key -> FLOPs per step
    batch: dict[tuple[str, int], int] = dataclasses.field(default_factory=dict)  # that ran
    mfu: dict[str, float] = dataclasses.field(default_factory=dict)  # check name -> MFU


def check_matmul(ctx: Context) -> dict[str, Any]:
    from ulframe.train import perf

    rate = perf.measure_matmul_rate(ctx.device, torch.bfloat16, seconds=0.3)
    ctx.matmul_rate = rate
    return {"tflops": rate / 1e12, "dtype": "bfloat16"}


FLOPS_BATCH = 2  # count_flops' batch (as the loop counts): a paper step without checkpointing


def count_flops(b: Built, batch: dict[str, torch.Tensor], device: torch.device) -> float:
    """FLOPs of one forward and backward of the stage's loss on `batch` (bf16 autocast), counted
    on its first `FLOPS_BATCH` examples and scaled to its size (the count is linear in the batch;
    a counted step of the paper's stage 1 at the full batch, without activation checkpointing,
    would hold tens of GiB)."""
    from ulframe.diffusion import BatchNoise
    from ulframe.train import perf

    size = len(batch["label"])
    few = {k: v[:FLOPS_BATCH] for k, v in batch.items()}

    def step() -> torch.Tensor:
        noise = BatchNoise(torch.Generator(device).manual_seed(0))
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return b.model(few, noise).total_nats().mean()

    b.model.train()
    try:
        return perf.train_flops(step) * size / min(size, FLOPS_BATCH)
    finally:
        for p in b.model.parameters():
            p.grad = None


def estimated_peak(b: Built, batch_size: int) -> float:
    """benchmarks/memory.py's one-GPU estimate for this stage and batch, GiB."""
    r = memory.stage_memory(
        "", b.stage, b.example, b.classes, 1, Path(tempfile.gettempdir()), b.previous, batch_size
    )
    return memory.single_gpu_bytes(r) / GIB


def check_step(
    ctx: Context, exp: Experiment, index: int, compiled: bool, optimizer: Any = None
) -> dict[str, Any]:
    """`step_at` at the configured batch, or, when that runs out of GPU memory, once more at half
    of it (a compiled step starts at the batch its eager step ran at)."""
    sizes = ctx.sizes
    size = ctx.batch.get((exp.key, index), sizes.batch1 if index == 0 else sizes.batch2)
    oom = ""
    try:
        result = step_at(ctx, exp, index, compiled, optimizer, size)
    except torch.cuda.OutOfMemoryError as err:
        if size < 2:
            raise
        oom = _error(err)
    if oom:  # (out of the except block: its traceback, which holds the model, is gone)
        reset_dynamo()
        _free()
        size //= 2
        result = step_at(ctx, exp, index, compiled, optimizer, size)
        result |= {"oom_at": size * 2, "oom_error": oom[:500]}
    if optimizer is None:
        ctx.batch[(exp.key, index)] = size
    return result


def step_at(
    ctx: Context, exp: Experiment, index: int, compiled: bool, optimizer: Any, size: int
) -> dict[str, Any]:
    from ulframe.train.distributed import World
    from ulframe.train.step import Trainer

    device = ctx.device
    key = f"{exp.key}/{index}/{size}"
    b = build(exp, index, device, ctx.workdir)
    batch = synthetic_batch(b, size, device)
    result: dict[str, Any] = {
        "batch": size,
        "params_m": round(sum(p.numel() for p in b.model.parameters()) / 1e6, 2),
        "trainable_m": round(
            sum(p.numel() for p in b.model.parameters() if p.requires_grad) / 1e6, 2
        ),
    }
    if not compiled and optimizer is None:
        try:
            result["estimated_peak_gib"] = round(estimated_peak(b, size), 2)
        except Exception as err:  # the estimate is an extra: the step is the check
            result["estimate_error"] = _error(err)
    if key not in ctx.flops:
        try:
            ctx.flops[key] = count_flops(b, batch, device)
        except Exception as err:  # no MFU then; the step is still measured
            result["flops_error"] = _error(err)
    flops = ctx.flops.get(key, 0.0)

    changes: dict[str, Any] = {"batch_size": size, "precision": "bf16"}
    changes |= compile_setting(b.stage.train, "networks" if compiled else "off")
    if optimizer is not None:
        changes["optimizer"] = optimizer
    settings = dataclasses.replace(b.stage.train, **changes)
    world = World(0, 1, 0, device)
    _free()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if compiled:
        reset_dynamo()
    try:
        with compile_backend(ctx.backend):
            trainer = Trainer.build(b.model, settings, world)
        result |= time_steps(ctx, trainer, batch, size, flops)
        if compiled:
            result |= {"compile_s": result["warmup_s"], "backend": ctx.backend}
    finally:
        if compiled:  # what dynamo saw, then its caches freed
            result["dynamo"] = dynamo_counters()
            reset_dynamo()
    return result


def time_steps(
    ctx: Context, trainer: Any, batch: dict[str, torch.Tensor], size: int, flops: float
) -> dict[str, Any]:
    """Warm-up steps, then timed `train_step`s: speed, loss, peak memory, MFU."""
    from ulframe.train.step import train_step

    device, sizes = ctx.device, ctx.sizes
    t0 = time.perf_counter()
    seen = 0
    for _ in range(sizes.warmup):
        train_step(trainer, batch, seen)
        seen += size
    _sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(sizes.steps):
        last = train_step(trainer, batch, seen)
        seen += size
    _sync(device)
    seconds = time.perf_counter() - t0
    loss = float(last.scalars["loss_nats"])
    if not math.isfinite(loss):
        raise RuntimeError(f"the loss is not finite: {loss}")
    if last.skipped:
        raise RuntimeError(f"the step was skipped: {last.skipped}")
    result = {
        "samples_per_s": sizes.steps * size / seconds,
        "step_ms": 1e3 * seconds / sizes.steps,
        "loss_nats": loss,
        "flops_per_step": flops or None,
        "model_tflops_per_s": flops * sizes.steps / seconds / 1e12 if flops else None,
        "peak_gib": torch.cuda.max_memory_allocated(device) / GIB
        if device.type == "cuda"
        else None,
        "warmup_s": warm_s,
    }
    if ctx.matmul_rate > 0 and flops:
        result["mfu"] = flops * sizes.steps / seconds / ctx.matmul_rate
    return result


def bitsandbytes_works(device: torch.device) -> None:
    """Raise `Skip` unless bitsandbytes is installed and its 8-bit AdamW steps on `device`."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise Skip("bitsandbytes is not installed")
    try:
        import bitsandbytes as bnb

        p = torch.nn.Parameter(torch.ones(memory.BNB_MIN_8BIT, device=device))
        p.grad = torch.ones_like(p)
        bnb.optim.AdamW8bit([p]).step()
        _sync(device)
        if not torch.isfinite(p).all():
            raise RuntimeError("a step gave non-finite weights")
    except Exception as err:  # no CUDA build, a library that does not load, ...
        raise Skip(f"bitsandbytes' 8-bit AdamW does not run on {device}: {_error(err)}") from err


def check_adamw8bit(ctx: Context) -> dict[str, Any]:
    from ulframe import wiring

    bitsandbytes_works(ctx.device)
    exp = ctx.experiments[0]
    memory.load_experiment(exp.files, exp.bindings)  # registers ulframe's optimizers
    factory = wiring.registered().get("optimizers.AdamW8bit")
    if factory is None:
        raise RuntimeError("optimizers.AdamW8bit is not registered (bitsandbytes import failed?)")
    optimizer = functools.partial(factory, betas=(0.9, 0.99), weight_decay=0.0)
    return check_step(ctx, exp, 0, compiled=False, optimizer=optimizer)


def check_sampling(ctx: Context, exp: Experiment) -> dict[str, Any]:
    device, sizes = ctx.device, ctx.sizes
    b1 = build(exp, 0, device, ctx.workdir)
    stage1, model1 = b1.stage, b1.model.eval()
    gen = torch.Generator(device).manual_seed(0)
    latent = tuple(model1.latent_shape)  # type: ignore[arg-type]
    z_0 = torch.randn((sizes.decode_n, *latent), generator=gen, device=device)
    result: dict[str, Any] = {
        "decoder_steps": stage1.sample_steps,
        "decoder_sampler": getattr(stage1.sampler, "__name__", str(stage1.sampler)),
        "decode_n": sizes.decode_n,
    }
    with torch.no_grad():
        model1.decode_latents(z_0[:1], gen, stage1.sampler, 2)  # warm-up
        for precision in ("fp32", "bf16"):
            _sync(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                x = model1.decode_latents(z_0, gen, stage1.sampler, stage1.sample_steps)
            _sync(device)
            if not torch.isfinite(x).all():
                raise RuntimeError(f"decoder samples ({precision}) are not finite")
            result[f"decoder_images_per_s_{precision}"] = sizes.decode_n / (
                time.perf_counter() - t0
            )
    result["images_per_s"] = result["decoder_images_per_s_fp32"]
    del b1, model1
    _free()

    b2 = build(exp, 1, device, ctx.workdir)
    stage2, model2 = b2.stage, b2.model.eval()
    n = sizes.sample_n
    settings = stage2.sample_settings(model2)
    context = None
    if settings.continues:
        context = torch.rand((n, *b2.example["x"].shape), generator=gen, device=device) * 2 - 1
    labels = stage2.sample_labels(n, device, b2.classes)
    _sync(device)
    t0 = time.perf_counter()
    x = stage2.sample(model2, n, labels, generator=gen, context=context)
    _sync(device)
    seconds = time.perf_counter() - t0
    if not torch.isfinite(x).all():
        raise RuntimeError("end-to-end samples are not finite")
    decoder_steps = stage2.decoder_sample_steps or settings.steps
    return result | {
        "end_to_end_n": n,
        "end_to_end_images_per_s": n / seconds,
        "base_steps": settings.steps,
        "end_to_end_decoder_steps": decoder_steps,
        "guidance": settings.guidance,
        "continues_clips": settings.continues,
        "shape": list(x.shape),
    }


# ---- subprocesses -------------------------------------------------------------------------------
def _env(ctx: Context) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if ctx.device.type == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


_CHILDREN: set[subprocess.Popen[str]] = set()  # running subprocesses (killed when the run ends)
_CLOSED = threading.Event()  # the run has ended: no new subprocess


def _kill(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _communicate(proc: subprocess.Popen[str], until: float) -> tuple[str, str, bool]:
    """(stdout, stderr, timed out) of `proc` by the deadline `until` (a perf_counter time); past
    it the whole process group is killed."""
    try:
        out, err = proc.communicate(timeout=max(until - time.perf_counter(), 0.1))
        return out, err, False
    except subprocess.TimeoutExpired:
        _kill(proc)
        out, err = proc.communicate()
        return out, err, True
    finally:
        if proc.poll() is None:  # interrupted (the run stopped): no orphaned process group
            _kill(proc)
        _CHILDREN.discard(proc)


def _start(cmd: Sequence[str], ctx: Context) -> subprocess.Popen[str]:
    if _CLOSED.is_set():
        raise Stopped("the run has ended")
    proc = subprocess.Popen(
        list(cmd), cwd=REPO, env=_env(ctx), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    _CHILDREN.add(proc)
    return proc


def _ulframe_run(ctx: Context, workdir: Path, *extra: str, samples: int = 8) -> list[str]:
    bindings = [*TINY_RUN, f"TRAIN_SAMPLES = {samples}", f"Experiment.device = '{ctx.device.type}'"]
    cmd = [sys.executable, "-m", "ulframe", "run", TINY, "--workdir", str(workdir)]
    return [*cmd, *(a for b in bindings for a in ("--gin_param", b)), *extra]


def _timed_out(until: float, t0: float) -> str:
    return f"timed out at its deadline, after {until - t0:.0f} s"


def check_launch(ctx: Context, until: float) -> dict[str, Any]:
    workdir = ctx.workdir / "launch"
    binding = "stage1/TrainSettings.parallelism = 'fsdp'"  # one process: not wrapped
    cmd = _ulframe_run(ctx, workdir, "--gin_param", binding, "--nproc", "1")
    t0 = time.perf_counter()
    _, err, timed_out = _communicate(_start(cmd, ctx), until)
    if timed_out:
        raise RuntimeError(f"{_timed_out(until, t0)}:\n{err[-1500:]}")
    done = workdir / "stages" / "stage1" / "DONE.json"
    if not done.is_file():
        raise RuntimeError(f"no DONE.json; stderr:\n{err[-1500:]}")
    if "launching 1 processes" not in err:
        raise RuntimeError(f"not launched through the elastic agent; stderr:\n{err[-1500:]}")
    ckpts = sorted(p.name for p in (workdir / "stages" / "stage1" / "checkpoints").glob("ckpt-*"))
    return {
        "checkpoints": ckpts,
        "scalars": json.loads(done.read_text()).get("scalars", {}),
        "note": "one process: ulframe wraps no model (DDP, FSDP2 on the device: wrap/)",
    }


def check_sigterm(ctx: Context, until: float) -> dict[str, Any]:
    """Both runs, the stopped one and the resumed one, by the one deadline `until`."""
    workdir = ctx.workdir / "sigterm"
    samples = ctx.sizes.run_samples
    cmd = _ulframe_run(ctx, workdir, samples=samples)
    t0 = time.perf_counter()
    proc = _start(cmd, ctx)
    first = workdir / "stages" / "stage1" / "checkpoints" / f"ckpt-{4:012d}"  # renamed in whole
    while not first.is_dir() and proc.poll() is None and time.perf_counter() < until:
        time.sleep(0.005)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, err, timed_out = _communicate(proc, until)
    if timed_out or proc.returncode != 2:
        raise RuntimeError(
            f"expected exit code 2 after SIGTERM, got {proc.returncode} "
            f"({_timed_out(until, t0) if timed_out else 'in time'}); stderr:\n{err[-1500:]}"
        )
    last = err.strip().splitlines()[-1]
    if "stopped by signal 15 at " not in last:
        raise RuntimeError(f"unexpected last line: {last}")
    stopped_at = int(last.split(" at ")[1].split()[0])
    saved = workdir / "stages" / "stage1" / "checkpoints" / f"ckpt-{stopped_at:012d}"
    if not (saved / "manifest.json").is_file():
        raise RuntimeError(f"no checkpoint at {stopped_at} samples")
    again = _start(cmd, ctx)
    _, err2, timed_out = _communicate(again, until)
    if timed_out or again.returncode != 0:
        why = _timed_out(until, t0) if timed_out else f"exit code {again.returncode}"
        raise RuntimeError(f"the resumed run failed ({why}):\n{err2[-1500:]}")
    if f"resumed at {stopped_at} samples" not in err2:
        raise RuntimeError(f"the re-run did not resume at {stopped_at}:\n{err2[-1500:]}")
    done = json.loads((workdir / "stages" / "stage1" / "DONE.json").read_text())
    if done.get("samples_seen") != samples:
        raise RuntimeError(f"DONE.json: {done.get('samples_seen')} samples, not {samples}")
    return {"resumed_at": stopped_at, "train_samples": samples, "stop_line": last}


def wrap_variants(ctx: Context) -> list[str]:
    """The wrap/ variants this run checks: all three (fsdp+compile on CPU with --quick too, with
    its backend, aot_eager), unless `--no-wrap-compile` leaves the compiled one out."""
    return [v for v in WRAP_VARIANTS if not (v.endswith("+compile") and ctx.args.no_wrap_compile)]


def check_wrap(ctx: Context, variant: str, until: float) -> dict[str, Any]:
    """One wrap/ variant in its own subprocess (a hung collective cannot stall this process)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "wrap", "--variant", variant]
    cmd += ["--device", ctx.device.type, "--compile-backend", ctx.backend]
    cmd += ["--quick"] if ctx.quick else []
    t0 = time.perf_counter()
    out, err, timed_out = _communicate(_start(cmd, ctx), until)
    for line in out.splitlines():
        if line.startswith(RESULT):
            entry = json.loads(line[len(RESULT) :])
            if entry["status"] != "ok":
                raise RuntimeError(
                    f"{entry.get('error')}\n" + "\n".join(entry.get("traceback", []))
                )
            return dict(entry["result"])
    why = _timed_out(until, t0) if timed_out else "the worker ended without a result"
    raise RuntimeError(f"{why}; stderr: {err[-1500:]}")


def wrap_worker(device: torch.device, backend: str, variants: Sequence[str]) -> int:
    """(subprocess) A one-rank process group; the tiny stage-1 model under DDP, FSDP2."""
    import torch.distributed as dist

    from ulframe.train import distributed
    from ulframe.train.distributed import World
    from ulframe.train.optim import EMA
    from ulframe.train.step import Trainer, train_step

    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        store=dist.HashStore(),
        rank=0,
        world_size=1,
    )
    world = World(0, 1, 0, device)
    with tempfile.TemporaryDirectory(prefix="ulframe-gpu-check-") as tmp:
        for variant in variants:
            t0 = time.perf_counter()
            entry: dict[str, Any] = {"name": f"wrap/{variant}"}
            try:
                parallelism, _, compiled = variant.partition("+")
                b = build(Experiment("tiny", (TINY,)), 0, device, Path(tmp))
                model = b.model
                settings = dataclasses.replace(
                    b.stage.train, batch_size=4, precision="bf16", parallelism=parallelism,
                    **compile_setting(b.stage.train, "off"),  # compiled below, as Trainer.build
                )  # fmt: skip
                # What Trainer.build does for several processes (distributed.wrap returns a
                # world of one unwrapped): EMA first, then the wrapper, compile, optimizer.
                ema = EMA(model, settings.ema_halflife_samples)
                if parallelism == "fsdp":
                    distributed.shard(model)
                    wrapped: torch.nn.Module = model
                    ema.track_sharded(model)
                else:
                    ids = [device.index] if device.type == "cuda" else None
                    wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
                if compiled:
                    from ulframe.train.parallelize import compile_model

                    with compile_backend(backend):
                        compile_model(model, "networks")
                params = [p for p in model.parameters() if p.requires_grad]
                trainer = Trainer(
                    model, wrapped, ema, settings.build_optimizer(params), params, settings,
                    world, 0, autocast=torch.autocast(device.type, dtype=torch.bfloat16),
                )  # fmt: skip
                batch = synthetic_batch(b, 4, device)
                losses = []
                for step in range(3):
                    result = train_step(trainer, batch, 4 * step, log_due=step == 2)
                    losses.append(float(result.scalars["loss_nats"]))
                _sync(device)
                if not all(math.isfinite(v) for v in losses):
                    raise RuntimeError(f"non-finite losses {losses}")
                ema.sync()
                model_state, opt_state = distributed.training_state(model, trainer.opt)
                before = {k: v.detach().clone() for k, v in model_state.items()}
                # (set_model_state_dict distributes the tensors of the dict it is given in place)
                distributed.load_training_state(model, trainer.opt, model_state, opt_state)
                again, _ = distributed.training_state(model, trainer.opt)
                differ = [k for k in before if not torch.equal(before[k], again[k])]
                if differ:
                    raise RuntimeError(f"state round trip changed {differ[:3]}")
                entry |= {
                    "status": "ok",
                    "result": {
                        "losses": losses,
                        "sharded": distributed.is_sharded(model),
                        "state_tensors": len(model_state),
                        "grad_norms": result.module_norms,
                        "dynamo": dynamo_counters() if compiled else None,
                        "peak_gib": torch.cuda.max_memory_allocated(device) / GIB
                        if device.type == "cuda"
                        else None,
                    },
                }
            except Exception as err:
                tail = traceback.format_exc().strip().splitlines()[-12:]
                entry |= {"status": "error", "error": _error(err), "traceback": tail}
            entry["seconds"] = time.perf_counter() - t0
            print(RESULT + json.dumps(entry, default=str), flush=True)
            _free()
    dist.destroy_process_group()
    return 0


# ---- main ---------------------------------------------------------------------------------------
def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda but torch sees no CUDA device")
    return torch.device("cuda", 0) if requested == "cuda" else torch.device("cpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu", "auto"), default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny presets, 1-2 steps (CPU)")
    parser.add_argument(
        "--out", type=Path, default=Path("gpu_check.json"),
        help="JSON report (default: in the working directory; give a kept path)",
    )  # fmt: skip
    parser.add_argument(
        "--budget-s", type=float,
        help=f"the whole run's seconds, from the process start ({DEFAULT_BUDGET_S:.0f}; "
        "quick: none; 0: none)",
    )  # fmt: skip
    parser.add_argument("--only", default="", help="comma-separated name prefixes to run")
    parser.add_argument("--skip", default="", help="comma-separated name prefixes to skip")
    parser.add_argument(
        "--compile-backend", help="torch.compile backend (inductor; quick on CPU: aot_eager)"
    )
    parser.add_argument(
        "--serial", action="store_true", help="--quick: subprocess checks one after the others"
    )
    parser.add_argument(
        "--no-wrap-compile", action="store_true", help="leave out wrap/fsdp+compile"
    )
    parser.add_argument("--worker", choices=("wrap",), help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=WRAP_VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    if device.type == "cpu" and not args.quick:
        print("gpu_check: the paper-size networks need a GPU; running the --quick checks on CPU")
        args.quick = True
    backend = args.compile_backend or (
        "aot_eager" if args.quick and device.type == "cpu" else "inductor"
    )
    if device.type == "cpu" and "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
    if args.worker == "wrap":
        return wrap_worker(device, backend, [args.variant] if args.variant else WRAP_VARIANTS)

    problem = missing_packages() or missing_plugins()
    if problem:
        print(f"gpu_check: {problem}", file=sys.stderr, flush=True)
        return 2

    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    budget = (
        args.budget_s if args.budget_s is not None else (0.0 if args.quick else DEFAULT_BUDGET_S)
    )
    experiments = QUICK if args.quick else PAPER
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    meta = environment(device) | {
        "quick": args.quick,
        "compile_backend": backend,
        "sizes": dataclasses.asdict(sizes),
        "budget_s": budget or None,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    report = Report(args.out, meta, budget)
    report.only = [p for p in args.only.split(",") if p]
    report.skip = [p for p in args.skip.split(",") if p]
    print(
        f"gpu check on {meta.get('gpu', device.type)}: torch {torch.__version__}, "
        f"{'quick (tiny presets)' if args.quick else 'paper-size networks'}, "
        f"compile backend {backend}, budget {f'{budget:.0f} s' if budget else 'none'}; "
        f"report: {args.out.resolve()}",
        flush=True,
    )
    finished = threading.Lock()
    head = f"step/{experiments[0].key}/stage1/"
    mfu_of: dict[str, float] = {}

    def finish() -> int:
        """Write the report and print the summary, once (main's `finally` or the watchdog):
        the exit code, -1 when it had been done."""
        if not finished.acquire(blocking=False):
            return -1
        if threading.current_thread() is threading.main_thread():  # no second Stopped now
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, signal.SIG_IGN)
        locked = report.lock.acquire(timeout=5)  # (the watchdog: main may hold it, stuck)
        report.closed = True
        if locked:
            report.lock.release()
        _CLOSED.set()
        for proc in list(_CHILDREN):
            _kill(proc)
        mfu = mfu_of.get(head + "compiled", mfu_of.get(head + "eager"))
        summary = report.summary()
        with contextlib.suppress(Exception):
            report.write({"decoder_mfu": mfu})
        if report.stopped:
            print(f"stopped: {report.stopped} at {report.elapsed():.0f} s")
        if summary["skipped"]:
            print(f"skipped: {', '.join(summary['skipped'])}")
        if summary["failed"]:
            print(f"failed: {', '.join(summary['failed'])} (errors in {args.out})")
        shown = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
        print(f"gpu check: {summary['ok']}/{summary['ran']} ok, decoder MFU {shown}", flush=True)
        return 0 if summary["ok"] == summary["ran"] and not report.stopped else 1

    def watchdog() -> None:
        """The main thread stuck past the budget (a kernel, a collective): report and exit."""
        time.sleep(max(budget + GRACE_S - report.elapsed(), 0))
        if finished.locked():  # main has reported
            return
        report.stopped = f"stuck past the time budget ({budget:.0f} s)"
        code = finish()
        if code >= 0:
            sys.stdout.flush()
            os._exit(code)

    if budget:
        threading.Thread(target=watchdog, daemon=True).start()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGTERM, _on_stop)
    signal.signal(signal.SIGINT, _on_stop)
    with tempfile.TemporaryDirectory(
        prefix="ulframe-gpu-check-", ignore_cleanup_errors=True
    ) as tmp:
        try:
            ctx = Context(device, args.quick, sizes, experiments, backend, Path(tmp), args)
            run_checks(ctx, report, mfu_of)
        except Stopped as why:
            report.stopped = str(why)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            code = max(finish(), 1 if report.stopped else 0)
    if report.stopped:  # threads may still be in torch's C++ code: no interpreter teardown
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def run_checks(ctx: Context, report: Report, mfu_of: dict[str, float]) -> None:
    """Every check, in the order of the docstring; the MFU of each step into `mfu_of`."""
    sizes, experiments = ctx.sizes, ctx.experiments

    def step(exp: Experiment, index: int, compiled: bool) -> None:
        name = f"step/{exp.key}/stage{index + 1}/{'compiled' if compiled else 'eager'}"
        if compiled and ctx.quick and (exp.key, index) not in QUICK_COMPILED:
            if report.wanted(name):
                report.record(
                    name, "skipped", reason="--quick compiles one image and one video step"
                )
            return
        res = report.run(
            name, lambda _: check_step(ctx, exp, index, compiled),
            limit_s=sizes.compiled_limit_s if compiled else sizes.limit_s,
            min_left_s=COMPILE_MIN_S if compiled else MIN_START_S,
        )  # fmt: skip
        if res and "mfu" in res:
            mfu_of[name] = res["mfu"]

    def wrap_checks() -> None:
        for variant in wrap_variants(ctx):
            compiled = variant.endswith("+compile")
            report.run(
                f"wrap/{variant}", functools.partial(check_wrap, ctx, variant),
                limit_s=sizes.compiled_limit_s if compiled else sizes.limit_s,
                min_left_s=WRAP_COMPILE_MIN_S if compiled else MIN_START_S,
            )  # fmt: skip

    def launch_checks() -> None:
        report.run("launch", functools.partial(check_launch, ctx), limit_s=sizes.limit_s)
        sigterm = functools.partial(check_sigterm, ctx)
        report.run("sigterm_resume", sigterm, limit_s=2 * sizes.limit_s)

    # --quick: the subprocess checks run beside the others, in two threads (a small, busy CPU:
    # they mostly wait); on a GPU one after the other, so that no check shares the device.
    background = []
    if ctx.quick and not ctx.args.serial:
        background = [threading.Thread(target=f, daemon=True) for f in (wrap_checks, launch_checks)]
        for thread in background:
            thread.start()
    report.run("matmul_rate", lambda _: check_matmul(ctx), limit_s=60)
    first = experiments[0]
    step(first, 0, compiled=False)
    step(first, 0, compiled=True)  # the headline: the decoder's MFU as the experiments train
    for exp in experiments:
        for index in (0, 1):
            if (exp, index) != (first, 0):
                step(exp, index, compiled=False)
    report.run("adamw8bit", lambda _: check_adamw8bit(ctx), limit_s=sizes.limit_s, cuda_only=True)
    for exp in experiments:
        sampling = functools.partial(check_sampling, ctx, exp)
        report.run(f"sampling/{exp.key}", lambda _, f=sampling: f(), limit_s=sizes.limit_s)
    if not background:
        wrap_checks()
        launch_checks()
    for index in (0, 1):  # the other compiled steps, stage 1 first
        for exp in experiments:
            if (exp, index) != (first, 0):
                step(exp, index, compiled=True)
    for thread in background:
        thread.join()


if __name__ == "__main__":
    sys.exit(main())
