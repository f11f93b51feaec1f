"""`ulframe`: run, validate and inspect experiments.

    ulframe run FILE.gin [FILE2.gin ...] [--gin.NAME=VALUE ...] [--gin_param 'a.b = 1' ...] [--workdir DIR]
    ulframe config FILE.gin [...]          parse, validate and print the config; no training
    ulframe plugins [--kind KIND] [--markdown]

Errors in the user's input exit with code 2 and one short message (`--debug` shows tracebacks).
"""

from __future__ import annotations

import argparse
import json
import logging
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
Re-running the same command on the same workdir resumes where it stopped."""

CONFIG_EXAMPLES = """examples:
  ulframe config gin/quickstart.gin
  ulframe config gin/ul_imagenet512.gin --gin.DATA_ROOT="'/data/imagenet'" --operative"""

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
    return p


def _configure_logging(is_main: bool, logfile: Path | None = None) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s", "%H:%M:%S")
    )
    root.addHandler(handler)
    if logfile is not None:
        fh = logging.FileHandler(logfile)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)
    root.setLevel(logging.INFO if is_main else logging.WARNING)


def _load(files: Sequence[str], bindings: Sequence[str]) -> Any:
    """Discover plugins, register them with gin, parse files and overrides, check them."""
    from ulframe import wiring
    from ulframe.registry import Registry

    registry = Registry()
    wiring.register(registry)
    wiring.parse(files, bindings)
    wiring.check_required()  # before any constructor runs: `run` and `config` say the same
    return registry


def _build_experiment() -> Any:
    from ulframe import wiring

    return wiring.call(wiring.configured("ulframe.Experiment"))


def cmd_run(args: argparse.Namespace, bindings: list[str]) -> int:
    from ulframe import hookspecs, rundir, wiring
    from ulframe.hookspecs import RunInfo
    from ulframe.train import distributed
    from ulframe.train.loop import RunContext, run_experiment

    _configure_logging(is_main=True)
    registry = _load(args.files, bindings)
    experiment = _build_experiment()
    world = distributed.init(experiment.device)
    workdir = args.workdir or Path("runs") / Path(args.files[-1]).stem
    if world.is_main:
        rundir.prepare(workdir)
    distributed.barrier(world)
    _configure_logging(world.is_main, workdir / "log.txt" if world.is_main else None)
    dists = {e.distribution for e in registry.all_entries()}
    if world.is_main:
        rundir.write_run_files(workdir, wiring.full_config(), dists)
    hooks = hookspecs.plugin_manager(list(experiment.hooks))
    info = RunInfo(
        workdir, [s.name for s in experiment.stages], "", world.is_main, world.world_size
    )
    ctx = RunContext(
        workdir, world, hooks, info, rundir.MetricsFile(workdir / "metrics.jsonl", world.is_main),
        seed=experiment.seed, num_workers=experiment.num_workers, operative_config=wiring.operative_config,
    )  # fmt: skip
    hooks.hook.ulframe_run_start(run=info)
    try:
        results = run_experiment(experiment, ctx)
    except BaseException as err:
        hooks.hook.ulframe_error(run=info, error=err)
        raise
    finally:
        info.operative_config = wiring.operative_config()
        if world.is_main:
            rundir.write_text(workdir / "operative_config.gin", info.operative_config)
    hooks.hook.ulframe_run_end(run=info, results=results)
    if world.is_main:
        log.info("done: %s", json.dumps(results))
        log.info("workdir: %s (tensorboard --logdir %s)", workdir, workdir)
    distributed.shutdown()
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(_expand_gin_overrides(argv))
    bindings = list(getattr(args, "gin_param", []))
    try:
        if args.command == "run":
            return cmd_run(args, bindings)
        if args.command == "config":
            return cmd_config(args, bindings)
        return cmd_plugins(args)
    except UserError as err:
        if args.debug:
            raise
        sys.stderr.write(f"ulframe: error: {err}\n")
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
