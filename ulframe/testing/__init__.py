"""The plugin contract kit, shipped with ulframe, and its pytest plugin.

Every plugin of a distribution is built at tiny sizes and run through its kind's checks
(`ulframe.testing.kit`). Three ways to run it:

- ``ulframe check-plugins mypkg``: one line per plugin and check, exit 0 when none fails;
- ``pytest -p ulframe.testing --ulframe-dists=mypkg``: one test per plugin and check, in the
  package's own test suite (the option takes a comma-separated list; without it the plugin
  adds nothing). Opt-in: ulframe registers no ``pytest11`` entry point, so no other pytest run
  in the environment loads it;
- from Python: ``ulframe.testing.kit.run_all(["mypkg"])`` returns the outcomes.
"""

from __future__ import annotations

from typing import Any

OPTION = "--ulframe-dists"


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("ulframe", "ulframe plugin contract kit")
    group.addoption(
        OPTION,
        action="store",
        default="",
        metavar="DIST[,DIST...]",
        help="run the ulframe contract kit on every plugin these installed distributions register",
    )


def pytest_collection_modifyitems(session: Any, config: Any, items: list[Any]) -> None:
    """Append one item per plugin and check of the distributions named by --ulframe-dists."""
    dists = [d.strip() for d in (config.getoption(OPTION) or "").split(",") if d.strip()]
    if not dists:
        return
    from ulframe.testing import kit

    unknown = [d for d in dists if not kit.installed(d)]
    if unknown:
        raise config.pytest_usage_error(f"{OPTION}: not installed: {', '.join(unknown)}")
    checks, broken = kit.collect(dists)
    state = kit.Kit()
    config.add_cleanup(state.close)
    for outcome in broken:
        items.append(_item_class().from_parent(session, name=f"{outcome.label}::load", run=outcome))
    for check in checks:
        items.append(_item_class().from_parent(session, name=check.id, run=(state, check)))


_ITEM: list[Any] = []


def _item_class() -> Any:
    """The pytest Item of one check (defined on first use: importing this module stays free of
    pytest for the command line)."""
    if _ITEM:
        return _ITEM[0]
    import pytest

    from ulframe.testing import kit

    class ContractItem(pytest.Item):
        def __init__(self, *, run: Any, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._run = run

        def runtest(self) -> None:
            if isinstance(self._run, kit.Outcome):
                outcome = self._run
            else:
                state, check = self._run
                with kit.one_thread():
                    outcome = state.run(check)
            if outcome.status == "SKIP":
                pytest.skip(outcome.message)
            if outcome.status == "FAIL":
                raise kit.CheckFailed(outcome.line())

        def repr_failure(self, excinfo: Any, style: Any = None) -> str:
            if isinstance(excinfo.value, kit.CheckFailed):
                return str(excinfo.value)
            return str(super().repr_failure(excinfo))

        def reportinfo(self) -> tuple[str, int, str]:
            return "ulframe-contract", 0, self.name

    _ITEM.append(ContractItem)
    return ContractItem
