"""`ulframe`: run, validate and inspect experiments.

    ulframe run FILE.gin [FILE2.gin ...] [--gin.NAME=VALUE ...] [--gin-param 'a.b = 1' ...] [--workdir DIR]
    ulframe config FILE.gin [...]          parse, validate and print the config and the networks'
                                           parameter counts; no training
    ulframe export WORKDIR --out DIR       a trained model others load: ulframe.load(DIR)
    ulframe export WORKDIR [--stage NAME] --out FILE.safetensors   one stage's EMA weights
    ulframe ema WORKDIR --sigma-rel S [--stage NAME]   a post-hoc EMA of the run's snapshots
                                           becomes the stage's EMA (sample, eval, export)
    ulframe sample WORKDIR [EXTRA.gin ...] -n N [--class C] [--guidance G] [--steps S]
    ulframe eval WORKDIR [EXTRA.gin ...]   evaluate a trained run; prints and writes eval.json
    ulframe plugins [--kind KIND] [--markdown]
    ulframe shard SRC OUT [--size 1GB]     an image or Kinetics folder as tar shards
    ulframe --version                      ulframe's version, torch's and Python's

Gin files are positional or `--gin-file FILE` (repeatable, the T5X spelling); `--gin-search-path
DIR` (repeatable) is where file names and `include` lines are also looked up. Flags are dashed
(`--gin-param`, `--fd-samples`, ...); the underscore spellings (`--gin_param`, `--gin_file`,
`--gin_search_path`, `--fd_samples`, ...) are accepted as well.

`sample` and `eval` read the run's own config (WORKDIR/config.gin, overrides included); gin
files and --gin overrides after it apply on top. The older form `ulframe sample FILE.gin
--workdir DIR [--gin...]` names the config instead. This module parses, dispatches and prints:
training is `ulframe.train.runner`, reading a trained run `ulframe.trained`. Errors in the
user's input exit with code 2 and one short message (`--debug` shows tracebacks).
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

from ulframe.errors import ConfigError, UserError

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
  ulframe run gin/quickstart.gin --gin-param 'stage1/TrainSettings.train_samples = 2048'
  ulframe run --gin-search-path gin --gin-file quickstart.gin   (T5X-style flags)
  ulframe run gin/quickstart.gin --nproc 2        two processes (one per GPU; gloo on CPU)
  ulframe run gin/quickstart.gin --nproc 8 --nnodes 2 --node-rank 0 --rdzv-endpoint node0:29400
                                                 node 0 of two (docs/cluster.md: SLURM)
Re-running the same command on the same workdir resumes where it stopped."""

CONFIG_EXAMPLES = """examples:
  ulframe config gin/quickstart.gin
  ulframe config gin/ul_imagenet512.gin --gin.DATA_ROOT="'/data/imagenet'" --operative"""

SAMPLE_EXAMPLES = """examples:
  ulframe sample runs/quickstart -n 16
  ulframe sample runs/quickstart -n 8 --class 3 --guidance 2.0 --steps 64
  ulframe sample runs/quickstart -n 16 --sampler dpmpp_2m --steps 8   (a registered sampler)
  ulframe sample runs/quickstart more.gin --seed 1     (more.gin: bindings on top of the run's)
  ulframe sample gin/quickstart.gin --workdir runs/quickstart -n 16   (the config named instead)
Writes WORKDIR/samples/samples.png (a grid) and samples.npz (uint8 images, labels)."""

EVAL_EXAMPLES = """examples:
  ulframe eval runs/quickstart
  ulframe eval runs/quickstart --fd-samples 0
Prints one JSON object (bits_per_pixel, psnr, ssim, bits_per_pixel_base, ...) and writes
WORKDIR/eval.json."""

EXPORT_EXAMPLES = """examples:
  ulframe export runs/quickstart --out quickstart-ul
  ulframe export runs/quickstart --stage stage1 --out stage1_ema.safetensors
A folder (--format folder, the default unless --out ends in .safetensors): config.json, one
.safetensors of EMA weights per network, README.md; load it with `ulframe.load(DIR)` (no gin, no
run directory). A file (--format safetensors): one stage's EMA state dict; its metadata names
the stage, samples seen and the gin config."""

