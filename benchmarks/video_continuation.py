"""Clip continuation on Moving-Digits: does the video quickstart keep the digit and its motion?

Stage 2 of `gin/quickstart_video.gin` continues clips from their context alone: given the first
5 frames of a clip it generates the other 11 (the Kinetics-600 protocol), with no class label.
On held-out eval clips (eval digits only, trajectories fixed by the dataset's seed) this prints,
for the label-free continuations drawn with 3 sample seeds (mean and spread over the seeds):

- **judge**: the digit judge (`metrics.fd_digits`) on a digit-sized window centred on each
  generated frame's ink; per clip, the majority vote of the generated frames against the clip's
  digit (a frame with no ink votes "none" and so counts as wrong);
- **mse** of the generated frames (pixels in [-1, 1]) and its ratio to two baselines: a blank
  (black) frame and copy-last (the last context frame repeated: the digit, no motion);
- **position error**: the centre of ink mass of each generated frame against the true frame's,
  in pixels (a frame with no ink counts as the frame's diagonal), averaged over the generated
  frames;
- **ink kept**: the generated frames' total ink (grey level in [0, 1], summed) per frame, over
  the context frames' per frame: 1 when the digit neither fades nor gathers noise;
- **jump**: the distance between the centres of ink mass of the last context frame and the
  first generated one (the true clips move 1-2 pixels per frame);
- **fd**: the Fréchet distance of the judge's features of the generated frames (digit windows)
  against those of the true future frames.

Two-digit clips (`--num-digits 2`, or a run trained on them): each digit is scored on its own,
at its true trajectory (the dataset's layout of the eval clip): the judge on the digit-sized
window at the digit's true position, the position error of the ink centre in a window twice the
digit's size around it. Nothing there separates overlapping digits: read those numbers as a
measure, not a target.

    python benchmarks/video_continuation.py --workdir runs/quickstart_video   # a finished run
    python benchmarks/video_continuation.py --quick                          # trains one first

A `--workdir` without a finished stage 2 is trained first (`ulframe run` with the gin files,
plus the `--quick` budget with `--quick`; a partly trained run is resumed). A finished run is
restored from its own `config.gin`, so the overrides it was trained with apply.

Last line: `continuation mse ratio model/copy-last: X.XX` (below 1: the generated frames are
closer to the truth than a frozen last frame).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from ulframe import cli, trained
from ulframe.eval.frechet import frechet_distance_features

ROOT = Path(__file__).resolve().parents[1]
GIN_FILE = ROOT / "gin" / "quickstart_video.gin"
DEFAULT_WORKDIR = ROOT / "runs" / "quickstart_video"
QUICK_WORKDIR = ROOT / "runs" / "video_continuation_quick"
# --quick: half the quickstart's training samples of each stage, fewer clips.
QUICK_OVERRIDES = ["TRAIN_SAMPLES = 8192", "BASE_TRAIN_SAMPLES = 8192"]
QUICK_CLIPS = 64
INK_THRESHOLD = 0.25
"""Grey level (in [0, 1]) above which a pixel counts as ink (voting, locating the digit)."""
TARGETS = {
    "judge accuracy per clip": (">=", 0.80),
    "mse model/blank": ("<=", 0.60),
    "mse model/copy-last": ("<=", 0.50),
    "position error px": ("<=", 3.0),
    "jump px": ("<=", 3.0),
}


# ---- scoring: pure functions of clips (N, C, T, H, W) in [-1, 1] ------------------------------
def grey01(frames: Tensor) -> Tensor:
    """Frames (..., C, H, W) in [-1, 1] -> grey level (..., H, W) in [0, 1]."""
    return ((frames.float().mean(-3) + 1) / 2).clamp(0, 1)


def has_ink(frames: Tensor, threshold: float = INK_THRESHOLD) -> Tensor:
    """(..., C, H, W) -> (...) bool: some pixel's grey level is above `threshold`."""
    return (grey01(frames) > threshold).flatten(-2).any(-1)


def ink_centre(frames: Tensor, threshold: float = INK_THRESHOLD) -> Tensor:
    """Centre of ink mass (..., 2) as (row, col) in pixels: the grey-level-weighted mean position
    of the pixels above `threshold`; NaN for a frame without ink."""
    grey = grey01(frames)
    mass = torch.where(grey > threshold, grey, torch.zeros_like(grey))  # (..., H, W)
    h, w = grey.shape[-2:]
    rows = torch.arange(h, dtype=grey.dtype)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=grey.dtype)[None, :].expand(h, w)
    total = mass.sum((-2, -1))
    centre = torch.stack([(mass * rows).sum((-2, -1)), (mass * cols).sum((-2, -1))], -1)
    return centre / total[..., None]  # NaN where total == 0


