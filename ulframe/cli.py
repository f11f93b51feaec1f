"""`ulframe`: run, validate and inspect experiments.

    ulframe run FILE.gin [FILE2.gin ...] [--gin.NAME=VALUE ...] [--gin_param 'a.b = 1' ...] [--workdir DIR]
    ulframe config FILE.gin [...]          parse, validate and print the config; no training
    ulframe export WORKDIR [--stage NAME] --out FILE.safetensors   EMA weights of a run
    ulframe sample FILE.gin --workdir DIR -n N [--class C] [--guidance G] [--steps S]
    ulframe eval FILE.gin --workdir DIR    evaluate a trained run; prints and writes eval.json
    ulframe plugins [--kind KIND] [--markdown]

Errors in the user's input exit with code 2 and one short message (`--debug` shows tracebacks).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ulframe.errors import UserError

log = logging.getLogger("ulframe")
EXIT_USER_ERROR = 2

MAIN_EXAMPLES = """examples:
  ulframe run gin/quickstart.gin                 train (re-run the same command to resume)
  ulframe config gin/quickstart.gin              check a config without training
  ulframe plugins --kind weightings              what can be bound from gin
run `ulframe COMMAND --help` for a command's options and examples"""

RUN_EXAMPLES = """examples:
  ulframe run gin/quickstart.gin
  ulframe run gin/quickstart.gin --workdir runs/lf17 --gin.LOSS_FACTOR=1.7
  ulframe run gin/ul_imagenet512.gin --gin.DATA_ROOT="'/data/imagenet'"
  ulframe run gin/quickstart.gin --gin_param 'stage1/TrainSettings.train_samples = 2048'
  ulframe run gin/quickstart.gin --nproc 2        two processes (one per GPU; gloo on CPU)
Re-running the same command on the same workdir resumes where it stopped."""

CONFIG_EXAMPLES = """examples:
  ulframe config gin/quickstart.gin
  ulframe config gin/ul_imagenet512.gin --gin.DATA_ROOT="'/data/imagenet'" --operative"""

SAMPLE_EXAMPLES = """examples:
  ulframe sample gin/quickstart.gin --workdir runs/quickstart -n 16
  ulframe sample gin/quickstart.gin --workdir runs/quickstart -n 8 --class 3 --guidance 2.0 --steps 64
Writes WORKDIR/samples/samples.png (a grid) and samples.npz (uint8 images, labels)."""

EVAL_EXAMPLES = """examples:
  ulframe eval gin/quickstart.gin --workdir runs/quickstart
Prints one JSON object (bits_per_pixel, psnr, ssim, bits_per_pixel_base, ...) and writes
WORKDIR/eval.json."""

EXPORT_EXAMPLES = """examples:
  ulframe export runs/quickstart --stage stage1 --out stage1_ema.safetensors
The file holds the EMA state dict; its metadata names the stage, samples seen and the gin config."""

PLUGINS_EXAMPLES = """examples:
  ulframe plugins
  ulframe plugins --kind weightings
  ulframe plugins --markdown > docs/gin_reference.md"""


