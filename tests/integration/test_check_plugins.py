"""`ulframe check-plugins` and `pytest -p ulframe.testing` on installed third-party packages.

The example package (plugins/examples/ulframe-example: a weighting, a hook, a dataset, a
network) passes with no change to ulframe; the broken one (tests/integration/data/
ulframe-broken: a dataset of H×W×C uint8 arrays, a weighting returning NaN) fails with one line
per problem. Both are built with setuptools and installed into temporary targets. The commands
run in this process with the targets on sys.path (`cli`, conftest.py), but for `pytest -p
ulframe.testing`, a pytest of its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# One worker runs the module (`make test`: --dist loadgroup): the broken package is built once.
pytestmark = pytest.mark.xdist_group("check_plugins")
BROKEN_SOURCE = Path(__file__).parent / "data" / "ulframe-broken"
TIMEOUT_S = 120

RunCli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def broken_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("broken-plugin")
    source, target = base / "src", base / "site"
    shutil.copytree(BROKEN_SOURCE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    cmd += ["--no-index", "--disable-pip-version-check", "--target", str(target), str(source)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert done.returncode == 0, f"pip install of the broken plugin failed:\n{done.stderr}"
    return target


@pytest.fixture
def both_path(example_plugin: Any, broken_target: Path) -> list[Path]:
    """The example's and the broken package's targets, for `cli(..., sys_path=...)`."""
    return [example_plugin.target, broken_target]


@pytest.fixture
def both_env(both_path: list[Path], cli_env: Callable[..., Any]) -> Any:
    return cli_env({"PYTHONPATH": os.pathsep.join(map(str, both_path))})


def _verdicts(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.split(" ")[0] in ("PASS", "FAIL", "SKIP")]


def test_the_example_package_passes_check_plugins(cli: RunCli, example_plugin: Any) -> None:
    done = cli("check-plugins", "ulframe-example", sys_path=[example_plugin.target])
    assert done.returncode == 0, done.stdout + done.stderr
    lines = _verdicts(done.stdout)
    assert lines == done.stdout.splitlines()  # nothing but verdicts on stdout
    assert all(line.startswith("PASS ") for line in lines), lines
    for expected in (
        "PASS weightings.edm  finite_positive",
        "PASS hooks.example_counter  hook_names",
        "PASS datasets.stripes  layout",
        "PASS datasets.stripes  disjoint",
        "PASS encoders.patch  gradients",
        "PASS encoders.patch  video",
    ):
        assert expected in lines
    assert not any("ulframe " in line or ".resnet" in line for line in lines)  # only its plugins


def test_the_broken_package_fails_with_one_line_per_problem(
    cli: RunCli, both_path: list[Path]
) -> None:
    done = cli("check-plugins", "ulframe-broken", sys_path=both_path)
    assert done.returncode == 1, done.stdout + done.stderr
    fails = [line for line in _verdicts(done.stdout) if line.startswith("FAIL")]
    assert fails == [
        "FAIL weightings.nan  finite_positive: w(λ) = nan at λ = 0.0999997 (200 of 401 points "
        "of λ ∈ [-20, 20], torch.float32); expected finite weights >= 0",
        "FAIL datasets.hwc_uint8  layout: returned numpy.ndarray (16, 16, 3) uint8; expected a "
        "float32 tensor C×H×W (video: C×T×H×W) in [-1, 1] (first train example)",
    ]
    # both packages at once: the example's checks still pass, the exit code is the worst
    done = cli("check-plugins", "ulframe_example", "ulframe-broken", sys_path=both_path)
    assert done.returncode == 1 and "PASS datasets.stripes  layout" in done.stdout


def test_check_plugins_refuses_what_is_not_installed(cli: RunCli) -> None:
    done = cli("check-plugins", "no-such-dist-here")
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == "ulframe: error: not installed: no-such-dist-here (pip install it first)"
    )


def test_the_pytest_plugin_makes_one_test_per_plugin_and_check(
    both_env: Any, tmp_path: Path
) -> None:
    """What a third-party package runs in its own CI: `pytest -p ulframe.testing`."""
    cmd = [sys.executable, "-m", "pytest", "-p", "ulframe.testing", "-p", "no:cacheprovider"]
    cmd += ["--ulframe-dists=ulframe-example,ulframe-broken", "-q", "-rfs"]
    done = subprocess.run(
        cmd, cwd=tmp_path, env=both_env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED ::weightings.nan::finite_positive" in done.stdout
    assert "FAILED ::datasets.hwc_uint8::layout" in done.stdout
    assert "2 failed, 23 passed, 3 skipped" in done.stdout
    # opt-in: without the option the plugin adds nothing
    done = subprocess.run(
        [*cmd[:-3], "-q"], cwd=tmp_path, env=both_env, capture_output=True, text=True,
        timeout=TIMEOUT_S,
    )  # fmt: skip
    assert "no tests ran" in done.stdout


def test_a_run_refuses_the_broken_dataset_in_one_line(
    cli: RunCli, both_path: list[Path], tmp_path: Path, tiny_run: list[str]
) -> None:
    """The engine's own boundary check: `ulframe run` with the broken dataset exits 2 naming
    the plugin before any network is built."""
    done = cli(
        "run", "gin/quickstart.gin", "--workdir", tmp_path / "run", *tiny_run,
        "--gin_param", "Experiment.dataset = @datasets.hwc_uint8()", sys_path=both_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    (last,) = done.stderr.strip().splitlines()[-1:]
    assert last == (
        "ulframe: error: datasets.hwc_uint8 (from ulframe-broken): decode returned numpy.ndarray "
        "(64, 64, 3) uint8; expected a float32 tensor C×H×W (video: C×T×H×W) in [-1, 1]"
    )


def test_config_refuses_the_nan_weighting_in_one_line(cli: RunCli, both_path: list[Path]) -> None:
    done = cli(
        "config", "gin/quickstart.gin",
        "--gin_param", "stage1/stages.ul_joint.decoder_weighting = @weightings.nan()",
        sys_path=both_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "weightings.nan (from ulframe-broken) (as ul_joint.decoder_weighting): w(λ) " in last
    assert "expected finite weights >= 0" in last


def _guide_package(root: Path) -> Path:
    """The package docs/plugins.md builds, written from its code blocks (pyproject.toml and
    every block that starts with `# mypkg/<file>.py`)."""
    import re

    text = (Path(__file__).resolve().parents[2] / "docs" / "plugins.md").read_text()
    blocks = re.findall(r"```(?:toml|python)\n(.*?)```", text, re.S)
    written = []
    for block in blocks:
        first = block.splitlines()[0]
        if first in ("# pyproject.toml",) or first.startswith("# mypkg/"):
            path = root / first[2:]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(block)
            written.append(path.relative_to(root).as_posix())
    assert sorted(written) == [
        "mypkg/data.py", "mypkg/hooks.py", "mypkg/network.py", "mypkg/weighting.py",
        "pyproject.toml",
    ]  # fmt: skip
    (root / "mypkg" / "__init__.py").write_text("")
    return root


def test_the_package_of_the_guide_passes_check_plugins(cli: RunCli, tmp_path: Path) -> None:
    """docs/plugins.md's minimal package, followed to the letter, passes with no change to
    ulframe."""
    source, target = _guide_package(tmp_path / "src"), tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    cmd += ["--no-index", "--disable-pip-version-check", "--target", str(target), str(source)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stderr
    done = cli("check-plugins", "mypkg", sys_path=[target])
    assert done.returncode == 0, done.stdout + done.stderr
    lines = _verdicts(done.stdout)
    assert "PASS weightings.flat_then_sigmoid  finite_positive" in lines
    assert "PASS datasets.checker  disjoint" in lines
    assert "PASS encoders.pixel_shuffle  gradients" in lines
    assert "PASS hooks.loss_printer  hook_names" in lines
    assert not [line for line in lines if line.startswith("FAIL")]


def test_the_generated_parts_of_the_guide_are_up_to_date() -> None:
    """`python -m ulframe.testing.docgen docs/plugins.md` regenerates them."""
    from ulframe.testing import docgen

    doc = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"
    text = doc.read_text()
    assert {m["name"] for m in docgen.MARKER.finditer(text)} == set(docgen.SECTIONS)
    assert docgen.render(text) == text, "run: python -m ulframe.testing.docgen docs/plugins.md"
