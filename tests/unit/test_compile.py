"""TrainSettings.compile: torch.compile of the training step (inductor, CPU here).

One tiny run compiles (slow: the inductor's C++ kernels are built on the first step, cached on
disk afterwards); everything else is checked without compiling anything.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch

from ulframe import cli
from ulframe.errors import ConfigError
from ulframe.protocols import BuildContext
from ulframe.train import checkpoint, optim
from ulframe.train.parallelize import compile_model
from ulframe.train.settings import TrainSettings
from ulframe_plugins.networks.decoders import UViTDecoder
from ulframe_plugins.networks.encoders import ResNetEncoder
from ulframe_plugins.networks.priors import ViT
from ulframe_plugins.stages.ul_joint import ULJoint

QUICKSTART = Path(__file__).resolve().parents[2] / "gin" / "quickstart.gin"


def test_an_unknown_compile_mode_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"TrainSettings.compile must be one of .*'networks'"):
        TrainSettings(compile="max-autotune")


def _tiny_stage() -> ULJoint:
    return ULJoint(
        encoder=partial(
            ResNetEncoder, latent_channels=4, channels=(8, 16), blocks_per_stage=(1, 1)
        ),
        prior=partial(ViT, widths=(16,), depths=(1,), heads=2, patch_size=1),
        decoder=partial(UViTDecoder, channels=(8,), width=16, depth=1, heads=2, patch_size=2),
        train=TrainSettings(),
    )


def _tiny_context(stage_dir: Path = Path(".")) -> BuildContext:
    return BuildContext({"x": torch.zeros(1, 8, 8), "label": 0}, 10, torch.device("cpu"), stage_dir)


def _tiny_model() -> torch.nn.Module:
    return _tiny_stage().build(_tiny_context())


def test_compile_modes_pick_the_networks_or_the_whole_forward() -> None:
    # torch.compile is lazy: nothing is compiled until a forward runs
    assert compile_model(_tiny_model(), "off") == []
    model = _tiny_model()
    keys = list(model.state_dict())
    assert compile_model(model, "networks") == ["encoder", "prior", "decoder"]
    assert compile_model(_tiny_model(), "step") == ["ULJointModel"]
    assert list(model.state_dict()) == keys  # compiled in place: the same modules and keys
    # ...and really compiled: each network's forward is now dynamo's wrapper of the original
    for name in ("encoder", "prior", "decoder"):
        network = getattr(model, name)
        wrapped = getattr(network.forward, "_torchdynamo_orig_callable", None)
        assert wrapped is not None and wrapped.__func__ is type(network).forward, name


def test_compile_gives_every_block_a_graph_of_its_own() -> None:
    import torch._dynamo.config as dynamo_config

    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(3)])
    key = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    before = getattr(dynamo_config, key)
    try:
        setattr(dynamo_config, key, 1)
        compile_model(model, "networks")
        assert getattr(dynamo_config, key) == 3
    finally:
        setattr(dynamo_config, key, before)


def test_the_compile_prefix_is_removed_from_state_dict_keys() -> None:
    layer = torch.nn.Sequential(torch.nn.Linear(2, 2))
    # the keys of `torch.compile(layer)` (an OptimizedModule) and of a compiled child
    state = {f"_orig_mod.{k}": v for k, v in layer.state_dict().items()}
    state |= {"1._orig_mod.weight": torch.zeros(1)}
    assert list(checkpoint.without_compile_prefix(state)) == ["0.weight", "0.bias", "1.weight"]
    plain = layer.state_dict()
    assert checkpoint.without_compile_prefix(plain) is plain


def test_a_checkpoint_of_a_torch_compile_wrapper_loads_into_an_eager_model(tmp_path: Path) -> None:
    # A state dict saved from `torch.compile(model)` (an OptimizedModule: every key prefixed
    # `_orig_mod.`) loads where a stage's EMA weights are loaded (the later stages, `ulframe
    # sample/eval`), into the eager model of the same config.
    torch.manual_seed(1)
    trained = _tiny_model()
    state = torch.compile(trained).state_dict()
    assert state and all(k.startswith("_orig_mod.") for k in state)
    stage_dir = tmp_path / "stage1"
    checkpoint.save(
        checkpoint.checkpoint_dir(stage_dir), 4, {"samples_seen": 4, "model": state, "ema": state}
    )
    torch.manual_seed(2)
    loaded = checkpoint.load_stage_ema(_tiny_stage(), _tiny_context(stage_dir), stage_dir)
    expected = trained.state_dict()
    assert list(loaded.state_dict()) == list(expected)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key


def _run(workdir: Path, tiny_run: list[str], samples: int, mode: str) -> int:
    args = ["run", str(QUICKSTART), "--workdir", str(workdir), *tiny_run]
    args += ["--gin_param", "Experiment.hooks = []", f"--gin.TRAIN_SAMPLES={samples}"]
    args += ["--gin_param", f"stage1/TrainSettings.compile = '{mode}'", "--allow-config-change"]
    (workdir / "stages" / "stage1" / "DONE.json").unlink(missing_ok=True)  # train on
    return cli.main(args)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The .grad attribute:UserWarning")  # dynamo, while tracing
def test_a_compiled_run_trains_checkpoints_and_resumes_from_and_into_eager_runs(
    tmp_path: Path,
    tiny_run: list[str],
    tiny_threads: None,
    restore_logging: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The aot_eager backend: dynamo and AOTAutograd trace and wrap the networks as they do for
    # inductor (the graphs, the compiled forwards, the state-dict keys), without inductor's C++
    # code generation, whose time depends on its on-disk cache (10-150 s on the 2-core machine).
    monkeypatch.setattr(torch, "compile", partial(torch.compile, backend="aot_eager"))
    workdir = tmp_path / "run"
    ckpts = workdir / "stages" / "stage1" / "checkpoints"
    assert _run(workdir, tiny_run, 4, "off") == 0  # an eager checkpoint at 4 samples
    eager = checkpoint.load_latest(ckpts)
    eager_keys = sorted(eager["model"])
    # rewritten as a `torch.compile(model)` wrapper would write it (every key `_orig_mod.`...):
    # the compiled run resumes it through `checkpoint.without_compile_prefix` (which
    # `checkpoint.load` applies: `checkpoint.upgrade`)
    # (a checkpoint file of format 2: ulframe's own checkpoint directories never hold them)
    for part in ("model", "ema"):
        eager[part] = {f"{optim.COMPILE_PREFIX}{k}": v for k, v in eager[part].items()}
    shutil.rmtree(checkpoint.list_checkpoints(ckpts)[-1])
    eager["format"] = 2
    legacy = ckpts / "ckpt-000000000004.pt"
    torch.save(eager, legacy)
    digest = {
        "sha256": hashlib.sha256(legacy.read_bytes()).hexdigest(),
        "bytes": legacy.stat().st_size,
    }
    legacy.with_suffix(".json").write_text(json.dumps(digest))
    written = torch.load(checkpoint.list_checkpoints(ckpts)[-1], weights_only=True)
    assert all(k.startswith("_orig_mod.") for k in written["model"])
    assert sorted(checkpoint.load_latest(ckpts)["model"]) == eager_keys

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert _run(workdir, tiny_run, 8, "networks") == 0  # resumes the eager checkpoint, compiled
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it really compiled
    state = checkpoint.load_latest(ckpts)
    assert state["samples_seen"] == 8
    for part in ("model", "ema"):
        assert sorted(state[part]) == eager_keys
        assert not any("_orig_mod" in k for k in state[part])  # written without the prefix
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    trained = [r["samples_seen"] for r in rows if r["kind"] == "train"]
    assert trained == [4, 8]  # the compiled run went on from the eager one's 4 samples
    assert all(torch.isfinite(v).all() for v in state["model"].values())

    assert _run(workdir, tiny_run, 12, "off") == 0  # an eager run resumes the compiled checkpoint
    assert checkpoint.load_latest(ckpts)["samples_seen"] == 12