def _expand_gin_overrides(argv: Sequence[str]) -> list[str]:
    """`--gin.NAME=VALUE` (or `--gin.NAME VALUE`) as `--gin_param 'NAME = VALUE'`, in place.

    So overrides apply in command-line order whichever form they take: the last one wins.
    """
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg.startswith("--gin."):
            name, eq, value = arg[len("--gin.") :].partition("=")
            if not eq:
                value = next(it, "")
            out += ["--gin_param", f"{name} = {value}"]
        else:
            out.append(arg)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ulframe",
        description="Train Unified Latents from gin files. Plugins extend every part.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=MAIN_EXAMPLES,
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = p.add_subparsers(dest="command", required=True)

    def gin_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("files", nargs="+", metavar="FILE.gin", help="gin files, parsed in order")
        sp.add_argument(
            "--gin_param", action="append", default=[], metavar="BINDING",
            help="a gin binding string, e.g. 'stage1/TrainSettings.lr = 3e-4' (repeatable); "
            "--gin.NAME=VALUE is the short form",
        )  # fmt: skip
        # SUPPRESS: absent here, `ulframe --debug COMMAND` keeps the top-level value
        sp.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )

    fmt = argparse.RawDescriptionHelpFormatter
    run = sub.add_parser(
        "run",
        help="train an experiment (resumes an existing workdir)",
        epilog=RUN_EXAMPLES,
        formatter_class=fmt,
    )
    gin_args(run)
    run.add_argument(
        "--workdir", type=Path, help="run directory (default: runs/<name of the last gin file>)"
    )
    run.add_argument(
        "--allow-config-change", action="store_true",
        help="resume a workdir although its gin config differs (the diff is logged)",
    )  # fmt: skip
    run.add_argument(
        "--nproc", type=int, default=0, metavar="N",
        help="train in N processes on this machine (one per GPU; gloo on CPU) under torch's "
        "elastic agent; same as `torchrun --nproc-per-node N -m ulframe run ...`",
    )  # fmt: skip
    run.add_argument(
        "--max-restarts", type=int, default=0, metavar="K",
        help="with --nproc: restart all processes up to K times when one fails (they resume "
        "from the newest checkpoint)",
    )  # fmt: skip
    cfg = sub.add_parser(
        "config",
        help="parse, validate and print a config without training",
        epilog=CONFIG_EXAMPLES,
        formatter_class=fmt,
    )
    gin_args(cfg)
    cfg.add_argument("--operative", action="store_true", help="print only what the experiment uses")
    plg = sub.add_parser(
        "plugins", help="list every registered plugin", epilog=PLUGINS_EXAMPLES, formatter_class=fmt
    )
    plg.add_argument("--kind", help="only this kind (encoders, priors, ..., hooks)")
    plg.add_argument("--markdown", action="store_true", help="the gin reference page as Markdown")
    plg.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    exp = sub.add_parser(
        "export",
        help="write the EMA weights of a run's newest valid checkpoint to a .safetensors file",
        epilog=EXPORT_EXAMPLES,
        formatter_class=fmt,
    )
    exp.add_argument("workdir", type=Path, metavar="WORKDIR", help="the run's directory")
    exp.add_argument("--stage", help="stage to export (needed when several have checkpoints)")
    exp.add_argument("--out", type=Path, required=True, metavar="FILE.safetensors")
    exp.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    # -- sample / eval: read a finished (or checkpointed) run ---------------------------------
    smp = sub.add_parser(
        "sample",
        help="draw end-to-end samples from a trained run (PNG grid + .npz)",
        epilog=SAMPLE_EXAMPLES,
        formatter_class=fmt,
    )
    gin_args(smp)
    smp.add_argument("--workdir", type=Path, help="the run's directory (default: runs/<name>)")
    smp.add_argument("-n", "--num", type=int, default=16, help="number of samples (default 16)")
    smp.add_argument(
        "--class", dest="label", type=int, default=None,
        help="class of every sample (default: classes in turn; unconditional without classes)",
    )  # fmt: skip
    smp.add_argument("--guidance", type=float, default=None, help="guidance scale (default: gin)")
    smp.add_argument("--steps", type=int, default=None, help="sampler steps (default: gin)")
    smp.add_argument("--seed", type=int, default=None, help="seed (default: Experiment.seed)")
    evl = sub.add_parser(
        "eval",
        help="evaluate every stage of a trained run; print and write eval.json",
        epilog=EVAL_EXAMPLES,
        formatter_class=fmt,
    )
    gin_args(evl)
    evl.add_argument("--workdir", type=Path, help="the run's directory (default: runs/<name>)")
    evl.add_argument(
        "--batches", type=int, default=None,
        help="eval batches per stage (default: each stage's TrainSettings.eval_batches)",
    )  # fmt: skip
    evl.add_argument(
        "--fd_samples", type=int, default=256,
        help="end-to-end samples for the Fréchet distance: 'fd' for images (Experiment."
        "sample_metric, default metrics.fd_photos), 'fvd' for videos (e.g. metrics.fvd_i3d "
        "with its weights file); 0: skip",
    )  # fmt: skip
    return p


