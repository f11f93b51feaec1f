"""TensorBoard logger (rank 0 only): scalars, evaluation images and videos, the operative config,
hparams and a rate–distortion figure (bits/pixel against PSNR).

Videos (N, C, T, H, W) are logged as animated GIFs in image summaries (:func:`gif_summary`), which
TensorBoard shows, playing, in its Images tab. ``SummaryWriter.add_video`` is not used: it encodes
through ``moviepy.editor``, which moviepy 2 removed, and without it writes an empty summary and
only prints a message.

The figure is drawn with matplotlib (Agg canvas, no display). For a sweep, one point per run::

    python -m ulframe_plugins.hooks.tensorboard SWEEP_DIR   # writes SWEEP_DIR/rate_distortion.png

where every subfolder of SWEEP_DIR holding a `metrics.jsonl` is one run (its final evaluation).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ulframe.eval.images import grid
from ulframe.eval.video import DEFAULT_FPS, encode_gif, video_grid_frames
from ulframe.hookspecs import RunInfo, StageInfo, StepInfo, hookimpl

DEFAULT_HPARAMS = ("loss_factor", "bias", "latent_logsnr_max", "lr", "batch_size")
_BINDING = re.compile(r"^\s*([A-Za-z_][\w./]*)\s*=\s*(.+?)\s*$")


# ---- latent channels --------------------------------------------------------------------------
def latent_channels(z: torch.Tensor) -> np.ndarray:
    """(N, C, h, w) latents -> one grid image: a row per example, a grayscale tile per channel.

    Each channel is normalised to [-1, 1] by its own min and max over the examples shown.
    """
    z = z.detach().float().cpu()
    n, c = z.shape[:2]
    lo = z.amin(dim=(0, 2, 3), keepdim=True)
    hi = z.amax(dim=(0, 2, 3), keepdim=True)
    z = 2 * (z - lo) / (hi - lo).clamp_min(1e-8) - 1
    return grid(z.reshape(n * c, 1, *z.shape[2:]), ncols=c)


def latent_video_channels(z: torch.Tensor) -> np.ndarray:
    """(N, C, T, h, w) latent videos -> (T, H', W', 3) frames laid out like `latent_channels`.

    A row per example, a grayscale tile per channel; each channel is normalised to [-1, 1] by its
    own min and max over the examples *and all frames* shown, so brightness is comparable over
    time (a frame-wise normalisation would hide a channel fading in or out).
    """
    z = z.detach().float().cpu()
    n, c, t = z.shape[:3]
    lo = z.amin(dim=(0, 2, 3, 4), keepdim=True)
    hi = z.amax(dim=(0, 2, 3, 4), keepdim=True)
    z = 2 * (z - lo) / (hi - lo).clamp_min(1e-8) - 1
    tiles = z.reshape(n * c, 1, t, *z.shape[3:])
    return video_grid_frames(tiles, ncols=c)


# ---- videos as GIF image summaries -------------------------------------------------------------
def gif_summary(tag: str, frames: np.ndarray, fps: float = DEFAULT_FPS) -> Any:
    """A ``Summary`` holding frames (T, H, W, 3) uint8 as one animated GIF image.

    The same proto ``add_video`` would write (``Summary.Image``: height, width, colorspace 3 =
    RGB, ``encoded_image_string`` = the GIF bytes), encoded with Pillow instead of moviepy.
    """
    from tensorboard.compat.proto.summary_pb2 import Summary

    h, w, c = frames.shape[1:]
    image = Summary.Image(
        height=h, width=w, colorspace=c, encoded_image_string=encode_gif(frames, fps)
    )
    return Summary(value=[Summary.Value(tag=tag, image=image)])


def add_gif(writer: Any, tag: str, frames: np.ndarray, step: int, fps: float = DEFAULT_FPS) -> None:
    """Log frames (T, H, W, 3) uint8 to a ``SummaryWriter`` as an animated GIF image summary.

    Written through the writer's file writer, as ``SummaryWriter.add_video`` itself does (the
    writer has no public method that takes a ready ``Summary``).
    """
    writer._get_file_writer().add_summary(gif_summary(tag, frames, fps), step)


# ---- hparams from the operative config ---------------------------------------------------------
def _value(text: str) -> Any:
    text = text.strip()
    if text in ("True", "False"):
        return text == "True"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text.strip("'\"")


def config_hparams(operative_config: str, names: Sequence[str], scope: str) -> dict[str, Any]:
    """Values of the bindings whose parameter name is one of `names` (matched by suffix).

    `stage1/stages.ul_joint.loss_factor = 1.5` gives loss_factor=1.5; a `%MACRO` value is
    resolved; a binding in `scope` (`stage1/...`) wins over others. Multi-line values are skipped.
    """
    bindings: dict[str, str] = {}
    for line in operative_config.splitlines():
        m = _BINDING.match(line)
        if m:
            bindings[m.group(1)] = m.group(2)
    found: dict[str, Any] = {}
    for name in names:
        keys = [k for k in bindings if k == name or k.endswith("." + name)]
        keys.sort(key=lambda k: not k.startswith(scope + "/"))  # this stage's bindings first
        for key in keys:
            raw = bindings[key]
            seen = 0
            while raw.startswith("%") and raw[1:] in bindings and seen < 10:
                raw, seen = bindings[raw[1:]], seen + 1
            if raw.endswith(("(", "[", "{", "\\")) or raw.startswith(("@", "%")):
                continue
            found[name] = _value(raw)
            break
    return found


# ---- the rate–distortion figure ----------------------------------------------------------------
def new_figure(size: tuple[int, int]) -> Any:
    """A matplotlib `Figure` of `size` pixels on the Agg canvas (no pyplot, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] / 100, size[1] / 100), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_image(fig: Any) -> Image.Image:
    """A matplotlib figure drawn into an RGB image."""
    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())


