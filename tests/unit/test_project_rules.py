"""The project's own rules (tools/check_rules.py) hold on the tree."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _rules():
    spec = importlib.util.spec_from_file_location("check_rules", ROOT / "tools" / "check_rules.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_print_no_stray_gin_no_stray_distributed_no_stage_in_the_engine():
    assert _rules().violations() == []


def test_rules_catch_a_violation(tmp_path, monkeypatch):
    rules = _rules()
    (tmp_path / "ulframe").mkdir()
    (tmp_path / "plugins").mkdir()
    (tmp_path / "ulframe" / "bad.py").write_text("import gin\nprint('x')\n")
    (tmp_path / "ulframe" / "cli.py").write_text("steps = stage.decoder_sample_steps\n")
    (tmp_path / "ulframe" / "diffusion").mkdir()
    (tmp_path / "ulframe" / "diffusion" / "ok.py").write_text("# ul_joint's prior uses this\n")
    monkeypatch.setattr(rules, "ROOT", tmp_path)
    found = rules.violations()
    assert any("print() in library code" in v for v in found)
    assert any("gin imported outside" in v for v in found)
    assert [v for v in found if "UL stage's name" in v] == [
        "ulframe/cli.py:1: a UL stage's name in the engine (stages reach it through "
        "ulframe/protocols.py)"
    ]
