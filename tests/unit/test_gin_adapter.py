"""ulframe.gin_adapter: one test per gin behaviour it relies on (see its docstring), so that a gin
release that changes one fails here, not in a user's error message."""

from __future__ import annotations

import contextlib
import io
import os
import tokenize
from collections.abc import Iterator
from pathlib import Path

import gin
import pytest

from ulframe import gin_adapter


def _adapter_demo(a: int, b: str = "x", c: float = gin.REQUIRED) -> tuple[int, str, float]:
    return a, b, c


def _other_demo(a: int) -> int:
    return a


SELECTOR = "ulframe_adapter_test.demo"


@pytest.fixture
def demo() -> Iterator[None]:
    """`ulframe_adapter_test.demo` registered, bindings cleared after the test."""
    gin.clear_config()
    gin_adapter.replace_configurable(_adapter_demo, SELECTOR)
    yield
    gin.clear_config()


def _error(fn: object, *args: object) -> str:
    with pytest.raises(Exception) as err:
        fn(*args)  # type: ignore[operator]
    return str(err.value)


# 1.
def test_bindings_lists_every_binding_by_scope_and_complete_selector(demo: None) -> None:
    gin.parse_config(["demo.a = 3", "s1/demo.b = 'y'", "N = 2", "s1/M = %N", "demo.c = @demo"])
    found = gin_adapter.bindings()
    assert found[("", SELECTOR)]["a"] == 3
    assert found[("s1", SELECTOR)] == {"b": "y"}
    assert found[("N", "gin.macro")] == {"value": 2}
    macro = found[("s1/M", "gin.macro")]["value"]
    assert isinstance(macro, gin.config.ConfigurableReference)
    assert macro.selector == "gin.macro" and macro.scopes == ["N"] and macro.evaluate
    ref = found[("", SELECTOR)]["c"]
    assert ref.selector == "demo" and ref.configurable.selector == SELECTOR and not ref.evaluate
    assert ref.configurable.wrapped is _adapter_demo
    with pytest.raises(TypeError):
        gin_adapter.bindings()[("", "x")] = {}  # type: ignore[index]


# 2.
def test_replace_configurable_puts_another_object_under_a_taken_selector(demo: None) -> None:
    gin_adapter.replace_configurable(_adapter_demo, SELECTOR)  # the same object again: kept
    gin_adapter.replace_configurable(_other_demo, SELECTOR)
    gin.parse_config(["demo.a = 5"])
    assert gin.get_configurable(SELECTOR)() == 5
    gin_adapter.replace_configurable(_adapter_demo, SELECTOR)  # back, for the other tests


# 3.
def test_is_constant_knows_gin_constants() -> None:
    if not gin_adapter.is_constant("ulframe_adapter_test.ANSWER"):  # (constants stay defined)
        gin.constant("ulframe_adapter_test.ANSWER", 42)
    assert gin_adapter.is_constant("ulframe_adapter_test.ANSWER")
    assert gin_adapter.is_constant("ANSWER")  # gin matches a constant by its last part too
    assert not gin_adapter.is_constant("ULFRAME_NO_SUCH_CONSTANT")


# 4. and 5.
def test_readers_and_search_paths_decide_what_gin_parses(
    demo: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # gin's reader list as it is after the test (the reader below is this test's only)
    monkeypatch.setattr(gin.config, "_FILE_READERS", list(gin.config._FILE_READERS))
    (tmp_path / "inc").mkdir()
    (tmp_path / "inc" / "leaf.gin").write_text("demo.a = 1\n")
    (tmp_path / "main.gin").write_text("include 'leaf.gin'\n")
    read: list[str] = []

    @contextlib.contextmanager
    def reader(path: str) -> Iterator[io.StringIO]:
        read.append(path)
        text = Path(path).read_text()
        yield io.StringIO(text.replace("demo.a = 1", "demo.a = 2"))

    before = gin_adapter.search_paths()
    gin_adapter.read_files_with(reader, os.path.isfile)
    gin_adapter.read_files_with(reader, os.path.isfile)  # once
    with gin_adapter.search_path_first(str(tmp_path / "inc")):
        assert gin_adapter.search_paths() == [str(tmp_path / "inc"), *before]
        gin.parse_config_file(str(tmp_path / "main.gin"))
    assert gin_adapter.search_paths() == before
    assert read == [str(tmp_path / "main.gin"), str(tmp_path / "inc" / "leaf.gin")]
    assert gin.query_parameter(f"{SELECTOR}.a") == 2  # what the reader gave, includes too


# 6.
def test_error_texts(demo: None) -> None:
    message = _error(gin.parse_config, "\n\ndemo.nope = 1")
    assert gin_adapter.error_location(message) == gin_adapter.ErrorLocation(None, 3)
    assert gin_adapter.unknown_parameter(message) == ("demo", "nope")
    assert gin_adapter.unknown_configurable(_error(gin.parse_config, "nodemo.a = 1")) == "nodemo"
    message = _error(gin.parse_config, "demo.a = @s1/nodemo()")
    assert gin_adapter.unknown_configurable(message) == "nodemo"  # (gin drops the scope)
    message = _error(gin.get_configurable(SELECTOR), 1)
    assert gin_adapter.missing_required(message) == ("demo", ["c"])
    assert gin_adapter.error_location("no location") is None


def test_error_location_in_a_file(demo: None, tmp_path: Path) -> None:
    path = tmp_path / "bad.gin"
    path.write_text("demo.a = 1\ndemo.nope = 2\n")
    message = _error(gin.parse_config_file, str(path))
    assert gin_adapter.error_location(message) == gin_adapter.ErrorLocation(str(path), 2)


def test_configurable_calls_name_the_configurable_and_its_scope(demo: None) -> None:
    def fail(a: int) -> None:
        raise ValueError("a is wrong")

    gin_adapter.replace_configurable(fail, "ulframe_adapter_test.fail")
    gin.parse_config(["s1/fail.a = 1"])
    with gin.config_scope("s1"):
        message = _error(gin.get_configurable("ulframe_adapter_test.fail"))
    calls = gin_adapter.configurable_calls(message)
    assert message[: calls[0].start] == "a is wrong"
    assert (calls[0].name, calls[0].scope) == ("fail", "s1")
    assert "fail" in calls[0].obj
    assert gin_adapter.configurable_calls("plain") == []


# 7.
def test_token_error_args_survive_gin(demo: None) -> None:
    with pytest.raises(tokenize.TokenError) as err:
        gin.parse_config("demo.a = [1,\n")
    args = gin_adapter.token_error_args(err.value)
    assert isinstance(args[0], str) and args[1][0] >= 1


# 8.
def test_statements_come_with_their_line_and_their_own_macros(demo: None) -> None:
    text = "include 'x.gin'\n# note\nA = %B\ns1/demo.a = (%C,\n  %D)\ndemo.b = 'no macro'\n"
    found = list(gin_adapter.statements(text))
    assert found == [
        gin_adapter.Statement(1, True, "", "x.gin", "", ()),
        gin_adapter.Statement(3, False, "", "A", "", ("B",)),
        gin_adapter.Statement(4, False, "s1", "demo", "a", ("C", "D")),
        gin_adapter.Statement(6, False, "", "demo", "b", ()),
    ]
    with pytest.raises(SyntaxError):
        list(gin_adapter.statements("demo.a = = 1"))
