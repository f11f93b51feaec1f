"""Memory on paper: per-GPU memory of the paper-scale experiments, from shapes only.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory.py             # ~15 s on 2 CPU cores
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory.py --json memory.json

For each stage of gin/ul_imagenet512.gin and gin/ul_kinetics.gin, the stage's model is built
through ulframe's own wiring (the experiment file, its stage objects, `stage.build`) twice, and
nothing is computed:

1. **On the meta device** (`torch.device("meta")`): parameters (trainable and frozen), and the
   FSDP2 plan of `ulframe.train.distributed.shard` (every block of an `nn.ModuleList` a unit,
   the root the rest): the parameters of the largest unit and of the root.
2. **Under FakeTensorMode** (tensors with shapes and dtypes, no data): the training forward
   `model(batch, noise)` in bf16 autocast at the per-GPU batch, with
   `torch.autograd.graph.saved_tensors_hooks` summing the bytes of every distinct storage saved
   for backward that is not a parameter (activations, and the bf16 copies of the weights that
   autocast keeps for backward). Run at batch 1 and at the per-GPU batch: activation bytes per
   example, and the part that does not grow with the batch. Then again with activation
   checkpointing (`ulframe.train.parallelize.checkpoint_activations(model, "blocks")`, what
   `TrainSettings.activation_checkpointing = 'blocks'` does), plus the largest checkpointed
   block's own saved bytes (held again while backward recomputes it). Both are printed; the
   one-GPU estimate (`single_gpu_bytes`) follows what the stage configures.

Stage 2 is built with random stage-1 weights (its `load_stage_ema` reads no checkpoint here):
memory does not depend on the weights. The data the experiment files name is not read: one
example is made from the dataset's configured shape (`resolution`, `num_frames`, 3 channels),
with the paper's class count (ImageNet 1000, Kinetics-600 600).

Per GPU, on `--gpus` GPUs (8) of `--gpu-gib` GiB (80), per-GPU batch = global batch / GPUs,
fp32 weights (autocast computes in bf16), `P` parameters of which `Pt` train:

| | DDP (replicated) | FSDP2 (sharded over N GPUs) |
|---|---|---|
| weights | 4 P | 4 P / N, + the root's and two units' full weights while gathered |
| gradients | 4 Pt, + 4 Pt of DDP's gradient buckets | 4 Pt / N, + the root's full gradients |
| AdamW state | 8 Pt (8-bit AdamW: about 2 Pt) | 8 Pt / N (2 Pt / N) |
| EMA | 4 P (a full copy: evaluation reads it) | 4 P full copy, + 4 P / N averaged shards |
| activations | per example × batch + fixed | the same |

A checkpoint gathers nothing: each rank writes its own shards through
torch.distributed.checkpoint. With `TrainSettings.async_checkpoint` a copy of the rank's part
(weights, optimizer state, EMA shards) sits in host memory while it is written, not on the GPU.
"Needs activation checkpointing" is: the estimate exceeds `--usable` (0.9) of the GPU.

The last line is `memory: largest per-GPU estimate X GiB (EXPERIMENT STAGE, PARALLELISM) of
Y GiB usable; activation checkpointing needed: yes|no`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ulframe.train.parallelize import checkpoint_activations, checkpointed_blocks

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = ("gin/ul_imagenet512.gin", "gin/ul_kinetics.gin")
# The class counts of the paper's datasets (the experiment files point at data not read here).
PAPER_CLASSES = {"ImageFolder": 1000, "Kinetics": 600}
# Bindings that keep an experiment's construction free of side effects (no hooks, no workers).
QUIET = ("Experiment.hooks = []", "Experiment.num_workers = 0")
GIB = 2**30
BNB_BLOCK = 256  # bitsandbytes' 8-bit optimizers quantize their state in blocks of 256
BNB_MIN_8BIT = 4096  # smaller tensors keep 32-bit state


# ---- building a stage's model through the experiment file -------------------------------------
def load_experiment(files: str | Path | Sequence[str | Path], bindings: Sequence[str] = ()) -> Any:
    """The configured `Experiment` of the gin file(s) (+ bindings): stage and dataset objects.

    gin's bindings are global: build every model of this experiment before loading another."""
    from ulframe import wiring
    from ulframe.train.settings import CONFIGURABLES

    paths = [files] if isinstance(files, str | Path) else list(files)
    wiring.load([str(REPO / f) for f in paths], [*QUIET, *bindings], engine=CONFIGURABLES)
    return wiring.experiment()


