"""Style rules a linter does not know: run by `make lint` (and by the test suite).

- no `print(` in library code (`ulframe/`): use logging;
- `import gin` only in `ulframe/wiring.py` (library and plugins receive plain objects);
- `torch.distributed` only in `ulframe/train/distributed.py`;
- the engine knows no stage: no name of a UL stage or of its parameters (`ul_joint`, `ULBase`,
  `decoder_sample_steps`, `context_frames`, ...) in `ulframe/` outside `ulframe/diffusion/` (the
  diffusion math the stages share). Stages reach the engine through `ulframe/protocols.py`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RULES = [
    (re.compile(r"^\s*print\("), ["ulframe"], set(), "print() in library code (use logging)"),
    (
        re.compile(r"^\s*(import gin\b|from gin\b)"),
        ["ulframe", "plugins"],
        {"ulframe/wiring.py"},
        "gin imported outside ulframe/wiring.py",
    ),
    (
        re.compile(r"torch\.distributed|from torch import distributed"),
        ["ulframe", "plugins"],
        {"ulframe/train/distributed.py"},
        "torch.distributed outside ulframe/train/distributed.py",
    ),
    (
        re.compile(
            r"\bul_joint\b|\bul_base\b|\bkl_ae\b|ULJoint|ULBase|KLAE|KLAutoencoder|latent_cache"
            r"|decoder_sample_steps|context_frames|guidance_interval|ulframe_plugins"
        ),
        ["ulframe"],
        {"ulframe/diffusion/"},
        "a UL stage's name in the engine (stages reach it through ulframe/protocols.py)",
    ),
]
SKIP = ("plugins/examples/",)


def violations() -> list[str]:
    out = []
    for pattern, roots, allowed, why in RULES:
        for root in roots:
            for path in sorted((ROOT / root).rglob("*.py")):
                rel = path.relative_to(ROOT).as_posix()
                inside = any(rel.startswith(a) for a in allowed if a.endswith("/"))
                if rel in allowed or inside or rel.startswith(SKIP):
                    continue
                for n, line in enumerate(path.read_text().splitlines(), 1):
                    if pattern.search(line):
                        out.append(f"{rel}:{n}: {why}")
    return out


if __name__ == "__main__":
    found = violations()
    for v in found:
        sys.stderr.write(v + "\n")
    sys.exit(1 if found else 0)
