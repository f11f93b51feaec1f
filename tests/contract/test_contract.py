"""Contract suite: every plugin the `ulframe` distribution registers passes the contract kit.

The kit (`ulframe.testing.kit`, the same that `ulframe check-plugins DIST` and `pytest -p
ulframe.testing --ulframe-dists=DIST` run on third-party packages) is run here on the built-ins,
one test per plugin and check; tiny constructor arguments are derived by the kit from the
factories' signatures. Two metrics need a weights file that is never downloaded: they get a
random-init one (`OVERRIDES`). Built-ins may skip only the checks that do not apply to them
(`ALLOWED_SKIPS`): every built-in network also passes the video check.

Beyond the kit: entry points all load, and every entry is bindable from gin and builds through
gin to what it builds directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gin
import pytest
import torch

from ulframe import wiring
from ulframe.data import first_example
from ulframe.registry import KINDS, Entry, Registry
from ulframe.testing import kit
from ulframe.train.settings import CONFIGURABLES

REGISTRY = Registry()  # real discovery through the installed entry points
CORE_DISTRIBUTION = "ulframe"
CHECKS, BROKEN = kit.collect([CORE_DISTRIBUTION], REGISTRY)
ALLOWED_SKIPS = {
    "disjoint": "does not declare disjoint_splits",
    "context": "takes no context_channels",
}


@gin.configurable("contract_probe", module="ulframe_tests")
def contract_probe(value: Any = None) -> Any:
    """Returns what gin binds to `value`: the probe of the bindable-from-gin check."""
    return value


class _TinyI3D(torch.nn.Module):
    """A TorchScript module with the I3D detector's call: per-channel mean and deviation of
    the clip as its 6 features (the real weights are never downloaded)."""

    def forward(
        self,
        x: torch.Tensor,
        rescale: bool = False,
        resize: bool = False,
        return_features: bool = False,
    ) -> torch.Tensor:
        return torch.cat([x.mean((2, 3, 4)), x.std((2, 3, 4))], 1)


def _weights(folder: Path) -> dict[str, dict[str, Any]]:
    """Random-init weight files for the metrics whose real weights are never downloaded."""
    import warnings

    from ulframe_plugins.metrics.fid_inception import FIDInceptionV3

    fid = folder / "fid_random_init.pt"
    torch.manual_seed(0)
    torch.save(FIDInceptionV3().state_dict(), fid)
    i3d = folder / "tiny_i3d.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated
        torch.jit.script(_TinyI3D()).save(str(i3d))
    return {
        "metrics.fid_inception": {"weights_path": str(fid), "input_size": 75},
        "metrics.fvd_i3d": {"weights": str(i3d), "input_size": 16},
    }


@pytest.fixture(scope="module")
def contract_kit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[kit.Kit]:
    folder = tmp_path_factory.mktemp("contract_kit")
    with kit.Kit(folder / "kit", overrides=_weights(folder)) as k, kit.one_thread():
        yield k


@pytest.fixture
def wired(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """gin with every discovered entry registered (ulframe.wiring); bindings cleared after."""
    # bitsandbytes takes ~6 s to import on a CPU machine and has nothing to do with plugins.
    monkeypatch.setattr(wiring, "_bnb_optimizers", dict)
    wiring.register(REGISTRY, engine=CONFIGURABLES)
    yield
    gin.clear_config()


# ------------------------------------------------------------------------------ the kit


@pytest.mark.parametrize("check", CHECKS, ids=[c.id for c in CHECKS])
def test_contract(check: kit.Check, contract_kit: kit.Kit) -> None:
    outcome = contract_kit.run(check)
    if outcome.status == "FAIL":
        pytest.fail(outcome.line(), pytrace=False)
    if outcome.status == "SKIP":
        allowed = ALLOWED_SKIPS.get(check.name, "")
        assert allowed and allowed in outcome.message, f"a built-in may not skip: {outcome.line()}"


def test_the_kit_checks_every_builtin_kind() -> None:
    kinds = {c.entry.kind for c in CHECKS}
    assert kinds == set(kit.CHECKED_KINDS), "no entry of a kind: is the project installed?"
    assert BROKEN == []
    assert REGISTRY.entries("stages"), "no stage discovered"


@pytest.mark.parametrize("kind", KINDS)
def test_no_entry_failed_to_load(kind: str) -> None:
    assert REGISTRY.broken(kind) == []


# ------------------------------------------------------------------------------ gin


def params(kinds: tuple[str, ...]) -> list[Any]:
    return [pytest.param(e, id=f"{k}.{e.name}") for k in kinds for e in REGISTRY.entries(k)]


@pytest.mark.parametrize("entry", params(KINDS))
def test_bindable_from_gin(entry: Entry, wired: None) -> None:
    """`f.value = @kind.name` parses and resolves to the registered factory."""
    gin.parse_config([f"contract_probe.value = @{entry.kind}.{entry.name}"])
    configurable = gin.get_configurable(f"{entry.kind}.{entry.name}")
    assert contract_probe() is configurable
    if isinstance(entry.factory, type):
        assert issubclass(configurable, entry.factory)
    else:
        assert configurable.__wrapped__ is entry.factory


def fingerprint(kind: str, obj: Any) -> dict[str, Any]:
    """What a product computes on fixed inputs: equal fingerprints, equal behaviour."""
    if kind in kit.NETWORK_KINDS:
        kit.perturb_zero_init_(obj).eval()
        with torch.no_grad():
            return {"out": obj(*kit.network_inputs(kind))}
    if kind == "weightings":
        return {"w": obj(torch.linspace(-20, 20, 101, dtype=torch.float64))}
    if kind == "schedules":
        t = torch.linspace(0, 1, 11, dtype=torch.float64)
        return {"logsnr": obj.logsnr(t), "neg_dlogsnr_dt": obj.neg_dlogsnr_dt(t)}
    if kind == "datasets":
        return {"num_classes": obj.num_classes, "x": first_example(obj.source("eval"))["x"]}
    if kind == "metrics":
        ref = kit.network_inputs("decoders")[0]
        if getattr(obj, "inputs", "images") == "videos":
            ref = torch.stack([ref.roll(k, -1) for k in range(10)], 2)
        return obj(ref, ref.flip(0))
    raise AssertionError(f"no fingerprint for kind {kind}")


GIN_BUILT = ("weightings", "datasets", "metrics")  # `@kind.name()`: gin calls them


@pytest.mark.parametrize(
    "entry", params((*kit.NETWORK_KINDS, "weightings", "schedules", "datasets", "metrics"))
)
def test_built_through_gin_equals_built_directly(
    entry: Entry, contract_kit: kit.Kit, wired: None
) -> None:
    """Hyperparameters bound in gin reach the factory: same product as a direct call."""
    kwargs = contract_kit.state(entry).kwargs
    assert kwargs is not None, contract_kit.state(entry).error
    selector = f"{entry.kind}.{entry.name}"
    gin_called = entry.kind in GIN_BUILT
    bindings = [f"{selector}.{k} = {v!r}" for k, v in kwargs.items()]
    bindings.append(f"contract_probe.value = @{selector}{'()' if gin_called else ''}")
    gin.parse_config(bindings)
    if gin_called:
        via_gin = contract_probe()
    else:
        torch.manual_seed(0)
        via_gin = contract_probe()(**kit.supplied(entry.kind))
    direct = contract_kit.build(entry, kwargs)
    if isinstance(entry.factory, type):
        assert isinstance(via_gin, entry.factory)
    a, b = fingerprint(entry.kind, via_gin), fingerprint(entry.kind, direct)
    assert a.keys() == b.keys()
    for key in a:
        same = torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]
        assert same, key
