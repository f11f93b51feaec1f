"""GPU check: the paper-size networks and the multi-process, resume and sampling paths on one GPU.

    python benchmarks/gpu_check.py --device cuda                 # one GPU, <= 8 minutes, no data
    OMP_NUM_THREADS=1 python benchmarks/gpu_check.py --device cpu --quick   # the CPU fallback

Each check runs on its own; a failure is recorded (error, traceback tail) and the next check
runs. The JSON report (`--out`, default gpu_check.json) is rewritten after every check, so a
killed run leaves what it measured. Checks, in order:

- `matmul_rate`: achieved bf16 matmul FLOP/s (`ulframe.train.perf.measure_matmul_rate`), the
  reference of MFU.
- `step/{imagenet512,kinetics600}/{stage1,stage2}/{eager,compiled}`: the networks of
  gin/ul_imagenet512.gin and gin/ul_kinetics.gin (their presets, gin/presets/imagenet512.gin and
  kinetics600.gin), built through ulframe's wiring and each stage's `build` (stage 2 on
  random stage-1 weights), trained on synthetic batches by the loop's own
  `Trainer.build` + `train_step` (bf16 autocast, clipping, AdamW, EMA): samples/s, peak
  memory (`torch.cuda.max_memory_allocated`), model FLOPs per step (`perf.train_flops`) and MFU
  against `matmul_rate`, beside the estimate of benchmarks/memory.py for the same batch.
  Stage 1 is encoder + prior + decoder with the real ULJoint loss; stage 2 is the base model
  (ImageNet: on cached latents; Kinetics: encoding clips and their 5 context frames on the fly).
  `eager` sets `TrainSettings.compile = "off"`, `compiled` "networks" (what the experiment files
  train with); the time of a compiled check's warm-up steps is its `compile_s`.
- `adamw8bit`: the ImageNet stage-1 step with `@optimizers.AdamW8bit` (bitsandbytes; CUDA only).
- `sampling/{imagenet512,kinetics600}`: images (clips) per second of the stage-1 decoder at the
  experiment's sampler and steps (fp32, as `ulframe sample` runs, and in bf16 autocast), and of
  end-to-end samples of stage 2 (`stage.sample`: its steps, guidance, context frames).
- `wrap/ddp`, `wrap/fsdp` (+ `wrap/fsdp+compile` on CUDA): a one-rank process group (nccl on
  CUDA, gloo on CPU) in a subprocess; the tiny-preset stage-1 model wrapped as
  `distributed.wrap` wraps it for several processes (DDP, or FSDP2 by `distributed.shard`;
  ulframe itself does not wrap a world of one), three `train_step`s, the full state dicts
  gathered and loaded back (`training_state`, `load_training_state`).
- `launch`: `ulframe run gin/quickstart.gin --nproc 1` with `parallelism = 'fsdp'` (torch's
  elastic agent, the workdir lock, the checkpoint layout) for two steps on the device; with one
  process the setting is accepted and nothing is wrapped, which is why `wrap/` exists.
- `sigterm_resume`: a tiny run in a subprocess gets SIGTERM after its first checkpoint; it must
  stop with a checkpoint, and the same command must resume from the samples it saved and finish.

Sizes (`--quick` replaces them): stage-1 batch 16 and stage-2 batch 32 per step (the configs'
per-GPU batch on 8 GPUs is 32; stage 1 at 32 does not fit 80 GB, see benchmarks/memory.py), 3
warm-up and 10 timed steps; sampling 4 decoder images, 2 end-to-end. benchmarks/memory.py
estimates the one-GPU peak at these batches at 48.5 / 49.7 GiB (ImageNet / Kinetics stage 1)
and 25.6 / 22.2 GiB (stage 2).
`--budget-s` (default 360) skips, with a recorded reason, checks that would start after that
many seconds; the compiled steps come last, stage 1 first. `--only`, `--skip`: name prefixes.

`--quick`: the same experiment files with the tiny presets (gin/presets/tiny_image.gin,
tiny_video.gin) at 32x32 images and 16x16 clips, batch 4, 1 warm-up and 2 timed steps, 4
sampler steps, and `torch.compile(backend="aot_eager")` on CPU (graph capture and AOT autograd
without code generation; `--compile-backend inductor` to change), compiled steps for ImageNet
stage 1 and Kinetics stage 2 only, and the subprocess checks (`wrap/`, `launch`,
`sigterm_resume`) running beside the in-process ones (`--serial`: after them, as on a GPU).
CUDA-only checks are skipped with a reason.

The last line is `gpu check: N/M ok, decoder MFU X%`: M checks ran (skipped ones excluded), N
passed; decoder MFU is the ImageNet-512 stage-1 step's (compiled when it ran, else eager).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import math
import os
import platform
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import memory

REPO = Path(__file__).resolve().parents[1]
RESULT = "GPU_CHECK_RESULT "  # a worker subprocess's result lines start with this
GIB = 2**30
TINY = "gin/quickstart.gin"  # the gin/presets/tiny_image.gin experiment


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
    timeout_s: int  # per subprocess


FULL_SIZES = Sizes(16, 32, 3, 10, 4, 2, 256, 150)
QUICK_SIZES = Sizes(4, 4, 1, 2, 2, 2, 24, 120)
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


# ---- the report ---------------------------------------------------------------------------------
class Report:
    """Runs checks one by one, records each, rewrites the JSON file after each."""

    def __init__(self, path: Path, meta: dict[str, Any], budget_s: float) -> None:
        self.path = path
        self.meta = meta
        self.budget_s = budget_s
        self.start = time.perf_counter()
        self.checks: list[dict[str, Any]] = []
        self.only: list[str] = []
        self.skip: list[str] = []
        self.lock = threading.Lock()  # checks may finish in two threads (--quick)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def wanted(self, name: str) -> bool:
        if self.only and not any(name.startswith(p) for p in self.only):
            return False
        return not any(name.startswith(p) for p in self.skip)

    def record(self, name: str, status: str, seconds: float = 0.0, **fields: Any) -> None:
        entry = {"name": name, "status": status, "seconds": round(seconds, 2), **fields}
        detail = fields.get("reason") or fields.get("error") or _short(fields.get("result", {}))
        with self.lock:
            self.checks.append(entry)
            line = f"[{self.elapsed():6.0f} s] {name}: {status} ({seconds:.1f} s) {detail}"
            print(line, flush=True)
            self.write()

    def run(self, name: str, fn: Callable[[], dict[str, Any]], cuda_only: bool = False) -> Any:
        """Run one check; its result dict, or None when it failed or was skipped."""
        if not self.wanted(name):
            return None
        if cuda_only and self.meta["device"] != "cuda":
            self.record(name, "skipped", reason="CUDA only")
            return None
        if self.budget_s and self.elapsed() > self.budget_s:
            self.record(name, "skipped", reason=f"time budget ({self.budget_s:.0f} s) spent")
            return None
        t0 = time.perf_counter()
        try:
            result = fn()
        except Skip as why:
            self.record(name, "skipped", time.perf_counter() - t0, reason=str(why))
            return None
        except Exception as err:  # recorded; the next check runs
            tail = traceback.format_exc().strip().splitlines()[-12:]
            self.record(name, "error", time.perf_counter() - t0, error=_error(err), traceback=tail)
            return None
        finally:
            _free()
        self.record(name, "ok", time.perf_counter() - t0, result=result)
        return result

    def summary(self) -> dict[str, Any]:
        ran = [c for c in self.checks if c["status"] != "skipped"]
        ok = [c for c in ran if c["status"] == "ok"]
        return {
            "ok": len(ok),
            "ran": len(ran),
            "skipped": [c["name"] for c in self.checks if c["status"] == "skipped"],
            "failed": [c["name"] for c in ran if c["status"] != "ok"],
            "seconds": round(self.elapsed(), 1),
        }

    def write(self, extra: dict[str, Any] | None = None) -> None:
        """(Under the lock, or when no other thread runs checks.)"""
        data = {"meta": self.meta, "checks": self.checks, "summary": self.summary()}
        tmp = self.path.with_name(self.path.name + ".tmp")
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
    mfu: dict[str, float] = dataclasses.field(default_factory=dict)  # check name -> MFU


def check_matmul(ctx: Context) -> dict[str, Any]:
    from ulframe.train import perf

    rate = perf.measure_matmul_rate(ctx.device, torch.bfloat16, seconds=0.3)
    ctx.matmul_rate = rate
    return {"tflops": rate / 1e12, "dtype": "bfloat16"}


def count_flops(b: Built, batch: dict[str, torch.Tensor], device: torch.device) -> float:
    """FLOPs of one forward and backward of the stage's loss on `batch` (bf16 autocast)."""
    from ulframe.diffusion import BatchNoise
    from ulframe.train import perf

    def step() -> torch.Tensor:
        noise = BatchNoise(torch.Generator(device).manual_seed(0))
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return b.model(batch, noise).total_nats().mean()

    b.model.train()
    try:
        return float(perf.train_flops(step))
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
    from ulframe.train.distributed import World
    from ulframe.train.loop import Trainer

    device, sizes = ctx.device, ctx.sizes
    size = sizes.batch1 if index == 0 else sizes.batch2
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
    from ulframe.train.loop import train_step

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


