"""Every `torch.distributed` call of ulframe lives here.

A single process (no torchrun environment) is a world of size 1 and never touches
`torch.distributed`; under torchrun the backend is nccl on GPU and gloo on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ulframe.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(requested)


def init(requested_device: str = "auto") -> World:
    """Join the process group when launched by torchrun; else a world of one.

    A missing or inconsistent rank environment stops this process before it joins anything,
    with one line (`rank_environment`): every process checks its own, so none waits for a peer
    that will never come."""
    rank, world_size, local_rank = rank_environment()
    device = pick_device(requested_device, local_rank)
    if device.type == "cuda" and local_rank >= torch.cuda.device_count():
        raise UserError(
            f"LOCAL_RANK={local_rank} but {torch.cuda.device_count()} CUDA device(s) are "
            f"visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
            "start at most one process per visible device on a node"
        )
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, **_attempt_store(rank, world_size))
    return World(rank, world_size, local_rank, device)


RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def rank_environment() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as a launcher (torchrun, `ulframe run --nproc`) set them;
    (0, 1, 0) when none is set. A value that is not an integer, RANK without WORLD_SIZE or the
    reverse, a rank outside [0, WORLD_SIZE), a LOCAL_RANK outside [0, LOCAL_WORLD_SIZE), or a
    world of several processes without MASTER_ADDR/MASTER_PORT is a one-line UserError."""
    values: dict[str, int] = {}
    for name in RANK_VARIABLES:
        raw = os.environ.get(name)
        if raw is None:
            continue
        try:
            values[name] = int(raw)
        except ValueError:
            raise UserError(f"{name}={raw!r} is not an integer") from None
    if ("RANK" in values) != ("WORLD_SIZE" in values):
        have, lack = ("RANK", "WORLD_SIZE") if "RANK" in values else ("WORLD_SIZE", "RANK")
        raise UserError(
            f"{have}={values[have]} is set but {lack} is not; a launcher (torchrun, ulframe run "
            "--nproc) sets both"
        )
    rank, world_size = values.get("RANK", 0), values.get("WORLD_SIZE", 1)
    local_rank = values.get("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size})")
    local_world = values.get("LOCAL_WORLD_SIZE", world_size)
    if not 0 <= local_rank < local_world:
        raise UserError(f"LOCAL_RANK={local_rank} is outside [0, LOCAL_WORLD_SIZE={local_world})")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if world_size > 1 and missing:
        raise UserError(
            f"WORLD_SIZE={world_size} but {' and '.join(missing)} not set; a launcher "
            "(torchrun, ulframe run --nproc) sets them"
        )
    return rank, world_size, local_rank


def _attempt_store(rank: int, world_size: int) -> dict[str, Any]:
    """Under the elastic agent, the process group's rendezvous keys in a namespace of this
    restart attempt.

    After a worker dies and the agent restarts all of them, the agent's store still holds the
    previous attempt's keys (gloo's peer addresses); read by the new processes they point at dead
    sockets, and the restarted group fails or hangs connecting (seen with torch 2.13 on CPU). A
    PrefixStore per attempt (TORCHELASTIC_RESTART_COUNT) makes every attempt start clean.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}  # plain env:// (or not under the agent): torch's own rendezvous
    from datetime import timedelta

    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=timedelta(minutes=30),
    )
    return {
        "store": dist.PrefixStore(f"ulframe/attempt_{attempt}/", store),
        "rank": rank,
        "world_size": world_size,
    }


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


PARALLELISMS = ("ddp", "fsdp")


def wrap(model: torch.nn.Module, world: World, parallelism: str = "ddp") -> torch.nn.Module:
    """The module to train: `model` itself (one process), DDP around it ("ddp"), or `model`
    sharded in place with FSDP2 ("fsdp", see `shard`)."""
    if world.world_size == 1:
        return model
    if parallelism == "fsdp":
        shard(model)
        return model
    ids = [world.device.index] if world.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def shard(model: torch.nn.Module) -> None:
    """Shard `model`'s parameters, gradients and optimizer state over the ranks (FSDP2).

    The unit of sharding is every block held in an `nn.ModuleList` (ResNet blocks, transformer
    blocks: what the networks repeat), innermost first, then the root for the rest. A block's
    parameters are all-gathered just before its forward and freed after it, so a rank holds the
    full weights of one block at a time. The engine knows no network class: any plugin that
    keeps its repeated blocks in ModuleLists gets this plan.
    """
    from torch.distributed.fsdp import fully_shard

    for _, block in repeated_blocks(model):
        fully_shard(block)
    fully_shard(model)


def repeated_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every block held in an `nn.ModuleList` of `model` (not itself a ModuleList/ModuleDict),
    with its name, children before their parents: the units of `shard` (FSDP2) and of
    activation checkpointing (`ulframe.train.parallelize.checkpoint_activations`)."""
    found: list[tuple[str, torch.nn.Module]] = []
    for name, module in reversed(list(model.named_modules())):  # children before parents
        if isinstance(module, torch.nn.ModuleList):
            for index, block in enumerate(module):
                if not isinstance(block, torch.nn.ModuleList | torch.nn.ModuleDict):
                    found.append((f"{name}.{index}" if name else str(index), block))
    return found


