"""TrainSettings.compile: torch.compile of the training step (inductor, CPU here).

One tiny run compiles (slow: the inductor's C++ kernels are built on the first step, cached on
disk afterwards); everything else is checked without compiling anything.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import gin
import pytest
import torch

from ulframe import cli
from ulframe.errors import ConfigError
from ulframe.protocols import BuildContext
from ulframe.train import checkpoint
from ulframe.train.loop import compile_model
from ulframe.train.settings import TrainSettings
from ulframe_plugins.networks.decoders import UViTDecoder
from ulframe_plugins.networks.encoders import ResNetEncoder
from ulframe_plugins.networks.priors import ViT
from ulframe_plugins.stages.ul_joint import ULJoint

QUICKSTART = Path(__file__).resolve().parents[2] / "gin" / "quickstart.gin"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """`ulframe.cli` reconfigures the root logger (and opens workdir/log.txt): undo that."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in root.handlers:
        if h not in handlers:
            h.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    gin.clear_config()


def test_an_unknown_compile_mode_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"TrainSettings.compile must be one of .*'networks'"):
        TrainSettings(compile="max-autotune")


def _tiny_model() -> torch.nn.Module:
    stage = ULJoint(
        encoder=partial(
            ResNetEncoder, latent_channels=4, channels=(8, 16), blocks_per_stage=(1, 1)
        ),
        prior=partial(ViT, widths=(16,), depths=(1,), heads=2, patch_size=1),
        decoder=partial(UViTDecoder, channels=(8,), width=16, depth=1, heads=2, patch_size=2),
        train=TrainSettings(),
    )
    example = {"x": torch.zeros(1, 8, 8), "label": 0}
    return stage.build(BuildContext(example, 10, torch.device("cpu"), Path(".")))


def test_compile_modes_pick_the_networks_or_the_whole_forward() -> None:
    # torch.compile is lazy: nothing is compiled until a forward runs
    assert compile_model(_tiny_model(), "off") == []
    model = _tiny_model()
    keys = list(model.state_dict())
    assert compile_model(model, "networks") == ["encoder", "prior", "decoder"]
    assert compile_model(_tiny_model(), "step") == ["ULJointModel"]
    assert list(model.state_dict()) == keys  # compiled in place: the same modules and keys


def test_the_compile_prefix_is_removed_from_state_dict_keys() -> None:
    layer = torch.nn.Sequential(torch.nn.Linear(2, 2))
    # the keys of `torch.compile(layer)` (an OptimizedModule) and of a compiled child
    state = {f"_orig_mod.{k}": v for k, v in layer.state_dict().items()}
    state |= {"1._orig_mod.weight": torch.zeros(1)}
    assert list(checkpoint.without_compile_prefix(state)) == ["0.weight", "0.bias", "1.weight"]
    plain = layer.state_dict()
    assert checkpoint.without_compile_prefix(plain) is plain


def _run(workdir: Path, tiny_run: list[str], samples: int, mode: str) -> int:
    args = ["run", str(QUICKSTART), "--workdir", str(workdir), *tiny_run]
    args += ["--gin_param", "Experiment.hooks = []", f"--gin.TRAIN_SAMPLES={samples}"]
    args += ["--gin_param", f"stage1/TrainSettings.compile = '{mode}'", "--allow-config-change"]
    (workdir / "stages" / "stage1" / "DONE.json").unlink(missing_ok=True)  # train on
    return cli.main(args)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The .grad attribute:UserWarning")  # dynamo, while tracing
def test_a_compiled_run_trains_checkpoints_and_resumes_from_and_into_eager_runs(
    tmp_path: Path, tiny_run: list[str], tiny_threads: None, restore_logging: None
) -> None:
    workdir = tmp_path / "run"
    ckpts = workdir / "stages" / "stage1" / "checkpoints"
    assert _run(workdir, tiny_run, 4, "off") == 0  # an eager checkpoint at 4 samples
    eager_keys = sorted(checkpoint.load_latest(ckpts)["model"])

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert _run(workdir, tiny_run, 8, "networks") == 0  # resumes the eager checkpoint, compiled
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it really compiled
    state = checkpoint.load_latest(ckpts)
    assert state["samples_seen"] == 8
    for part in ("model", "ema"):
        assert sorted(state[part]) == eager_keys
        assert not any("_orig_mod" in k for k in state[part])
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    trained = [r["samples_seen"] for r in rows if r["kind"] == "train"]
    assert trained == [4, 8]  # the compiled run went on from the eager one's 4 samples
    assert all(torch.isfinite(v).all() for v in state["model"].values())

    assert _run(workdir, tiny_run, 12, "off") == 0  # an eager run resumes the compiled checkpoint
    assert checkpoint.load_latest(ckpts)["samples_seen"] == 12
