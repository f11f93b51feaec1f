"""benchmarks/memory.py counts on the meta device and under FakeTensorMode what the real modules
hold: checked on the tiny preset (gin/quickstart.gin), where the real modules are cheap."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def memory() -> ModuleType:
    spec = importlib.util.spec_from_file_location("memory", ROOT / "benchmarks" / "memory.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory"] = module
    spec.loader.exec_module(module)
    return module


def test_meta_and_fake_counts_match_the_real_modules(
    memory: ModuleType, tmp_path: Path, tiny_threads: None
) -> None:
    experiment = memory.load_experiment("gin/quickstart.gin")
    example, classes = memory.example_of(experiment.dataset)
    assert classes == 10 and tuple(example["x"].shape) == (1, 32, 32)
    names: list[str] = []
    for stage in experiment.stages:  # stage 1, then stage 2 on random stage-1 weights
        torch.manual_seed(0)
        real = memory.build_stage(stage, example, classes, torch.device("cpu"), tmp_path, names)
        with torch.device("meta"):
            meta = memory.build_stage(
                stage, example, classes, torch.device("meta"), tmp_path, names
            )
        assert all(p.is_meta for p in meta.parameters())
        counts = memory.count(meta)
        assert counts.params == sum(p.numel() for p in real.parameters())
        assert counts.trainable == sum(p.numel() for p in real.parameters() if p.requires_grad)
        assert counts.by_child == {
            n: sum(p.numel() for p in c.parameters()) for n, c in real.named_children()
        }
        units, root = memory.fsdp_units(real)
        assert sum(units) + root == counts.params and counts.largest_unit == max(units)

        # Saved-for-backward bytes of a bf16 training forward: fake tensors as real ones, within
        # 0.1% (the normalisations' per-row statistics: float32 from the CPU kernels, bfloat16
        # from their meta kernels).
        batch = memory.train_batch(stage, real, example, 3)
        mode, fake = memory.fake_build(stage, example, classes, tmp_path, names)
        with mode:
            fake_bytes = memory.saved_tensor_bytes(
                fake, memory.train_batch(stage, fake, example, 3)
            )
        real_bytes = memory.saved_tensor_bytes(real, batch)
        assert real_bytes > 0 and fake_bytes == pytest.approx(real_bytes, rel=1e-3)
        names.append(stage.name)

    assert experiment.stages[1].cache_latents  # stage 2 trains on latents: a latent batch
    assert set(memory.train_batch(experiment.stages[1], real, example, 2)) == {"z", "label"}


def test_adamw8bit_state_follows_bitsandbytes_blocks(memory: ModuleType) -> None:
    small, large = torch.empty(4095), torch.empty(4096 * 3 + 1)
    assert memory.adamw8bit_state_bytes([small]) == 8 * 4095  # 32-bit state below 4096
    blocks = -(-large.numel() // 256)
    assert memory.adamw8bit_state_bytes([large]) == 2 * large.numel() + 8 * blocks
