"""The registry: what exists.

Each kind of plugin is an entry-point group `ulframe.<kind>`. Discovery goes through stevedore,
lazily: a kind's entries are found and imported the first time that kind is asked for. The
built-in plugins register through the same entry points as any third-party package (see
pyproject.toml); nothing registers itself at import time.

Rules:
- two entries of one kind with one name fail loudly, naming both distributions;
- an unknown name fails listing the valid ones (and the closest matches);
- an entry whose import fails is recorded and reported, the other entries still load;
- `ULFRAME_DISABLE_PLUGIN_AUTOLOAD=1` keeps only the entries of the `ulframe` distribution itself
  (as pytest's PYTEST_DISABLE_PLUGIN_AUTOLOAD does), unless a distribution is named in
  `ULFRAME_PLUGINS` (comma separated).

A `Registry` is an ordinary object; tests make their own with fake entries (`Registry.from_entries`)
so nothing leaks between them.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.metadata
import inspect
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from stevedore import ExtensionManager, NamedExtensionManager

from ulframe.errors import ContractError, PluginError

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = (
    "encoders",
    "priors",
    "decoders",
    "ae_decoders",
    "weightings",
    "schedules",
    "datasets",
    "stages",
    "samplers",
    "metrics",
    "hooks",
)
GROUP_PREFIX = "ulframe."
CORE_DISTRIBUTION = "ulframe"
DISABLE_ENV = "ULFRAME_DISABLE_PLUGIN_AUTOLOAD"
ENABLE_ENV = "ULFRAME_PLUGINS"


@dataclass(frozen=True)
class Entry:
    """One registered plugin: a factory of kind `kind`, bindable in gin as `@kind.name`."""

    kind: str
    name: str
    factory: Callable[..., Any]
    target: str  # "module:attr"
    distribution: str
    version: str

    @property
    def origin(self) -> str:
        return f"{self.kind}.{self.name} ({self.target}, from {self.distribution} {self.version})"

    def doc(self) -> str:
        """The first line of the factory's docstring."""
        text = inspect.getdoc(self.factory) or ""
        return text.strip().splitlines()[0] if text.strip() else ""

    def parameters(self) -> dict[str, str]:
        """Gin-configurable keyword parameters and their defaults (repr), `REQUIRED` if none."""
        try:
            sig = inspect.signature(self.factory)
        except (TypeError, ValueError):
            return {}
        out = {}
        for p in sig.parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name == "self":
                continue
            out[p.name] = "REQUIRED" if p.default is p.empty else _show(p.default)
        return out


def _show(value: Any) -> str:
    """A default value as text that does not change between processes (no addresses)."""
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{value.__module__}.{value.__qualname__}"
    return repr(value)


@dataclass(frozen=True)
class BrokenEntry:
    """An entry point whose import (or protocol check) failed."""

    kind: str
    name: str
    target: str
    distribution: str
    reason: str


@dataclass
class _Kind:
    entries: dict[str, Entry] = field(default_factory=dict)
    broken: dict[str, BrokenEntry] = field(default_factory=dict)