def example_of(dataset: Any) -> tuple[dict[str, torch.Tensor], int]:
    """One example and the class count: the dataset's own first example when its data is here,
    else zeros of the configured shape (3 channels; `num_frames` when it is video)."""
    from ulframe.data.pipeline import first_example

    try:
        return first_example(dataset.source("train")), int(dataset.num_classes)
    except Exception:  # the data is elsewhere: shape from the configuration
        frames = getattr(dataset, "num_frames", None)
        shape = (3, *((frames,) if frames else ()), dataset.resolution, dataset.resolution)
        classes = PAPER_CLASSES.get(type(dataset).__name__, 0)
        return {"x": torch.zeros(shape), "label": torch.tensor(0)}, classes


@contextlib.contextmanager
def random_source_stage() -> Iterator[None]:
    """Within the block a later stage builds the earlier stage's model as that stage builds it,
    with random weights, instead of loading its EMA checkpoint (none exists here)."""
    from ulframe_plugins.stages import ul_base

    def build_only(stage: Any, ctx: Any, stage_dir: Path, map_location: Any = "cpu") -> Any:
        del stage_dir, map_location
        return stage.build(ctx)

    original = ul_base.load_stage_ema
    ul_base.load_stage_ema = build_only  # type: ignore[assignment]
    try:
        yield
    finally:
        ul_base.load_stage_ema = original  # type: ignore[assignment]


def build_stage(
    stage: Any,
    example: dict[str, torch.Tensor],
    num_classes: int,
    device: torch.device,
    workdir: Path,
    previous: Sequence[str] = (),
) -> torch.nn.Module:
    """`stage.build` with a BuildContext of `example` (on `device`); `previous` names the stages
    before it (built with random weights, see `random_source_stage`)."""
    from ulframe.protocols import BuildContext

    example = {k: torch.as_tensor(v).to(device) for k, v in example.items()}
    prev = {name: workdir / name for name in previous}
    ctx = BuildContext(example, num_classes, device, workdir / stage.name, prev)
    with random_source_stage():
        return stage.build(ctx)


def train_batch(
    stage: Any, model: torch.nn.Module, example: dict[str, torch.Tensor], batch: int
) -> dict[str, torch.Tensor]:
    """A batch of the shape the stage trains on (zeros): the examples, or the cached latents of
    a stage that trains on them (`cache_latents`)."""
    labels = torch.zeros(batch, dtype=torch.long, device=example["x"].device)
    if getattr(stage, "cache_latents", False):
        latent = tuple(model.latent_shape)  # type: ignore[arg-type]
        return {"z": torch.zeros((batch, *latent), device=example["x"].device), "label": labels}
    x = example["x"][None].expand(batch, *example["x"].shape).contiguous()
    return {"x": x, "label": labels}


# ---- counting ---------------------------------------------------------------------------------
def fsdp_units(model: torch.nn.Module) -> tuple[list[int], int]:
    """Parameters per FSDP2 unit in the plan of `ulframe.train.distributed.shard` (every block
    of an nn.ModuleList, innermost first, each owning what no inner unit owns) and of the root."""
    blocks = [
        block
        for module in model.modules()
        if isinstance(module, torch.nn.ModuleList)
        for block in module
        if not isinstance(block, torch.nn.ModuleList | torch.nn.ModuleDict)
    ]
    owner: dict[int, int] = {}  # id(parameter) -> index of its innermost unit
    for index, block in sorted(enumerate(blocks), key=lambda ib: -_depth(model, ib[1])):
        for p in block.parameters():
            owner.setdefault(id(p), index)
    units = [0] * len(blocks)
    root = 0
    for p in model.parameters():
        if id(p) in owner:
            units[owner[id(p)]] += p.numel()
        else:
            root += p.numel()
    return units, root


def _depth(model: torch.nn.Module, target: torch.nn.Module) -> int:
    for name, module in model.named_modules():
        if module is target:
            return name.count(".") + 1
    return 0


def adamw8bit_state_bytes(params: Sequence[torch.Tensor]) -> int:
    """bitsandbytes AdamW8bit's state: two uint8 states and a float32 absmax per 256-element
    block each, 32-bit state for tensors under 4096 elements (checked against
    benchmarks/optimizer_memory.py: 2.03 B/param on the paper decoder)."""
    total = 0
    for p in params:
        n = p.numel()
        total += 8 * n if n < BNB_MIN_8BIT else 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK)
    return total


@dataclass
class Counts:
    """What a model holds, from the meta device."""

    params: int
    trainable: int
    by_child: dict[str, int]
    largest_unit: int  # FSDP2: parameters of the largest unit
    root: int  # FSDP2: parameters of the root (not in any unit)
    root_trainable: int
    adamw8bit_bytes: int


