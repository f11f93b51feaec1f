"""Optimizer state: bitsandbytes AdamW8bit vs torch AdamW, on the paper-size decoder.

    .venv/bin/python benchmarks/optimizer_memory.py              # ~2-4 minutes on 2 CPU cores
    .venv/bin/python benchmarks/optimizer_memory.py --no-runs    # state bytes only

1. **State bytes.** `UViTDecoder` with the sizes of gin/presets/imagenet512.gin (image
   (3, 512, 512), latent (32, 32, 32)) is built on CPU; each optimizer takes one step on small
   random gradients (not data: only the size of its state is measured), and the bytes of every
   tensor in `optimizer.state` are summed. bitsandbytes keeps tensors with fewer than
   `min_8bit_size` (4096) elements in 32-bit state, as it does in training.
2. **Loss after a short run.** The same short quickstart run (tiny_image networks, 32x32) is
   trained twice in subprocesses, `@optimizers.AdamW` vs `@optimizers.AdamW8bit` (same betas,
   weight decay, lr, seed, data), and the final training loss (mean of the last log window) and
   the final evaluation's total nats (fixed evaluation noise) are compared.

The last line is `adamw/adamw8bit state ratio: X.XX`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PAPER_DECODER = {  # gin/presets/imagenet512.gin
    "channels": (128, 256, 512),
    "blocks_per_stage": 2,
    "width": 1024,
    "depth": 8,
    "heads": 16,
    "patch_size": 2,
    "dropout": 0.1,
}


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for state in opt.state.values()
        for v in state.values()
        if torch.is_tensor(v)
    )


def measure_state(make: object, params: list[torch.nn.Parameter]) -> tuple[int, float]:
    opt = make(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)  # type: ignore[operator]
    t0 = time.perf_counter()
    opt.step()
    seconds = time.perf_counter() - t0
    size = state_bytes(opt)
    del opt
    return size, seconds


def short_run(optimizer: str, samples: int, workdir: Path) -> dict[str, float]:
    bindings = [
        "Experiment.stages = [@stage1/stages.ul_joint()]",
        "Experiment.hooks = []",
        "Experiment.num_workers = 0",
        f"TRAIN_SAMPLES = {samples}",
        f"stage1/TrainSettings.optimizer = @optimizers.{optimizer}",
        f"optimizers.{optimizer}.betas = (0.9, 0.99)",
        f"optimizers.{optimizer}.weight_decay = 0.0",
        "stage1/TrainSettings.warmup_samples = 64",
        f"stage1/TrainSettings.log_every_samples = {samples // 4}",
        "stage1/TrainSettings.eval_every_samples = 0",
        "stage1/TrainSettings.checkpoint_every_samples = 0",
        "stage1/stages.ul_joint.sample_steps = 2",
        "stage1/stages.ul_joint.eval_images = 2",
    ]
    cmd = [sys.executable, "-m", "ulframe", "run", "gin/quickstart.gin", "--workdir", str(workdir)]
    cmd += [a for b in bindings for a in ("--gin_param", b)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ULFRAME_")}
    env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{optimizer} run failed:\n{done.stderr[-3000:]}")
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"][-1]
    final = [r for r in records if r["kind"] == "eval"][-1]
    return {"train_loss_nats": train["loss_nats"], "eval_total_nats": final["eval/total_nats"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=1024, help="samples of each short run")
    p.add_argument("--no-runs", action="store_true", help="only the state bytes")
    args = p.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    import bitsandbytes as bnb

    from ulframe_plugins.networks.decoders import UViTDecoder

    torch.manual_seed(0)
    decoder = UViTDecoder(shape=(3, 512, 512), latent_shape=(32, 32, 32), **PAPER_DECODER)
    params = [q for q in decoder.parameters() if q.requires_grad]
    n_params = sum(q.numel() for q in params)
    for q in params:
        q.grad = torch.randn_like(q) * 1e-4
    small = sum(q.numel() for q in params if q.numel() < 4096)
    print(
        f"decoder: UViTDecoder, imagenet512 preset, {n_params / 1e6:.1f}M parameters "
        f"({len(params)} tensors; {small / n_params:.3%} of the elements in tensors < 4096), "
        f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, device cpu"
    )
    adamw, t_adamw = measure_state(torch.optim.AdamW, params)
    adamw8, t_adamw8 = measure_state(bnb.optim.AdamW8bit, params)
    print(
        f"torch AdamW         state {adamw / 2**20:9.1f} MiB  ({adamw / n_params:.2f} B/param), step {t_adamw:.2f} s"
    )
    print(f"bnb AdamW8bit       state {adamw8 / 2**20:9.1f} MiB  ({adamw8 / n_params:.2f} B/param), step {t_adamw8:.2f} s")  # fmt: skip

    if not args.no_runs:
        with tempfile.TemporaryDirectory() as tmp:
            results = {}
            for name in ("AdamW", "AdamW8bit"):
                t0 = time.perf_counter()
                results[name] = short_run(name, args.samples, Path(tmp) / name)
                print(
                    f"short run, {name:9s}: {args.samples} samples in {time.perf_counter() - t0:.0f} s: "
                    + ", ".join(f"{k} {v:.2f}" for k, v in results[name].items())
                )  # fmt: skip
        for key in ("train_loss_nats", "eval_total_nats"):
            a, b = results["AdamW"][key], results["AdamW8bit"][key]
            print(f"{key}: AdamW8bit - AdamW = {b - a:+.2f} nats ({(b - a) / abs(a):+.2%})")
    print(f"adamw/adamw8bit state ratio: {adamw / adamw8:.2f}")


if __name__ == "__main__":
    main()