def _normalized(distribution: str) -> str:
    """A distribution name as pip compares them: `ulframe_example` is `ulframe-example` (PEP 503)."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _allowed(distribution: str) -> bool:
    if os.environ.get(DISABLE_ENV, "").strip() not in ("1", "true", "yes"):
        return True
    enabled = {
        _normalized(d.strip()) for d in os.environ.get(ENABLE_ENV, "").split(",") if d.strip()
    }
    return _normalized(distribution) in enabled | {CORE_DISTRIBUTION}


class Registry:
    """Entries of every kind, discovered lazily per kind."""

    def __init__(self, discover: bool = True) -> None:
        self._discover = discover
        self._kinds: dict[str, _Kind] = {}

    @classmethod
    def from_entries(cls, entries: Iterable[Entry]) -> Registry:
        """A registry holding exactly `entries` (no discovery): for tests and tools."""
        reg = cls(discover=False)
        for entry in entries:
            reg._add(reg._kind(entry.kind, discover=False), entry)
        return reg

    # -- discovery ---------------------------------------------------------------------------
    def _kind(self, kind: str, discover: bool | None = None) -> _Kind:
        if kind not in KINDS:
            raise PluginError(f"unknown plugin kind '{kind}'; kinds: {', '.join(KINDS)}")
        if kind not in self._kinds:
            self._kinds[kind] = _Kind()
            if self._discover if discover is None else discover:
                self._load_kind(kind)
        return self._kinds[kind]

    def _load_kind(self, kind: str) -> None:
        from ulframe.protocols import check_factory

        group = GROUP_PREFIX + kind
        state = self._kinds[kind]
        found: dict[tuple[str, str], tuple[str, str]] = {}  # (name, target) -> (dist, version)
        for ep in importlib.metadata.entry_points(group=group):
            dist = ep.dist.metadata["Name"] if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            if not _allowed(dist):
                log.debug("plugin autoload disabled: skipping %s.%s from %s", kind, ep.name, dist)
                continue
            found.setdefault((ep.name, ep.value), (dist, version))
        if not found:
            return
        failures: dict[tuple[str, str], str] = {}

        def on_failure(_manager: Any, ep: Any, err: BaseException) -> None:
            failures[(ep.name, ep.value)] = f"{type(err).__name__}: {err}"

        ExtensionManager.ENTRY_POINT_CACHE.pop(group, None)  # see newly installed packages
        manager: NamedExtensionManager[Any] = NamedExtensionManager(
            group, names=sorted({name for name, _ in found}), on_load_failure_callback=on_failure
        )
        loaded = {(e.name, e.entry_point.value): e.plugin for e in manager.extensions}
        for (name, target), (dist, version) in sorted(found.items()):
            failure = failures.get((name, target))
            if failure is None and (name, target) not in loaded:
                failure = "entry point was not loaded"
            if failure is None:
                problems = check_factory(kind, loaded[(name, target)])
                if problems:
                    failure = f"does not provide the {kind} protocol: {'; '.join(problems)}"
            if failure is not None:
                log.warning("plugin %s.%s from %s failed to load: %s", kind, name, dist, failure)
                state.broken[name] = BrokenEntry(kind, name, target, dist, failure)
                continue
            self._add(state, Entry(kind, name, loaded[(name, target)], target, dist, version))

    @staticmethod
    def _add(state: _Kind, entry: Entry) -> None:
        if entry.name in state.entries:
            other = state.entries[entry.name]
            raise PluginError(
                f"duplicate plugin name '{entry.kind}.{entry.name}': provided by "
                f"{other.distribution} ({other.target}) and by {entry.distribution} ({entry.target}); "
                "uninstall one of them or rename its entry point"
            )
        state.entries[entry.name] = entry

    # -- queries -----------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return sorted(self._kind(kind).entries)

    def entries(self, kind: str) -> list[Entry]:
        state = self._kind(kind)
        return [state.entries[n] for n in sorted(state.entries)]

    def broken(self, kind: str) -> list[BrokenEntry]:
        state = self._kind(kind)
        return [state.broken[n] for n in sorted(state.broken)]

    def all_entries(self) -> list[Entry]:
        return [e for kind in KINDS for e in self.entries(kind)]

    def get(self, kind: str, name: str) -> Entry:
        state = self._kind(kind)
        if name in state.entries:
            return state.entries[name]
        if name in state.broken:
            b = state.broken[name]
            raise PluginError(
                f"plugin '{kind}.{name}' from distribution {b.distribution} ({b.target}) "
                f"failed to load: {b.reason}"
            )
        valid = sorted(state.entries)
        close = difflib.get_close_matches(name, valid, n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise PluginError(
            f"no {kind} plugin named '{name}'{hint} valid names: {', '.join(valid) or '(none)'}"
        )

    def maker(self, kind: str, product: Any) -> Entry | None:
        """The entry of `kind` whose factory is `product` or its class; None when none is."""
        if kind not in KINDS:
            return None
        klass = type(product)
        return next(
            (e for e in self.entries(kind) if e.factory is product or e.factory is klass), None
        )


@contextlib.contextmanager
def naming_plugins(registry: Registry | None = None, source_of: Any = None) -> Iterator[None]:
    """A `ContractError` raised inside names the plugin (`kind.NAME (from DIST)`) in place of
    the product's class that the checking layer (data, diffusion) named it by: the entry that
    made the error's product, else the one that made `source_of` (what the checked object came
    from: the dataset whose `Source` is checked). Unchanged when no registered entry made
    either. The engine wraps its calls of those checks in this (`first_example` of the
    dataset, the construction of the experiment's stages)."""
    try:
        yield
    except ContractError as err:
        try:
            known = registry or Registry()
            entry = known.maker(err.kind, err.product) or known.maker(err.kind, source_of)
        except Exception:  # the message matters more than the name
            entry = None
        if entry is None:
            raise
        text = str(err)  # gin's wrapper of an error in a configured call appends its call trail
        said = text[len(err.who) :] if err.who and text.startswith(err.who) else f": {text}"
        plugin = f"{entry.kind}.{entry.name} (from {entry.distribution})"
        raise ContractError(plugin, said, err.kind, err.product) from err
