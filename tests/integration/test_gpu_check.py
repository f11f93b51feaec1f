"""benchmarks/gpu_check.py's CPU fallback runs every check that applies on a CPU, and passes.

The script is written for a GPU that this project has not had yet: run on CPU with `--quick`
(the same experiment files at the tiny presets, the same code paths), it must finish with every
check that is not CUDA-only passing, so that its first GPU run fails only where the GPU differs.
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
EXPECTED = {
    "matmul_rate",
    "step/imagenet512/stage1/eager",
    "step/imagenet512/stage2/eager",
    "step/kinetics600/stage1/eager",
    "step/kinetics600/stage2/eager",
    "step/imagenet512/stage1/compiled",
    "step/kinetics600/stage2/compiled",
    "sampling/imagenet512",
    "sampling/kinetics600",
    "wrap/ddp",
    "wrap/fsdp",
    "wrap/fsdp+compile",
    "launch",
    "sigterm_resume",
}


@pytest.mark.slow
def test_quick_cpu_gpu_check_passes_every_check_that_applies(
    cli_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--out", out],
        cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
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

    # What the GPU run will report, present on CPU too.
    step = checks["step/imagenet512/stage1/eager"]["result"]
    assert step["samples_per_s"] > 0 and step["flops_per_step"] > 0 and 0 < step["mfu"]
    assert step["estimated_peak_gib"] > 0 and step["peak_gib"] is None  # no CUDA allocator
    compiled = checks["step/imagenet512/stage1/compiled"]["result"]
    assert compiled["backend"] == "aot_eager" and compiled["compile_s"] > 0
    assert compiled["loss_nats"] == pytest.approx(step["loss_nats"], rel=1e-3)  # same weights
    video = checks["sampling/kinetics600"]["result"]
    assert video["continues_clips"] and video["end_to_end_images_per_s"] > 0
    assert checks["wrap/fsdp"]["result"]["sharded"] is True
    assert checks["wrap/ddp"]["result"]["sharded"] is False
    assert checks["wrap/fsdp+compile"]["result"]["sharded"] is True
    assert checks["wrap/fsdp+compile"]["result"]["dynamo"]["stats"]  # compiled (aot_eager)
    assert checks["sigterm_resume"]["result"]["resumed_at"] >= 4
    assert report["meta"]["quick"] is True and report["summary"]["ok"] == ok
