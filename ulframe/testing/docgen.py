"""The parts of docs/plugins.md that are generated from the code, between markers.

    python -m ulframe.testing.docgen docs/plugins.md          rewrite them in place
    python -m ulframe.testing.docgen docs/plugins.md --check  exit 1 when they are stale

A section ``NAME`` sits between ``<!-- BEGIN GENERATED: NAME -->`` and ``<!-- END GENERATED:
NAME -->``: ``source`` (the `Source` and `Dataset` protocols), ``hooks`` (every hook and its
arguments), ``infos`` (the fields of `RunInfo`, `StageInfo`, `StepInfo`), ``checks`` (what the
contract kit checks per kind).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import typing
from collections.abc import Callable
from pathlib import Path

MARKER = re.compile(
    r"(<!-- BEGIN GENERATED: (?P<name>\w+) -->\n)(?P<body>.*?)(<!-- END GENERATED: (?P=name) -->)",
    re.S,
)


def _doc(obj: object) -> str:
    return inspect.cleandoc(inspect.getdoc(obj) or "")


def _first(obj: object) -> str:
    return _doc(obj).split("\n\n")[0].replace("\n", " ")


def source() -> str:
    from ulframe.data.pipeline import Dataset, Source

    out = []
    for proto in (Source, Dataset):
        members = [
            f"    {n}: {getattr(a, '__name__', None) or str(a).replace('typing.', '')}"
            for n, a in typing.get_type_hints(proto).items()
        ]
        for name in ("decode", "source"):
            fn = vars(proto).get(name)
            if fn is not None:
                sig = str(inspect.signature(fn)).replace("'", "")
                members.append(f"    def {name}{sig}: ...")
        out.append(f"```python\nclass {proto.__name__}(Protocol):\n" + "\n".join(members))
        out.append("```\n")
        out.append(_doc(proto) + "\n")
    return "\n".join(out)


def hooks() -> str:
    from ulframe import hookspecs

    rows = ["| hook | arguments | when |", "|---|---|---|"]
    for name in hookspecs.hook_names():
        fn = getattr(hookspecs, name)
        sig = inspect.signature(fn)
        args = ", ".join(f"`{p.name}: {_type(p.annotation)}`" for p in sig.parameters.values())
        rows.append(f"| `{name}` | {args} | {_first(fn)} |")
    return "\n".join(rows) + "\n"


def _type(annotation: object) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    return str(text or annotation).replace("torch.", "").replace("|", "\\|")


def infos() -> str:
    from ulframe import hookspecs

    out = []
    for cls in (hookspecs.RunInfo, hookspecs.StageInfo, hookspecs.StepInfo):
        out.append(f"**`{cls.__name__}`** — {_first(cls)}\n")
        out.append("| field | type | default |\n|---|---|---|")
        for f in dataclasses.fields(cls):
            default = (
                repr(f.default) if f.default is not dataclasses.MISSING
                else "empty" if f.default_factory is not dataclasses.MISSING else ""
            )  # fmt: skip
            out.append(f"| `{f.name}` | `{_type(f.type)}` | {default} |")
        out.append("")
    return "\n".join(out)


def checks() -> str:
    from ulframe.testing import kit

    rows = ["| kind | checks |", "|---|---|"]
    for kind, names in kit.CHECKS.items():
        rows.append(f"| {kind} | {', '.join(f'`{n}`' for n in names)} |")
    return "\n".join(rows) + "\n"


SECTIONS: dict[str, Callable[[], str]] = {
    "source": source,
    "hooks": hooks,
    "infos": infos,
    "checks": checks,
}


def render(text: str) -> str:
    """`text` with every generated section regenerated."""

    def fill(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in SECTIONS:
            raise KeyError(f"unknown generated section {name!r}; known: {', '.join(SECTIONS)}")
        return match.group(1) + SECTIONS[name]() + match.group(4)

    return MARKER.sub(fill, text)


def main(argv: list[str]) -> int:
    path = Path(argv[0])
    text = path.read_text()
    new = render(text)
    if "--check" in argv:
        return int(new != text)
    path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
