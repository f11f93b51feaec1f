"""Style rules a linter does not know: run by `make lint` (and by the test suite).

- no `print(` in library code (`ulframe/`): use logging;
- `import gin` only in `ulframe/wiring.py` and `ulframe/gin_adapter.py` (what wiring needs of gin
  beyond its public API); library and plugins receive plain objects;
- `torch.distributed` only in the modules of `DISTRIBUTED_MODULES`;
- the engine knows no stage: no name of a UL stage or of its parameters (`ul_joint`, `ULBase`,
  `decoder_sample_steps`, `context_frames`, ...) in `ulframe/` outside `ulframe/diffusion/` (the
  diffusion math the stages share). Stages reach the engine through `ulframe/protocols.py`;
- layers: each `ulframe` module imports only from its own layer of `LAYERS` or lower ones
  (docs/architecture.md, "Layers"); a module of no layer is a violation too.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DISTRIBUTED_MODULES = {
    "ulframe/train/distributed.py",  # process groups, DDP/FSDP wrapping, sharded state dicts
    "ulframe/train/checkpoint.py",  # torch.distributed.checkpoint (DCP): save, load, reshard
}
"""The only files that may use `torch.distributed`: one line each, with what it uses it for."""

LAYERS: tuple[tuple[str, ...], ...] = (
    ("ulframe", "ulframe.errors", "ulframe.progress"),
    ("ulframe.diffusion", "ulframe.data", "ulframe.hookspecs", "ulframe.rundir"),
    ("ulframe.protocols", "ulframe.eval"),
    ("ulframe.registry", "ulframe.experiment"),
    ("ulframe.wiring", "ulframe.gin_adapter", "ulframe.testing", "ulframe.reference"),
    ("ulframe.train",),
    ("ulframe.trained", "ulframe.parameters", "ulframe.formats"),
    ("ulframe.cli", "ulframe.__main__"),
)
"""ulframe's layers, bottom-up: a module, or a package and every module in it (`ulframe` itself
is only `ulframe/__init__.py`)."""

RULES = [
    (re.compile(r"^\s*print\("), ["ulframe"], set(), "print() in library code (use logging)"),
    (
        re.compile(r"^\s*(import gin\b|from gin\b)"),
        ["ulframe", "plugins"],
        {"ulframe/wiring.py", "ulframe/gin_adapter.py"},
        "gin imported outside ulframe/wiring.py and ulframe/gin_adapter.py",
    ),
    (
        re.compile(r"torch\.distributed|from torch import distributed"),
        ["ulframe", "plugins"],
        DISTRIBUTED_MODULES,
        f"torch.distributed outside {', '.join(sorted(DISTRIBUTED_MODULES))}",
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
    """Every rule's violations under `ROOT`, as `path:line: why` lines."""
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
    return out + layer_violations()


def layer_of(module: str) -> int | None:
    """The index in `LAYERS` of a dotted `ulframe` module, None when no layer holds it."""
    for index, names in enumerate(LAYERS):
        for name in names:
            if module == name or (name != "ulframe" and module.startswith(name + ".")):
                return index
    return None


def _module_name(rel: str) -> str:
    """`ulframe/data/__init__.py` -> `ulframe.data`; `ulframe/cli.py` -> `ulframe.cli`."""
    parts = rel.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(tree: ast.Module, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, dotted module) of every `ulframe` module that `tree` imports, at any depth
    (inside functions and `if TYPE_CHECKING:` too). `from A import n` counts as `A.n` where
    that is a module of the tree (`from ulframe import wiring`), else as `A`."""
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found = (ROOT / f"{target.replace('.', '/')}.py").is_file() or (
                    ROOT / target.replace(".", "/") / "__init__.py"
                ).is_file()
                out.append((node.lineno, target if found else base))
    return [(n, m) for n, m in out if m == "ulframe" or m.startswith("ulframe.")]


def layer_violations() -> list[str]:
    """Imports of a `ulframe` module from a higher layer than its own (see `LAYERS`), and
    modules that no layer holds, as `path:line: why` lines."""
    out = []
    for path in sorted((ROOT / "ulframe").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        module = _module_name(rel)
        own = layer_of(module)
        if own is None:
            out.append(
                f"{rel}:1: {module} is in no layer (add it to LAYERS in tools/check_rules.py)"
            )
            continue
        tree = ast.parse(path.read_text(), filename=rel)
        for line, target in _imported(tree, module, path.name == "__init__.py"):
            theirs = layer_of(target)
            if theirs is not None and theirs > own:
                out.append(
                    f"{rel}:{line}: {module} (layer {own}) imports {target} (layer {theirs}), "
                    "a higher layer"
                )
    return out


if __name__ == "__main__":
    found = violations()
    for v in found:
        sys.stderr.write(v + "\n")
    sys.exit(1 if found else 0)