def count(model: torch.nn.Module) -> Counts:
    trainable = [p for p in model.parameters() if p.requires_grad]
    units, root = fsdp_units(model)
    in_units = {
        id(p) for m in model.modules() if isinstance(m, torch.nn.ModuleList) for p in m.parameters()
    }
    root_trainable = sum(p.numel() for p in trainable if id(p) not in in_units)
    return Counts(
        params=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in trainable),
        by_child={n: sum(p.numel() for p in c.parameters()) for n, c in model.named_children()},
        largest_unit=max(units, default=0),
        root=root,
        root_trainable=root_trainable,
        adamw8bit_bytes=adamw8bit_state_bytes(trainable),
    )


def saved_tensor_bytes(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], precision: str = "bf16"
) -> int:
    """Bytes of the distinct storages the training forward `model(batch, noise)` saves for
    backward, parameters excluded. Works on real tensors and under FakeTensorMode."""
    return saved_bytes_by_block(model, batch, precision)[0]


def saved_bytes_by_block(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    precision: str = "bf16",
    blocks: Sequence[tuple[str, torch.nn.Module]] = (),
) -> tuple[int, dict[str, int]]:
    """`saved_tensor_bytes`, and the part of it each of `blocks` (name, module) saves while its
    forward runs: what that block's forward holds again when activation checkpointing recomputes
    it in backward."""
    from ulframe.diffusion import BatchNoise

    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}
    by_block = {name: 0 for name, _ in blocks}
    running: list[str] = []  # the blocks whose forward is running, innermost last

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in params and storage._cdata not in saved:
            saved[storage._cdata] = storage.nbytes()
            if running:
                by_block[running[-1]] += storage.nbytes()
        return t

    def enter(name: str) -> Callable[..., None]:
        return lambda module, args: running.append(name)

    def leave(module: torch.nn.Module, args: Any, output: Any) -> None:
        running.pop()

    handles = []
    for name, block in blocks:
        handles.append(block.register_forward_pre_hook(enter(name)))
        handles.append(block.register_forward_hook(leave))
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    model.train()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # CPU autocast's notes on fused kernels it cannot use
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
                model(batch, BatchNoise(generator))
    finally:
        for handle in handles:
            handle.remove()
    return sum(saved.values()), by_block


@dataclass
class StageMemory:
    """One stage of one experiment: counts, activations and the per-GPU estimates (bytes)."""

    experiment: str
    stage: str
    counts: Counts
    global_batch: int
    per_gpu_batch: int
    activation_per_example: int
    activation_fixed: int
    # With activation checkpointing ("blocks"): what the forward saves (the checkpointed blocks'
    # inputs and the rest of the network), and the largest block's own activations, held again
    # while backward recomputes it (a transient of one block at a time), per example and fixed.
    ac_per_example: int = 0
    ac_fixed: int = 0
    recompute_per_example: int = 0
    recompute_fixed: int = 0
    checkpointed_blocks: int = 0
    activation_checkpointing: str = "off"  # what the experiment configures for the stage
    per_gpu: dict[str, dict[str, int]] = field(default_factory=dict)  # parallelism -> parts
    per_gpu_ac: dict[str, dict[str, int]] = field(default_factory=dict)  # the same, with AC

    def total(self, parallelism: str, checkpointed: bool = False) -> int:
        return sum((self.per_gpu_ac if checkpointed else self.per_gpu)[parallelism].values())

    def activations_at(self, batch: int, checkpointed: bool = False) -> int:
        """Activation bytes at a per-GPU batch (with AC: saved + the recompute transient)."""
        if not checkpointed:
            return self.activation_per_example * batch + self.activation_fixed
        per_example = self.ac_per_example + self.recompute_per_example
        return per_example * batch + self.ac_fixed + self.recompute_fixed


def per_gpu_parts(
    c: Counts, activations: int, gpus: int, optimizer_bytes: int
) -> dict[str, dict[str, int]]:
    """The table of the module docstring, in bytes."""
    p, pt = c.params, c.trainable
    ddp = {
        "weights": 4 * p,
        "gradients": 4 * pt + 4 * pt,  # .grad and DDP's buckets (gradient_as_bucket_view=False)
        "optimizer": optimizer_bytes,
        "ema": 4 * p,
        "activations": activations,
    }
    fsdp = {
        "weights": 4 * p // gpus + 4 * (c.root + 2 * c.largest_unit),
        "gradients": 4 * pt // gpus + 4 * c.root_trainable,
        "optimizer": optimizer_bytes // gpus,
        "ema": 4 * p + 4 * p // gpus,
        "activations": activations,
    }
    return {"ddp": ddp, "fsdp": fsdp}


