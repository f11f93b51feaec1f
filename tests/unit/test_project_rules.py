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


def test_the_layers_hold_and_name_every_module_of_the_engine():
    rules = _rules()
    assert rules.layer_violations() == []
    for path in (ROOT / "ulframe").rglob("*.py"):
        module = rules._module_name(path.relative_to(ROOT).as_posix())
        assert rules.layer_of(module) is not None, module
    assert rules.layer_of("ulframe.wiring") < rules.layer_of("ulframe.train.settings")
    assert rules.layer_of("ulframe.diffusion.weighting") < rules.layer_of("ulframe.registry")


def test_the_layer_rule_catches_an_import_from_a_higher_layer(tmp_path, monkeypatch):
    rules = _rules()
    files = {
        "ulframe/__init__.py": "",
        "ulframe/errors.py": "def f():\n    from ulframe.cli import main\n",  # lazy: caught too
        "ulframe/cli.py": "from ulframe import errors, wiring\nimport ulframe.train.loop\n",
        "ulframe/wiring.py": "from ulframe.train import settings\n",
        "ulframe/train/__init__.py": "",
        "ulframe/train/settings.py": "from ulframe.wiring import register\n",  # down: fine
        "ulframe/train/loop.py": "from .settings import X\n",
        "ulframe/data/__init__.py": "from .pipeline import Dataset\n",
        "ulframe/data/pipeline.py": "from ..registry import Registry\n",  # relative, up
        "ulframe/registry.py": "from ulframe.protocols import check_factory\n",
        "ulframe/extra.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(rules, "ROOT", tmp_path)
    assert rules.layer_violations() == [
        "ulframe/data/pipeline.py:1: ulframe.data.pipeline (layer 1) imports ulframe.registry "
        "(layer 3), a higher layer",
        "ulframe/errors.py:2: ulframe.errors (layer 0) imports ulframe.cli (layer 7), a higher "
        "layer",
        "ulframe/extra.py:1: ulframe.extra is in no layer (add it to LAYERS in "
        "tools/check_rules.py)",
        "ulframe/wiring.py:1: ulframe.wiring (layer 4) imports ulframe.train.settings (layer 5), "
        "a higher layer",
    ]
    assert len([v for v in rules.violations() if "a higher layer" in v]) == 3


def test_torch_distributed_only_in_the_named_modules(tmp_path, monkeypatch):
    rules = _rules()
    assert "ulframe/train/distributed.py" in rules.DISTRIBUTED_MODULES
    (tmp_path / "ulframe" / "train").mkdir(parents=True)
    (tmp_path / "plugins").mkdir()
    for name in ("distributed.py", "loop.py"):
        (tmp_path / "ulframe" / "train" / name).write_text("import torch.distributed as dist\n")
    monkeypatch.setattr(rules, "ROOT", tmp_path)
    found = [v for v in rules.violations() if "torch.distributed outside" in v]
    assert [v.split(":")[0] for v in found] == ["ulframe/train/loop.py"]
