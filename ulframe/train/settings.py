"""Training settings of one stage, bound from gin as `stage1/TrainSettings.*`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch.optim.optimizer import ParamsT

from ulframe.errors import ConfigError
from ulframe.train.optim import warmup_constant, warmup_cosine
from ulframe.train.posthoc_ema import SIGMA_REL_MAX
from ulframe.wiring import retired

# The enumerated settings: gin's values are checked against these types when the config loads
# (`wiring.check_values`: file:line, the value and the allowed ones); `__post_init__` checks them
# again for settings built in Python.
Precision = Literal["fp32", "bf16"]
Parallelism = Literal["ddp", "fsdp"]
CompileMode = Literal["off", "networks", "step"]
ActivationCheckpointing = Literal["off", "blocks"]
NanPolicy = Literal["skip", "stop"]

PRECISIONS: tuple[str, ...] = get_args(Precision)
PARALLELISMS: tuple[str, ...] = get_args(Parallelism)
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
ACTIVATION_CHECKPOINTING: tuple[str, ...] = get_args(ActivationCheckpointing)
NAN_POLICIES: tuple[str, ...] = get_args(NanPolicy)


@dataclass
class TrainSettings:
    """How one stage trains. Every period is counted in samples, so a change of batch size or a
    resume keeps the schedule exact.

    Args:
        batch_size: global batch size (examples per optimizer step, summed over ranks).
        train_samples: samples the stage trains on in total.
        optimizer: optimizer factory called as `optimizer(params, lr=lr)` (`@optimizers.AdamW`,
            `@optimizers.AdamW8bit`); its other arguments (betas, weight_decay) come from gin.
        lr: peak learning rate.
        lr_schedule: multiplier of `lr` as a function of (samples_seen, train_samples,
            warmup_samples): `@lr_schedules.warmup_constant` or `@lr_schedules.warmup_cosine`.
        warmup_samples: linear warm-up of the learning rate over this many samples.
        grad_clip: clip the global gradient norm to this value (0 disables).
        ema_halflife_samples: EMA of the weights with this half-life in samples (EDM2-style;
            0 disables, evaluation then uses the raw weights).
        precision: "fp32" or "bf16" (autocast of the forward pass; weights stay fp32).
        log_every_samples: period of logged training scalars.
        eval_every_samples: period of evaluations on EMA weights (0: only at the end).
        eval_batches: batches of held-out data per evaluation.
        checkpoint_every_samples: period of checkpoints (0: only at the end).
        keep_checkpoints: the newest K checkpoints are kept (and always the newest finite one).
        async_checkpoint: write checkpoints in the background (DCP's `async_save`): the tensors are copied to host memory, then a thread writes them
            while training goes on (one more copy of the training state in host memory); the
            next checkpoint and the end of the stage wait for it. A kill during the write
            leaves the previous checkpoint as it is.
        parallelism: how several processes share the model: "ddp" replicates it and averages
            gradients (DistributedDataParallel); "fsdp" shards parameters, gradients and
            optimizer state over the ranks (FSDP2 `fully_shard`), for models that do not fit one
            device. Ignored with one process.
        compile: torch.compile of the training step. "off" (eager); "networks": each network
            the stage builds (the top-level modules of its model: encoder, prior, decoder...)
            is compiled on its own; "step": the stage's whole forward, loss included. Under
            FSDP both compile every sharded block (torchtitan's recipe; the FSDP hooks stay
            eager). Only the training forward and backward are compiled: the EMA copy
            (evaluation) stays eager, the compiled modules share their parameters with the
            model, and checkpoints hold the same keys with or without compile (a checkpoint of
            either kind resumes in the other). The first steps pay the compile time.
        activation_checkpointing: "off", or "blocks": every repeated block of the stage's
            trainable networks (each block of an nn.ModuleList: the FSDP2 units, e.g. the
            ResBlocks and Transformer blocks) keeps only its inputs for backward and runs its
            forward again during backward (non-reentrant `torch.utils.checkpoint`). Saves most
            of the activation memory (docs/benchmarks.md, "Memory on paper") for one extra
            forward of each checkpointed block: about a third more FLOPs in those blocks per
            step (a forward is about a third of forward + backward); the logged `perf/mfu`
            counts model FLOPs, without the recomputation. Frozen networks are not
            checkpointed. Composes with `parallelism` and `compile` (the checkpointed region
            is compiled, FSDP's hooks stay outside it); the EMA copy stays plain, and
            checkpoints hold the same keys with or without it (either resumes the other).
        peak_flops: the peak FLOP/s of one device in the training precision (a datasheet
            value, e.g. 989e12 for an H100 SXM in bf16), the denominator of the logged
            `perf/mfu`; 0 measures the device's achieved matmul rate at the stage's start
            (a short probe; on a CPU the only meaningful reference).
        measure_mfu: log `perf/model_tflops_per_s` and `perf/mfu`: the stage's start counts
            the model FLOPs of a step (`torch.utils.flop_counter` on two examples) and, when
            `peak_flops` is 0, runs the matmul probe (about a second per process). False skips
            both and logs neither: for runs of seconds, e.g. the test suite's tiny runs.
        nan_policy: what a training step whose loss terms or gradient norm are not finite
            (NaN/Inf) does: "skip" changes no weight, optimizer state or EMA, does not count
            towards `train_samples` (the stage trains one more step) and is counted in
            `skipped_steps`; after `max_nonfinite_steps` such steps in a row the run stops.
            "stop" stops at the first one. Either way the stop writes a checkpoint (of the last
            good weights: the step changed nothing) and names the last finite checkpoint.
            The check costs one device sync per step (the one that already tells every rank
            of a SIGTERM, under several processes).
        max_nonfinite_steps: with `nan_policy = "skip"`, stop after this many non-finite
            steps in a row (>= 1).
        posthoc_ema_sigma_rels: the post-hoc EMA (EDM2, docs/posthoc_ema.md): power-function
            EMAs of the weights with these relative widths σ_rel (each in (0, 1/sqrt(12)],
            e.g. (0.05, 0.1)) are tracked beside the half-life EMA, which evaluation keeps
            using; () tracks none. Each costs one more copy of the weights.
        posthoc_ema_every_samples: with `posthoc_ema_sigma_rels`, save every profile to
            `stages/<name>/ema_snapshots/` every this many samples (> 0) and at the end;
            `ulframe ema WORKDIR --sigma-rel S` reconstructs any σ_rel from them.
    """

    # The fields, one per setting (deliberately: stage configurations list theirs the same way).
    batch_size: int = 32
    train_samples: int = 100_000
    optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW
    lr: float = 1e-4
    lr_schedule: Callable[[int, int, int], float] = warmup_constant
    warmup_samples: int = 10_000
    grad_clip: float = 1.0
    ema_halflife_samples: int = 10_000
    precision: Precision = "fp32"
    log_every_samples: int = 1_000
    eval_every_samples: int = 0
    eval_batches: int = 4
    checkpoint_every_samples: int = 0
    keep_checkpoints: int = 3
    async_checkpoint: bool = False
    parallelism: Parallelism = "ddp"
    compile: CompileMode = "off"
    activation_checkpointing: ActivationCheckpointing = "off"
    peak_flops: float = 0.0
    measure_mfu: bool = True
    nan_policy: NanPolicy = "skip"
    max_nonfinite_steps: int = 3
    posthoc_ema_sigma_rels: tuple[float, ...] = ()
    posthoc_ema_every_samples: int = 0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"TrainSettings.precision must be one of {PRECISIONS}, got {self.precision!r}"
            )
        if self.parallelism not in PARALLELISMS:
            raise ConfigError(
                f"TrainSettings.parallelism must be 'ddp' or 'fsdp', got {self.parallelism!r}"
            )
        if self.compile not in COMPILE_MODES:
            raise ConfigError(
                f"TrainSettings.compile must be one of {COMPILE_MODES}, got {self.compile!r}"
            )
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise ConfigError(
                "TrainSettings.activation_checkpointing must be one of "
                f"{ACTIVATION_CHECKPOINTING}, got {self.activation_checkpointing!r}"
            )
        if self.nan_policy not in NAN_POLICIES:
            raise ConfigError(
                f"TrainSettings.nan_policy must be one of {NAN_POLICIES}, got {self.nan_policy!r}"
            )
        for name in ("batch_size", "train_samples", "log_every_samples", "max_nonfinite_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"TrainSettings.{name} must be positive, got {getattr(self, name)}"
                )
        for name in ("lr", "warmup_samples", "grad_clip", "ema_halflife_samples",
                     "eval_every_samples", "eval_batches", "checkpoint_every_samples",
                     "keep_checkpoints", "peak_flops"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ConfigError(f"TrainSettings.{name} must be >= 0, got {getattr(self, name)}")
        self._check_posthoc_ema()

    def _check_posthoc_ema(self) -> None:
        sigma_rels = tuple(self.posthoc_ema_sigma_rels)
        for s in sigma_rels:
            if not 0.0 < s <= SIGMA_REL_MAX:
                raise ConfigError(
                    f"TrainSettings.posthoc_ema_sigma_rels: {s} is not in (0, {SIGMA_REL_MAX:.4f}]"
                )
        if len(set(sigma_rels)) != len(sigma_rels):
            raise ConfigError(f"TrainSettings.posthoc_ema_sigma_rels repeats a value: {sigma_rels}")
        if sigma_rels and self.posthoc_ema_every_samples <= 0:
            raise ConfigError(
                "TrainSettings.posthoc_ema_every_samples must be positive with "
                f"posthoc_ema_sigma_rels, got {self.posthoc_ema_every_samples}"
            )

    def build_optimizer(self, params: ParamsT) -> torch.optim.Optimizer:
        return self.optimizer(params, lr=self.lr)

    def lr_at(self, samples_seen: int) -> float:
        return self.lr * self.lr_schedule(samples_seen, self.train_samples, self.warmup_samples)


CONFIGURABLES: dict[str, Callable[..., Any]] = {
    "ulframe.TrainSettings": TrainSettings,
    # Counted in samples (see ulframe/train/optim.py), hence not torch's step-based schedulers.
    "lr_schedules.warmup_constant": warmup_constant,
    "lr_schedules.warmup_cosine": warmup_cosine,
    # The NaN/Inf guard was a hook; it is the loop's now (`nan_policy`, `max_nonfinite_steps`).
    "hooks.nan_guard": retired(
        "hooks.nan_guard was removed: the training loop handles non-finite steps itself; set "
        "TrainSettings.nan_policy ('skip' or 'stop') and TrainSettings.max_nonfinite_steps (was "
        "hooks.nan_guard.max_consecutive), and drop @hooks.nan_guard() from Experiment.hooks"
    ),
}
"""What the training layer offers gin, by selector: `wiring.load(..., engine=CONFIGURABLES)`
(the wiring layer below knows no training code); retired selectors stop a config that still
names them, with a pointer to what replaced them."""