def fake_build(
    stage: Any,
    example: dict[str, torch.Tensor],
    classes: int,
    workdir: Path,
    previous: Sequence[str] = (),
) -> tuple[Any, torch.nn.Module]:
    """(FakeTensorMode, the stage's model built inside it): shapes, no data."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model = build_stage(stage, example, classes, torch.device("cpu"), workdir, previous)
    return mode, model


def stage_memory(
    experiment_name: str,
    stage: Any,
    example: dict[str, torch.Tensor],
    classes: int,
    gpus: int,
    workdir: Path,
    previous: Sequence[str] = (),
    per_gpu_batch: int | None = None,
) -> StageMemory:
    """One stage: counts (meta device), activations (FakeTensorMode), per-GPU estimates."""
    with torch.device("meta"):
        meta = build_stage(stage, example, classes, torch.device("meta"), workdir, previous)
    counts = count(meta)
    del meta
    batch = per_gpu_batch or max(1, stage.train.batch_size // gpus)
    precision = stage.train.precision
    mode, model = fake_build(stage, example, classes, workdir, previous)
    blocks = checkpointed_blocks(model)
    sizes = (1, batch) if batch > 1 else (1,)
    plain, ac, recompute = [], [], []
    with mode:  # without activation checkpointing, then with it (on the same fake model)
        for size in sizes:
            total, by_block = saved_bytes_by_block(
                model, train_batch(stage, model, example, size), precision, blocks
            )
            plain.append(total)
            recompute.append(max(by_block.values(), default=0))
        checkpoint_activations(model, "blocks")
        for size in sizes:
            ac.append(
                saved_tensor_bytes(model, train_batch(stage, model, example, size), precision)
            )
    result = StageMemory(
        experiment_name, stage.name, counts, stage.train.batch_size, batch,
        *_per_example(plain, batch), *_per_example(ac, batch), *_per_example(recompute, batch),
        len(blocks), getattr(stage.train, "activation_checkpointing", "off"),
    )  # fmt: skip
    optimizer = 8 * counts.trainable
    result.per_gpu = per_gpu_parts(counts, result.activations_at(batch), gpus, optimizer)
    result.per_gpu_ac = per_gpu_parts(counts, result.activations_at(batch, True), gpus, optimizer)
    return result


def _per_example(measured: Sequence[int], batch: int) -> tuple[int, int]:
    """(bytes per example, fixed bytes) from bytes measured at batch 1 (and at `batch`)."""
    if len(measured) == 1:
        return measured[0], 0
    per_example = (measured[1] - measured[0]) // (batch - 1)
    return per_example, max(measured[0] - per_example, 0)


def single_gpu_bytes(r: StageMemory, checkpointed: bool | None = None) -> int:
    """The estimate for one process on one GPU (DDP's, without its gradient buckets), with
    activation checkpointing as the stage configures it unless `checkpointed` says."""
    if checkpointed is None:
        checkpointed = r.activation_checkpointing != "off"
    return r.total("ddp", checkpointed) - 4 * r.counts.trainable


def estimate(
    gin_file: str, gpus: int, bindings: Sequence[str] = (), per_gpu_batch: int | None = None
) -> list[StageMemory]:
    """Every stage of `gin_file`, in order."""
    experiment = load_experiment(gin_file, bindings)
    example, classes = example_of(experiment.dataset)
    out: list[StageMemory] = []
    with tempfile.TemporaryDirectory(prefix="ulframe-memory-") as tmp:
        for stage in experiment.stages:
            previous = [r.stage for r in out]
            out.append(
                stage_memory(
                    gin_file, stage, example, classes, gpus, Path(tmp), previous, per_gpu_batch
                )
            )
    return out


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def print_table(results: Sequence[StageMemory], gpus: int, gpu_gib: float, usable: float) -> None:
    budget = usable * gpu_gib * GIB
    print(f"per GPU on {gpus} GPUs of {gpu_gib:g} GiB ({usable:.0%} usable = {budget / GIB:.0f} GiB), AdamW fp32 state, bf16 autocast; GiB")  # fmt: skip
    print("without activation checkpointing, then with it (AC: saved + one block's recompute)")
    head = (
        f"{'experiment':<22} {'stage':<7} {'params M':>9} {'train M':>8} {'batch':>6} "
        f"{'act/ex':>7} {'act':>6} {'para':>5} {'weights':>8} {'grads':>6} {'AdamW':>6} "
        f"{'EMA':>5} {'total':>6} {'8bit tot':>8} {'fits':>5} {'AC act':>7} {'AC tot':>7} "
        f"{'AC fits':>7}"
    )
    print(head)
    for r in results:
        c = r.counts
        for par in ("ddp", "fsdp"):
            parts = r.per_gpu[par]
            total, total_ac = r.total(par), r.total(par, True)
            opt8 = c.adamw8bit_bytes // (gpus if par == "fsdp" else 1)
            total8 = total - parts["optimizer"] + opt8
            print(
                f"{Path(r.experiment).stem:<22} {r.stage:<7} {c.params / 1e6:>9.1f} "
                f"{c.trainable / 1e6:>8.1f} {r.per_gpu_batch:>6} "
                f"{_gib(r.activation_per_example):>7} {_gib(parts['activations']):>6} {par:>5} "
                f"{_gib(parts['weights']):>8} {_gib(parts['gradients']):>6} "
                f"{_gib(parts['optimizer']):>6} {_gib(parts['ema']):>5} {_gib(total):>6} "
                f"{_gib(total8):>8} {'yes' if total <= budget else 'NO':>5} "
                f"{_gib(r.per_gpu_ac[par]['activations']):>7} {_gib(total_ac):>7} "
                f"{'yes' if total_ac <= budget else 'NO':>7}"
            )


def max_batch(r: StageMemory, parallelism: str, budget: float, checkpointed: bool = False) -> int:
    """The largest per-GPU batch whose estimate fits `budget` bytes."""
    parts = (r.per_gpu_ac if checkpointed else r.per_gpu)[parallelism]
    rest = sum(parts.values()) - parts["activations"]
    fixed = r.activations_at(0, checkpointed)
    per_example = r.activations_at(1, checkpointed) - fixed
    return max(0, int((budget - rest - fixed) // max(per_example, 1)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gin", nargs="+", default=list(EXPERIMENTS), help="experiment files")
    parser.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs (default 8)")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory per GPU, GiB (80)")
    parser.add_argument("--usable", type=float, default=0.9, help="usable fraction (0.9)")
    parser.add_argument("--batch", type=int, help="per-GPU batch (default: global / gpus)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    results = [r for f in args.gin for r in estimate(f, args.gpus, per_gpu_batch=args.batch)]
    print_table(results, args.gpus, args.gpu_gib, args.usable)
    budget = args.usable * args.gpu_gib * GIB
    print(
        "\nlargest per-GPU batch that fits (DDP / FSDP2; with AC), and the FSDP2 checkpoint peak:"
    )
    for r in results:
        c = r.counts
        save = (4 * c.params + 8 * c.trainable) / GIB
        print(
            f"  {Path(r.experiment).stem} {r.stage}: {max_batch(r, 'ddp', budget)} / "
            f"{max_batch(r, 'fsdp', budget)}; with AC {max_batch(r, 'ddp', budget, True)} / "
            f"{max_batch(r, 'fsdp', budget, True)} (configured {r.per_gpu_batch}, AC "
            f"'{r.activation_checkpointing}'); activations {_gib(r.activation_per_example)} GiB "
            f"per example + {_gib(r.activation_fixed)} fixed, with AC "
            f"{_gib(r.ac_per_example)} + {_gib(r.ac_fixed)} saved and "
            f"{_gib(r.recompute_per_example)} + {_gib(r.recompute_fixed)} while a block "
            f"recomputes ({r.checkpointed_blocks} blocks); checkpoint save +{save:.1f} GiB under FSDP2"
        )  # fmt: skip
    if args.json:
        rows = [
            asdict(r)
            | {"total": {p: r.total(p) for p in r.per_gpu}}
            | {"total_ac": {p: r.total(p, True) for p in r.per_gpu_ac}}
            for r in results
        ]
        args.json.write_text(json.dumps(rows, indent=2))
    pars = ("ddp", "fsdp")
    worst = max(((r.total(p), r, p) for r in results for p in pars), key=lambda t: t[0])
    worst_ac = max(((r.total(p, True), r, p) for r in results for p in pars), key=lambda t: t[0])
    needed = any(min(r.total("ddp"), r.total("fsdp")) > budget for r in results)
    fits_ac = all(min(r.total("ddp", True), r.total("fsdp", True)) <= budget for r in results)
    print(
        f"memory: largest per-GPU estimate {_gib(worst[0])} GiB ({Path(worst[1].experiment).stem} "
        f"{worst[1].stage}, {worst[2]}) of {budget / GIB:.0f} GiB usable; "
        f"activation checkpointing needed: {'yes' if needed else 'no'}; with it "
        f"{_gib(worst_ac[0])} GiB ({Path(worst_ac[1].experiment).stem} {worst_ac[1].stage}, "
        f"{worst_ac[2]}): fits: {'yes' if fits_ac else 'no'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