def position_error(generated: Tensor, true: Tensor) -> Tensor:
    """Per frame (N, T): distance in pixels between the centres of ink mass of generated and true
    clips (N, C, T, H, W); a generated frame with no ink counts as the frame's diagonal."""
    h, w = true.shape[-2:]
    gen = ink_centre(generated.transpose(1, 2))  # (N, T, 2)
    ref = ink_centre(true.transpose(1, 2))
    distance = (gen - ref).norm(dim=-1)
    return torch.where(torch.isnan(distance), torch.tensor(math.hypot(h, w)), distance)


def digit_windows(frames: Tensor, size: int, threshold: float = INK_THRESHOLD) -> Tensor:
    """Frames (M, C, H, W) cut to a `size` x `size` window (M, 1, S, S) centred on the bounding
    box of the ink; a frame with no ink is cut at its centre. The window stays inside."""
    grey = frames.float().mean(1)  # (M, H, W)
    ink = (grey + 1) / 2 > threshold
    height, width = grey.shape[-2:]
    crops = []
    for image, mask in zip(grey, ink, strict=True):
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        cy = (float(rows.min() + rows.max()) / 2) if len(rows) else (height - 1) / 2
        cx = (float(cols.min() + cols.max()) / 2) if len(cols) else (width - 1) / 2
        top = min(max(round(cy - (size - 1) / 2), 0), height - size)
        left = min(max(round(cx - (size - 1) / 2), 0), width - size)
        crops.append(image[top : top + size, left : left + size])
    return torch.stack(crops)[:, None]


def frames_of(clips: Tensor) -> Tensor:
    """(N, C, T, H, W) -> (N * T, C, H, W)."""
    n, c, t, h, w = clips.shape
    return clips.transpose(1, 2).reshape(n * t, c, h, w)


def judge_votes(judge: torch.nn.Module, windows: Tensor, inked: Tensor) -> Tensor:
    """The judge's class of every window (M,), -1 where the frame has no ink."""
    classes = torch.cat([judge(w).argmax(-1) for w in windows.split(256)])
    return torch.where(inked, classes, torch.full_like(classes, -1))


def majority(votes: Tensor) -> Tensor:
    """Per row of votes (N, T): the most frequent vote (the smallest on ties); -1 = no ink."""
    return torch.mode(votes, dim=1).values


def judge_features(judge: torch.nn.Module, windows: Tensor) -> Tensor:
    return torch.cat([judge.features(w) for w in windows.split(256)])


def score_one_digit(
    judge: torch.nn.Module, generated: Tensor, true: Tensor, context: Tensor, labels: Tensor,
    size: int,
) -> dict[str, float]:  # fmt: skip
    """The numbers of one set of continuations of single-digit clips.

    Args:
        judge: the digit judge (`load_digit_judge`).
        generated, true: the generated and the true future frames, (N, C, T_f, H, W).
        context: the context frames (N, C, k, H, W).
        labels: the clips' digit classes (N,).
        size: the digit size (the judge's window).
    """
    n, _, t = generated.shape[:3]
    windows = digit_windows(frames_of(generated), size)
    votes = judge_votes(judge, windows, has_ink(frames_of(generated))).reshape(n, t)
    blank = torch.full_like(true, -1.0)
    copy_last = context[:, :, -1:].expand_as(true)
    mse = float(((generated - true) ** 2).mean())
    ink_generated = grey01(generated.transpose(1, 2)).sum((-2, -1)).mean()
    ink_context = grey01(context.transpose(1, 2)).sum((-2, -1)).mean()
    first = ink_centre(generated[:, :, 0].unsqueeze(2).transpose(1, 2))[:, 0]  # (N, 2)
    last = ink_centre(context[:, :, -1].unsqueeze(2).transpose(1, 2))[:, 0]
    jump = (first - last).norm(dim=-1)
    h, w = true.shape[-2:]
    jump = torch.where(torch.isnan(jump), torch.tensor(math.hypot(h, w)), jump)
    true_windows = digit_windows(frames_of(true), size)
    return {
        "judge accuracy per clip": float((majority(votes) == labels).float().mean()),
        "judge accuracy per frame": float((votes == labels[:, None]).float().mean()),
        "mse": mse,
        "mse model/blank": mse / float(((blank - true) ** 2).mean()),
        "mse model/copy-last": mse / float(((copy_last - true) ** 2).mean()),
        "position error px": float(position_error(generated, true).mean()),
        "ink kept": float(ink_generated / ink_context),
        "jump px": float(jump.mean()),
        "fd": frechet_distance_features(
            judge_features(judge, windows), judge_features(judge, true_windows)
        ),
    }


