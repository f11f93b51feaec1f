"""What ulframe relies on of gin beyond its public API, in one place (used by `ulframe.wiring`).

gin has no public way to do these things; each is a behaviour of gin-config 0.5 that a release
may change, and each has a test in tests/unit/test_gin_adapter.py, so that a gin upgrade fails a
test, not a user:

1. `bindings`: `gin.config._CONFIG` maps `(scope, complete selector)` to `{parameter: value}`,
   values as parsed (references are `gin.config.ConfigurableReference`); a macro `NAME = v` is
   stored as `(NAME, "gin.macro")` -> `{"value": v}` (gin lists no bindings publicly).
2. `replace_configurable`: `gin.config._REGISTRY` is a `SelectorMap` of `Configurable`s (with the
   original object as `.wrapped`) by complete selector, with `.get` and `.pop`; after a `.pop`,
   `gin.external_configurable` registers a new object under that selector (gin has no public
   unregister, and refuses a second object under a taken selector).
3. `is_constant`: `gin.config._CONSTANTS` is a `SelectorMap` of the `gin.constant`s, whose
   `matching_selectors(name)` is empty for a name that is no constant.
4. `search_path_first` and `search_paths`: `gin.config._LOCATION_PREFIXES` is the list of folders
   that `parse_config_file` tries, in order, for a relative `include` (public:
   `add_config_file_search_path` appends only).
5. `read_files_with`: `gin.config._FILE_READERS` is the list of `(open_fn, exists_fn)` that
   `parse_config_file` tries in order, the first whose `exists_fn` holds opening the file, and the
   text it yields is what gin parses, includes too (public: `register_file_reader` appends, after
   gin's own `open`, so it would never be asked).
6. The text of gin's errors (there are no error types or attributes to read instead):
   `error_location` ('In file "F", line N' / 'In bindings string line N', appended to an error
   raised while a statement is applied), `unknown_parameter` ("Configurable 'C' doesn't have a
   parameter named 'P'"), `unknown_configurable` ("No configurable matching 'S'" and "No
   configurable matching reference '@S()'"), `missing_required` ("Required bindings for `C` not
   provided in config: ['a', 'b']") and `configurable_calls` ("In call to configurable 'N' (OBJ)
   in scope 'S'", appended to an error raised inside a configured call).
7. `token_error_args`: an error raised while a statement is applied comes as a proxy of the same
   type whose `args` are empty; the original is its `__context__`.
8. `statements`: `gin.config_parser.ConfigParser(text, delegate)` yields statements one at a
   time, each with `.location.line_num`, and calls `delegate.macro(name)` for each `%name` of a
   statement while it parses that statement (before yielding it).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import gin
import gin.config
import gin.config_parser


# ---- 1. the bindings ---------------------------------------------------------------------------
def bindings() -> Mapping[tuple[str, str], Mapping[str, Any]]:
    """Every binding, `(scope, complete selector)` -> `{parameter: value}` (read only; macros
    under `(NAME, "gin.macro")`, their value as `"value"`)."""
    return MappingProxyType(gin.config._CONFIG)


# ---- 2. registering ----------------------------------------------------------------------------
def replace_configurable(obj: Callable[..., Any], selector: str) -> None:
    """Register `obj` as `selector` (`module.name`), replacing another object registered there."""
    module, _, name = selector.rpartition(".")
    existing = gin.config._REGISTRY.get(selector)
    if existing is not None and existing.wrapped is not obj:
        gin.config._REGISTRY.pop(selector)
    gin.external_configurable(obj, name=name, module=module)


# ---- 3. constants ------------------------------------------------------------------------------
def is_constant(name: str) -> bool:
    """Whether `%name` names a `gin.constant`."""
    return bool(gin.config._CONSTANTS.matching_selectors(name))


# ---- 4. and 5. reading files -------------------------------------------------------------------
def search_paths() -> list[str]:
    """The folders gin tries for a relative `include`, in order (a copy)."""
    return list(gin.config._LOCATION_PREFIXES)


@contextlib.contextmanager
def search_path_first(folder: str) -> Iterator[None]:
    """`folder` first in gin's search list inside the block; the list is as before after it."""
    prefixes = gin.config._LOCATION_PREFIXES
    prefixes.insert(0, folder)
    try:
        yield
    finally:
        prefixes.pop(0)


def read_files_with(reader: Callable[[str], Any], exists: Callable[[str], bool]) -> None:
    """Make `reader` (a context manager of a text stream) the first reader gin tries for the
    files it parses, includes too; once (again is a no-op)."""
    readers = gin.config._FILE_READERS
    if not readers or readers[0][0] is not reader:
        readers.insert(0, (reader, exists))


