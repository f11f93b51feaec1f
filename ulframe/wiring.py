"""The one place that talks to gin: what is chosen, with which values.

`register(registry, engine=...)` makes every discovered entry bindable as `@<kind>.<name>` (for
example `@weightings.sigmoid()`, `@encoders.resnet`), plus the engine's own configurables
(`Experiment`, and what the layers above hand in as `engine`: `TrainSettings` and the LR schedules
as `@lr_schedules.warmup_cosine`, `ulframe.train.settings.CONFIGURABLES`), torch's optimizers as
`@optimizers.AdamW` and bitsandbytes' 8-bit optimizers as `@optimizers.AdamW8bit`.
`parse(files, bindings)` reads gin files and overrides and turns gin's errors into `ConfigError`s
that name the file, the line and the closest valid names. A removed selector registered as
`retired(message)` still parses, and `load` stops a config that binds or references it with
`message` (what replaced it).

Library and plugin modules never import gin; they receive plain objects. Only gin's public API
is used here; what ulframe needs of gin beyond it (its bindings, its search path, its error texts)
is in `ulframe.gin_adapter`, with the gin behaviours it relies on.
"""

from __future__ import annotations

import collections.abc
import contextlib
import difflib
import importlib.util
import inspect
import io
import logging
import os
import re
import tokenize
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import gin
import gin.config
import torch

from ulframe import gin_adapter
from ulframe.errors import ConfigError, UserError
from ulframe.experiment import Experiment
from ulframe.registry import KINDS, Registry, naming_plugins

log = logging.getLogger(__name__)

# selector -> the callable registered under it (what `ulframe plugins` and error hints read)
_registered: dict[str, Callable[..., Any]] = {}

ENGINE_MODULE = "ulframe"


def _torch_optimizers() -> dict[str, Callable[..., Any]]:
    out: dict[str, Callable[..., Any]] = {}
    for name in ("AdamW", "Adam", "SGD", "RAdam", "Adagrad", "RMSprop", "Adamax", "NAdam"):
        out[name] = getattr(torch.optim, name)
    return out


BNB_OPTIMIZERS = ("AdamW8bit", "Adam8bit", "PagedAdamW8bit")


class LazyOptimizer:
    """`bitsandbytes.optim.<name>`, imported when first called.

    Importing bitsandbytes takes seconds (it loads torch's compiler stack), which every
    `ulframe config` and `run` would pay for optimizers few configs use. gin sees the signature
    `(params, **kwargs)`, so `check_required` checks the names bound to it against the real class.
    """

    __signature__ = inspect.Signature(
        [
            inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
        ]
    )

    def __init__(self, name: str) -> None:
        self.__name__ = self.__qualname__ = name
        self.__module__ = "bitsandbytes.optim"
        self.__doc__ = f"bitsandbytes.optim.{name}: 8-bit optimizer states (imported on first use)."

    def target(self) -> Callable[..., Any]:
        try:
            import bitsandbytes.optim as bnb_optim
        except Exception as err:  # a broken install fails only the configs that use it
            raise ConfigError(f"optimizers.{self.__name__} needs bitsandbytes: {err}") from err
        return getattr(bnb_optim, self.__name__)

    def __call__(self, params: Any, **kwargs: Any) -> Any:
        return self.target()(params, **kwargs)


def retired(message: str) -> Callable[..., Any]:
    """A configurable that was removed, to register under its old selector (`register`'s
    `engine`): gin still parses old files that bind or reference it (any parameter), and `load`
    stops on them with `message`, which names what replaced it; called, it raises the same."""

    def removed(**kwargs: Any) -> Any:
        raise ConfigError(message)

    removed.retired = message  # type: ignore[attr-defined]
    return removed


def check_retired() -> None:
    """No binding of a `retired` configurable, nor a reference to one (in any bound value,
    macros included): a `ConfigError` with its message, at the binding's file:line."""
    gone = {s: o for s, o in _registered.items() if getattr(o, "retired", None) is not None}
    if not gone:
        return
    for (scope, selector), params in gin_adapter.bindings().items():
        for name, value in params.items():
            obj = gone.get(selector)
            if obj is None:
                obj = next((o for o in gone.values() if _refers_to(value, o)), None)
            if obj is not None:
                raise ConfigError(f"{_location(scope, selector, name)}{obj.retired}")  # type: ignore[attr-defined]