def digit_masks(layouts: list, size: int, resolution: int, t0: int, t1: int) -> Tensor:
    """Per clip and digit, the frames of that digit alone as 0/1 boxes: (N, D, T, H, W) bool,
    from the dataset's layouts [(digit, left (T,), top (T,)), ...] over frames [t0, t1)."""
    n, d = len(layouts), len(layouts[0])
    boxes = torch.zeros(n, d, t1 - t0, resolution, resolution, dtype=torch.bool)
    for i, layout in enumerate(layouts):
        for j, (_, left, top) in enumerate(layout):
            for k, t in enumerate(range(t0, t1)):
                x, y = int(left[t]), int(top[t])
                boxes[i, j, k, y : y + size, x : x + size] = True
    return boxes


def score_each_digit(
    judge: torch.nn.Module, generated: Tensor, true: Tensor, layouts: list, digit_labels: Tensor,
    size: int, t0: int,
) -> dict[str, float]:  # fmt: skip
    """Per-digit numbers of multi-digit clips, each digit at its true trajectory.

    The judge reads the `size` window at the digit's true position; the position error is that
    of the centre of ink mass inside a window twice the digit's size around the digit's true
    centre, against the true digit's own centre (a window without ink: the frame's diagonal).
    """
    n, _, t, h, w = generated.shape
    d = digit_labels.shape[1]
    grey_gen = grey01(generated.transpose(1, 2))  # (N, T, H, W)
    accuracy, frame_accuracy, errors = [], [], []
    for j in range(d):
        windows, inked, pos = [], [], []
        for i in range(n):
            _, left, top = layouts[i][j]
            for k in range(t):
                x, y = int(left[t0 + k]), int(top[t0 + k])
                crop = generated[i, :, k, y : y + size, x : x + size]
                windows.append(crop.float().mean(0, keepdim=True))
                inked.append(bool((grey01(crop[:, None])[0] > INK_THRESHOLD).any()))
                cy, cx = y + (size - 1) / 2, x + (size - 1) / 2
                y0, y1 = max(0, round(cy - size)), min(h, round(cy + size) + 1)
                x0, x1 = max(0, round(cx - size)), min(w, round(cx + size) + 1)
                region = grey_gen[i, k, y0:y1, x0:x1]
                mass = torch.where(region > INK_THRESHOLD, region, torch.zeros_like(region))
                if float(mass.sum()) > 0:
                    rows = torch.arange(y0, y1, dtype=mass.dtype)[:, None]
                    cols = torch.arange(x0, x1, dtype=mass.dtype)[None, :]
                    g = torch.stack([(mass * rows).sum(), (mass * cols).sum()]) / mass.sum()
                    ref = true_centre_of_digit(layouts[i][j], k + t0, size)
                    pos.append(float((g - ref).norm()))
                else:
                    pos.append(math.hypot(h, w))
        votes = judge_votes(judge, torch.stack(windows), torch.tensor(inked)).reshape(n, t)
        accuracy.append(float((majority(votes) == digit_labels[:, j]).float().mean()))
        frame_accuracy.append(float((votes == digit_labels[:, j, None]).float().mean()))
        errors.append(statistics.fmean(pos))
    out: dict[str, float] = {}
    for j in range(d):
        out[f"digit {j + 1}: judge accuracy per clip"] = accuracy[j]
        out[f"digit {j + 1}: judge accuracy per frame"] = frame_accuracy[j]
        out[f"digit {j + 1}: position error px"] = errors[j]
    out["judge accuracy per clip, both digits"] = statistics.fmean(accuracy)
    return out


def true_centre_of_digit(layout_entry: tuple, t: int, size: int) -> Tensor:
    """Centre of ink mass of one digit alone at frame t (row, col), from its image and place."""
    from ulframe_plugins.datasets.moving_digits import resized_digits

    digit, left, top = layout_entry
    image = torch.from_numpy(resized_digits(size)[digit])  # (S, S) in [0, 1]
    mass = torch.where(image > INK_THRESHOLD, image, torch.zeros_like(image))
    rows = torch.arange(size, dtype=mass.dtype)[:, None]
    cols = torch.arange(size, dtype=mass.dtype)[None, :]
    centre = torch.stack([(mass * rows).sum(), (mass * cols).sum()]) / mass.sum()
    return centre + torch.tensor([float(top[t]), float(left[t])])


