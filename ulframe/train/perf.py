"""FLOPs of a training step and the device's matmul rate: what model FLOP/s and MFU are made of.

- `train_flops(step_fn)`: the FLOPs of one forward and backward, counted by torch's
  `FlopCounterMode` (matmuls, convolutions, attention: the operations that dominate; element-wise
  work is not counted, as in the usual MFU definition) around `loss = step_fn(); loss.backward()`.
- `measure_matmul_rate(device, dtype)`: the FLOP/s square matmuls achieve on the device in that
  dtype, a short probe: the reference of MFU when no datasheet peak is given
  (`TrainSettings.peak_flops`).

The loop counts the FLOPs per training example once at build (`example_flops`) and logs
`perf/model_tflops_per_s` (per device) and `perf/mfu` with the training scalars.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

PROBE_SIZES = {"cuda": 8192, "cpu": 512}  # square matmul sizes: large enough to be compute-bound
_RATES: dict[tuple[str, str, int], float] = {}  # (device, dtype, CPU threads) -> FLOP/s


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
    """Achieved FLOP/s of square matmuls in `dtype` on `device`: one warm-up, then as many
    matmuls as fit in about `seconds` (synchronised on CUDA)."""
    n = PROBE_SIZES.get(device.type, PROBE_SIZES["cpu"])
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn((n, n), generator=gen, device=device).to(dtype)
    b = torch.randn((n, n), generator=gen, device=device).to(dtype)
    flops_each = 2 * n**3
    torch.mm(a, b)  # warm-up: kernels chosen, caches and clocks up
    _sync(device)
    t0 = time.perf_counter()
    torch.mm(a, b)
    _sync(device)
    once = max(time.perf_counter() - t0, 1e-9)
    count = max(1, int(seconds / once))
    t0 = time.perf_counter()
    for _ in range(count):
        torch.mm(a, b)
    _sync(device)
    return count * flops_each / max(time.perf_counter() - t0, 1e-9)


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