# ---- 6. and 7. gin's errors --------------------------------------------------------------------
_LOCATION_RE = re.compile(
    r'In (?:file "(?P<file>[^"]+)", line (?P<line>\d+)|bindings string line (?P<bline>\d+))'
)
_NO_PARAM_RE = re.compile(
    r"Configurable '(?P<conf>[^']+)' doesn't have a parameter named '(?P<param>[^']+)'"
)
_NO_CONF_RE = re.compile(r"No configurable matching (?:reference )?'@?(?P<sel>[^'()]+)(?:\(\))?'")
_REQUIRED_RE = re.compile(
    r"Required bindings for `(?P<conf>[^`]+)` not provided in config: \[(?P<names>[^\]]*)\]"
)
_CALL_RE = re.compile(
    r"\n  In call to configurable '(?P<name>[^']+)' \((?P<obj>.*?)\)(?: in scope '(?P<scope>[^']*)')?"
)


class ErrorLocation(NamedTuple):
    file: str | None  # None: the bindings string (`parse_config`)
    line: int


def error_location(message: str) -> ErrorLocation | None:
    """Where gin says an error was raised (the statement being applied), if it says."""
    m = _LOCATION_RE.search(message)
    if m is None:
        return None
    if m.group("file"):
        return ErrorLocation(m.group("file"), int(m.group("line")))
    return ErrorLocation(None, int(m.group("bline")))


def unknown_parameter(message: str) -> tuple[str, str] | None:
    """(configurable as written, parameter) of a binding of a parameter the callable lacks."""
    m = _NO_PARAM_RE.search(message)
    return (m.group("conf"), m.group("param")) if m else None


def unknown_configurable(message: str) -> str | None:
    """The selector (scope included, without `@` and `()`) of an unknown configurable."""
    m = _NO_CONF_RE.search(message)
    return m.group("sel") if m else None


def missing_required(message: str) -> tuple[str, list[str]] | None:
    """(configurable, parameter names) of a call that lacks `gin.REQUIRED` bindings."""
    m = _REQUIRED_RE.search(message)
    if m is None:
        return None
    return m.group("conf"), [n.strip(" '\"") for n in m.group("names").split(",") if n.strip()]


class Call(NamedTuple):
    start: int  # where gin's note starts in the message
    name: str  # the configurable's name (no module)
    obj: str  # how gin prints the object called
    scope: str  # "" unscoped


def configurable_calls(message: str) -> list[Call]:
    """gin's "In call to configurable ..." notes of an error raised inside configured calls,
    innermost first."""
    return [
        Call(m.start(), m.group("name"), m.group("obj"), m.group("scope") or "")
        for m in _CALL_RE.finditer(message)
    ]


def token_error_args(err: BaseException) -> tuple[Any, ...]:
    """The `args` of a `tokenize.TokenError` raised by gin's parser (gin's proxy drops them)."""
    return err.args or getattr(err.__context__, "args", ())


# ---- 8. statements and where they are ----------------------------------------------------------
class Statement(NamedTuple):
    """A statement of a gin text: an `include` (`selector` is the file) or a binding
    (`arg_name` "" for a macro's definition)."""

    line: int
    include: bool
    scope: str
    selector: str
    arg_name: str
    macros: tuple[str, ...]  # every `%NAME` the statement uses


REFERENCE = object()
"""What `statements` makes of a reference or a macro in a value (only the statements are read)."""


class _Recorder(gin.config_parser.ParserDelegate):
    """A parser delegate that only notes the macros a statement uses."""

    def __init__(self) -> None:
        self.macros: list[str] = []

    def configurable_reference(self, scoped_configurable_name: str, evaluate: bool) -> Any:
        return REFERENCE

    def macro(self, macro_name: str) -> Any:
        self.macros.append(macro_name)
        return REFERENCE


def statements(text: str) -> Iterator[Statement]:
    """The includes and bindings of a gin text in order, each with its line and the macros its
    value uses (other statements are skipped); gin's syntax errors pass through."""
    recorder = _Recorder()
    for st in gin.config_parser.ConfigParser(text, recorder):
        used = tuple(recorder.macros)
        recorder.macros.clear()
        if isinstance(st, gin.config_parser.IncludeStatement):
            yield Statement(st.location.line_num, True, "", st.filename, "", used)
        elif isinstance(st, gin.config_parser.BindingStatement):
            yield Statement(st.location.line_num, False, st.scope, st.selector, st.arg_name, used)