def sharded_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The blocks `shard` made FSDP units (every unit but the root), with their names."""
    from torch.distributed.fsdp import FSDPModule

    found: list[tuple[str, torch.nn.Module]] = []
    for name, module in model.named_modules():
        sharded = isinstance(module, FSDPModule)  # (not narrowed: FSDPModule is a mixin)
        if name and sharded:
            found.append((name, module))
    return found


def is_sharded(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def local_shard_of(full: torch.Tensor, like: Any) -> torch.Tensor:
    """This rank's shard of the full tensor `full`, sharded as the DTensor `like` is."""
    from torch.distributed.tensor import distribute_tensor

    value = distribute_tensor(full.detach().to(like.device), like.device_mesh, like.placements)
    return value.to_local()


def training_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, full: bool = True
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's and optimizer's state dicts through torch's state-dict API, the optimizer's
    keyed by parameter name (so either loads under another wrapping or number of processes).

    `full`: unsharded tensors on every rank (under FSDP2 every rank must call it: it
    all-gathers); else as this rank holds them, for DCP: DTensor shards under FSDP2, nothing
    gathered. A fresh optimizer gets its state first (torch takes a step of zero gradients at
    learning rate 0)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=full, cpu_offload=False)
    return (
        get_model_state_dict(model, options=options),
        get_optimizer_state_dict(model, optimizer, options=options),
    )


def load_training_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, Any],
    optimizer_state: dict[str, Any],
    full: bool = True,
) -> None:
    """The inverse of `training_state` (every rank). A full optimizer state may also be keyed
    by parameter index (`optimizer.state_dict()`, checkpoints of format <= 2)."""
    groups = optimizer_state.get("param_groups") or [{}]
    by_index = all(isinstance(p, int) for g in groups for p in g.get("params", []))
    if full and not is_sharded(model) and by_index:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=full)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


_checkpoint_groups: dict[int, Any] = {}


def checkpoint_group(world: World) -> Any:
    """A gloo process group of every rank for background checkpoint saves (None alone): their
    collectives run in another thread, and must not share a group with the training step's."""
    if world.world_size == 1:
        return None
    if world.world_size not in _checkpoint_groups:
        _checkpoint_groups[world.world_size] = dist.new_group(backend="gloo")
    return _checkpoint_groups[world.world_size]


def module_grad_norms(model: torch.nn.Module, world: World) -> dict[str, float]:
    """L2 norm of the gradient of each top-level child module (encoder, prior, decoder...).

    Every rank must call it: sharded gradients are summed (as squares) over the ranks.
    """
    names, squares = [], []
    for name, child in model.named_children():
        grads = [p.grad for p in child.parameters() if p.grad is not None]
        if grads:
            local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
            names.append(name)
            squares.append(torch.stack([g.detach().float().pow(2).sum() for g in local]).sum())
    if not names:
        return {}
    total = torch.stack(squares)
    if world.world_size > 1 and is_sharded(model):
        dist.all_reduce(total)
    return {f"grad_norm/{n}": float(v) for n, v in zip(names, total.sqrt().tolist(), strict=True)}


