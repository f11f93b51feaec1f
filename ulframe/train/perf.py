"""FLOPs of a training step and the device's matmul rate: what model FLOP/s and MFU are made of.

- `train_flops(step_fn)`: the FLOPs of one forward and backward, counted by torch's
  `FlopCounterMode` (matmuls, convolutions, attention: the operations that dominate; element-wise
  work is not counted, as in the usual MFU definition) around `loss = step_fn(); loss.backward()`.
- `measure_matmul_rate(device, dtype)`: the FLOP/s square matmuls achieve on the device in that
  dtype, a short probe (warm-up, then the best of several timed repeats): the reference of MFU
  when no datasheet peak is given (`TrainSettings.peak_flops`).

torch's counter has formulas for the CUDA attention kernels but none for the CPU one
(`aten._scaled_dot_product_flash_attention_for_cpu` and its backward); importing this module
registers torch's own sdpa formulas for it, so a CPU count includes attention as a CUDA count
does (forward 4·B·H·L·S·D: two matmuls of 2·B·H·L·S·D).

With `TrainSettings.measure_mfu` (the default), the loop counts the FLOPs per training example
once at the stage's start (`count_example_flops` on `probe_batch`), takes the peak (`peak_flops`, or the
probe) and logs `perf/model_tflops_per_s` (per device) and `perf/mfu` with the training scalars;
without it, neither the count nor the probe runs.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from ulframe.data.pipeline import collate, readable_examples
from ulframe.diffusion import BatchNoise

log = logging.getLogger(__name__)

PROBE_SIZES = {"cuda": 8192, "cpu": 512}  # square matmul sizes: large enough to be compute-bound
PROBE_REPEATS = 5  # timed repeats after the warm-up; the rate is the best of them
_RATES: dict[tuple[str, str, int], float] = {}  # (device, dtype, CPU threads) -> FLOP/s


def _register_cpu_attention() -> None:
    """Give the CPU flash-attention kernels (forward, backward) torch's sdpa formulas, where this
    torch has those kernels, has the formulas and does not count the kernels already."""
    forward_count = getattr(flop_counter, "sdpa_flop_count", None)
    backward_count = getattr(flop_counter, "sdpa_backward_flop_count", None)
    if forward_count is None or backward_count is None:
        return

    def forward(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kw: Any) -> int:
        return int(forward_count(q, k, v))

    def backward(
        grad: Any, q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kw: Any
    ) -> int:
        return int(backward_count(grad, q, k, v))

    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", forward),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", backward),
    ):
        op = None
        with contextlib.suppress(AttributeError, RuntimeError):
            op = getattr(torch.ops.aten, name)
        if op is not None and op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op)(formula)


_register_cpu_attention()


def train_flops(step_fn: Callable[[], torch.Tensor]) -> int:
    """FLOPs of one forward and backward: `loss = step_fn(); loss.backward()` under
    `FlopCounterMode` (gradients accumulate into the parameters as usual; the caller clears
    them)."""
    counter = FlopCounterMode(display=False)
    with counter:
        loss = step_fn()
        loss.backward()
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_rate(device: torch.device, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """Achieved FLOP/s of square matmuls in `dtype` on `device`: matmuls for about `seconds` as a
    warm-up (kernels chosen, caches filled, a GPU's clocks raised from idle), then
    `PROBE_REPEATS` timed repeats of about `seconds / PROBE_REPEATS` each (synchronised on
    CUDA); the best repeat's rate (the device's capability, least disturbed by other work)."""
    n = PROBE_SIZES.get(device.type, PROBE_SIZES["cpu"])
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn((n, n), generator=gen, device=device).to(dtype)
    b = torch.randn((n, n), generator=gen, device=device).to(dtype)
    flops_each = 2 * n**3
    _sync(device)
    count = 0
    t0 = time.perf_counter()
    while True:  # warm-up: at least one matmul, then until `seconds` have passed
        torch.mm(a, b)
        count += 1
        if count & (count - 1) == 0:  # synchronise at powers of two: few host stalls
            _sync(device)
            if time.perf_counter() - t0 >= seconds:
                break
    once = (time.perf_counter() - t0) / count
    per_repeat = max(1, int(seconds / PROBE_REPEATS / max(once, 1e-9)))
    best = 0.0
    for _ in range(PROBE_REPEATS):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(per_repeat):
            torch.mm(a, b)
        _sync(device)
        best = max(best, per_repeat * flops_each / max(time.perf_counter() - t0, 1e-9))
    return best


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """`measure_matmul_rate`, measured once per (device, dtype, CPU threads) in a process."""
    key = (str(device), str(dtype), torch.get_num_threads())
    if key not in _RATES:
        _RATES[key] = measure_matmul_rate(device, dtype)
    return _RATES[key]


def mfu_scalars(
    flops_per_example: float, samples_per_s: float, world_size: int, peak_flops: float
) -> dict[str, float]:
    """`perf/model_tflops_per_s` (model FLOP/s per device, in 1e12) and `perf/mfu` (that over
    the peak FLOP/s of a device); empty when the FLOPs or the peak are unknown."""
    if flops_per_example <= 0 or peak_flops <= 0:
        return {}
    per_device = flops_per_example * samples_per_s / max(world_size, 1)
    return {"perf/model_tflops_per_s": per_device / 1e12, "perf/mfu": per_device / peak_flops}


def probe_batch(source: Any, size: int = 2, tries: int = 16) -> dict[str, torch.Tensor] | None:
    """A batch of the first `size` readable examples of a Source (among its first `tries`
    items, decoded as the loader decodes them: `readable_examples`), or None, logged, when
    there is none or they make no batch: the run then logs no MFU, and goes on."""
    try:
        examples = readable_examples(source, size, tries)
        if not examples:
            raise ValueError(f"none of the first {tries} items could be decoded")
        return collate(examples)
    except Exception as err:  # only the MFU needs it: the loader reports bad data itself
        log.warning("no batch to count the model's FLOPs on (%s): perf/mfu is not logged", err)
        return None


def count_example_flops(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], autocast: Any = None
) -> float:
    """Model FLOPs of one example's forward and backward, counted (`train_flops`) on
    `batch` with eager `model` before it is wrapped or compiled; 0 when counting fails. The
    random streams, the gradients and the buffers (running statistics a training forward
    updates, e.g. a KL autoencoder's latent variance) are left as they were."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    device = next(iter(batch.values())).device
    rows = len(next(iter(batch.values())))

    def step() -> torch.Tensor:
        noise = BatchNoise(torch.Generator(device).manual_seed(0), 0, 1)
        with autocast if autocast is not None else torch.autocast(device.type, enabled=False):
            return model(batch, noise).total_nats().mean()

    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            flops = train_flops(step)
    except Exception as err:  # a model FlopCounterMode cannot run: no MFU, training goes on
        log.warning("could not count the model's FLOPs (%s): perf/mfu is not logged", err)
        flops = 0
    finally:
        for p in model.parameters():
            p.grad = None
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
    return flops / max(rows, 1)
