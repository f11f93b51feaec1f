"""benchmarks/memory.py counts on the meta device and under FakeTensorMode what the real modules
hold: checked on the tiny preset (gin/quickstart.gin), where the real modules are cheap."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from ulframe.train.parallelize import checkpoint_activations

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

        # With activation checkpointing (TrainSettings.activation_checkpointing = 'blocks'): the
        # same count on fake and real tensors, and less of it where blocks train (stage 1)
        with mode:
            checkpoint_activations(fake, "blocks")
            fake_ac = memory.saved_tensor_bytes(fake, memory.train_batch(stage, fake, example, 3))
        trains_blocks = bool(checkpoint_activations(real, "blocks"))
        real_ac = memory.saved_tensor_bytes(real, batch)
        assert fake_ac == pytest.approx(real_ac, rel=2e-3)  # the same statistics, a smaller total
        assert real_ac < (0.6 if trains_blocks else 1.0) * real_bytes
        names.append(stage.name)

    assert experiment.stages[1].cache_latents  # stage 2 trains on latents: a latent batch
    assert set(memory.train_batch(experiment.stages[1], real, example, 2)) == {"z", "label"}


def test_adamw8bit_state_follows_bitsandbytes_blocks(memory: ModuleType) -> None:
    small, large = torch.empty(4095), torch.empty(4096 * 3 + 1)
    assert memory.adamw8bit_state_bytes([small]) == 8 * 4095  # 32-bit state below 4096
    blocks = -(-large.numel() // 256)
    assert memory.adamw8bit_state_bytes([large]) == 2 * large.numel() + 8 * blocks


def test_the_estimate_with_activation_checkpointing_is_smaller_and_configured(
    memory: ModuleType, tiny_threads: None
) -> None:
    bindings = ["stage1/TrainSettings.activation_checkpointing = 'blocks'"]
    stage1, stage2 = memory.estimate("gin/quickstart.gin", gpus=1, bindings=bindings)
    assert (stage1.activation_checkpointing, stage2.activation_checkpointing) == ("blocks", "off")
    assert stage1.checkpointed_blocks > 0 and stage1.recompute_per_example > 0
    for r in (stage1, stage2):
        for par in ("ddp", "fsdp"):
            assert r.total(par, checkpointed=True) < r.total(par)
        assert r.activations_at(r.per_gpu_batch, True) == r.per_gpu_ac["ddp"]["activations"]
        assert memory.max_batch(r, "ddp", 2**30, True) > memory.max_batch(r, "ddp", 2**30)
    # one GPU, as configured: stage 1 with activation checkpointing, stage 2 without
    assert memory.single_gpu_bytes(stage1) == memory.single_gpu_bytes(stage1, checkpointed=True)
    assert memory.single_gpu_bytes(stage2) == memory.single_gpu_bytes(stage2, checkpointed=False)