EMA_EXAMPLES = """examples:
  ulframe ema runs/quickstart --sigma-rel 0.08
  ulframe ema runs/quickstart --sigma-rel 0.15 --stage stage2
Reconstructs the EMA of relative width S from the stage's snapshots (trained with
TrainSettings.posthoc_ema_sigma_rels) and writes it to WORKDIR/stages/NAME/posthoc_ema.pt, which
sample, eval and export then use; remove that file to use the run's own EMA again. Prints one
JSON object (the stage, sigma_rel, snapshots, profile_error)."""

SHARD_EXAMPLES = """examples:
  ulframe shard /data/imagenet /data/imagenet-shards --size 1GB
  ulframe shard /data/kinetics400 /data/k400-shards --size 2GB --kind clip
Unreadable files are skipped and counted; prints one JSON object (examples, shards, skipped per
split) and writes OUT/manifest.json last."""

PLUGINS_EXAMPLES = """examples:
  ulframe plugins
  ulframe plugins --kind weightings
  ulframe plugins --markdown > docs/gin_reference.md"""


def _expand_gin_overrides(argv: Sequence[str]) -> list[str]:
    """`--gin.NAME=VALUE` (or `--gin.NAME VALUE`) as `--gin-param 'NAME = VALUE'`, in place, and
    every other flag dashed (`--fd_samples` as `--fd-samples`: the underscore spellings are
    hidden aliases).

    So overrides apply in command-line order whichever form they take: the last one wins.
    """
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg.startswith("--gin."):
            name, eq, value = arg[len("--gin.") :].partition("=")
            if not eq:
                value = next(it, "")
            out += ["--gin-param", f"{name} = {value}"]
        elif arg.startswith("--") and "_" in arg.partition("=")[0]:
            flag, eq, value = arg.partition("=")
            out.append(flag.replace("_", "-") + eq + value)
        else:
            out.append(arg)
    return out


def version_text() -> str:
    """`ulframe X (torch Y, Python Z)`."""
    import importlib.metadata
    import platform

    import torch

    try:
        ours = importlib.metadata.version("ulframe")
    except importlib.metadata.PackageNotFoundError:
        ours = "unknown (not installed)"
    return f"ulframe {ours} (torch {torch.__version__}, Python {platform.python_version()})"


