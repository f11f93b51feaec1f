"""The registry: isolation, duplicates, unknown names, real discovery, broken entries, switches.

Registries built with `Registry.from_entries` hold fake entries and nothing else; discovery tests
put throwaway distributions (a dist-info folder with entry_points.txt) on sys.path.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ulframe.errors import PluginError
from ulframe.registry import DISABLE_ENV, ENABLE_ENV, KINDS, Entry, Registry

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_DISTRIBUTION = "ulframe-example"


def fake(kind: str, name: str, distribution: str = "fake-dist", target: str = "") -> Entry:
    def factory(scale: float = 1.0) -> object:
        """A fake factory."""
        return object()

    return Entry(kind, name, factory, target or f"fake_module:{name}", distribution, "1.0")


def builtin_entry_points() -> dict[str, dict[str, str]]:
    """{kind: {name: "module:attr"}} as declared in pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    groups = project["entry-points"]
    return {kind: dict(groups.get(f"ulframe.{kind}", {})) for kind in KINDS}


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    monkeypatch.delenv(ENABLE_ENV, raising=False)
    return monkeypatch


# ---- registries built from entries --------------------------------------------------------------
def test_from_entries_registries_are_isolated() -> None:
    a = Registry.from_entries([fake("weightings", "w1")])
    b = Registry.from_entries([fake("weightings", "w2"), fake("hooks", "h")])
    assert a.names("weightings") == ["w1"]
    assert b.names("weightings") == ["w2"]
    assert a.names("hooks") == []  # no discovery: the built-in hooks are not there
    assert [e.name for e in b.all_entries()] == ["w2", "h"]


def test_duplicate_names_fail_naming_both_distributions() -> None:
    first = fake("weightings", "edm", "dist-one", "one.weighting:EDM")
    second = fake("weightings", "edm", "dist-two", "two.weighting:EDM")
    with pytest.raises(PluginError) as err:
        Registry.from_entries([first, second])
    assert str(err.value) == (
        "duplicate plugin name 'weightings.edm': provided by dist-one (one.weighting:EDM) and by "
        "dist-two (two.weighting:EDM); uninstall one of them or rename its entry point"
    )


def test_same_name_in_two_kinds_is_not_a_duplicate() -> None:
    reg = Registry.from_entries([fake("weightings", "x"), fake("metrics", "x")])
    assert reg.get("weightings", "x").kind == "weightings"
    assert reg.get("metrics", "x").kind == "metrics"


def test_unknown_name_lists_valid_names_and_the_closest() -> None:
    reg = Registry.from_entries([fake("weightings", n) for n in ("sigmoid", "elbo", "edm")])
    with pytest.raises(PluginError) as err:
        reg.get("weightings", "sigmod")
    assert str(err.value) == (
        "no weightings plugin named 'sigmod'; did you mean 'sigmoid'? valid names: edm, elbo, sigmoid"
    )
    with pytest.raises(PluginError) as err:
        reg.get("weightings", "zzz")
    assert str(err.value) == "no weightings plugin named 'zzz' valid names: edm, elbo, sigmoid"


def test_unknown_kind_lists_the_kinds() -> None:
    with pytest.raises(PluginError) as err:
        Registry.from_entries([]).names("weighting")
    assert str(err.value) == f"unknown plugin kind 'weighting'; kinds: {', '.join(KINDS)}"


def test_entry_describes_itself() -> None:
    entry = fake("weightings", "w")
    assert entry.origin == "weightings.w (fake_module:w, from fake-dist 1.0)"
    assert entry.doc() == "A fake factory."
    assert entry.parameters() == {"scale": "1.0"}


# ---- discovery through real entry points ---------------------------------------------------------
def test_discovery_finds_every_builtin_of_every_kind(no_env: pytest.MonkeyPatch) -> None:
    reg = Registry()
    declared = builtin_entry_points()
    assert set(declared) == set(KINDS)
    for kind in KINDS:
        assert declared[kind], f"pyproject.toml declares no built-in {kind}"
        found = {e.name: e for e in reg.entries(kind) if e.distribution == "ulframe"}
        assert {n: e.target for n, e in found.items()} == declared[kind], kind
        assert [b for b in reg.broken(kind) if b.distribution == "ulframe"] == [], kind
        for entry in found.values():
            assert entry.version  # the installed version, e.g. "0.1.0"
            _module, attr = entry.target.split(":")
            assert entry.factory.__name__ == attr.split(".")[-1]