# ---- the benchmark ------------------------------------------------------------------------------
def summarise(per_seed: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """name -> (mean, spread = max - min) over the seeds."""
    return {
        k: (statistics.fmean(r[k] for r in per_seed), max(r[k] for r in per_seed) - min(r[k] for r in per_seed))
        for k in per_seed[0]
    }  # fmt: skip


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
        "--sampler", default=None, help="sampler as registered (default: the stage's), both chains"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sample seeds")
    p.add_argument(
        "--num-digits", type=int, default=None, help="digits per eval clip (default: the run's)"
    )
    p.add_argument("--judge-weights", default=None, help="digit judge weights (default: shipped)")
    p.add_argument(
        "--gin-param",
        action="append",
        default=[],
        metavar="BINDING",
        help="a gin binding applied on top of the run's config when it is restored (repeatable): "
        "sampling settings of a trained run, e.g. 'stage2/stages.ul_base.guidance_scale = 2.0'",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON")
    p.add_argument(
        "--gif",
        type=Path,
        default=None,
        help="also write a GIF (per clip: true clip, continuation, copy-last) and a PNG strip",
    )
    args = p.parse_args()
    trained.check_sampling(args.sampler, args.steps)
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
            run_args += ["--gin-param", b]
        t0 = time.perf_counter()
        if cli.main(run_args) != 0:
            return 1
        print(f"trained {args.workdir} in {time.perf_counter() - t0:.0f} s")

    from ulframe_plugins.datasets.moving_digits import MovingDigits
    from ulframe_plugins.metrics.fd_digits import load_digit_judge

    config = args.workdir / trained.CONFIG_FILE
    files = trained.config_files(args.workdir) if config.is_file() else args.gin
    run = trained.open_run(
        args.workdir, files, [*([] if config.is_file() else bindings), *args.gin_param]
    )
    sampling = run.sampling()
    if sampling is None:
        raise SystemExit(f"{args.workdir}: no stage of this run draws samples")
    stage, model = sampling.stage, sampling.model
    settings = stage.sample_settings(model, steps=args.steps)
    overrides = trained.sampling_overrides(stage, args.sampler)
    k = int(settings.facts.get("context_frames", 0))
    if not settings.continues or not k:
        raise SystemExit(f"{args.workdir}: its stage 2 does not continue clips")
    dataset = run.experiment.dataset
    if not isinstance(dataset, MovingDigits):
        raise SystemExit(f"{args.workdir}: trained on {type(dataset).__name__}, not MovingDigits")
    num_digits = args.num_digits or dataset.num_digits
    if num_digits != dataset.num_digits:
        dataset = MovingDigits(
            resolution=dataset.resolution, num_frames=dataset.num_frames, num_digits=num_digits,
            digit_size=dataset.digit_size, channels=dataset.channels,
            eval_clips=max(dataset.eval_clips, args.clips), max_speed=dataset.max_speed,
            seed=dataset.seed,
        )  # fmt: skip
    size = dataset.digit_size
    source = dataset.source("eval")
    if len(source.items) < args.clips:
        raise SystemExit(f"the eval split has {len(source.items)} clips; pass --clips <= that")
    items = source.items[: args.clips]
    examples = [source.decode(item) for item in items]
    clips = torch.stack([e["x"] for e in examples])  # (N, C, T, H, W)
    labels = torch.tensor([e["label"] for e in examples])
    layouts = [source.layout(item) for item in items]
    from ulframe_plugins.datasets.digits import load_digits

    _, digit_classes = load_digits()
    digit_labels = torch.tensor([[int(digit_classes[d]) for d, _, _ in lay] for lay in layouts])
    n, t = len(clips), clips.shape[2]
    judge, meta = load_digit_judge(args.judge_weights)
    context, future = clips[:, :, :k], clips[:, :, k:]

    per_seed: list[dict[str, float]] = []
    samples: dict[int, Tensor] = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        for seed in args.seeds:
            generator = torch.Generator(run.device).manual_seed(seed)
            chunks = []
            for start in range(0, n, 64):
                part = clips[start : start + 64].to(run.device)
                chunks.append(
                    stage.sample(
                        model,
                        len(part),
                        None,
                        None,
                        generator,
                        args.steps,
                        context=part,
                        **overrides,
                    )
                    .cpu()
                    .clamp(-1, 1)
                )
            samples[seed] = torch.cat(chunks)
            generated = samples[seed][:, :, k:]
            if num_digits == 1:
                scores = score_one_digit(judge, generated, future, context, labels, size)
            else:
                scores = {
                    "mse": float(((generated - future) ** 2).mean()),
                    "mse model/blank": float(((generated - future) ** 2).mean())
                    / float(((future + 1) ** 2).mean()),
                    "mse model/copy-last": float(((generated - future) ** 2).mean())
                    / float(((context[:, :, -1:] - future) ** 2).mean()),
                    **score_each_digit(judge, generated, future, layouts, digit_labels, size, k),
                }
            per_seed.append(scores)
    sample_s = time.perf_counter() - t0
    summary = summarise(per_seed)

    print(
        f"workdir: {args.workdir}   clips: {n} held-out (eval digits), {num_digits} digit(s) "
        f"each   frames: {k} context -> {t - k} generated, no class label   sampling: "
        f"{args.sampler or 'the stage sampler'}, {settings.steps} steps, seeds {args.seeds} "
        f"({sample_s:.0f} s)"
    )
    if num_digits == 1:
        with torch.no_grad():
            reference = {
                "true future frames": score_one_digit(judge, future, future, context, labels, size),
                "copy last context frame": score_one_digit(
                    judge, context[:, :, -1:].expand_as(future).contiguous(), future, context,
                    labels, size,
                ),
            }  # fmt: skip
        print(
            f"{'':<28} {'model (mean ± spread)':>24} {'true frames':>12} {'copy-last':>10}  target"
        )
        for name, (mean, spread) in summary.items():
            target = TARGETS.get(name)
            verdict = ""
            if target is not None:
                ok = mean >= target[1] if target[0] == ">=" else mean <= target[1]
                verdict = f"{target[0]} {target[1]:g} {'met' if ok else 'MISSED'}"
            true_v = reference["true future frames"][name]
            copy_v = reference["copy last context frame"][name]
            print(
                f"{name:<28} {mean:>15.4f} ± {spread:<6.4f} {true_v:>12.4f} {copy_v:>10.4f}  {verdict}"
            )
        ink_mean = summary["ink kept"][0]
        print(f"ink kept in [0.8, 1.25]: {'met' if 0.8 <= ink_mean <= 1.25 else 'MISSED'}")
    else:  # the same measures of the true frames: their ceiling (overlapping digits)
        reference = score_each_digit(judge, future, future, layouts, digit_labels, size, k)
        print(f"{'':<42} {'model (mean ± spread)':>24} {'true frames':>12}")
        for name, (mean, spread) in summary.items():
            ceiling = f"{reference[name]:>12.4f}" if name in reference else ""
            print(f"{name:<42} {mean:>15.4f} ± {spread:<6.4f} {ceiling}")
    held_out = meta.get("heldout_accuracy")
    if held_out:
        print(f"digit judge: {100 * held_out:.1f}% on held-out digits")
    if args.json is not None:
        args.json.write_text(json.dumps({k: list(v) for k, v in summary.items()}, indent=1))
    if args.gif is not None:
        from ulframe.eval.video import save_gif

        first = samples[args.seeds[0]]
        copy = torch.cat([context, context[:, :, -1:].expand_as(future)], 2)
        shown = torch.stack([clips, first, copy], 1)[:16].flatten(0, 1)
        path = save_gif(shown, args.gif, ncols=6)
        strip = args.gif.with_suffix(".png")
        save_strip(torch.stack([clips[:4], first[:4]], 1).flatten(0, 1), strip)
        print(f"gif: {path} (per clip: true, continuation, copy-last); strip: {strip}")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    print(f"continuation mse ratio model/blank: {summary['mse model/blank'][0]:.2f}")
    print(f"continuation mse ratio model/copy-last: {summary['mse model/copy-last'][0]:.2f}")
    return 0


def save_strip(clips: Tensor, path: Path) -> None:
    """A PNG of clips (N, C, T, H, W): one row per clip, its frames left to right."""
    from PIL import Image

    n, _, t, h, w = clips.shape
    grey = (grey01(clips.transpose(1, 2)) * 255).round().to(torch.uint8)  # (N, T, H, W)
    canvas = torch.full((n * (h + 1), t * (w + 1)), 128, dtype=torch.uint8)
    for i in range(n):
        for j in range(t):
            canvas[i * (h + 1) : i * (h + 1) + h, j * (w + 1) : j * (w + 1) + w] = grey[i, j]
    image = Image.fromarray(canvas.numpy(), mode="L")
    image.resize((image.width * 3, image.height * 3), Image.NEAREST).save(path)


if __name__ == "__main__":
    sys.exit(main())
