"""ulframe.wiring: everything discovered is bindable from gin; gin's errors become short messages.

Each error test writes a small gin file in tmp and checks the exact message a person reads: the
file and line, what is wrong, and the closest valid spelling.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import gin
import gin.config
import pytest

from ulframe import gin_adapter, wiring
from ulframe.errors import ConfigError
from ulframe.registry import DISABLE_ENV, ENABLE_ENV, KINDS, Registry
from ulframe.train.settings import CONFIGURABLES

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "gin" / "quickstart.gin"


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry()


@pytest.fixture
def wired(registry: Registry) -> Iterator[Registry]:
    """gin with everything registered; bindings cleared after the test."""
    wiring.register(registry, engine=CONFIGURABLES)
    yield registry
    gin.clear_config()


def gin_file(tmp_path: Path, text: str, name: str = "exp.gin") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def parse_error(files: list[Path], bindings: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as err:
        wiring.parse(files, bindings)
    return str(err.value)


# ---- what is bindable ------------------------------------------------------------------------
def test_every_discovered_entry_is_bindable(wired: Registry) -> None:
    entries = wired.all_entries()
    assert {e.kind for e in entries} == set(KINDS)
    for entry in entries:
        selector = f"{entry.kind}.{entry.name}"
        wiring.parse([], [f"REF = @{selector}"])
        ref = gin.query_parameter("%REF")
        assert ref.configurable.selector == selector
        assert ref.configurable.wrapped is entry.factory
        assert wiring.registered()[selector] is entry.factory


def test_optimizers_and_lr_schedules_are_bindable(wired: Registry) -> None:
    import bitsandbytes.optim
    import torch

    from ulframe.train import optim

    expected = {
        "optimizers.AdamW": torch.optim.AdamW,
        "lr_schedules.warmup_constant": optim.warmup_constant,
        "lr_schedules.warmup_cosine": optim.warmup_cosine,
    }
    for selector, obj in expected.items():
        wiring.parse([], [f"REF = @{selector}"])
        assert gin.query_parameter("%REF").configurable.wrapped is obj, selector
    for name in wiring.BNB_OPTIMIZERS:
        wiring.parse([], [f"REF = @optimizers.{name}"])
        lazy = gin.query_parameter("%REF").configurable.wrapped
        assert lazy.target() is getattr(bitsandbytes.optim, name)

    wiring.parse([], ["optimizers.AdamW8bit.betas = (0.8, 0.95)", "optimizers.AdamW.eps = 1e-6"])
    wiring.check_required()
    params = [torch.nn.Parameter(torch.zeros(4))]
    opt8 = wiring.configured("optimizers.AdamW8bit")(params, lr=1e-3)
    assert isinstance(opt8, bitsandbytes.optim.AdamW8bit)
    assert opt8.defaults["betas"] == (0.8, 0.95)
    assert wiring.configured("optimizers.AdamW")(params, lr=1e-3).defaults["eps"] == 1e-6


def test_8bit_optimizer_parameters_are_checked(wired: Registry) -> None:
    wiring.parse([], ["optimizers.AdamW8bit.betaz = (0.9, 0.99)"])
    with pytest.raises(ConfigError) as err:
        wiring.check_required()
    assert (
        str(err.value) == "'optimizers.AdamW8bit' has no parameter 'betaz'. Did you mean 'betas'?"
    )


def test_registering_does_not_import_bitsandbytes(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Importing bitsandbytes takes seconds; only a config that uses an 8-bit optimizer pays.
    for name in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, name)
    try:
        wiring.register(registry, engine=CONFIGURABLES)
        wiring.parse([QUICKSTART])
        wiring.check_required()
        assert "bitsandbytes" not in sys.modules
    finally:
        gin.clear_config()


def test_quickstart_parses_and_checks(wired: Registry) -> None:
    wiring.parse([QUICKSTART], ["TRAIN_SAMPLES = 64"])
    wiring.check_required()
    assert gin.query_parameter("%TRAIN_SAMPLES") == 64


# ---- error messages --------------------------------------------------------------------------
def test_a_retired_selector_stops_a_config_that_binds_or_references_it(
    wired: Registry, tmp_path: Path
) -> None:
    # hooks.nan_guard: a hook until the NaN/Inf policy moved into the loop (TrainSettings)
    retired = CONFIGURABLES["hooks.nan_guard"].retired  # type: ignore[attr-defined]
    assert retired.startswith("hooks.nan_guard was removed: ") and "nan_policy" in retired
    listed = gin_file(tmp_path, f"""
        include '{QUICKSTART}'
        HOOKS = [@hooks.console(), @hooks.nan_guard()]
        Experiment.hooks = %HOOKS
    """)  # fmt: skip
    cases = {
        (listed, ()): f"{listed}:2: {retired}",  # a reference in a macro's value
        (QUICKSTART, ("hooks.nan_guard.max_consecutive = 2",)):
            f"--gin override 'hooks.nan_guard.max_consecutive = 2': {retired}",
    }  # fmt: skip
    for (file, bindings), expected in cases.items():
        gin.clear_config()
        wiring.parse([file], bindings)
        with pytest.raises(ConfigError) as err:
            wiring.check_retired()
        assert str(err.value) == expected
    gin.clear_config()
    wiring.parse([QUICKSTART])
    wiring.check_retired()  # not named: nothing to say
    with pytest.raises(ConfigError) as err:
        gin.get_configurable("hooks.nan_guard")()
    assert wiring.describe(err.value) == retired  # (gin's call trail dropped)


def test_syntax_error_names_file_and_line(wired: Registry, tmp_path: Path) -> None:
    path = gin_file(
        tmp_path,
        """
        LOSS_FACTOR = 1.5
        stage1/stages.ul_joint.loss_factor = = 1.7
        """,
    )
    assert parse_error([path]) == f"{path}:2: gin syntax error: Unable to parse value."


def test_unclosed_bracket_names_the_file_even_when_included(
    wired: Registry, tmp_path: Path
) -> None:
    inner = gin_file(tmp_path, "encoders.resnet.channels = (8, 16\n", "presets/inner.gin")
    outer = gin_file(tmp_path, "include 'presets/inner.gin'\n", "outer.gin")
    expected = f"{inner}:1: gin syntax error: '(' is never closed"  # the line that opens it
    assert parse_error([inner]) == expected
    assert parse_error([outer]) == expected


def test_misspelled_parameter_names_file_line_and_suggests(wired: Registry, tmp_path: Path) -> None:
    path = gin_file(
        tmp_path,
        f"""
        include '{QUICKSTART}'

        stage1/stages.ul_joint.los_factor = 1.7
        """,
    )
    assert parse_error([path]) == (
        f"{path}:3: 'stages.ul_joint' has no parameter 'los_factor'. Did you mean 'loss_factor'?"
    )


def test_errors_in_overrides_quote_the_override(wired: Registry) -> None:
    message = parse_error(
        [QUICKSTART], ("TRAIN_SAMPLES = 64", "stage1/TrainSettings.bach_size = 8")
    )
    assert message == (
        "--gin override 'stage1/TrainSettings.bach_size = 8': 'TrainSettings' has no parameter "
        "'bach_size'. Did you mean 'batch_size'?"
    )
    message = parse_error([], ("TRAIN_SAMPLES = 64", "LOSS_FACTOR = = 1.7"))
    assert (
        message == "--gin override 'LOSS_FACTOR = = 1.7': gin syntax error: Unable to parse value."
    )


def test_misspelled_configurable_suggests_the_right_one(wired: Registry, tmp_path: Path) -> None:
    path = gin_file(
        tmp_path,
        f"""
        include '{QUICKSTART}'
        stage1/stages.ul_joint.decoder_weighting = @weightings.sigmod()
        """,
    )
    message = parse_error([path])
    assert message.startswith(f"{path}:2: unknown configurable 'weightings.sigmod'. Did you mean ")
    assert "'weightings.sigmoid'" in message.split("(`ulframe plugins`")[0].split("Did you mean")[1]
    assert message.endswith("? (`ulframe plugins` lists them)")

    path = gin_file(tmp_path, "stages.ul_jiont.loss_factor = 1.7\n", "second.gin")
    message = parse_error([path])
    assert message.startswith(f"{path}:1: unknown configurable 'stages.ul_jiont'. Did you mean ")
    assert "'stages.ul_joint'" in message


def test_missing_required_parameter_is_named(wired: Registry, tmp_path: Path) -> None:
    path = gin_file(
        tmp_path,
        f"""
        include '{QUICKSTART}'
        Experiment.dataset = @datasets.image_folder()
        """,
    )
    wiring.parse([path])
    with pytest.raises(ConfigError) as err:
        wiring.check_required()
    assert str(err.value) == (
        "missing required parameter(s): datasets.image_folder.root "
        "(bind them in a gin file or with --gin.NAME=VALUE)"
    )


def test_engine_supplied_arguments_are_not_required(wired: Registry) -> None:
    # `@encoders.resnet` (no call): the engine passes `shape`, gin need not bind it.
    wiring.parse([QUICKSTART])
    wiring.check_required()
    # `@encoders.resnet()` (gin calls it): `shape` must be bound.
    wiring.parse([], ["stage1/stages.ul_joint.encoder = @encoders.resnet()"])
    with pytest.raises(
        ConfigError, match=r"^missing required parameter\(s\): encoders.resnet.shape "
    ):
        wiring.check_required()


def test_missing_gin_file(wired: Registry, tmp_path: Path) -> None:
    missing = tmp_path / "nope.gin"
    assert parse_error([missing]) == f"{missing}: gin file not found"


def test_nested_includes_resolve_relative_to_the_including_file(
    wired: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gin_file(tmp_path, "include 'presets/mid.gin'\nLOSS_FACTOR = 1.1\n", "exp/main.gin")
    gin_file(tmp_path, "include 'leaf.gin'\nTRAIN_SAMPLES = 7\n", "exp/presets/mid.gin")
    gin_file(tmp_path, "SEED = 3\n", "exp/presets/leaf.gin")
    monkeypatch.chdir(tmp_path)  # neither folder is the working directory
    before = gin_adapter.search_paths()
    wiring.parse([Path("exp/main.gin")])
    assert gin.query_parameter("%SEED") == 3
    assert gin.query_parameter("%TRAIN_SAMPLES") == 7
    assert gin_adapter.search_paths() == before  # nothing leaks


def test_an_undefined_macro_is_named_at_the_line_that_uses_it(
    wired: Registry, tmp_path: Path
) -> None:
    path = gin_file(tmp_path, f"""
        include '{QUICKSTART}'
        # a comment, then a binding without macros
        stage1/TrainSettings.lr = 0.001
        stage1/TrainSettings.grad_clip = %UNDEFINED_NAME
    """)  # fmt: skip
    wiring.parse([path])
    with pytest.raises(ConfigError) as err:
        wiring.check_values()
    assert str(err.value) == (
        f"{path}:4: undefined macro %UNDEFINED_NAME: define it in a gin file "
        "(`UNDEFINED_NAME = ...`) or with --gin.UNDEFINED_NAME=VALUE"
    )


@pytest.mark.parametrize(
    ("setting", "allowed"),
    [
        ("precision", "'fp32', 'bf16'"),
        ("parallelism", "'ddp', 'fsdp'"),
        ("compile", "'off', 'networks', 'step'"),
        ("activation_checkpointing", "'off', 'blocks'"),
        ("nan_policy", "'skip', 'stop'"),
    ],
)
def test_a_wrong_choice_of_an_enumerated_setting_is_one_line_with_file_line_and_choices(
    wired: Registry, tmp_path: Path, setting: str, allowed: str
) -> None:
    path = gin_file(tmp_path, f"""
        include '{QUICKSTART}'
        stage1/TrainSettings.{setting} = 'fp16'
    """)  # fmt: skip
    wiring.parse([path])
    with pytest.raises(ConfigError) as err:
        wiring.check_values()
    assert str(err.value) == (
        f"{path}:2: stage1/TrainSettings.{setting}: expected one of {allowed}, got str 'fp16'"
    )


BROKEN_ENTRY_POINTS = {"ulframe.weightings": {"ghost": "ulframe_no_such_module.weighting:Ghost"}}


def test_reference_to_a_broken_plugin_explains_it_failed_to_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_distribution: Callable[..., Path]
) -> None:
    make_distribution(tmp_path / "site", "ulframe-broken-demo", BROKEN_ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    monkeypatch.delenv(ENABLE_ENV, raising=False)
    wiring.register(Registry(), engine=CONFIGURABLES)
    try:
        path = gin_file(
            tmp_path,
            f"""
            include '{QUICKSTART}'
            stage1/stages.ul_joint.decoder_weighting = @weightings.ghost()
            """,
        )
        assert parse_error([path]) == (
            f"{path}:2: unknown configurable 'weightings.ghost'. The plugin exists but failed to "
            "load (distribution ulframe-broken-demo, ulframe_no_such_module.weighting:Ghost): "
            "ModuleNotFoundError: No module named 'ulframe_no_such_module' "
            "(`ulframe plugins` lists them)"
        )
    finally:
        gin.clear_config()