def rate_distortion_figure(
    points: Sequence[tuple[float, float, str]],
    title: str = "rate-distortion",
    connect: bool = True,
    size: tuple[int, int] = (480, 360),
) -> Image.Image:
    """Bits/pixel (x) against PSNR in dB (y) as an RGB image, drawn with matplotlib.

    `points` are (bits_per_pixel, psnr, label); non-finite points are left out. `connect`
    joins the points in order (a run's trajectory); labels are written beside the points.
    """
    pts = [(x, y, s) for x, y, s in points if math.isfinite(x) and math.isfinite(y)]
    fig = new_figure(size)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("bits/pixel", fontsize=8)
    ax.set_ylabel("PSNR (dB)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, color="0.9")
    if not pts:
        ax.text(0.5, 0.5, "no points", color="gray", ha="center", va="center",
                transform=ax.transAxes)  # fmt: skip
        return figure_image(fig)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if connect and len(pts) > 1:
        ax.plot(xs, ys, color="#5a82c8", linewidth=1, zorder=1)
    ax.scatter(xs, ys, s=20, color="#c83c28", edgecolors="black", linewidths=0.5, zorder=2)
    for x, y, label in pts:
        if label:
            ax.annotate(label, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
    ax.margins(0.12)
    return figure_image(fig)


def final_eval_point(metrics_path: Path) -> tuple[float, float] | None:
    """(bits_per_pixel, psnr) of the last evaluation in a `metrics.jsonl` that has both."""
    point = None
    for line in metrics_path.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if r.get("kind") == "eval" and "eval/bits_per_pixel" in r and "eval/psnr" in r:
            point = (float(r["eval/bits_per_pixel"]), float(r["eval/psnr"]))
    return point


def earlier_points(workdir: Path, stage: str, before: int) -> list[tuple[float, float, str]]:
    """(bits_per_pixel, psnr, "") of `stage`'s evaluations in `workdir/metrics.jsonl` before
    `before` samples: the start of the rate–distortion trajectory of a resumed run."""
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return []
    points = []
    for line in path.read_text().splitlines():
        r = json.loads(line) if line.strip() else {}
        if (
            r.get("kind") == "eval"
            and r.get("stage") == stage
            and r.get("samples_seen", before) < before
            and {"eval/bits_per_pixel", "eval/psnr"} <= set(r)
        ):
            points.append((float(r["eval/bits_per_pixel"]), float(r["eval/psnr"]), ""))
    return points


def sweep_rate_distortion(sweep_dir: Path) -> Path:
    """One point per run (subfolder with metrics.jsonl) -> SWEEP_DIR/rate_distortion.png."""
    sweep_dir = Path(sweep_dir)
    points = []
    for metrics in sorted(sweep_dir.glob("*/metrics.jsonl")):
        point = final_eval_point(metrics)
        if point is not None:
            points.append((*point, metrics.parent.name))
    if not points:
        raise FileNotFoundError(
            f"no run in {sweep_dir} has an evaluation with bits_per_pixel and psnr "
            "(expected SWEEP_DIR/<run>/metrics.jsonl)"
        )
    points.sort()
    out = sweep_dir / "rate_distortion.png"
    rate_distortion_figure(points, f"rate-distortion: {sweep_dir.name}", connect=False).save(out)
    return out


# ---- what every logger of a run draws the same ----------------------------------------------
def perf_scalars(step: StepInfo) -> dict[str, float]:
    """The `perf/` scalars of a logged step: `step_time_s` and, on CUDA, `gpu_memory_gib` (the
    peak of allocated memory)."""
    perf = {"step_time_s": step.step_time_s}
    if torch.cuda.is_available():
        perf["gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return perf


def eval_media(images: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, pixels) of each evaluation entry, drawn as every logger here shows it.

    Images (N, C, H, W) in [-1, 1] give one (H', W', 3) uint8 grid; videos (N, C, T, H, W) give
    the (T, H', W', 3) uint8 frames of their grid. Latents (the entry `latents`, or any entry
    whose channel count is not 1 or 3) are shown a row per example and a grayscale tile per
    channel; reconstructions (input, reconstruction, ...) 8 tiles per row. Other ranks are left
    out.
    """
    for name, x in images.items():
        if x.dim() not in (4, 5):
            continue
        latent = name == "latents" or x.shape[1] not in (1, 3)
        ncols = 2 * 4 if name == "reconstructions" else None
        if x.dim() == 4:
            yield name, latent_channels(x) if latent else grid(x, ncols)
        else:
            yield name, latent_video_channels(x) if latent else video_grid_frames(x, ncols)


@dataclass(frozen=True)
class DrawnEval:
    """One evaluation of a stage, drawn: what `EvalLogger._log_eval` logs."""

    samples_seen: int  # the stage's samples seen at the evaluation
    scalars: dict[str, float]  # as the stage reported them, unprefixed
    media: dict[str, np.ndarray]  # `eval_media`: (H, W, 3) grids and (T, H, W, 3) frames, uint8
    # The stage's rate–distortion trajectory so far (bits/pixel, PSNR, label), this evaluation's
    # point last and labelled with its samples seen; None: the evaluation has no bits/pixel+PSNR.
    trajectory: list[tuple[float, float, str]] | None

    def trajectory_title(self, stage: StageInfo) -> str:
        """The title of the trajectory's figure (`rate_distortion_figure`)."""
        return f"rate-distortion: {stage.name} (label: samples seen)"


class EvalLogger(ABC):
    """Base of the hooks that log evaluations: drawn here once, logged by each subclass its way.

    At `ulframe_eval_end`, on rank 0 only: the images, videos and latents drawn by `eval_media`
    and, after an evaluation with bits/pixel and PSNR, the stage's rate–distortion trajectory so
    far (a resumed run's earlier points read back from `metrics.jsonl`; the newest labelled with
    its samples seen), handed to `_log_eval` as one `DrawnEval` for the subclass to log (and
    draw the trajectory with `rate_distortion_figure`).
    """

    def __init__(self) -> None:
        self._rd: dict[str, list[tuple[float, float, str]]] = {}

    @abstractmethod
    def _log_eval(self, run: RunInfo, stage: StageInfo, drawn: DrawnEval) -> None:
        """Log one evaluation of `stage`."""

    # The hookspec's signature (ulframe/hookspecs.py), repeated as an implementation must.
    @hookimpl
    def ulframe_eval_end(
        self,
        run: RunInfo,
        stage: StageInfo,
        samples_seen: int,
        scalars: dict[str, float],
        images: dict[str, torch.Tensor],
    ) -> None:
        if not run.is_main:
            return
        media = dict(eval_media(images))
        trajectory = self._trajectory(run.workdir, stage.name, samples_seen, scalars)
        self._log_eval(run, stage, DrawnEval(samples_seen, scalars, media, trajectory))

    def _trajectory(
        self, workdir: Path, stage: str, samples_seen: int, scalars: dict[str, float]
    ) -> list[tuple[float, float, str]] | None:
        """`stage`'s rate–distortion points with this evaluation's added (and labelled with its
        samples seen), or None when the evaluation has no bits/pixel and PSNR."""
        if "bits_per_pixel" not in scalars or "psnr" not in scalars:
            return None
        if stage not in self._rd:  # resumed: earlier points from metrics.jsonl
            self._rd[stage] = earlier_points(workdir, stage, samples_seen)
        points = self._rd[stage]
        points.append((float(scalars["bits_per_pixel"]), float(scalars["psnr"]), ""))
        return [*points[:-1], (*points[-1][:2], str(samples_seen))]


# ---- the hook ----------------------------------------------------------------------------------
class TensorBoardLogger(EvalLogger):
    """Writes `workdir/tb/<stage>` event files: scalars, eval images/videos, config, hparams, R-D.

    Images (N, C, H, W) are logged as grids; videos (N, C, T, H, W) as looping GIFs of their grid,
    `fps` frames per second (Images tab). Latents (the "latents" entry, or any entry whose channel
    count is not 1 or 3) are shown channel by channel as grayscale tiles, for videos with each
    channel normalised over all its frames. After each evaluation with bits/pixel and PSNR the
    rate-distortion trajectory is logged (`eval/rate_distortion`) and written to
    `workdir/rate_distortion.png`. At the end of a stage, hparams: the stage name and the
    operative-config parameters named in `hparams` (matched by suffix) against its final eval.
    """

    def __init__(
        self,
        subdir: str = "tb",
        flush_secs: int = 30,
        hparams: Sequence[str] = DEFAULT_HPARAMS,
        fps: float = DEFAULT_FPS,
    ) -> None:
        super().__init__()
        self.subdir = subdir
        self.flush_secs = flush_secs
        self.hparams = tuple(hparams)
        self.fps = fps
        self._writers: dict[str, Any] = {}
        self._config_logged = False

    def _writer(self, run: RunInfo, stage: StageInfo) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        if stage.name not in self._writers:
            self._writers[stage.name] = SummaryWriter(
                str(run.workdir / self.subdir / stage.name), flush_secs=self.flush_secs
            )
        return self._writers[stage.name]

    @hookimpl
    def ulframe_train_step_end(self, run: RunInfo, step: StepInfo) -> None:
        if not run.is_main:
            return
        w = self._writer(run, step.stage)
        for k, v in step.scalars.items():
            w.add_scalar(f"train/{k}", v, step.samples_seen)
        for k, v in perf_scalars(step).items():
            w.add_scalar(f"perf/{k}", v, step.samples_seen)
        if not self._config_logged:
            text = run.operative_config
            w.add_text(
                "config/operative",
                "\n".join("    " + line for line in text.splitlines()),
                step.samples_seen,
            )
            self._config_logged = True

    def _log_eval(self, run: RunInfo, stage: StageInfo, drawn: DrawnEval) -> None:
        w = self._writer(run, stage)
        for k, v in drawn.scalars.items():
            w.add_scalar(f"eval/{k}", v, drawn.samples_seen)
        for name, pixels in drawn.media.items():
            if pixels.ndim == 3:
                w.add_image(f"eval/{name}", pixels, drawn.samples_seen, dataformats="HWC")
            else:
                add_gif(w, f"eval/{name}", pixels, drawn.samples_seen, self.fps)
        if drawn.trajectory is not None:
            fig = rate_distortion_figure(drawn.trajectory, drawn.trajectory_title(stage))
            w.add_image(
                "eval/rate_distortion", np.asarray(fig), drawn.samples_seen, dataformats="HWC"
            )
            name = (
                "rate_distortion.png" if stage.index == 0 else f"rate_distortion_{stage.name}.png"
            )
            fig.save(run.workdir / name)
        w.flush()

    @hookimpl
    def ulframe_stage_end(self, run: RunInfo, stage: StageInfo, scalars: dict[str, float]) -> None:
        if run.is_main and self.hparams:
            w = self._writer(run, stage)
            params: dict[str, Any] = {"stage": stage.name}
            params |= config_hparams(run.operative_config, self.hparams, stage.name)
            metrics = {f"hparam/{k}": float(v) for k, v in scalars.items()}
            w.add_hparams(params, metrics, run_name=".", global_step=stage.total_samples)
        if stage.name in self._writers:
            self._writers.pop(stage.name).close()

    @hookimpl
    def ulframe_error(self, run: RunInfo, error: BaseException) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ulframe_plugins.hooks.tensorboard",
        description="Rate–distortion figure of a sweep: the final evaluation of every run "
        "(each subfolder with metrics.jsonl) as bits/pixel against PSNR.",
    )
    parser.add_argument("sweep_dir", type=Path, help="folder whose subfolders are runs")
    args = parser.parse_args(argv)
    try:
        out = sweep_rate_distortion(args.sweep_dir)
    except FileNotFoundError as err:
        sys.stderr.write(f"error: {err}\n")
        return 1
    sys.stdout.write(f"wrote {out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