def check_adamw8bit(ctx: Context) -> dict[str, Any]:
    from ulframe import wiring

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


def _communicate(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str, bool]:
    """(stdout, stderr, timed out); on a timeout the whole process group is killed."""
    try:
        out, err = proc.communicate(timeout=timeout)
        return out, err, False
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return out, err, True


def _start(cmd: Sequence[str], ctx: Context) -> subprocess.Popen[str]:
    return subprocess.Popen(
        list(cmd), cwd=REPO, env=_env(ctx), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip


def _ulframe_run(ctx: Context, workdir: Path, *extra: str, samples: int = 8) -> list[str]:
    bindings = [*TINY_RUN, f"TRAIN_SAMPLES = {samples}", f"Experiment.device = '{ctx.device.type}'"]
    cmd = [sys.executable, "-m", "ulframe", "run", TINY, "--workdir", str(workdir)]
    return [*cmd, *(a for b in bindings for a in ("--gin_param", b)), *extra]


def check_launch(ctx: Context) -> dict[str, Any]:
    workdir = ctx.workdir / "launch"
    binding = "stage1/TrainSettings.parallelism = 'fsdp'"  # one process: not wrapped
    cmd = _ulframe_run(ctx, workdir, "--gin_param", binding, "--nproc", "1")
    _, err, timed_out = _communicate(_start(cmd, ctx), ctx.sizes.timeout_s)
    if timed_out:
        raise RuntimeError(f"timed out after {ctx.sizes.timeout_s} s:\n{err[-1500:]}")
    done = workdir / "stages" / "stage1" / "DONE.json"
    if not done.is_file():
        raise RuntimeError(f"no DONE.json; stderr:\n{err[-1500:]}")
    if "launching 1 processes" not in err:
        raise RuntimeError(f"not launched through the elastic agent; stderr:\n{err[-1500:]}")
    ckpts = sorted(p.name for p in (workdir / "stages" / "stage1" / "checkpoints").rglob("*.pt"))
    return {
        "checkpoints": ckpts,
        "scalars": json.loads(done.read_text()).get("scalars", {}),
        "note": "one process: ulframe wraps no model (DDP, FSDP2 on the device: wrap/)",
    }


def check_sigterm(ctx: Context) -> dict[str, Any]:
    workdir = ctx.workdir / "sigterm"
    samples = ctx.sizes.run_samples
    cmd = _ulframe_run(ctx, workdir, samples=samples)
    proc = _start(cmd, ctx)
    first = workdir / "stages" / "stage1" / "checkpoints" / f"ckpt-{4:012d}.json"
    deadline = time.monotonic() + ctx.sizes.timeout_s
    while not first.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, err, timed_out = _communicate(proc, ctx.sizes.timeout_s)
    if timed_out or proc.returncode != 2:
        raise RuntimeError(
            f"expected exit code 2 after SIGTERM, got {proc.returncode} "
            f"(timed out: {timed_out}); stderr:\n{err[-1500:]}"
        )
    last = err.strip().splitlines()[-1]
    if "stopped by signal 15 at " not in last:
        raise RuntimeError(f"unexpected last line: {last}")
    stopped_at = int(last.split(" at ")[1].split()[0])
    saved = workdir / "stages" / "stage1" / "checkpoints" / f"ckpt-{stopped_at:012d}.pt"
    if not saved.is_file():
        raise RuntimeError(f"no checkpoint at {stopped_at} samples")
    again = _start(cmd, ctx)
    _, err2, timed_out = _communicate(again, ctx.sizes.timeout_s)
    if timed_out or again.returncode != 0:
        raise RuntimeError(f"the resumed run failed ({again.returncode}):\n{err2[-1500:]}")
    if f"resumed at {stopped_at} samples" not in err2:
        raise RuntimeError(f"the re-run did not resume at {stopped_at}:\n{err2[-1500:]}")
    done = json.loads((workdir / "stages" / "stage1" / "DONE.json").read_text())
    if done.get("samples_seen") != samples:
        raise RuntimeError(f"DONE.json: {done.get('samples_seen')} samples, not {samples}")
    return {"resumed_at": stopped_at, "train_samples": samples, "stop_line": last}


def check_wrap_all(ctx: Context, report: Report) -> None:
    """The wrap/ checks, in one subprocess (a hung collective cannot stall this process)."""
    variants = ["ddp", "fsdp"] + (["fsdp+compile"] if ctx.device.type == "cuda" else [])
    names = [f"wrap/{v}" for v in variants]
    if not any(report.wanted(n) for n in names):
        return
    if report.budget_s and report.elapsed() > report.budget_s:
        for n in names:
            report.record(n, "skipped", reason=f"time budget ({report.budget_s:.0f} s) spent")
        return
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "wrap"]
    cmd += ["--device", ctx.device.type, "--compile-backend", ctx.backend]
    cmd += ["--quick"] if ctx.quick else []
    t0 = time.perf_counter()
    out, err, timed_out = _communicate(_start(cmd, ctx), ctx.sizes.timeout_s)
    seen = set()
    for line in out.splitlines():
        if line.startswith(RESULT):
            entry = json.loads(line[len(RESULT) :])
            seen.add(entry["name"])
            name = entry.pop("name")
            if report.wanted(name):
                report.record(name, entry.pop("status"), entry.pop("seconds", 0.0), **entry)
    for name in names:
        if name not in seen and report.wanted(name):
            why = f"timed out after {ctx.sizes.timeout_s} s" if timed_out else "worker ended"
            report.record(
                name, "error", time.perf_counter() - t0, error=f"{why}; stderr: {err[-1500:]}"
            )


