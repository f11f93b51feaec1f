"""Shared fixtures: the CLI in a subprocess or in-process, throwaway plugin distributions, tiny runs.

Fixtures (test modules use these rather than importing this file):

- `run_cli(*args, env=..., cwd=...)` runs `python -m ulframe ...` with the test interpreter and
  returns the finished process (text stdout/stderr; never raises on a non-zero exit).
- `cli(*args, sys_path=...)` runs `ulframe.cli.main(args)` in the test's own process and answers
  like `run_cli`, without the ~2 s start-up of a second interpreter: for every command that needs
  no process of its own (`in_process_cli()`, the same for a module-scoped fixture).
- `cli_env(extra)` is the environment those subprocesses get: one BLAS/OpenMP thread (two cores
  are shared here and oversubscribed threads make a tiny run ~20x slower), no ULFRAME_*
  variables and no PYTHONPATH inherited from the caller.
- `example_plugin` (session) pip-installs plugins/examples/ulframe-example into a temporary
  target once: `.target` (for sys.path), `.env` (a CLI env whose PYTHONPATH holds it).
- `make_distribution(root, name, entry_points, modules)` writes an installed distribution
  (dist-info with entry_points.txt, plus modules) into a folder: a plugin package without pip.
- `tiny_run` is the `--gin_param` arguments that shrink gin/quickstart.gin to a run of seconds
  (`TINY_RUN`; it turns off the MFU measurement, `NO_MFU`, as every test's run should unless it
  tests the MFU).
- `tiny_threads` sets one torch thread for an in-process run.
- `restore_logging` undoes what an in-process `ulframe.cli.main` sets up (root logger
  handlers and level, gin's config).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_SOURCE = REPO / "plugins" / "examples" / "ulframe-example"
CLI_TIMEOUT_S = 120

# What a run of seconds does not need, whatever its config (every stage: an unscoped binding):
# the MFU's FLOP count and matmul probe (about a second per process). Tests of the MFU ask for it.
NO_MFU = "TrainSettings.measure_mfu = False"

# gin/quickstart.gin shrunk to two logged steps of 4 images at 16x16 with small networks: every
# phase of a run (train, log, eval, checkpoint, images, resume) in a few seconds on one CPU core.
TINY_RUN: tuple[str, ...] = (
    NO_MFU,
    "TRAIN_SAMPLES = 8",
    "Experiment.stages = [@stage1/stages.ul_joint()]",  # stage 2: TINY_STAGE2 below
    "datasets.photos.resolution = 16",
    "datasets.photos.crops_per_epoch = 64",
    "datasets.photos.eval_crops = 8",
    "Experiment.num_workers = 0",
    "stage1/TrainSettings.batch_size = 4",
    "stage1/TrainSettings.warmup_samples = 4",
    "stage1/TrainSettings.log_every_samples = 4",
    "stage1/TrainSettings.eval_every_samples = 4",
    "stage1/TrainSettings.eval_batches = 1",
    "stage1/TrainSettings.checkpoint_every_samples = 4",
    "stage1/stages.ul_joint.sample_steps = 2",
    "stage1/stages.ul_joint.eval_t_per_example = 1",
    "stage1/stages.ul_joint.eval_images = 2",
    "encoders.resnet.channels = (8, 16)",
    "prior/priors.vit.widths = (32,)",
    "prior/priors.vit.depths = (1,)",
    "prior/priors.vit.heads = 2",
    "decoders.uvit.channels = (8,)",
    "decoders.uvit.width = 32",
    "decoders.uvit.depth = 1",
    "decoders.uvit.heads = 2",
)

# Stage 2 (ul_base) of gin/quickstart.gin added to TINY_RUN: a few steps on cached latents.
TINY_STAGE2: tuple[str, ...] = (
    "Experiment.stages = [@stage1/stages.ul_joint(), @stage2/stages.ul_base()]",
    "BASE_TRAIN_SAMPLES = 8",
    "stage2/TrainSettings.batch_size = 4",
    "stage2/TrainSettings.warmup_samples = 4",
    "stage2/TrainSettings.log_every_samples = 4",
    "stage2/TrainSettings.eval_every_samples = 8",
    "stage2/TrainSettings.eval_batches = 1",
    "stage2/TrainSettings.checkpoint_every_samples = 8",
    "stage2/stages.ul_base.sample_steps = 2",
    "stage2/stages.ul_base.eval_t_per_example = 1",
    "stage2/stages.ul_base.eval_images = 2",
    "base/priors.vit.widths = (16, 32)",
    "base/priors.vit.depths = (1, 1)",
    "base/priors.vit.heads = 2",
)


def gin_args(bindings: Sequence[str]) -> list[str]:
    """`--gin_param BINDING` arguments for the CLI."""
    return [arg for b in bindings for arg in ("--gin_param", b)]


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ULFRAME_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", COLUMNS="100", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    env.update(extra or {})
    return env


def run_cli(
    *args: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    cwd: Path = REPO,
    timeout: float = CLI_TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """`python -m ulframe ARGS` in a subprocess; the caller checks returncode and output."""
    return subprocess.run(
        [sys.executable, "-m", "ulframe", *map(str, args)],
        cwd=cwd,
        env=dict(env) if env is not None else cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def make_distribution(
    root: Path,
    name: str,
    entry_points: Mapping[str, Mapping[str, str]],
    modules: Mapping[str, str] | None = None,
    version: str = "0.0.1",
) -> Path:
    """Write an installed distribution `name` under `root` (a folder for sys.path).

    `entry_points` maps a group (`ulframe.weightings`) to {entry name: "module:attr"};
    `modules` maps a file name (`my_plugin.py`) to its source.
    """
    root.mkdir(parents=True, exist_ok=True)
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = []
    for group, entries in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{entry} = {target}" for entry, target in entries.items()]
        lines.append("")
    (info / "entry_points.txt").write_text("\n".join(lines))
    for filename, source in (modules or {}).items():
        (root / filename).write_text(source)
    return root


@dataclass(frozen=True)
class InstalledPlugin:
    target: Path  # the folder pip installed into (put it on sys.path / PYTHONPATH)
    env: dict[str, str]  # `cli_env()` with PYTHONPATH = target


@pytest.fixture(scope="session")
def example_plugin(tmp_path_factory: pytest.TempPathFactory) -> InstalledPlugin:
    """Install the example distribution into a temporary target, once per session.

    The source is copied first, so the build leaves nothing (build/, *.egg-info) in the repo.
    """
    base = tmp_path_factory.mktemp("example-plugin")
    source = base / "src"
    target = base / "site"
    shutil.copytree(EXAMPLE_SOURCE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    cmd += ["--no-index", "--disable-pip-version-check", "--target", str(target), str(source)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)
    assert done.returncode == 0, f"pip install of the example plugin failed:\n{done.stderr}"
    return InstalledPlugin(target, cli_env({"PYTHONPATH": str(target)}))


@pytest.fixture(name="run_cli")
def run_cli_fixture() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_cli


@pytest.fixture(name="cli_env")
def cli_env_fixture() -> Callable[..., dict[str, str]]:
    return cli_env


@pytest.fixture(name="make_distribution")
def make_distribution_fixture() -> Callable[..., Path]:
    return make_distribution


@pytest.fixture
def tiny_run() -> list[str]:
    return gin_args(TINY_RUN)


@pytest.fixture
def tiny_threads() -> Iterator[None]:
    """One torch thread for an in-process run (see `cli_env`); restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """`ulframe.cli` reconfigures the root logger (and opens workdir/log.txt): undo that."""
    import logging

    import gin

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in root.handlers:
        if h not in handlers:
            h.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    gin.clear_config()