def _refers_to(value: Any, obj: Callable[..., Any]) -> bool:
    if isinstance(value, gin.config.ConfigurableReference):
        return value.configurable.wrapped is obj
    if isinstance(value, list | tuple):
        return any(_refers_to(v, obj) for v in value)
    if isinstance(value, dict):
        return any(_refers_to(v, obj) for v in value.values())
    return False


def _bnb_optimizers() -> dict[str, Callable[..., Any]]:
    if importlib.util.find_spec("bitsandbytes") is None:
        log.debug("bitsandbytes is not installed: 8-bit optimizers are not registered")
        return {}
    return {n: LazyOptimizer(n) for n in BNB_OPTIMIZERS}


def _register_one(selector: str, obj: Callable[..., Any]) -> None:
    # A different object under this name (tests build their own registries) is replaced.
    gin_adapter.replace_configurable(obj, selector)
    _registered[selector] = obj


def register(registry: Registry, *, engine: Mapping[str, Callable[..., Any]]) -> None:
    """Clear gin's bindings and register every configurable ulframe knows of: `registry`'s
    entries, `Experiment`, torch's and bitsandbytes' optimizers, and `engine`, the configurables
    of the layers above this one by selector (`ulframe.train.settings.CONFIGURABLES`:
    `ulframe.TrainSettings`, `lr_schedules.*`)."""
    gin.clear_config()
    _registered.clear()
    _register_one(f"{ENGINE_MODULE}.Experiment", Experiment)
    for selector, obj in engine.items():
        _register_one(selector, obj)
    for name, obj in {**_torch_optimizers(), **_bnb_optimizers()}.items():
        _register_one(f"optimizers.{name}", obj)
    for kind in KINDS:
        for entry in registry.entries(kind):
            _register_one(f"{kind}.{entry.name}", entry.factory)
    _REGISTRY_FOR_HINTS[0] = registry


_REGISTRY_FOR_HINTS: list[Registry | None] = [None]


# ---- parsing and its errors --------------------------------------------------------------------
def _parameters(obj: Callable[..., Any]) -> list[str]:
    target = obj.__init__ if inspect.isclass(obj) else obj  # type: ignore[misc]
    try:
        return [p for p in inspect.signature(target).parameters if p != "self"]
    except (TypeError, ValueError):
        return []


def _lookup(selector: str) -> Callable[..., Any] | None:
    selector = selector.split("/")[-1]
    if selector in _registered:
        return _registered[selector]
    matches = [s for s in _registered if s.endswith("." + selector)]
    return _registered[matches[0]] if len(matches) == 1 else None


