"""Clip continuation on Moving-Digits: does the video quickstart predict the motion?

Stage 2 of `gin/quickstart_video.gin` continues clips: conditioned on the latent of a clip's
first 5 frames it generates the other 11. On held-out eval clips (eval digits only, trajectories
fixed by the dataset's seed) this measures

- the MSE (pixels in [-1, 1]) of the 11 generated frames against the true frames, and the MSE of
  the baseline that repeats the last context frame (copy-last; it knows the digit and its last
  position but not the motion) and of a blank frame (the scale); per future frame too;
- the accuracy of the digit judge (`metrics.fd_digits`, `load_digit_judge`): per clip, the
  class with the largest softmax averaged over the 11 generated frames against the clip's label
  (the class of its digit), and per generated frame. The judge was trained on whole-image digits,
  so each frame is first cut to a digit-sized window (`digit_size`) centred on the bounding box of
  its ink (pixels above grey level 0.25). The label is only the class of the clip's
  first digit, so the judge needs one digit per clip: the quickstart's clips have one
  (`datasets.moving_digits.num_digits = 1`); for a run whose clips hold more, the eval clips are
  drawn with `num_digits = 1` (the same dataset otherwise) and a line says so. The judge on the
  true future frames and on the copy-last frames is printed beside it (its ceiling here).

The base model is class-conditional. Samples are drawn twice with the same seed: conditioned on
each clip's label (as the stage's own evaluation does; guidance as configured, or `--guidance`)
and with the null label (the class must then come from the context frames alone). The last line
uses the clip-label samples.

    python benchmarks/video_continuation.py --workdir runs/quickstart_video   # a finished run
    python benchmarks/video_continuation.py --quick                          # trains one first

A `--workdir` without a finished stage 2 is trained first (`ulframe run` with the gin files,
plus the `--quick` budget with `--quick`; a partly trained run is resumed). A finished run is
restored from its own `config.gin`, so the overrides it was trained with apply.

Last line: `continuation mse ratio model/copy-last: X.XX` (below 1: the generated frames are
closer to the truth than a frozen last frame, i.e. the model predicts motion; the line before it,
`model/blank`, says how far from a blank black frame: a blurred or misplaced digit is no better).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ulframe import cli, trained

ROOT = Path(__file__).resolve().parents[1]
GIN_FILE = ROOT / "gin" / "quickstart_video.gin"
DEFAULT_WORKDIR = ROOT / "runs" / "quickstart_video"
QUICK_WORKDIR = ROOT / "runs" / "video_continuation_quick"
# --quick: half the quickstart's training samples of each stage, fewer clips.
QUICK_OVERRIDES = [
    "TRAIN_SAMPLES = 4096",
    "BASE_TRAIN_SAMPLES = 4096",
]
QUICK_CLIPS = 64
INK_THRESHOLD = 0.25
"""Grey level (in [0, 1]) above which a pixel counts as ink when locating the digit."""


def digit_crops(frames: torch.Tensor, size: int, threshold: float = INK_THRESHOLD) -> torch.Tensor:
    """Frames (M, C, H, W) in [-1, 1] cut to a ``size`` x ``size`` window (M, 1, S, S) centred on
    the bounding box of the pixels with ink above ``threshold`` (grey in [0, 1]); a frame with
    no such pixel is cut at its centre. The window stays inside the frame."""
    grey = frames.float().mean(1)  # (M, H, W)
    ink = (grey + 1) / 2 > threshold
    height, width = grey.shape[-2:]
    crops = []
    for image, mask in zip(grey, ink):
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        cy = (float(rows.min() + rows.max()) / 2) if len(rows) else (height - 1) / 2
        cx = (float(cols.min() + cols.max()) / 2) if len(cols) else (width - 1) / 2
        top = min(max(round(cy - (size - 1) / 2), 0), height - size)
        left = min(max(round(cx - (size - 1) / 2), 0), width - size)
        crops.append(image[top : top + size, left : left + size])
    return torch.stack(crops)[:, None]


def judge_probabilities(judge: torch.nn.Module, clips: torch.Tensor, size: int) -> torch.Tensor:
    """Softmax of the judge on the digit crop of every frame of clips (N, C, T, H, W):
    (N, T, 10)."""
    n, c, t, h, w = clips.shape
    frames = clips.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)
    crops = digit_crops(frames, size)
    probs = [judge(crops[i : i + 256]).softmax(-1) for i in range(0, n * t, 256)]
    return torch.cat(probs).reshape(n, t, -1)


def accuracies(probs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(per clip: argmax of the mean softmax over frames, per frame) accuracy, in %."""
    per_clip = (probs.mean(1).argmax(-1) == labels).float().mean()
    per_frame = (probs.argmax(-1) == labels[:, None]).float().mean()
    return 100 * float(per_clip), 100 * float(per_frame)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.add_argument("--gin", nargs="+", default=[str(GIN_FILE)], help="to train an absent run")
    p.add_argument("--clips", type=int, default=256, help="held-out eval clips (64 with --quick)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="train a short run (half the quickstart's samples) into --workdir first "
        f"(default {QUICK_WORKDIR.relative_to(ROOT)}), {QUICK_CLIPS} clips",
    )
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the stage's)")
    p.add_argument(
        "--guidance", type=float, default=None, help="guidance scale (default: the stage's)"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the sampling noise")
    p.add_argument("--judge-weights", default=None, help="digit judge weights (default: shipped)")
    p.add_argument(
        "--gif",
        type=Path,
        default=None,
        help="also write a GIF: per clip, the true clip, the clip-label continuation, copy-last",
    )
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    bindings: list[str] = []
    if args.quick:
        bindings = list(QUICK_OVERRIDES)
        args.clips = min(args.clips, QUICK_CLIPS)
        if args.workdir == DEFAULT_WORKDIR:
            args.workdir = QUICK_WORKDIR
    t_start = time.perf_counter()
    if not (args.workdir / "stages" / "stage2" / "DONE.json").is_file():
        run_args = ["run", *args.gin, "--workdir", str(args.workdir)]
        for b in bindings:
            run_args += ["--gin_param", b]
        t0 = time.perf_counter()
        if cli.main(run_args) != 0:
            return 1
        print(f"trained {args.workdir} in {time.perf_counter() - t0:.0f} s")

    from ulframe_plugins.datasets.moving_digits import MovingDigits
    from ulframe_plugins.metrics.fd_digits import load_digit_judge

    # The run's own config.gin (its overrides included) when it has one, else the gin files.
    config = args.workdir / trained.CONFIG_FILE
    files = trained.config_files(args.workdir) if config.is_file() else args.gin
    run = trained.open_run(args.workdir, files, [] if config.is_file() else bindings)
    sampling = run.sampling()
    if sampling is None:
        raise SystemExit(f"{args.workdir}: no stage of this run draws samples")
    stage, model = sampling.stage, sampling.model
    settings = stage.sample_settings(model, guidance=args.guidance, steps=args.steps)
    k = int(settings.facts.get("context_frames", 0))
    if not settings.continues or not k:
        raise SystemExit(f"{args.workdir}: its stage 2 does not continue clips")
    dataset = run.experiment.dataset
    if not isinstance(dataset, MovingDigits):
        raise SystemExit(f"{args.workdir}: trained on {type(dataset).__name__}, not MovingDigits")
    size = dataset.digit_size
    note = ""
    if dataset.num_digits != 1:
        note = f" (the run's clips hold {dataset.num_digits} digits: evaluated on 1-digit clips)"
        dataset = MovingDigits(
            resolution=dataset.resolution, num_frames=dataset.num_frames, num_digits=1,
            digit_size=dataset.digit_size, channels=dataset.channels,
            eval_clips=dataset.eval_clips, max_speed=dataset.max_speed, seed=dataset.seed,
        )  # fmt: skip
    source = dataset.source("eval")
    if len(source.items) < args.clips:
        raise SystemExit(f"the eval split has {len(source.items)} clips; pass --clips <= that")
    examples = [source.decode(item) for item in source.items[: args.clips]]
    clips = torch.stack([e["x"] for e in examples])  # (N, C, T, H, W)
    labels = torch.tensor([e["label"] for e in examples])
    n, t = len(clips), clips.shape[2]

    samples: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        for name, use_labels in (("clip label", True), ("null label", False)):
            generator = torch.Generator(run.device).manual_seed(args.seed)
            chunks = []
            for start in range(0, n, 64):
                part = slice(start, start + 64)
                m = len(clips[part])
                cond = labels[part].to(run.device) if use_labels else None
                chunks.append(
                    stage.sample(
                        model, m, cond, args.guidance, generator, args.steps,
                        context=clips[part].to(run.device),
                    ).cpu()
                )  # fmt: skip
            samples[name] = torch.cat(chunks).clamp(-1, 1)
    sample_s = time.perf_counter() - t0

    future = clips[:, :, k:]
    copy_last = clips[:, :, k - 1 : k].expand_as(future)
    blank = torch.full_like(future, -1.0)
    predictions = {
        "model, clip label": samples["clip label"][:, :, k:],
        "model, null label": samples["null label"][:, :, k:],
        "copy last context frame": copy_last,
        "blank frame": blank,
    }
    mse = {name: float(((x - future) ** 2).mean()) for name, x in predictions.items()}
    per_frame = {name: ((x - future) ** 2).mean((0, 1, 3, 4)) for name, x in predictions.items()}

    judge, meta = load_digit_judge(args.judge_weights)
    judge = judge.eval() if isinstance(judge, torch.nn.Module) else judge
    judged = {
        "model, clip label": predictions["model, clip label"],
        "model, null label": predictions["model, null label"],
        "copy last context frame": copy_last,
        "true future frames": future,
    }
    with torch.no_grad():
        accuracy = {name: accuracies(judge_probabilities(judge, x, size), labels)
                    for name, x in judged.items()}  # fmt: skip

    print(
        f"workdir: {args.workdir}   clips: {n} held-out (eval digits){note}   frames: {k} context "
        f"-> {t - k} generated   sampling: {settings.steps} steps, guidance {settings.guidance} "
        f"({sample_s:.0f} s for both label settings)"
    )
    print(f"{'continuation':<26} {'mse':>8}   mse per generated frame ({k}..{t - 1})")
    for name, value in mse.items():
        curve = " ".join(f"{v:.3f}" for v in per_frame[name].tolist())
        print(f"{name:<26} {value:>8.4f}   {curve}")
    held_out = meta.get("heldout_accuracy")
    judge_note = f"; judge: {100 * held_out:.1f}% on held-out digits" if held_out else ""
    print(f"digit judge accuracy on {size}x{size} digit crops, % of clips (mean softmax over "
          f"{t - k} frames) / % of frames{judge_note}")  # fmt: skip
    for name, (clip_acc, frame_acc) in accuracy.items():
        print(f"{name:<26} {clip_acc:>6.1f} / {frame_acc:.1f}")
    if args.gif is not None:
        from ulframe.eval.video import save_gif

        shown = torch.stack(
            [clips, samples["clip label"], torch.cat([clips[:, :, :k], copy_last], 2)], 1
        )
        path = save_gif(shown[:16].flatten(0, 1), args.gif, ncols=6)
        print(f"gif: {path} (per clip: true, continued with its label, copy-last)")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    blank_ratio = mse["model, clip label"] / mse["blank frame"]
    print(f"continuation mse ratio model/blank: {blank_ratio:.2f}")
    ratio = mse["model, clip label"] / mse["copy last context frame"]
    print(f"continuation mse ratio model/copy-last: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
