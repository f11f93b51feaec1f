"""The one place that talks to gin: what is chosen, with which values.

`register(registry)` makes every discovered entry bindable as `@<kind>.<name>` (for example
`@weightings.sigmoid()`, `@encoders.resnet`), plus the engine's own configurables (`Experiment`,
`TrainSettings`), torch's optimizers and LR schedules as `@optimizers.AdamW`,
`@lr_schedules.warmup_cosine` and bitsandbytes' 8-bit optimizers as `@optimizers.AdamW8bit`.
`parse(files, bindings)` reads gin files and overrides and turns gin's errors into `ConfigError`s
that name the file, the line and the closest valid names.

Library and plugin modules never import gin; they receive plain objects.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import inspect
import logging
import os
import re
import tokenize
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import gin
import gin.config
import torch

from ulframe.errors import ConfigError
from ulframe.registry import KINDS, Registry

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


def _bnb_optimizers() -> dict[str, Callable[..., Any]]:
    if importlib.util.find_spec("bitsandbytes") is None:
        log.debug("bitsandbytes is not installed: 8-bit optimizers are not registered")
        return {}
    return {n: LazyOptimizer(n) for n in BNB_OPTIMIZERS}


def _lr_schedules() -> dict[str, Callable[..., Any]]:
    from ulframe.train import optim

    # Counted in samples (see ulframe/train/optim.py), hence not torch's step-based schedulers.
    return {"warmup_constant": optim.warmup_constant, "warmup_cosine": optim.warmup_cosine}


def _engine_configurables() -> dict[str, Callable[..., Any]]:
    from ulframe.experiment import Experiment
    from ulframe.train.settings import TrainSettings

    return {"Experiment": Experiment, "TrainSettings": TrainSettings}


def _register_one(selector: str, obj: Callable[..., Any]) -> None:
    module, _, name = selector.rpartition(".")
    existing = gin.config._REGISTRY.get(selector)
    if existing is not None and existing.wrapped is not obj:
        # A different object under this name (tests build their own registries): replace it.
        gin.config._REGISTRY.pop(selector)
    gin.external_configurable(obj, name=name, module=module)
    _registered[selector] = obj


def register(registry: Registry) -> None:
    """Clear gin's bindings and register every configurable ulframe knows of."""
    gin.clear_config()
    _registered.clear()
    for name, obj in _engine_configurables().items():
        _register_one(f"{ENGINE_MODULE}.{name}", obj)
    for name, obj in {**_torch_optimizers(), **_bnb_optimizers()}.items():
        _register_one(f"optimizers.{name}", obj)
    for name, obj in _lr_schedules().items():
        _register_one(f"lr_schedules.{name}", obj)
    for kind in KINDS:
        for entry in registry.entries(kind):
            _register_one(f"{kind}.{entry.name}", entry.factory)
    _REGISTRY_FOR_HINTS[0] = registry


_REGISTRY_FOR_HINTS: list[Registry | None] = [None]


# ---- parsing and its errors --------------------------------------------------------------------
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
    m = _LOCATION_RE.search(message)
    if m is None:
        return f"{default_file}: " if default_file else ""
    if m.group("file"):
        return f"{m.group('file')}:{m.group('line')}: "
    return _at(OVERRIDES, int(m.group("bline")), bindings)


def explain(
    err: BaseException, file: str | None = None, bindings: Sequence[str] = ()
) -> ConfigError:
    """Turn one of gin's exceptions into a short `ConfigError` a person can act on."""
    msg = str(err)
    first = msg.splitlines()[0] if msg else type(err).__name__
    where = _where(msg, file, bindings)
    if isinstance(err, SyntaxError):
        loc = _at(err.filename or file, err.lineno, bindings) if err.lineno else where
        return ConfigError(f"{loc}gin syntax error: {err.msg}")
    if isinstance(err, tokenize.TokenError):
        args = err.args or getattr(err.__context__, "args", ())  # gin's proxies drop args
        line = args[1][0] if len(args) > 1 else "?"
        reason = args[0] if args else "unexpected end of input"
        return ConfigError(
            f"{_at(file, line, bindings)}gin syntax error: {reason} (unclosed bracket?)"
        )
    if m := _NO_PARAM_RE.search(msg):
        obj = _lookup(m.group("conf"))
        valid = _parameters(obj) if obj else []
        hint = _suggest(m.group("param"), valid) or (
            f" Valid: {', '.join(valid)}." if valid else ""
        )
        return ConfigError(
            f"{where}'{m.group('conf')}' has no parameter '{m.group('param')}'.{hint}"
        )
    if m := _NO_CONF_RE.search(msg):
        sel = m.group("sel")
        short = {s.split(".")[-1] for s in _registered} | set(_registered)
        hint = _broken_hint(sel) or _suggest(sel.split("/")[-1], short)
        return ConfigError(
            f"{where}unknown configurable '{sel}'.{hint} (`ulframe plugins` lists them)"
        )
    if m := _REQUIRED_RE.search(msg):
        names = m.group("names").replace("'", "")
        return ConfigError(
            f"missing required parameter(s) of {m.group('conf')}: {names} (bind them in a gin file or with --gin.NAME=VALUE)"
        )
    return ConfigError(f"{where}{first}")


