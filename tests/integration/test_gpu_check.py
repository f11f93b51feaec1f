"""benchmarks/gpu_check.py's CPU fallback runs the checks it is given on a CPU, and passes.

The script is written for a GPU that this project has not had yet: run on CPU with `--quick`
(the same experiment files at the tiny presets, the same code paths), the checks it runs must
pass, so that its first GPU run fails only where the GPU differs. One call of the script, end to
end, with `--only`/`--skip` (about 25 s, against 47 s for every check): every in-process check
but the compiled ImageNet stage-1 step (the compiled Kinetics stage-2 step covers compiling), and
`wrap/fsdp+compile` (FSDP2 with compiled blocks is tested nowhere else). Left out, because the
suite tests the same paths of ulframe elsewhere: `wrap/ddp` and `wrap/fsdp`
(tests/integration/test_distributed.py and test_fault_tolerance.py train DDP and FSDP in two
processes), `launch` (the elastic agent: test_distributed.py, test_faults.py's `--nproc` run) and
`sigterm_resume` (test_fault_tolerance.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAST_LINE = re.compile(r"^gpu check: (\d+)/(\d+) ok, decoder MFU (\d+\.\d+%|n/a)$")
# Skipped on a CPU, and why: CUDA-only checks and the compiled steps --quick leaves out.
MAY_SKIP = {"CUDA only", "--quick compiles one image and one video step"}
ONLY = ("matmul_rate", "step/", "adamw8bit", "sampling/", "wrap/fsdp+compile")
SKIP = ("step/imagenet512/stage1/compiled",)
EXPECTED = {
    "matmul_rate",
    "step/imagenet512/stage1/eager",
    "step/imagenet512/stage2/eager",
    "step/kinetics600/stage1/eager",
    "step/kinetics600/stage2/eager",
    "step/kinetics600/stage2/compiled",
    "sampling/imagenet512",
    "sampling/kinetics600",
    "wrap/fsdp+compile",
}
NOT_RUN = {"step/imagenet512/stage1/compiled", "wrap/ddp", "wrap/fsdp", "launch", "sigterm_resume"}


@pytest.mark.slow
def test_quick_cpu_gpu_check_passes_the_checks_it_is_given(
    cli_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--out", out]
    cmd += ["--only", ",".join(ONLY), "--skip", ",".join(SKIP)]
    done = subprocess.run(
        cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300, check=False
    )
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr[-3000:]
    match = LAST_LINE.match(lines[-1])
    assert match, f"last line: {lines[-1]!r}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    ok, ran = int(match[1]), int(match[2])
    report: dict[str, Any] = json.loads(out.read_text())
    failed = {c["name"]: c.get("error") for c in report["checks"] if c["status"] == "error"}
    assert ok == ran and not failed, failed
    assert done.returncode == 0

    checks = {c["name"]: c for c in report["checks"]}
    passed = {n for n, c in checks.items() if c["status"] == "ok"}
    assert passed == EXPECTED, passed ^ EXPECTED
    assert ran == len(EXPECTED)
    skipped = {c["reason"] for c in checks.values() if c["status"] == "skipped"}
    assert skipped <= MAY_SKIP, skipped
    assert checks["adamw8bit"]["reason"] == "CUDA only"
    assert not checks.keys() & NOT_RUN, checks.keys() & NOT_RUN  # --only / --skip

    # What the GPU run will report, present on CPU too.
    step = checks["step/imagenet512/stage1/eager"]["result"]
    assert step["samples_per_s"] > 0 and step["flops_per_step"] > 0 and 0 < step["mfu"]
    assert step["estimated_peak_gib"] > 0 and step["peak_gib"] is None  # no CUDA allocator
    eager = checks["step/kinetics600/stage2/eager"]["result"]
    compiled = checks["step/kinetics600/stage2/compiled"]["result"]
    assert compiled["backend"] == "aot_eager" and compiled["compile_s"] > 0
    assert compiled["loss_nats"] == pytest.approx(eager["loss_nats"], rel=1e-3)  # same weights
    video = checks["sampling/kinetics600"]["result"]
    assert video["continues_clips"] and video["end_to_end_images_per_s"] > 0
    assert checks["wrap/fsdp+compile"]["result"]["sharded"] is True
    assert checks["wrap/fsdp+compile"]["result"]["dynamo"]["stats"]  # compiled (aot_eager)
    assert report["meta"]["quick"] is True and report["summary"]["ok"] == ok