class _VersionAction(argparse.Action):
    """`--version`: computed when asked (importing torch for every `--help` would be slow)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 help: str | None = None) -> None:  # fmt: skip
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        sys.stdout.write(version_text() + "\n")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ulframe",
        description="Train Unified Latents from gin files. Plugins extend every part.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=MAIN_EXAMPLES,
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    p.add_argument("--version", action=_VersionAction, help="ulframe's, torch's, Python's version")
    sub = p.add_subparsers(dest="command", required=True)

    def gin_args(sp: argparse.ArgumentParser, run_dir: bool = False) -> None:
        if run_dir:
            sp.add_argument(
                "target", metavar="WORKDIR",
                help="the run's directory: its config.gin is the config (or, the older form, "
                "the first gin file of the config, with --workdir naming the run)",
            )  # fmt: skip
            sp.add_argument(
                "extra", nargs="*", metavar="EXTRA.gin",
                help="gin files parsed on top of the run's config (the older form: the other "
                "gin files of the config)",
            )  # fmt: skip
        else:
            sp.add_argument("files", nargs="*", metavar="FILE.gin", help="gin files, in order")
        sp.add_argument(
            "--gin-param", action="append", default=[], metavar="BINDING",
            help="a gin binding string, e.g. 'stage1/TrainSettings.lr = 3e-4' (repeatable); "
            "--gin.NAME=VALUE is the short form",
        )  # fmt: skip
        sp.add_argument(
            "--gin-file", action="append", default=[], metavar="FILE",
            help="a gin file, parsed after the positional ones (repeatable)",
        )  # fmt: skip
        sp.add_argument(
            "--gin-search-path", action="append", default=[], metavar="DIR",
            help="a folder where gin file names and `include` lines are looked up too "
            "(repeatable)",
        )  # fmt: skip
        # SUPPRESS: absent here, `ulframe --debug COMMAND` keeps the top-level value
        sp.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )

    fmt = argparse.RawDescriptionHelpFormatter
    # One argparse block per subcommand and option below (deliberately repeated: each option
    # reads as its --help line does; a table of them would hide the help text).
    run = sub.add_parser(
        "run",
        help="train an experiment (resumes an existing workdir)",
        epilog=RUN_EXAMPLES,
        formatter_class=fmt,
    )
    gin_args(run)
    run.set_defaults(func=cmd_run)
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
    run.add_argument(
        "--nnodes", type=int, default=0, metavar="N",
        help="train on N machines, --nproc processes on each (torch's c10d rendezvous; the "
        "workdir on a filesystem they share); see docs/cluster.md",
    )  # fmt: skip
    run.add_argument(
        "--node-rank", type=int, default=0, metavar="R",
        help="with --nnodes: this machine's number in [0, N); node 0 hosts the rendezvous and "
        "holds the workdir lock",
    )  # fmt: skip
    run.add_argument(
        "--rdzv-endpoint", metavar="HOST:PORT",
        help="with --nnodes: node 0's address and a free port, the same on every node",
    )  # fmt: skip
    run.add_argument(
        "--rdzv-timeout", type=int, default=300, metavar="SECONDS",
        help="with --nnodes: how long to wait for the rendezvous store and for every node "
        "(default 300)",
    )  # fmt: skip
    run.add_argument(
        "--requeue-signal", default="USR1", metavar="SIG",
        help="the signal that checkpoints, stops and exits with code 75 for the batch script "
        "to requeue the job (SLURM: #SBATCH --signal=USR1@180); USR1, USR2, TERM, HUP, XCPU or "
        "none (default USR1)",
    )  # fmt: skip
    cfg = sub.add_parser(
        "config",
        help="parse, validate and print a config without training",
        epilog=CONFIG_EXAMPLES,
        formatter_class=fmt,
    )
    gin_args(cfg)
    cfg.set_defaults(func=cmd_config)
    cfg.add_argument("--operative", action="store_true", help="print only what the experiment uses")
    cfg.add_argument(
        "--workdir", type=Path,
        help="the run whose finished stages' weights later stages build on, for their parameter "
        "counts (default: runs/<name of the last gin file>)",
    )  # fmt: skip
    plg = sub.add_parser(
        "plugins", help="list every registered plugin", epilog=PLUGINS_EXAMPLES, formatter_class=fmt
    )
    plg.set_defaults(func=cmd_plugins)
    plg.add_argument("--kind", help="only this kind (encoders, priors, ..., hooks)")
    plg.add_argument("--markdown", action="store_true", help="the gin reference page as Markdown")
    chk = sub.add_parser(
        "check-plugins",
        help="run the plugin contract kit on every plugin of installed distributions",
        epilog="examples:\n  ulframe check-plugins ulframe-example\n"
        "One line per plugin and check (PASS, FAIL: what it returned and what is expected, "
        "SKIP); exit 0 when none fails, 1 otherwise.",
        formatter_class=fmt,
    )  # fmt: skip
    chk.set_defaults(func=cmd_check_plugins)
    chk.add_argument("dists", nargs="+", metavar="DIST", help="installed distribution names")
    chk.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    plg.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    exp = sub.add_parser(
        "export",
        help="write a trained run as a folder that ulframe.load reads, or one stage's EMA weights",
        epilog=EXPORT_EXAMPLES,
        formatter_class=fmt,
    )
    exp.set_defaults(func=cmd_export)
    exp.add_argument("workdir", type=Path, metavar="WORKDIR", help="the run's directory")
    exp.add_argument(
        "--stage",
        help="with --format safetensors: the stage to export (needed when several have checkpoints)",
    )
    exp.add_argument("--out", type=Path, required=True, metavar="DIR | FILE.safetensors")
    exp.add_argument(
        "--format",
        choices=("folder", "safetensors"),
        help="folder: the model for ulframe.load; safetensors: one stage's EMA weights "
        "(default: safetensors when --out ends in .safetensors, else folder)",
    )
    exp.add_argument(
        "--stats-examples",
        type=int,
        metavar="N",
        help="train examples whose latents give the per-channel mean and std (default: all)",
    )
    exp.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    ema = sub.add_parser(
        "ema",
        help="reconstruct a post-hoc EMA of any length from a run's snapshots (EDM2)",
        epilog=EMA_EXAMPLES,
        formatter_class=fmt,
    )
    ema.set_defaults(func=cmd_ema)
    ema.add_argument("workdir", type=Path, metavar="WORKDIR", help="the run's directory")
    ema.add_argument(
        "--sigma-rel", type=float, required=True, metavar="S",
        help="the EMA's length as EDM2's relative standard deviation sigma_rel, in (0, 0.2887]",
    )  # fmt: skip
    ema.add_argument("--stage", help="stage to reconstruct (needed when several have snapshots)")
    ema.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    shd = sub.add_parser(
        "shard",
        help="write an image folder or a Kinetics folder as tar shards (datasets.shards)",
        epilog=SHARD_EXAMPLES,
        formatter_class=fmt,
    )
    shd.set_defaults(func=cmd_shard)
    shd.add_argument("src", type=Path, metavar="SRC", help="SRC/train/<class>/<file> (and val/)")
    shd.add_argument("out", type=Path, metavar="OUT", help="a new (or empty) folder")
    shd.add_argument(
        "--size", default="1GB", help="largest shard, e.g. 1GB, 500MB, 64MiB (default 1GB)"
    )
    shd.add_argument(
        "--kind", choices=("auto", "image", "clip"), default="auto",
        help="images or videos (default: clips when SRC/train holds a video file)",
    )  # fmt: skip
    shd.add_argument("--seed", type=int, default=0, help="seeds the order of the examples (0)")
    shd.add_argument(
        "--workers", type=int, default=4, help="threads reading and checking files (4)"
    )
    shd.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    # -- sample / eval: read a finished (or checkpointed) run ---------------------------------
    smp = sub.add_parser(
        "sample",
        help="draw samples from a trained run (PNG grid + .npz; GIF + MP4 for clips)",
        epilog=SAMPLE_EXAMPLES,
        formatter_class=fmt,
    )
    gin_args(smp, run_dir=True)
    smp.set_defaults(func=cmd_sample)
    smp.add_argument("--workdir", type=Path, help="the run's directory, when FILE.gin is given")
    smp.add_argument("-n", "--num", type=int, default=16, help="number of samples (default 16)")
    smp.add_argument(
        "--class", dest="label", type=int, default=None,
        help="class of every sample (default: classes in turn; unconditional without classes)",
    )  # fmt: skip
    smp.add_argument("--guidance", type=float, default=None, help="guidance scale (default: gin)")
    sampling_args(smp)
    smp.add_argument("--seed", type=int, default=None, help="seed (default: Experiment.seed)")
    evl = sub.add_parser(
        "eval",
        help="evaluate every stage of a trained run; print and write eval.json",
        epilog=EVAL_EXAMPLES,
        formatter_class=fmt,
    )
    gin_args(evl, run_dir=True)
    evl.set_defaults(func=cmd_eval)
    evl.add_argument("--workdir", type=Path, help="the run's directory, when FILE.gin is given")
    evl.add_argument(
        "--batches", type=int, default=None,
        help="eval batches per stage (default: each stage's TrainSettings.eval_batches)",
    )  # fmt: skip
    evl.add_argument(
        "--fd-samples", type=int, default=256,
        help="end-to-end samples for the Fréchet distance: 'fd' for images (Experiment."
        "sample_metric, default metrics.fd_photos), 'fvd' for videos (e.g. metrics.fvd_i3d "
        "with its weights file); 0: skip",
    )  # fmt: skip
    sampling_args(evl)
    return p


def sampling_args(parser: argparse.ArgumentParser) -> None:
    """`--sampler`, `--steps`, `--decoder-steps` of `sample` and `eval` (default: the gin's)."""
    parser.add_argument(
        "--sampler", default=None, metavar="NAME",
        help="sampler of every chain, as registered (ddim, ancestral, dpmpp_2m, dpmpp_2m_sde, "
        "heun, unipc, ...; default: gin)",
    )  # fmt: skip
    parser.add_argument(
        "--steps", type=int, default=None, help="sampler steps of every chain (default: gin)"
    )
    parser.add_argument(
        "--decoder-steps", type=int, default=None,
        help="the decoder's steps alone, over --steps (default: --steps, else gin)",
    )  # fmt: skip


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


def _gin_files(args: argparse.Namespace) -> None:
    """Merge `--gin-file`s into the files of the command (after the positional ones), look file
    names up in the `--gin-search-path` folders too, and hand the folders to gin (`include`)."""
    if not hasattr(args, "gin_file"):
        return
    search = [Path(d) for d in args.gin_search_path]
    for d in search:
        if not d.is_dir():
            raise UserError(f"--gin-search-path {d}: no such folder")

    def found(name: str) -> str:
        if Path(name).exists() or Path(name).is_absolute():
            return name
        hits = [d / name for d in search if (d / name).is_file()]
        return str(hits[0]) if hits else name

    if hasattr(args, "files"):
        args.files = [found(f) for f in [*args.files, *args.gin_file]]
        if not args.files:
            raise UserError(f"no gin file given: `ulframe {args.command} FILE.gin` or --gin-file")
    else:  # sample / eval: WORKDIR [EXTRA.gin ...]
        args.extra = [found(f) for f in [*args.extra, *args.gin_file]]
        if Path(args.target).suffix == ".gin":
            args.target = found(args.target)
    if search:
        from ulframe import wiring

        wiring.add_search_paths(search)


def _workdir(args: argparse.Namespace) -> Path:
    return args.workdir or Path("runs") / Path(args.files[-1]).stem


def _run_config(args: argparse.Namespace) -> tuple[Path, list[str]]:
    """(workdir, gin files) of `sample` / `eval`: `WORKDIR [EXTRA.gin ...]` reads the run's own
    config.gin first; `FILE.gin ... [--workdir DIR]` names the config (the older form)."""
    from ulframe import trained

    first = Path(args.target)
    for f in args.extra:
        if Path(f).is_dir():
            raise UserError(f"{f} is a directory; give one run directory, then gin files")
    if first.is_dir():
        if args.workdir is not None and args.workdir.resolve() != first.resolve():
            raise UserError(f"two run directories given: {first} and --workdir {args.workdir}")
        return first, trained.config_files(first, args.extra)
    if first.suffix != ".gin" and not first.exists():
        raise UserError(f"{first}: no such run directory or gin file")
    files = [args.target, *args.extra]
    return args.workdir or Path("runs") / Path(files[-1]).stem, files


def cmd_run(args: argparse.Namespace, bindings: list[str]) -> int:
    from ulframe import wiring
    from ulframe.errors import EXIT_REQUEUE
    from ulframe.train import distributed, runner, settings, signals
    from ulframe.train.loop import StopRequested

    _configure_logging(is_main=True)
    signals.set_requeue_signal(signals.parse_signal(args.requeue_signal))
    # config errors: one message, before launching
    registry = wiring.load(args.files, bindings, engine=settings.CONFIGURABLES)
    workdir = _workdir(args)
    cluster = runner.rendezvous(
        args.nnodes, args.node_rank, args.rdzv_endpoint, args.rdzv_timeout, workdir
    )
    if (args.nproc or cluster) and not distributed.launched():
        again = ["run", *args.files, *[a for b in bindings for a in ("--gin-param", b)]]
        again += [a for d in args.gin_search_path for a in ("--gin-search-path", d)]
        again += ["--workdir", str(args.workdir)] if args.workdir else []
        again += ["--allow-config-change"] if args.allow_config_change else []
        again += ["--requeue-signal", args.requeue_signal, *(["--debug"] if args.debug else [])]
        return runner.launch(
            again, workdir, args.nproc or 1, args.max_restarts, args.allow_config_change, cluster
        )
    experiment = wiring.experiment()
    try:
        runner.train(
            experiment, registry, workdir, args.allow_config_change,
            on_start=lambda world: _configure_logging(
                world.is_main, workdir / "log.txt" if world.is_main else None
            ),
        )  # fmt: skip
    except StopRequested as err:
        if not err.requeue:
            raise
        sys.stderr.write(f"ulframe: {err}; exit {EXIT_REQUEUE}: requeue the job\n")
        return EXIT_REQUEUE
    return 0


def cmd_export(args: argparse.Namespace, bindings: list[str]) -> int:
    """The EMA weights of the newest valid checkpoint of one stage (or the post-hoc EMA
    `ulframe ema` wrote into it), as safetensors."""
    from safetensors.torch import save

    from ulframe import rundir
    from ulframe.train import checkpoint, posthoc_ema

    _configure_logging(is_main=True)
    fmt = args.format or ("safetensors" if args.out.suffix == ".safetensors" else "folder")
    if fmt == "folder":
        return _export_folder(args, bindings)
    if args.out.is_dir():
        raise UserError(
            f"--out {args.out} is a directory; name a file, e.g. {args.out / 'ema.safetensors'}"
        )
    found = checkpoint.stage_checkpoints(args.workdir)
    if not found:
        raise UserError(f"no checkpoints under {args.workdir / 'stages'}: nothing to export")
    if args.stage is None and len(found) > 1:
        raise UserError(
            f"several stages have checkpoints; pick one with --stage: {', '.join(found)}"
        )
    name = args.stage or next(iter(found))
    if name not in found:
        raise UserError(f"stage '{name}' has no checkpoints; stages with some: {', '.join(found)}")
    state = checkpoint.load_latest(found[name], only=("ema",))  # (DCP: any number of processes)
    if state is None:
        raise UserError(f"no valid checkpoint in {found[name]} (see the warnings above)")
    weights, which = checkpoint.stage_ema(args.workdir / "stages" / name, state)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}
    metadata = {
        "stage": name,
        "samples_seen": str(state["samples_seen"]),
        "ema": posthoc_ema.describe(which),
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


def _export_folder(args: argparse.Namespace, bindings: list[str]) -> int:
    """`ulframe export WORKDIR --out DIR`: the folder `ulframe.load` reads."""
    from ulframe import formats

    if args.stage is not None:
        raise UserError(
            f"--stage {args.stage} exports one stage's weights: add --format safetensors "
            "(the folder holds every stage of the model)"
        )
    if args.stats_examples is not None and args.stats_examples < 1:
        raise UserError(f"--stats-examples must be >= 1, got {args.stats_examples}")
    config = formats.export(args.workdir, args.out, args.stats_examples, bindings)
    roles = [*config["stage1"]["networks"], *(config["stage2"] or {}).get("networks", {})]
    log.info("exported %s to %s: load it with ulframe.load(%r)", ", ".join(roles), args.out,
             str(args.out))  # fmt: skip
    return 0


def cmd_ema(args: argparse.Namespace, bindings: list[str]) -> int:
    """The post-hoc EMA of `--sigma-rel` becomes the stage's EMA (`posthoc_ema.replace_stage_ema`);
    each stage built on the EMA it replaces is named stale in one line."""
    from ulframe.train import posthoc_ema

    _configure_logging(is_main=True)
    summary, stale = posthoc_ema.replace_stage_ema(args.workdir, args.sigma_rel, args.stage)
    sys.stdout.write(json.dumps(summary) + "\n")
    for line in stale:
        log.warning("%s", line)
    return 0


def cmd_config(args: argparse.Namespace, bindings: list[str]) -> int:
    from ulframe import parameters, wiring
    from ulframe.train import settings

    _configure_logging(is_main=True)
    wiring.load(args.files, bindings, engine=settings.CONFIGURABLES)
    experiment = wiring.experiment()  # gin calls every constructor
    from ulframe.train.runner import check_stages_fit_data

    try:
        check_stages_fit_data(experiment)
    except UserError as err:
        if isinstance(err, ConfigError):
            raise
        log.warning("data not checked against the stages: %s", err)  # e.g. not here
    try:  # the networks, on the meta device: what the operative config then shows too
        counts = parameters.describe(parameters.stage_parameters(experiment, _workdir(args)))
    except UserError as err:  # e.g. the data is not here
        counts = f"# parameters: not counted (the networks are built from the data: {err})\n"
    sys.stdout.write(wiring.operative_config() if args.operative else wiring.full_config())
    sys.stdout.write("\n" + counts + "# config OK\n")
    return 0


def cmd_plugins(args: argparse.Namespace, bindings: list[str]) -> int:
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


def cmd_check_plugins(args: argparse.Namespace, bindings: list[str]) -> int:
    """The contract kit (`ulframe.testing`) on the plugins of the named distributions."""
    from ulframe.testing import kit

    _configure_logging(is_main=False)  # warnings only: the verdict lines are the output
    unknown = [d for d in args.dists if not kit.installed(d)]
    if unknown:
        raise UserError(f"not installed: {', '.join(unknown)} (pip install it first)")
    outcomes = kit.run_all(args.dists)
    if not outcomes:
        raise UserError(f"{', '.join(args.dists)} register no ulframe plugins (entry points)")
    for outcome in outcomes:
        sys.stdout.write(outcome.line() + "\n")
        sys.stdout.flush()
    return 1 if any(o.status == "FAIL" for o in outcomes) else 0


def cmd_sample(args: argparse.Namespace, bindings: list[str]) -> int:
    from ulframe import trained

    _configure_logging(is_main=True)
    if args.num < 1:
        raise UserError(f"-n must be >= 1, got {args.num}")
    trained.check_sampling(args.sampler, args.steps, args.decoder_steps)
    workdir, files = _run_config(args)
    run = trained.open_run(workdir, files, bindings)
    summary = trained.write_samples(
        run, args.num, args.label, args.guidance, args.steps, args.seed, args.sampler,
        args.decoder_steps,
    )  # fmt: skip
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


def cmd_eval(args: argparse.Namespace, bindings: list[str]) -> int:
    from ulframe import trained

    _configure_logging(is_main=True)
    trained.check_sampling(args.sampler, args.steps, args.decoder_steps)
    workdir, files = _run_config(args)
    run = trained.open_run(workdir, files, bindings)
    result = trained.evaluate(
        run, args.batches, args.fd_samples, args.sampler, args.steps, args.decoder_steps
    )
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


def cmd_shard(args: argparse.Namespace, bindings: list[str]) -> int:
    """An image or Kinetics folder as a shard set (`datasets.shards.write_folder`)."""
    from ulframe.data.shards import MANIFEST, parse_size
    from ulframe.registry import Registry

    _configure_logging(is_main=True)
    max_bytes = parse_size(args.size)
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    if not (args.src / "train").is_dir():
        raise UserError(f"SRC {args.src} has no train/ folder; expected SRC/train/<class>/<file>")
    shards: Any = Registry().get("datasets", "shards").factory  # the class: write_folder
    written = shards.write_folder(
        args.src, args.out, max_bytes=max_bytes, kind=args.kind, seed=args.seed,
        workers=args.workers,
    )  # fmt: skip
    summary = {
        "out": str(args.out),
        "kind": written.kind,
        "classes": len(written.classes),
        **{f"{s}_examples": written.count(s) for s in written.splits},
        **{f"{s}_shards": len(v) for s, v in written.splits.items()},
        **{f"{s}_skipped": n for s, n in written.skipped.items()},
    }
    sys.stdout.write(json.dumps(summary) + "\n")
    log.info("wrote %s; train with datasets.shards.root = %r", args.out / MANIFEST, str(args.out))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(_expand_gin_overrides(argv))
    bindings = list(getattr(args, "gin_param", []))
    try:
        _gin_files(args)
        return int(args.func(args, bindings))
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