@contextlib.contextmanager
def in_process_cli() -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:
    """`ulframe.cli.main(ARGS)` in this process, answered like `run_cli`: a finished process
    (returncode, stdout, stderr) with what the command wrote to sys.stdout and sys.stderr.

    No second interpreter starts (`run_cli` pays about 2 s of Python, torch and plugin start-up
    per call): for commands that need no process of their own, unlike a kill, a signal or a lock
    held by a live process. As in `cli_env`: the repo is the working directory, no ULFRAME_*
    variable is set, one torch thread; sys.argv is that of `python -m ulframe ARGS`. `sys_path`
    (`example_plugin.target`, a `make_distribution` folder) puts plugin distributions on sys.path
    for the call. argparse's exits (`--help`, a bad flag) are return codes; any other exception
    propagates (a subprocess would exit 1 with its traceback). On exit the logging that `main`
    set up, gin's config, the environment and the working directory are restored. Tests take
    the `cli` fixture; a module-scoped fixture uses this context manager.
    """
    import logging

    import gin
    import torch

    from ulframe import cli, gin_adapter

    root = logging.getLogger()
    handlers, level, threads = list(root.handlers), root.level, torch.get_num_threads()
    prefixes = gin_adapter.search_paths()  # `--gin-search-path` adds to gin's (a process's)

    def call(
        *args: str | os.PathLike[str], sys_path: Sequence[Path] = ()
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(a) for a in args]
        out, err = io.StringIO(), io.StringIO()
        with pytest.MonkeyPatch.context() as patch:
            # what `python -m ulframe ARGS` sees (the run's command.txt records it)
            patch.setattr(sys, "argv", [str(REPO / "ulframe" / "__main__.py"), *argv])
            for folder in sys_path:
                patch.syspath_prepend(str(folder))
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = cli.main(argv)
                except SystemExit as exit_:  # argparse
                    code = exit_.code if isinstance(exit_.code, int) else 1
                finally:
                    restore()  # as a process's exit would: log.txt closed, gin's search paths
        return subprocess.CompletedProcess(["ulframe", *argv], code, out.getvalue(), err.getvalue())

    def restore() -> None:
        for h in root.handlers:
            if h not in handlers:
                h.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        gin.config._LOCATION_PREFIXES[:] = prefixes

    with pytest.MonkeyPatch.context() as patch:
        for name in [k for k in os.environ if k.startswith("ULFRAME_")]:
            patch.delenv(name)
        patch.setenv("COLUMNS", "100")
        patch.chdir(REPO)
        torch.set_num_threads(1)
        try:
            yield call
        finally:
            restore()
            gin.clear_config()
            torch.set_num_threads(threads)


@pytest.fixture(name="cli")
def cli_fixture() -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:
    """`in_process_cli()` for one test."""
    with in_process_cli() as call:
        yield call


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The suite's tensors are tiny: one intra-op thread is faster than two on a busy 2-core box."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