def _suggest(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _broken_hint(selector: str) -> str:
    registry = _REGISTRY_FOR_HINTS[0]
    kind, _, name = selector.split("/")[-1].rpartition(".")
    if registry is None or kind not in KINDS:
        return ""
    for b in registry.broken(kind):
        if b.name == name:
            return f" The plugin exists but failed to load (distribution {b.distribution}, {b.target}): {b.reason}"
    return ""


OVERRIDES = "--gin override"


def _at(file: str | None, line: int | str, bindings: Sequence[str]) -> str:
    """`file:line: `, or the override itself (its position on the command line is unclear)."""
    if file != OVERRIDES:
        return f"{file}:{line}: "
    lines = "\n".join(bindings).splitlines()
    if isinstance(line, int) and 0 < line <= len(lines):
        return f"{OVERRIDES} '{lines[line - 1].strip()}': "
    return f"{OVERRIDES} line {line}: "


def _where(message: str, default_file: str | None, bindings: Sequence[str] = ()) -> str:
    at = gin_adapter.error_location(message)
    if at is None:
        return f"{default_file}: " if default_file else ""
    if at.file is not None:
        return f"{at.file}:{at.line}: "
    return _at(OVERRIDES, at.line, bindings)


_BRACKETS = {"(": ")", "[": "]", "{": "}"}


def _unclosed(text: str) -> tuple[str, int] | None:
    """The outermost bracket of `text` that is never closed, and its line (1-based); strings
    and comments are skipped."""
    stack: list[tuple[str, int]] = []
    quote, line, i = "", 1, 0
    while i < len(text):
        c = text[i]
        if c == "\n":
            line, quote = line + 1, ""  # gin strings do not span lines
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c == "#":
            while i + 1 < len(text) and text[i + 1] != "\n":
                i += 1
        elif c in _BRACKETS:
            stack.append((c, line))
        elif c in _BRACKETS.values() and stack and _BRACKETS[stack[-1][0]] == c:
            stack.pop()
        i += 1
    return stack[0] if stack else None


_BARE_STRING = re.compile(r"[A-Za-z_./~][\w./~:+-]*")


def _quote_hint(binding: str) -> str:
    """For `NAME = value` whose value is a bare word or path: how to pass it as a string."""
    name, _, value = binding.partition("=")
    value = value.strip()
    if _BARE_STRING.fullmatch(value) and value not in ("True", "False", "None"):
        return f" (a string needs quotes: --gin.{name.strip()}=\"'{value}'\")"
    return ""


def explain(
    err: BaseException, file: str | None = None, bindings: Sequence[str] = ()
) -> ConfigError:
    """Turn one of gin's exceptions into a short `ConfigError` a person can act on."""
    msg = str(err)
    first = msg.splitlines()[0] if msg else type(err).__name__
    where = _where(msg, file, bindings)
    overrides = "\n".join(bindings).splitlines()
    if file == OVERRIDES and (bracket := _unclosed("\n".join(overrides))):
        return ConfigError(
            f"{_at(file, bracket[1], bindings)}gin syntax error: '{bracket[0]}' is never closed"
        )
    if isinstance(err, SyntaxError):
        lineno = err.lineno
        loc = _at(err.filename or file, lineno, bindings) if lineno else where
        hint = ""
        if file == OVERRIDES and lineno and 0 < lineno <= len(overrides):
            hint = _quote_hint(overrides[lineno - 1])
        return ConfigError(f"{loc}gin syntax error: {err.msg}{hint}")
    if isinstance(err, tokenize.TokenError):
        args = gin_adapter.token_error_args(err)
        line = args[1][0] if len(args) > 1 else "?"
        reason = args[0] if args else "unexpected end of input"
        return ConfigError(
            f"{_at(file, line, bindings)}gin syntax error: {reason} (unclosed bracket?)"
        )
    if unknown := gin_adapter.unknown_parameter(msg):
        conf, param = unknown
        obj = _lookup(conf)
        valid = _parameters(obj) if obj else []
        hint = _suggest(param, valid) or (f" Valid: {', '.join(valid)}." if valid else "")
        return ConfigError(f"{where}'{conf}' has no parameter '{param}'.{hint}")
    if sel := gin_adapter.unknown_configurable(msg):
        short = {s.split(".")[-1] for s in _registered} | set(_registered)
        hint = _broken_hint(sel) or _suggest(sel.split("/")[-1], short)
        return ConfigError(
            f"{where}unknown configurable '{sel}'.{hint} (`ulframe plugins` lists them)"
        )
    if required := gin_adapter.missing_required(msg):
        conf, names = required
        return ConfigError(
            f"missing required parameter(s) of {conf}: {', '.join(names)} (bind them in a gin file or with --gin.NAME=VALUE)"
        )
    return ConfigError(f"{where}{first}")


# Every gin file read (includes too), in order, for `_index`; and the include chain being read.
_sources: list[tuple[str, str]] = []
_including: list[str] = []


class _NamedText(io.StringIO):
    """A file's text for gin's parser, which names the file in its errors (`.name`)."""

    def __init__(self, text: str, name: str) -> None:
        super().__init__(text)
        self.name = name


@contextlib.contextmanager
def _open_gin_file(path: str) -> Iterator[TextIO]:
    """Open a gin file with its folder first in gin's search list while gin parses it.

    So `include 'presets/x.gin'` resolves relative to the including file's folder at every
    level of nesting (then to the working directory), and the search list is the same after.
    A file that includes itself (through any chain) is refused; a bracket left open is named
    at the line that opens it.
    """
    real = os.path.realpath(path)
    if real in _including:
        chain = " -> ".join([*_including[_including.index(real) :], real])
        raise ConfigError(f"circular include: {chain}")
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read gin file ({err})") from err
    _sources.append((path, text))
    _including.append(real)
    try:
        with gin_adapter.search_path_first(os.path.dirname(os.path.abspath(path))):
            yield _NamedText(text, path)
    except (tokenize.TokenError, SyntaxError) as err:
        # As a SyntaxError it keeps naming this file when it is included (gin passes
        # SyntaxErrors through includes untouched, and hides other errors' arguments).
        if isinstance(err, SyntaxError) and err.filename != path:
            raise  # an included file's
        if bracket := _unclosed(text):
            raise SyntaxError(f"'{bracket[0]}' is never closed", (path, bracket[1], 0, "")) from err
        if isinstance(err, SyntaxError):
            raise
        line = err.args[1][0] if len(err.args) > 1 else None
        raise SyntaxError(f"{err.args[0]} (unclosed bracket?)", (path, line, 0, "")) from err
    finally:
        _including.pop()


def _install_gin_file_reader() -> None:
    gin_adapter.read_files_with(_open_gin_file, os.path.isfile)


def parse(files: Sequence[str | Path], bindings: Sequence[str] = ()) -> None:
    """Parse gin files in order, then the binding strings (command-line overrides)."""
    _sources.clear()
    _including.clear()
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise ConfigError(f"{f}: gin file not found")
        _install_gin_file_reader()
        try:
            gin.parse_config_file(str(path.resolve()))
        except (ValueError, SyntaxError, tokenize.TokenError, TypeError, OSError) as err:
            raise explain(err, str(path)) from err
        except (UserError, RecursionError) as err:  # ours, raised inside gin's include chain
            raise ConfigError(f"{_where(str(err), str(path))}{_first_line(err)}") from err
    try:
        gin.parse_config(list(bindings))
    except (ValueError, SyntaxError, tokenize.TokenError, TypeError) as err:
        raise explain(err, OVERRIDES, bindings) from err
    _index(bindings)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---- where each binding is written, for messages about its value -------------------------------
# (scope, selector, parameter) -> "file:line: " of the binding that wins (the last one).
_locations: dict[tuple[str, str, str], str] = {}
# (macro name, "file:line: ") of every `%NAME` in a value.
_macro_uses: list[tuple[str, str]] = []


_REFERENCE = object()  # a value that is a reference: its type is not checked


def _index(bindings: Sequence[str]) -> None:
    """Re-read every parsed file and the overrides in gin's order (an include's bindings where
    the include is), noting where each binding and each macro use is."""
    _locations.clear()
    _macro_uses.clear()
    sources = iter(_sources)  # in the order gin opened them: depth first

    def walk(file: str, text: str) -> None:
        try:
            for st in gin_adapter.statements(text):
                if st.include:
                    walk(*next(sources, (file, "")))
                    continue
                where = _at(file, st.line, bindings)
                _macro_uses.extend((name, where) for name in st.macros)
                if not st.arg_name:
                    macro = f"{st.scope}/{st.selector}" if st.scope else st.selector
                    _locations[(macro, "gin.macro", "value")] = where
                else:
                    selector = _complete_selector(st.scope, st.selector, st.arg_name)
                    _locations[(st.scope, selector, st.arg_name)] = where
        except Exception:  # gin parsed it already; a location is only a nicety
            return

    for file, text in sources:
        walk(file, text)
    walk(OVERRIDES, "\n".join(bindings))


def _location(scope: str, selector: str, param: str, value: Any = None) -> str:
    """`file:line: ` of a binding (of the macro, when its value is `%MACRO`); without a scope
    match, the binding of that parameter in any scope whose value is `value` (or the last one)."""
    key = (scope, selector, param)
    if key not in _locations:
        others = [k for k in _locations if k[1:] == (selector, param)]
        same = [k for k in others if value is not None and _bound(k) == value]
        if not others:
            return ""
        key = (same or others)[-1]
    raw = _bound(key)
    for _ in range(16):  # a macro of a macro ...; a loop ends here
        if not (isinstance(raw, gin.config.ConfigurableReference) and raw.selector == "gin.macro"):
            break
        key = ("/".join(raw.scopes), "gin.macro", "value")
        raw = _bound(key)
    return _locations.get(key, "")


def _complete_selector(scope: str, selector: str, param: str) -> str:
    """The selector gin stores a binding of `selector` (maybe partial, `resnet`) under."""
    try:
        return gin.config.ParsedBindingKey.parse((scope, selector, param)).complete_selector
    except ValueError:
        return selector


def _bound(key: tuple[str, str, str]) -> Any:
    """The value bound to (scope, selector, parameter) as parsed (macros and references not
    resolved), `_REFERENCE` when none is."""
    scope, selector, param = key
    try:
        found = gin.get_bindings(
            f"{scope}/{selector}" if scope else selector,
            resolve_references=False,
            inherit_scopes=False,
        )
    except ValueError:
        return _REFERENCE
    return found.get(param, _REFERENCE)


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a gin-configured callable, explaining missing or wrong bindings."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError) as err:
        if gin_adapter.missing_required(str(err)) or gin_adapter.unknown_configurable(str(err)):
            raise explain(err) from err
        raise


def configured(selector: str) -> Callable[..., Any]:
    """The gin-wrapped callable registered as `selector` (e.g. 'ulframe.Experiment')."""
    return gin.get_configurable(selector)


def macro(name: str, value: str) -> str:
    """A `--gin.NAME=VALUE` override as a gin binding string."""
    return f"{name} = {value}"


def operative_config() -> str:
    return gin.operative_config_str()


def full_config() -> str:
    return gin.config_str()


def registered() -> dict[str, Callable[..., Any]]:
    """Every selector ulframe registered with gin, and its callable."""
    return dict(_registered)


def check_required() -> None:
    """Every parameter without a default, of everything the config references, must be bound.

    A reference that gin calls (`@encoders.resnet()`) needs all of them; a factory passed without
    a call (`@encoders.resnet`) is called by the engine, which supplies the arguments of its
    kind's call signature (`protocols.SUPPLIED_BY_ENGINE`).
    """
    from ulframe.protocols import SUPPLIED_BY_ENGINE

    bound: dict[str, set[str]] = {}
    for (_scope, selector), names in gin_adapter.bindings().items():
        bound.setdefault(selector, set()).update(names)
        lazy = _registered.get(selector)
        if isinstance(lazy, LazyOptimizer):  # gin could not check these names (see LazyOptimizer)
            valid = _parameters(lazy.target())
            for name in sorted(set(names) - set(valid)):
                hint = _suggest(name, valid) or f" Valid: {', '.join(valid)}."
                raise ConfigError(f"'{selector}' has no parameter '{name}'.{hint}")
    missing: list[str] = []
    for ref in gin.config.iterate_references(gin_adapter.bindings()):
        selector = ref.configurable.selector  # complete (`ref.selector` is as written)
        obj = _lookup(selector)
        if obj is None:
            continue
        full = next((s for s, o in _registered.items() if o is obj), selector)
        kind = full.rpartition(".")[0]
        target = obj.__init__ if inspect.isclass(obj) else obj  # type: ignore[misc]
        try:
            params = inspect.signature(target).parameters.values()
        except (TypeError, ValueError):
            continue
        needed = {
            p.name
            for p in params
            if p.default is p.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and p.name != "self"
        }
        if not ref.evaluate:
            needed -= SUPPLIED_BY_ENGINE.get(kind, set())
        missing += [f"{full}.{n}" for n in sorted(needed - bound.get(full, set()))]
    if missing:
        raise ConfigError(
            f"missing required parameter(s): {', '.join(sorted(set(missing)))} "
            "(bind them in a gin file or with --gin.NAME=VALUE)"
        )


# ---- values: types, macros, and errors raised by the configurables themselves ---------------
def check_values() -> None:
    """Every `%MACRO` used is defined, and every bound value has its parameter's annotated type
    (int, float, bool, str, None, Literal, tuples and lists of them); `file:line` in errors."""
    defined = {scope for scope, selector in gin_adapter.bindings() if selector == "gin.macro"}
    for name, where in _macro_uses:
        if name not in defined and not gin_adapter.is_constant(name):
            raise ConfigError(
                f"{where}undefined macro %{name}: define it in a gin file (`{name} = ...`) "
                f"or with --gin.{name}=VALUE"
            )
    for (scope, selector), params in gin_adapter.bindings().items():
        hints = _type_hints(_registered.get(selector))
        for name, value in params.items():
            expected = hints.get(name)
            value = _resolved(value)
            if expected is None or _matches(value, expected):
                continue
            shown = selector.removeprefix(f"{ENGINE_MODULE}.")
            binding = f"{scope}/{shown}" if scope else shown
            raise ConfigError(
                f"{_location(scope, selector, name)}{binding}.{name}: expected "
                f"{_type_name(expected)}, got {type(value).__name__} {value!r}"
            )


def _type_hints(obj: Callable[..., Any] | None) -> dict[str, Any]:
    if obj is None or isinstance(obj, LazyOptimizer):
        return {}
    target = obj.__init__ if inspect.isclass(obj) and not _is_dataclass(obj) else obj  # type: ignore[misc]
    try:
        return typing.get_type_hints(target)
    except Exception:  # an annotation that does not resolve here: not checked
        return {}


def _is_dataclass(obj: Any) -> bool:
    import dataclasses

    return dataclasses.is_dataclass(obj)


def _resolved(value: Any, depth: int = 0) -> Any:
    """A bound value with macros replaced by their values; other references stay references."""
    if isinstance(value, gin.config.ConfigurableReference):
        if value.configurable.wrapped is gin.config.macro and value.evaluate:
            key = ("/".join(value.scopes), "gin.macro")
            if depth > 16:
                raise ConfigError(f"{_location(*key, 'value')}macro %{key[0]} refers to itself")
            return _resolved(_bound((*key, "value")), depth + 1)
        return _REFERENCE
    if isinstance(value, list | tuple):
        return type(value)(_resolved(v, depth) for v in value)
    return value


_PLAIN = {int: "an int", float: "a number", bool: "True or False", str: "a string"}
_PLURAL = {int: "ints", float: "numbers", bool: "bools", str: "strings"}


def _matches(value: Any, tp: Any) -> bool:
    """Whether `value` fits `tp`; only plain types are checked, anything else passes."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if value is _REFERENCE or tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp in _PLAIN:
        if tp is float:
            return isinstance(value, int | float) and not isinstance(value, bool)
        return isinstance(value, tp) and (tp is bool or not isinstance(value, bool))
    if origin is typing.Literal:
        return value in args
    if origin in (tuple, list, collections.abc.Sequence):
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(_matches, value, args))
        return not args or all(_matches(v, args[0]) for v in value)
    return True


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if tp is type(None):
        return "None"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list, collections.abc.Sequence):
        return f"a tuple of {_PLURAL.get(args[0], _type_name(args[0]))}" if args else "a tuple"
    return _PLAIN.get(tp, getattr(tp, "__name__", str(tp)))


def describe(err: BaseException) -> str:
    """The message of a `UserError` raised inside a gin-configured call, as one line: gin's
    "In call to configurable ..." lines become the plugin's name (and its scope) and, when the
    message names one of its parameters (`kind.name.param`), the file:line that binds it."""
    text = str(err)
    calls = gin_adapter.configurable_calls(text)
    if not calls:
        return text
    message = text[: calls[0].start].strip()
    name, scope = calls[0].name, calls[0].scope
    selector = _selector_called(name, calls[0].obj)
    plugin = f"{scope}/{selector}" if scope else selector
    params = _parameters(_registered[selector]) if selector in _registered else []
    named = re.search(rf"\b{re.escape(name)}\.(\w+)", message)
    mentioned = [named.group(1)] if named else re.findall(r"\w+", message)
    where = next((w for p in mentioned if p in params and (w := _location(scope, selector, p))), "")
    if name not in message:
        message = f"{plugin}: {message}"
    return f"{where}{message}"


def _selector_called(name: str, obj: str) -> str:
    """The registered selector of gin's configurable `name` whose object prints as `obj`."""
    found = [s for s in _registered if s.rpartition(".")[2] == name]
    exact = [
        s for s in found
        if f"{_registered[s].__module__}.{getattr(_registered[s], '__qualname__', '')}" in obj
    ]  # fmt: skip
    return (exact or found or [name])[0]


# ---- one call for the commands -----------------------------------------------------------------
def load(
    files: Sequence[str | Path],
    bindings: Sequence[str] = (),
    *,
    engine: Mapping[str, Callable[..., Any]],
) -> Registry:
    """Discover plugins, register them with `engine` (see `register`), parse files and overrides
    and check them (no retired configurable, required bindings, value types) before any
    constructor runs; the registry."""
    registry = Registry()
    register(registry, engine=engine)
    parse(files, bindings)
    check_retired()
    check_required()
    check_values()
    return registry


def add_search_paths(folders: Sequence[str | Path]) -> None:
    """Folders where gin also looks up `include` lines (after the including file's folder and
    the working directory): `--gin-search-path`."""
    for folder in folders:
        if str(folder) not in gin_adapter.search_paths():
            gin.add_config_file_search_path(str(folder))


def experiment() -> Any:
    """The configured `Experiment` (gin calls every constructor it references); a product that
    breaks its kind's contract there (a stage's weighting) is named by its plugin."""
    with naming_plugins(_REGISTRY_FOR_HINTS[0]):
        return call(configured(f"{ENGINE_MODULE}.Experiment"))