@contextlib.contextmanager
def _open_gin_file(path: str) -> Iterator[TextIO]:
    """Open a gin file with its folder first in gin's search list while gin parses it.

    So `include 'presets/x.gin'` resolves relative to the including file's folder at every
    level of nesting (then to the working directory), and the search list is the same after.
    """
    prefixes = gin.config._LOCATION_PREFIXES
    prefixes.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        with open(path) as f:
            yield f
    except tokenize.TokenError as err:
        # As a SyntaxError it keeps naming this file when it is included (gin passes
        # SyntaxErrors through includes untouched, and hides other errors' arguments).
        line = err.args[1][0] if len(err.args) > 1 else None
        raise SyntaxError(f"{err.args[0]} (unclosed bracket?)", (path, line, 0, "")) from err
    finally:
        prefixes.pop(0)


def _install_gin_file_reader() -> None:
    readers = gin.config._FILE_READERS
    if not readers or readers[0][0] is not _open_gin_file:
        readers.insert(0, (_open_gin_file, os.path.isfile))


def parse(files: Sequence[str | Path], bindings: Sequence[str] = ()) -> None:
    """Parse gin files in order, then the binding strings (command-line overrides)."""
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise ConfigError(f"{f}: gin file not found")
        _install_gin_file_reader()
        try:
            gin.parse_config_file(str(path.resolve()))
        except (ValueError, SyntaxError, tokenize.TokenError, TypeError, OSError) as err:
            raise explain(err, str(path)) from err
    try:
        gin.parse_config(list(bindings))
    except (ValueError, SyntaxError, tokenize.TokenError, TypeError) as err:
        raise explain(err, OVERRIDES, bindings) from err


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a gin-configured callable, explaining missing or wrong bindings."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError) as err:
        if _REQUIRED_RE.search(str(err)) or _NO_CONF_RE.search(str(err)):
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


_REF_RE = re.compile(r"@(?P<sel>(?:\w+/)*[\w.]+)(?P<call>\(\))?")


def check_required() -> None:
    """Every parameter without a default, of everything the config references, must be bound.

    A reference that gin calls (`@encoders.resnet()`) needs all of them; a factory passed without
    a call (`@encoders.resnet`) is called by the engine, which supplies the arguments of its
    kind's call signature (`protocols.SUPPLIED_BY_ENGINE`).
    """
    from ulframe.protocols import SUPPLIED_BY_ENGINE

    bound: dict[str, set[str]] = {}
    for (_scope, selector), params in gin.config._CONFIG.items():
        bound.setdefault(selector, set()).update(params)
        lazy = _registered.get(selector)
        if isinstance(lazy, LazyOptimizer):  # gin could not check these names (see LazyOptimizer)
            valid = _parameters(lazy.target())
            for name in sorted(set(params) - set(valid)):
                hint = _suggest(name, valid) or f" Valid: {', '.join(valid)}."
                raise ConfigError(f"'{selector}' has no parameter '{name}'.{hint}")
    missing: list[str] = []
    for m in _REF_RE.finditer(gin.config_str()):
        selector = m.group("sel").split("/")[-1]
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
        if not m.group("call"):
            needed -= SUPPLIED_BY_ENGINE.get(kind, set())
        missing += [f"{full}.{n}" for n in sorted(needed - bound.get(full, set()))]
    if missing:
        raise ConfigError(
            f"missing required parameter(s): {', '.join(sorted(set(missing)))} "
            "(bind them in a gin file or with --gin.NAME=VALUE)"
        )