def wrap_worker(device: torch.device, backend: str) -> int:
    """(subprocess) A one-rank process group; the tiny stage-1 model under DDP, FSDP2."""
    import torch.distributed as dist

    from ulframe.train import distributed
    from ulframe.train.distributed import World
    from ulframe.train.loop import Trainer, train_step
    from ulframe.train.optim import EMA

    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        store=dist.HashStore(),
        rank=0,
        world_size=1,
    )
    variants = ["ddp", "fsdp"] + (["fsdp+compile"] if device.type == "cuda" else [])
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
                    from ulframe.train.loop import compile_model

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
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON report")
    parser.add_argument(
        "--budget-s", type=float, help="skip checks starting after this (360; quick: none)"
    )
    parser.add_argument("--only", default="", help="comma-separated name prefixes to run")
    parser.add_argument("--skip", default="", help="comma-separated name prefixes to skip")
    parser.add_argument(
        "--compile-backend", help="torch.compile backend (inductor; quick on CPU: aot_eager)"
    )
    parser.add_argument(
        "--serial", action="store_true", help="--quick: subprocess checks one after the others"
    )
    parser.add_argument("--worker", choices=("wrap",), help=argparse.SUPPRESS)
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
        return wrap_worker(device, backend)

    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    budget = args.budget_s if args.budget_s is not None else (0.0 if args.quick else 360.0)
    experiments = QUICK if args.quick else PAPER
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    meta = environment(device) | {
        "quick": args.quick,
        "compile_backend": backend,
        "sizes": dataclasses.asdict(sizes),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    report = Report(args.out, meta, budget)
    report.only = [p for p in args.only.split(",") if p]
    report.skip = [p for p in args.skip.split(",") if p]
    print(
        f"gpu check on {meta.get('gpu', device.type)}: torch {torch.__version__}, "
        f"{'quick (tiny presets)' if args.quick else 'paper-size networks'}, "
        f"compile backend {backend}; report: {args.out}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="ulframe-gpu-check-") as tmp:
        ctx = Context(device, args.quick, sizes, experiments, backend, Path(tmp), args)

        def in_subprocesses() -> None:
            check_wrap_all(ctx, report)
            report.run("launch", lambda: check_launch(ctx))
            report.run("sigterm_resume", lambda: check_sigterm(ctx))

        # --quick: the subprocess checks run beside the others (a small, busy CPU); on a GPU
        # one after the other, so that no check shares the device with another.
        background = None
        if args.quick and not args.serial:
            background = threading.Thread(target=in_subprocesses, daemon=True)
            background.start()
        report.run("matmul_rate", lambda: check_matmul(ctx))
        for exp in experiments:
            for index in (0, 1):
                name = f"step/{exp.key}/stage{index + 1}/eager"
                res = report.run(name, functools.partial(check_step, ctx, exp, index, False))
                if res and "mfu" in res:
                    ctx.mfu[name] = res["mfu"]
        report.run("adamw8bit", lambda: check_adamw8bit(ctx), cuda_only=True)
        for exp in experiments:
            report.run(f"sampling/{exp.key}", functools.partial(check_sampling, ctx, exp))
        if background is None:
            in_subprocesses()
        for index in (0, 1):  # stage 1 (the decoder's MFU) first
            for exp in experiments:
                name = f"step/{exp.key}/stage{index + 1}/compiled"
                if args.quick and (exp.key, index) not in QUICK_COMPILED:
                    if report.wanted(name):
                        why = "--quick compiles one image and one video step"
                        report.record(name, "skipped", reason=why)
                    continue
                res = report.run(name, functools.partial(check_step, ctx, exp, index, True))
                if res and "mfu" in res:
                    ctx.mfu[name] = res["mfu"]
        if background is not None:
            background.join()

    head = f"step/{experiments[0].key}/stage1/"
    mfu = ctx.mfu.get(head + "compiled", ctx.mfu.get(head + "eager"))
    summary = report.summary()
    report.write({"decoder_mfu": mfu})
    if summary["skipped"]:
        print(f"skipped: {', '.join(summary['skipped'])}")
    if summary["failed"]:
        print(f"failed: {', '.join(summary['failed'])} (errors in {args.out})")
    shown = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
    print(f"gpu check: {summary['ok']}/{summary['ran']} ok, decoder MFU {shown}")
    return 0 if summary["ok"] == summary["ran"] else 1


if __name__ == "__main__":
    sys.exit(main())
