"""TrainSettings.activation_checkpointing: the repeated blocks of the stage's trainable networks
run under non-reentrant activation checkpointing. Checked on stage 1 of gin/quickstart.gin (the
gin/presets/tiny_image.gin networks) at 16x16: the same step, fewer saved bytes, the same keys.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import gin
import pytest
import torch

from ulframe import wiring
from ulframe.diffusion import BatchNoise
from ulframe.errors import ConfigError
from ulframe.protocols import BuildContext
from ulframe.train import distributed
from ulframe.train.distributed import World
from ulframe.train.parallelize import checkpoint_activations
from ulframe.train.settings import CONFIGURABLES, TrainSettings
from ulframe.train.step import Trainer, train_step

QUICKSTART = Path(__file__).resolve().parents[2] / "gin" / "quickstart.gin"
CPU = World(0, 1, 0, torch.device("cpu"))


@pytest.fixture(scope="module")
def stage() -> Iterator[object]:
    """Stage 1 of the quickstart (tiny_image networks), its decoder with dropout."""
    bindings = [
        "Experiment.hooks = []",
        "Experiment.num_workers = 0",
        "decoders.uvit.dropout = 0.1",
    ]
    wiring.load([str(QUICKSTART)], bindings, engine=CONFIGURABLES)
    yield wiring.experiment().stages[0]
    gin.clear_config()


def _model(stage: object, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    example = {"x": torch.zeros(1, 16, 16), "label": torch.tensor(0)}
    return stage.build(BuildContext(example, 10, torch.device("cpu"), Path(".")))  # type: ignore[attr-defined]


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"x": torch.rand((4, 1, 16, 16), generator=g) * 2 - 1, "label": torch.arange(4)}


def _saved_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct non-parameter storages a training forward saves for backward."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage()._cdata not in params:
            saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(_batch(), BatchNoise(torch.Generator().manual_seed(0)))
    return sum(saved.values())


@pytest.mark.parametrize("value", ["on", "all", True, ""])
def test_unknown_values_are_config_errors(value: object) -> None:
    with pytest.raises(ConfigError, match=r"activation_checkpointing must be one of"):
        TrainSettings(activation_checkpointing=value)  # type: ignore[arg-type]


def test_a_step_with_checkpointing_equals_one_without(stage: object) -> None:
    settings = {"batch_size": 4, "warmup_samples": 0, "ema_halflife_samples": 8}
    runs = {}
    for mode in ("off", "blocks"):
        train = TrainSettings(activation_checkpointing=mode, **settings)  # type: ignore[arg-type]
        trainer = Trainer.build(_model(stage), train, CPU, seed=3)
        result = train_step(trainer, _batch(), samples_seen=8)  # dropout in the decoder too
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}  # type: ignore[union-attr]
        runs[mode] = (result.scalars["loss_nats"], grads, trainer)
    (loss, grads, plain), (ac_loss, ac_grads, checkpointed) = runs["off"], runs["blocks"]
    assert torch.allclose(ac_loss, loss, rtol=1e-5, atol=0)
    assert ac_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(ac_grads[name], grad, rtol=1e-4, atol=1e-7), name
    assert any(g.abs().sum() > 0 for g in grads.values())
    # the same state-dict keys (no wrapper prefix): a checkpoint of either loads into the other
    assert list(checkpointed.model.state_dict()) == list(plain.model.state_dict())
    plain.model.load_state_dict(checkpointed.model.state_dict())
    checkpointed.model.load_state_dict(plain.model.state_dict())
    assert list(checkpointed.ema.model.state_dict()) == list(plain.ema.model.state_dict())
    # the EMA copy (evaluation) stays plain
    assert not any("forward" in vars(m) for m in checkpointed.ema.model.modules())


def test_checkpointed_blocks_keep_fewer_tensors_for_backward(stage: object) -> None:
    model = _model(stage)
    plain = _saved_bytes(model)
    names = checkpoint_activations(model, "blocks")
    blocks = {n for n, _ in distributed.repeated_blocks(model)}
    assert names and set(names) == blocks  # every block of the stage-1 networks trains
    assert {n.split(".")[0] for n in names} == {"encoder", "prior", "decoder"}
    checkpointed = _saved_bytes(model)
    assert checkpointed < 0.6 * plain, (checkpointed, plain)
    assert checkpoint_activations(_model(stage), "off") == []


def test_frozen_networks_are_not_checkpointed(stage: object) -> None:
    model = _model(stage)
    model.encoder.requires_grad_(False)  # type: ignore[union-attr]
    names = checkpoint_activations(model, "blocks")
    assert names and not any(n.startswith("encoder.") for n in names)
    assert all("forward" not in vars(m) for m in model.encoder.modules())  # type: ignore[union-attr]


def test_a_copy_of_a_checkpointed_model_runs_its_own_blocks(stage: object) -> None:
    model = _model(stage)
    checkpoint_activations(model, "blocks")
    twin = copy.deepcopy(model)
    for (_, block), (_, copied) in zip(
        distributed.repeated_blocks(model), distributed.repeated_blocks(twin), strict=True
    ):
        assert block.forward.__self__ is block and copied.forward.__self__ is copied


@pytest.mark.slow
def test_compiled_networks_trace_the_checkpointed_blocks(stage: object) -> None:
    # TrainSettings.compile = 'networks' compiles each network around its checkpointed blocks;
    # AOT autograd (inductor's front end, without its C++ build) gives the eager gradients
    def step(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = model(_batch(), BatchNoise(torch.Generator().manual_seed(0))).total_nats().mean()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}  # type: ignore[misc]

    from torch._dynamo.backends.registry import lookup_backend

    graphs: list[torch.fx.GraphModule] = []

    def aot_eager(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
        graphs.append(gm)  # the graph dynamo traced, before AOT autograd
        return lookup_backend("aot_eager")(gm, example_inputs)

    loss, grads = step(_model(stage))
    model = _model(stage)
    blocks = checkpoint_activations(model, "blocks")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for network in (model.encoder, model.prior, model.decoder):  # type: ignore[union-attr]
        network.forward = torch.compile(network.forward, backend=aot_eager)
    compiled_loss, compiled_grads = step(model)
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 3 and not counters["graph_break"]
    # every checkpointed block is in the traced graphs as a checkpointed region (dynamo's
    # higher-order op), not inlined as plain ops that keep their activations
    regions = [
        node
        for gm in graphs
        for node in gm.graph.nodes
        if node.op == "call_function"
        and node.target is torch.ops.higher_order.tag_activation_checkpoint
    ]
    assert len(graphs) == 3 and len(regions) == len(blocks), (len(regions), len(blocks))
    assert torch.allclose(compiled_loss, loss, rtol=1e-5, atol=0)
    for name, grad in grads.items():
        assert torch.allclose(compiled_grads[name], grad, rtol=1e-4, atol=1e-6), name