def _configure_logging(is_main: bool, logfile: Path | None = None) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s", "%H:%M:%S")
    )
    root.addHandler(handler)
    if logfile is not None:  # file names that are not UTF-8 are escaped, never an error
        fh = logging.FileHandler(logfile, errors="backslashreplace")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)
    for h in root.handlers:
        h.addFilter(_not_gin)
    root.setLevel(logging.INFO if is_main else logging.WARNING)


def _not_gin(record: logging.LogRecord) -> bool:
    """gin logs its file lookups on the root logger (`system_path_file_exists`, `Path not found`):
    noise next to ulframe's own messages about the same files."""
    return not (record.name == "root" and f"{os.sep}gin{os.sep}" in record.pathname)


def _load(files: Sequence[str], bindings: Sequence[str]) -> Any:
    """Discover plugins, register them with gin, parse files and overrides, check them."""
    from ulframe import wiring
    from ulframe.registry import Registry

    registry = Registry()
    wiring.register(registry)
    wiring.parse(files, bindings)
    wiring.check_required()  # before any constructor runs: `run` and `config` say the same
    wiring.check_values()
    return registry


def _build_experiment() -> Any:
    from ulframe import wiring

    return wiring.call(wiring.configured("ulframe.Experiment"))


def _launch(args: argparse.Namespace, bindings: list[str]) -> int:
    """Re-execute this `ulframe run` in `--nproc` processes under torch's elastic agent.

    The workdir lock is taken here and survives the exec: the agent holds it for the whole run,
    restarts included, and its rank-0 worker sees it as its parent's (`rundir.WorkdirLock`)."""

    from ulframe import rundir
    from ulframe.train import distributed

    if args.nproc < 1 or args.max_restarts < 0:
        raise UserError("--nproc must be >= 1 and --max-restarts >= 0")
    workdir = _workdir(args)
    rundir.prepare(workdir)
    rundir.WorkdirLock(workdir).acquire(inheritable=True)
    _check_workdir_config(args, workdir)
    again = ["run", *args.files, *[a for b in bindings for a in ("--gin_param", b)]]
    again += ["--workdir", str(args.workdir)] if args.workdir else []
    again += ["--allow-config-change"] if args.allow_config_change else []
    again += ["--debug"] if args.debug else []
    argv = distributed.launch_argv(args.nproc, args.max_restarts, again)
    log.info("launching %d processes: %s", args.nproc, " ".join(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
    return 0  # not reached


def _workdir(args: argparse.Namespace) -> Path:
    return args.workdir or Path("runs") / Path(args.files[-1]).stem


def _check_workdir_config(args: argparse.Namespace, workdir: Path) -> None:
    """Refuse to resume checkpoints trained under another config, before anything is built."""
    from ulframe import rundir, wiring
    from ulframe.train import checkpoint

    previous = rundir.read_config(workdir / "config.gin")
    if previous is not None and any((workdir / "stages").glob("*/checkpoints/**/ckpt-*.pt")):
        checkpoint.check_config(
            previous, wiring.full_config(), f"workdir {workdir}", args.allow_config_change
        )


def _with_nan_guard(hooks: list[Any], registry: Any) -> list[Any]:
    """The experiment's hooks, plus `hooks.nan_guard` (its gin bindings apply) when not listed:
    every run skips non-finite steps and stops after a few in a row."""
    from ulframe import wiring

    if any(isinstance(h, registry.get("hooks", "nan_guard").factory) for h in hooks):
        return hooks
    return [*hooks, wiring.call(wiring.configured("hooks.nan_guard"))]


def cmd_run(args: argparse.Namespace, bindings: list[str]) -> int:
    import contextlib

    from ulframe import rundir
    from ulframe.train import distributed

    _configure_logging(is_main=True)
    registry = _load(args.files, bindings)  # config errors: one clean message, before launching
    if args.nproc and not distributed.launched():
        return _launch(args, bindings)
    experiment = _build_experiment()
    world = distributed.init(experiment.device)
    workdir = _workdir(args)
    lock: Any = contextlib.nullcontext()
    if world.is_main:  # one lock per run: rank 0's (or the --nproc launcher's, see _launch)
        rundir.prepare(workdir)
        lock = rundir.WorkdirLock(workdir).acquire()
    with lock:
        _check_workdir_config(args, workdir)
        distributed.barrier(world)
        _configure_logging(world.is_main, workdir / "log.txt" if world.is_main else None)
        try:
            results = _train(args, experiment, world, workdir, registry)
        except (OSError, rundir.DiskFullError) as err:
            if not isinstance(err, rundir.DiskFullError) and not rundir.is_disk_full(err):
                raise
            path = getattr(err, "path", None) or getattr(err, "filename", None) or workdir
            raise UserError(
                f"no space left on device writing {path}; last good checkpoint: "
                f"{_last_good(workdir)}"
            ) from err
    files = " ".join(args.files)
    if world.is_main:
        log.info("done: %s", json.dumps(results))
        log.info(
            "workdir: %s | images: %s | metrics: %s | tensorboard --logdir %s",
            workdir, workdir / "stages" / "*" / "images", workdir / "metrics.jsonl", workdir,
        )  # fmt: skip
        log.info(
            "next: ulframe sample %s --workdir %s -n 16 ; ulframe eval %s --workdir %s",
            files,
            workdir,
            files,
            workdir,
        )
    distributed.shutdown()
    return 0


def _train(
    args: argparse.Namespace, experiment: Any, world: Any, workdir: Path, registry: Any
) -> dict[str, dict[str, float]]:
    """Run the experiment's stages. The run files are written once a stage has really started
    (`RunFiles.commit`), so a refused run changes nothing in the workdir."""
    from ulframe import hookspecs, rundir, wiring
    from ulframe.hookspecs import RunInfo
    from ulframe.train.loop import RunContext, run_experiment

    config = wiring.full_config()
    dists = {e.distribution for e in registry.all_entries()}
    files = rundir.RunFiles(workdir, config, dists, world.is_main)
    hooks = hookspecs.plugin_manager(_with_nan_guard(list(experiment.hooks), registry))
    info = RunInfo(
        workdir, [s.name for s in experiment.stages], "", world.is_main, world.world_size
    )
    ctx = RunContext(
        workdir, world, hooks, info, rundir.MetricsFile(workdir / "metrics.jsonl", world.is_main),
        seed=experiment.seed, num_workers=experiment.num_workers, operative_config=wiring.operative_config,
        config=config, allow_config_change=args.allow_config_change, commit=files.commit,
    )  # fmt: skip
    hooks.hook.ulframe_run_start(run=info)
    try:
        results = run_experiment(experiment, ctx)
    except BaseException as err:
        try:
            hooks.hook.ulframe_error(run=info, error=err)
        except Exception as hook_err:  # never hide the run's own error behind a hook's
            log.warning("a hook failed while the run stopped: %s", hook_err)
        raise
    finally:
        info.operative_config = wiring.operative_config()
        files.write_operative(info.operative_config)
    hooks.hook.ulframe_run_end(run=info, results=results)
    return results


def _last_good(workdir: Path) -> str:
    """The newest finite checkpoint of any stage in `workdir` (by time written)."""
    from ulframe.train import checkpoint

    found = [
        checkpoint.newest_finite(d)
        for d in workdir.glob("stages/*/checkpoints/**")
        if d.is_dir() and d.name in ("checkpoints", "rank0")
    ]
    paths = [p for p in found if p is not None]
    return str(max(paths, key=lambda p: p.stat().st_mtime)) if paths else "none"


def cmd_export(args: argparse.Namespace) -> int:
    """The EMA weights of the newest valid checkpoint of one stage, as safetensors."""
    from safetensors.torch import save

    from ulframe import rundir
    from ulframe.train import checkpoint

    _configure_logging(is_main=True)
    if args.out.is_dir():
        raise UserError(
            f"--out {args.out} is a directory; name a file, e.g. {args.out / 'ema.safetensors'}"
        )
    stages_dir = args.workdir / "stages"
    found = {
        p.parent.parent.name: p.parent
        for p in sorted(stages_dir.glob("*/checkpoints/**/ckpt-*.pt"))
        if p.parent.name in ("checkpoints", "rank0")
    }
    if not found:
        raise UserError(f"no checkpoints under {stages_dir}: nothing to export")
    if args.stage is None and len(found) > 1:
        raise UserError(
            f"several stages have checkpoints; pick one with --stage: {', '.join(found)}"
        )
    name = args.stage or next(iter(found))
    if name not in found:
        raise UserError(f"stage '{name}' has no checkpoints; stages with some: {', '.join(found)}")
    state = checkpoint.load_latest(found[name])
    if state is None:
        raise UserError(f"no valid checkpoint in {found[name]} (see the warnings above)")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state["ema"].items()}
    metadata = {
        "stage": name,
        "samples_seen": str(state["samples_seen"]),
        "config_sha256": str(state.get("config_sha256", "")),
        "config": str(state.get("config", "")),
    }
    try:
        rundir.write_bytes(args.out, save(tensors, metadata=metadata))
    except OSError as err:
        raise UserError(f"cannot write --out {args.out}: {err.strerror or err}") from err
    log.info(
        "exported %d EMA tensors of stage %s at %d samples to %s",
        len(tensors), name, state["samples_seen"], args.out,
    )  # fmt: skip
    return 0


def cmd_config(args: argparse.Namespace, bindings: list[str]) -> int:
    from ulframe import wiring

    _configure_logging(is_main=True)
    _load(args.files, bindings)
    _build_experiment()  # gin calls every constructor; networks are built later, from the data
    sys.stdout.write(wiring.operative_config() if args.operative else wiring.full_config())
    sys.stdout.write("\n# config OK\n")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from ulframe import reference
    from ulframe.registry import KINDS, Registry

    _configure_logging(is_main=True)
    kinds = [args.kind] if args.kind else list(KINDS)
    registry = Registry()
    for k in kinds:
        if k not in KINDS:
            raise UserError(f"unknown kind '{k}'; kinds: {', '.join(KINDS)}")
    text = (
        reference.markdown(registry, kinds) if args.markdown else reference.table(registry, kinds)
    )
    sys.stdout.write(text)
    return 0


def _restore_stages(args: argparse.Namespace, bindings: list[str]) -> tuple[Any, ...]:
    """Build every stage of the experiment and load its newest EMA weights from the workdir.

    Returns (experiment, [(stage, model, stage_dir)], device, registry).
    """
    import torch

    from ulframe.data.pipeline import first_example
    from ulframe.protocols import BuildContext
    from ulframe.train import checkpoint, distributed

    registry = _load(args.files, bindings)
    experiment = _build_experiment()
    device = distributed.pick_device(experiment.device, 0)
    workdir = args.workdir or Path("runs") / Path(args.files[-1]).stem
    if not (workdir / "stages").is_dir():
        raise UserError(f"{workdir} holds no run: train it first with `ulframe run`")
    example = first_example(experiment.dataset.source("train"))
    previous: dict[str, Path] = {}
    restored = []
    for stage in experiment.stages:
        stage_dir = workdir / "stages" / stage.name
        directory = stage_dir / "checkpoints"
        if not checkpoint.list_checkpoints(directory) and (directory / "rank0").is_dir():
            directory = directory / "rank0"
        state = checkpoint.load_latest(directory, map_location="cpu")
        if state is None:
            raise UserError(
                f"stage '{stage.name}' has no valid checkpoint under {directory}: train it first with `ulframe run`"
            )
        torch.manual_seed(experiment.seed)
        ctx = BuildContext(
            example, experiment.dataset.num_classes, device, stage_dir, dict(previous)
        )
        try:
            model = stage.build(ctx)
            model.load_state_dict(state["ema"])
        except RuntimeError as err:  # shapes differ: not the config the run was trained with
            first = str(err).strip().splitlines()[-1].strip()
            raise UserError(
                f"stage '{stage.name}': the checkpoint in {directory} does not fit this config "
                f"({first}); pass the gin files and overrides the run was trained with "
                f"(see {workdir / 'config.gin'})"
            ) from err
        restored.append((stage, model.to(device).eval(), stage_dir))
        previous[stage.name] = stage_dir
    return experiment, restored, device, registry


def cmd_sample(args: argparse.Namespace, bindings: list[str]) -> int:
    import numpy as np
    import torch
    from einops import rearrange

    from ulframe.eval.images import save_grid, to_uint8
    from ulframe.eval.video import save_gif, save_mp4

    _configure_logging(is_main=True)
    if args.num < 1:
        raise UserError(f"-n must be >= 1, got {args.num}")
    experiment, restored, device, _ = _restore_stages(args, bindings)
    samplers = [(s, m) for s, m, _ in restored if hasattr(m, "sample")]
    if not samplers:
        raise UserError("no stage of this experiment draws end-to-end samples (add stages.ul_base)")
    stage, model = samplers[-1]
    num_classes = experiment.dataset.num_classes
    context = None
    if getattr(model, "context_frames", 0):  # video continuation: real clips give the context
        context = _eval_images(experiment, args.num)
        if len(context) < args.num:
            raise UserError(f"-n {args.num}: the eval split has only {len(context)} clips")
    if args.label is not None:
        if not 0 <= args.label < max(num_classes, 1) or num_classes == 0:
            raise UserError(f"--class must be in [0, {num_classes}), got {args.label}")
        labels = torch.full((args.num,), args.label, dtype=torch.long, device=device)
    else:
        labels = stage.sample_labels(args.num, device, num_classes)
    guidance = stage.guidance_scale if args.guidance is None else args.guidance
    steps = stage.sample_steps if args.steps is None else args.steps
    decoder_steps = stage.decoder_sample_steps if args.steps is None else args.steps
    seed = experiment.seed if args.seed is None else args.seed
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        samples = model.sample(
            args.num, generator, labels, stage.sampler, steps, decoder_steps, guidance,
            stage.guidance_interval, **({"context": context} if context is not None else {}),
        ).cpu()  # fmt: skip
    workdir = args.workdir or Path("runs") / Path(args.files[-1]).stem
    out = workdir / "samples"
    npz = out / "samples.npz"
    label_array = labels.cpu().numpy() if labels is not None else np.full(args.num, -1)
    summary: dict[str, Any] = {"npz": str(npz), "n": args.num, "guidance": guidance}
    if samples.dim() == 5:  # videos: (N, C, T, H, W)
        shown = samples if context is None else torch.stack([context, samples], 1).flatten(0, 1)
        ncols = 2 if context is not None else None
        summary["gif"] = str(save_gif(shown, out / "samples.gif", ncols=ncols))
        summary["mp4"] = str(save_mp4(shown, out / "samples.mp4", ncols=ncols))
        frames = rearrange(to_uint8(rearrange(samples, "n c t h w -> (n t) c h w")),
                           "(n t) h w c -> n t h w c", n=args.num)  # fmt: skip
        if context is not None:
            summary["context_frames"] = model.context_frames
    else:
        # n = k * classes samples in class order: k columns, one class per row.
        per_class = args.num // num_classes if num_classes and args.label is None else 0
        ncols = per_class if per_class and args.num % num_classes == 0 else None
        summary["png"] = str(save_grid(samples, out / "samples.png", ncols=ncols))
        frames = to_uint8(samples)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(npz, images=frames, labels=label_array, guidance=guidance, steps=steps)
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


# The Fréchet-distance metric `ulframe eval` reports as "fd", when installed.
FD_METRIC = "fd_photos"


def _split_images(experiment: Any, split: str, n: int) -> Any:
    """Up to n examples' `x` of a split, in the split's own order, (N, C, *S) on CPU."""
    import torch

    from ulframe.data.pipeline import build_loader

    loader = build_loader(
        experiment.dataset.source(split), batch_size=min(n, 64), seed=experiment.seed,
        shuffle=False, repeat=False, drop_last=False,
    )  # fmt: skip
    images = []
    for batch in loader:
        images.append(batch["x"])
        if sum(len(x) for x in images) >= n:
            break
    return torch.cat(images)[:n]


def _eval_images(experiment: Any, n: int) -> Any:
    """Up to n images (or clips) of the eval split, (N, C, *S) on CPU."""
    return _split_images(experiment, "eval", n)


def draw_samples(
    stage: Any,
    model: Any,
    n: int,
    num_classes: int,
    device: Any,
    seed: int,
    context: Any = None,
    chunk: int = 64,
) -> tuple[Any, Any]:
    """n end-to-end samples with the stage's own settings, in chunks: (samples, labels or None).

    A model that continues clips (`context_frames`) continues the clips of `context`."""
    import torch

    generator = torch.Generator(device).manual_seed(seed)
    labels = stage.sample_labels(n, device, num_classes)
    samples = []
    with torch.no_grad():
        for start in range(0, n, chunk):
            part = slice(start, min(n, start + chunk))
            count = part.stop - part.start
            extra = {"context": context[part]} if context is not None else {}
            samples.append(
                model.sample(
                    count, generator, None if labels is None else labels[part], stage.sampler,
                    stage.sample_steps, stage.decoder_sample_steps, stage.guidance_scale,
                    stage.guidance_interval, **extra,
                ).cpu()
            )  # fmt: skip
    return torch.cat(samples), (None if labels is None else labels.cpu())


def cmd_eval(args: argparse.Namespace, bindings: list[str]) -> int:
    import torch

    from ulframe import wiring
    from ulframe.data.pipeline import build_loader

    _configure_logging(is_main=True)
    experiment, restored, device, registry = _restore_stages(args, bindings)
    merged: dict[str, Any] = {}
    per_stage: dict[str, dict[str, float]] = {}
    for stage, model, _ in restored:
        count = stage.train.eval_batches if args.batches is None else args.batches
        loader = build_loader(
            experiment.dataset.source("eval"), batch_size=stage.train.batch_size,
            seed=experiment.seed, shuffle=False, repeat=False, drop_last=False,
        )  # fmt: skip
        batches = [{k: v.to(device) for k, v in b.items()} for _, b in zip(range(count), loader)]
        generator = torch.Generator(device).manual_seed(experiment.seed)
        with torch.no_grad():
            report = stage.evaluate(model, batches, generator)
        per_stage[stage.name] = dict(report.scalars)
        merged.update(report.scalars)  # later stages win on a shared name
    samplers = [(s, m) for s, m, _ in restored if hasattr(m, "sample")]
    factory = experiment.sample_metric
    if factory is None and FD_METRIC in registry.names("metrics"):
        factory = wiring.configured(f"metrics.{FD_METRIC}")
    if samplers and args.fd_samples > 0:
        from ulframe.eval.samples import judge_samples

        stage, model = samplers[-1]
        reference = _eval_images(experiment, args.fd_samples)
        if factory is not experiment.sample_metric and reference.dim() != 4:
            factory = None  # fd_photos compares images; name a video metric for clips
        # A UserError (e.g. its weights file is missing) stops the command with its message.
        metric = wiring.call(factory) if factory is not None else None
        continues = bool(getattr(model, "context_frames", 0))
        samples, labels = draw_samples(
            stage, model, len(reference), experiment.dataset.num_classes, device,
            experiment.seed, context=reference if continues else None,
        )  # fmt: skip
        real = _split_images(experiment, "train", len(reference)) if metric else None
        merged |= judge_samples(metric, reference, samples, labels, real)
    result = merged | {"stages": per_stage}
    workdir = args.workdir or Path("runs") / Path(args.files[-1]).stem
    (workdir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(_expand_gin_overrides(argv))
    bindings = list(getattr(args, "gin_param", []))
    try:
        if args.command == "run":
            return cmd_run(args, bindings)
        if args.command == "config":
            return cmd_config(args, bindings)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "sample":
            return cmd_sample(args, bindings)
        if args.command == "eval":
            return cmd_eval(args, bindings)
        return cmd_plugins(args)
    except UserError as err:
        if args.debug:
            raise
        sys.stderr.write(f"ulframe: error: {_message(err)}\n")
        return EXIT_USER_ERROR
    except OSError as err:  # a full disk in any command (`run` also names its last checkpoint)
        if args.debug or err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {err.filename}" if err.filename else ""
        sys.stderr.write(f"ulframe: error: no space left on device{where}\n")
        return EXIT_USER_ERROR


def _message(err: UserError) -> str:
    """The error's message; one raised inside a gin-configured call names the plugin and the
    binding instead of gin's call trail (`wiring.describe`)."""
    wiring = sys.modules.get("ulframe.wiring")
    return wiring.describe(err) if wiring is not None else str(err)


if __name__ == "__main__":
    sys.exit(main())