def mean_over_ranks(scalars: dict[str, float], world: World) -> dict[str, float]:
    """Average a dict of floats over ranks (every rank must pass the same keys)."""
    if world.world_size == 1 or not scalars:
        return scalars
    keys = sorted(scalars)
    t = torch.tensor([scalars[k] for k in keys], dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return {k: float(v) / world.world_size for k, v in zip(keys, t.tolist(), strict=True)}


def any_over_ranks(flags: list[bool | torch.Tensor], world: World) -> list[bool]:
    """Each flag True on every rank when it is True on any rank (one all-reduce).

    A flag may be a 0-d tensor on the device (e.g. whether a step's loss is not finite): it is
    read in the same device sync as the all-reduce's result (the one sync of this call; with
    one process and no tensor flag, none)."""
    tensors = any(isinstance(f, torch.Tensor) for f in flags)
    if world.world_size == 1 and not tensors:
        return [bool(f) for f in flags]
    t = torch.stack(
        [
            f.detach().float().reshape(()).to(world.device)
            if isinstance(f, torch.Tensor)
            else torch.full((), 1.0 if f else 0.0, device=world.device)
            for f in flags
        ]
    )  # device kernels only, no host transfer before the one read below
    if world.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


def min_max_over_ranks(value: int, world: World) -> tuple[int, int]:
    """The smallest and the largest of an integer over ranks."""
    if world.world_size == 1:
        return value, value
    t = torch.tensor([value, -value], dtype=torch.int64, device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t[0]), -int(t[1])


@dataclass(frozen=True)
class Rendezvous:
    """Where the elastic agents of a multi-node run meet: torch's c10d rendezvous, its store
    hosted by the agent of node 0 at `endpoint` (HOST:PORT, HOST being node 0's address)."""

    nnodes: int
    node_rank: int  # 0 hosts the store; the global ranks are the rendezvous' to assign
    endpoint: str
    run_id: str  # the same on every node
    timeout_s: int  # how long to wait for the store and for every node to join

    def agent_args(self) -> list[str]:
        """The agent's rendezvous flags (no --node-rank: c10d ignores it; `is_host` says which
        agent hosts the store)."""
        conf = f"is_host={int(self.node_rank == 0)},join_timeout={self.timeout_s}"
        conf += f",read_timeout={self.timeout_s}"
        return [
            "--nnodes", str(self.nnodes), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", self.endpoint, "--rdzv-id", self.run_id, "--rdzv-conf", conf,
        ]  # fmt: skip


def launch_argv(
    nproc: int,
    max_restarts: int,
    ulframe_args: list[str],
    rendezvous: Rendezvous | None = None,
    signals: Sequence[str] = (),
) -> list[str]:
    """The command that runs `ulframe ULFRAME_ARGS` in `nproc` processes under torch's elastic
    agent (torchrun), restarting all of them up to `max_restarts` times when one fails: on this
    machine alone (`--standalone`), or as one node of `rendezvous`. `signals`: the signals the
    agent handles and forwards to its workers (its default set when empty)."""
    import sys

    where = ["--standalone"] if rendezvous is None else rendezvous.agent_args()
    handled = ["--signals-to-handle", ",".join(signals)] if signals else []
    return [
        sys.executable, "-m", "torch.distributed.run", *where, *handled,
        "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts),
        "-m", "ulframe", *ulframe_args,
    ]  # fmt: skip


def run_agent(
    argv: Sequence[str],
    rendezvous: Rendezvous | None,
    requeue_signal: int | None,
    requeue_code: int,
) -> int:
    """Run torch's elastic agent for `argv` (a `launch_argv`) in this process; its exit code.

    0 when every worker succeeded. `requeue_code` when the agent was stopped by `requeue_signal`
    (it forwarded the signal to the workers and waited for them to checkpoint and exit), or
    when every failed worker exited with `requeue_code`. 128 + the signal when another signal
    stopped it (forwarded the same way), 1 when a worker failed (logged). A rendezvous that does
    not complete within its timeout is a one-line UserError naming the endpoint.

    The agent's signal handlers (each raises `SignalException`) are in place from the start, not
    only once its workers run: a signal during the rendezvous stops the launcher the same way.
    """
    import logging
    import signal

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import (
        RendezvousConnectionError,
        RendezvousError,
        RendezvousTimeoutError,
    )

    args = torchrun.parse_args(list(argv[3:]))  # after `python -m torch.distributed.run`

    def stop(signum: int, _frame: object) -> None:
        raise SignalException(f"launcher got signal {signum}", signal.Signals(signum))

    handled = [getattr(signal, name.strip()) for name in args.signals_to_handle.split(",")]
    previous = {s: signal.signal(s, stop) for s in handled}
    try:
        torchrun.run(args)
    except SignalException as err:
        return requeue_code if err.sigval == requeue_signal else 128 + int(err.sigval)
    except ChildFailedError as err:
        codes = {failure.exitcode for failure in err.failures.values()}
        if codes == {requeue_code}:
            return requeue_code
        logging.getLogger(__name__).error("%s", err.format_msg())
        return 1
    except RendezvousError as err:
        if rendezvous is None:
            raise
        where = f"{rendezvous.endpoint} within {rendezvous.timeout_s} s (--rdzv-timeout)"
        if isinstance(err, RendezvousConnectionError) and rendezvous.node_rank == 0:
            message = f"cannot host the rendezvous store at {where}; is the port free?"
        elif isinstance(err, RendezvousConnectionError):
            message = (
                f"cannot reach the rendezvous store at {where}; node 0 (--node-rank 0) hosts "
                "it: start it on that host"
            )
        elif isinstance(err, RendezvousTimeoutError):
            message = (
                f"not all {rendezvous.nnodes} nodes joined the rendezvous at {where}; start "
                "each with the same --nnodes and --rdzv-endpoint"
            )
        else:
            message = f"the rendezvous at {rendezvous.endpoint} failed: {type(err).__name__}"
        raise UserError(message) from err
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


def launched() -> bool:
    """True inside a process started by a launcher: torchrun / the elastic agent, or any that
    sets RANK (then `rank_environment` checks the rest)."""
    return any(v in os.environ for v in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "RANK"))


def barrier(world: World) -> None:
    if world.world_size > 1:
        dist.barrier()