def test_discovery_is_lazy_per_kind(no_env: pytest.MonkeyPatch) -> None:
    reg = Registry()
    reg.names("weightings")
    assert list(reg._kinds) == ["weightings"]  # the laziness is the point


HALF_STAGE = '''
class HalfStage:
    """A stage that forgot `evaluate`."""

    name = "half"
    train = None

    def build(self, ctx):
        return None

    def train_source(self, source):
        return source
'''


def test_protocol_is_checked_at_load(
    tmp_path: Path, no_env: pytest.MonkeyPatch, make_distribution: Callable[..., Path]
) -> None:
    make_distribution(
        tmp_path,
        "ulframe-half-stage",
        {"ulframe.stages": {"half": "ulframe_test_half_stage:HalfStage"}},
        {"ulframe_test_half_stage.py": HALF_STAGE},
    )
    no_env.syspath_prepend(str(tmp_path))
    reg = Registry()
    assert "ul_joint" in reg.names("stages")  # the others still load
    assert "half" not in reg.names("stages")
    [broken] = reg.broken("stages")
    assert (broken.name, broken.distribution, broken.target) == (
        "half",
        "ulframe-half-stage",
        "ulframe_test_half_stage:HalfStage",
    )
    assert broken.reason == "does not provide the stages protocol: lacks method 'evaluate'"
    with pytest.raises(PluginError) as err:
        reg.get("stages", "half")
    assert str(err.value) == (
        "plugin 'stages.half' from distribution ulframe-half-stage "
        "(ulframe_test_half_stage:HalfStage) failed to load: "
        "does not provide the stages protocol: lacks method 'evaluate'"
    )


def test_duplicate_across_real_distributions_fails(
    tmp_path: Path, no_env: pytest.MonkeyPatch, make_distribution: Callable[..., Path]
) -> None:
    make_distribution(
        tmp_path,
        "ulframe-psnr-clone",
        {"ulframe.metrics": {"psnr": "ulframe_test_psnr_clone:PSNR"}},
        {"ulframe_test_psnr_clone.py": "from ulframe.eval.metrics import PSNR\n"},
    )
    no_env.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError) as err:
        Registry().names("metrics")
    message = str(err.value)
    assert message.startswith("duplicate plugin name 'metrics.psnr': provided by ")
    assert "ulframe (ulframe.eval.metrics:PSNR)" in message
    assert "ulframe-psnr-clone (ulframe_test_psnr_clone:PSNR)" in message


def test_disable_autoload_hides_the_example_and_plugins_env_enables_it(
    example_plugin: Any, no_env: pytest.MonkeyPatch
) -> None:
    no_env.syspath_prepend(str(example_plugin.target))
    assert "edm" in Registry().names("weightings")
    entry = Registry().get("hooks", "example_counter")
    assert (entry.distribution, entry.version) == (EXAMPLE_DISTRIBUTION, "0.1.0")

    no_env.setenv(DISABLE_ENV, "1")
    assert "edm" not in Registry().names("weightings")
    assert "example_counter" not in Registry().names("hooks")
    assert "sigmoid" in Registry().names("weightings")  # the built-ins stay

    no_env.setenv(ENABLE_ENV, f"some-other-dist, {EXAMPLE_DISTRIBUTION}")
    assert "edm" in Registry().names("weightings")
    no_env.setenv(ENABLE_ENV, "ulframe_example")  # pip's spelling rules: _ and - are one
    assert "example_counter" in Registry().names("hooks")


def test_broken_entry_is_reported_and_the_others_still_load(
    tmp_path: Path, make_distribution: Callable[..., Path], cli: Callable[..., Any]
) -> None:
    # An entry point whose module does not exist, seen by `ulframe plugins` through sys.path.
    make_distribution(
        tmp_path,
        "ulframe-broken-demo",
        {"ulframe.weightings": {"ghost": "ulframe_no_such_module.weighting:Ghost"}},
        version="0.3.0",
    )
    done = cli("plugins", "--kind", "weightings", sys_path=[tmp_path])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "weightings  (bind as @weightings.NAME())"
    assert any(line.startswith("  sigmoid          ulframe 0.1.0 ") for line in lines)
    assert any(line.startswith("  elbo             ulframe 0.1.0 ") for line in lines)
    assert lines[-1] == (
        "  ghost            ulframe-broken-demo  BROKEN: "
        "ModuleNotFoundError: No module named 'ulframe_no_such_module'"
    )
    assert (
        "plugin weightings.ghost from ulframe-broken-demo failed to load: "
        "ModuleNotFoundError: No module named 'ulframe_no_such_module'"
    ) in done.stderr
