"""The random draws of one training step, independent of how many processes share the batch.

A stage's loss draws noise and times for its batch. With W data-parallel processes each one
holds B = B_global / W examples: rank r holds the rows r, r + W, r + 2W, ... of the global batch
(the loader's sharding, :func:`ulframe.data.shard_indices`, interleaves the same way). A
:class:`BatchNoise` makes every draw for the *global* batch from a generator seeded identically
on all ranks and keeps this rank's rows, so each example gets the same noise, and the antithetic
times the same grid, whatever W: W processes compute the loss of one process, and a run on 2
processes matches a run on 1 up to float reductions (tested).

The price is that every rank draws W times the noise it uses: one ``randn`` of the global batch
per call, small next to the networks' forward and backward passes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ulframe.diffusion.elbo import antithetic_t


class BatchNoise:
    """This rank's rows of random draws made for the whole global batch.

    Args:
        generator: seeded identically on every rank (the training loop seeds it from the run's
            seed and the samples seen).
        rank, world_size: this process and the number of processes sharing the global batch.
    """

    def __init__(self, generator: torch.Generator, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.generator = generator
        self.rank = rank
        self.world_size = world_size

    @classmethod
    def of(cls, noise: BatchNoise | torch.Generator) -> BatchNoise:
        """`noise` itself, or a single-process BatchNoise around a plain generator."""
        return noise if isinstance(noise, BatchNoise) else cls(noise)

    def _rows(self, full: Tensor) -> Tensor:
        return full[self.rank :: self.world_size] if self.world_size > 1 else full

    def _global(self, shape: Sequence[int]) -> tuple[int, ...]:
        return (shape[0] * self.world_size, *shape[1:])

    def randn(
        self, shape: Sequence[int], device: torch.device, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """Standard normal draws of `shape` (B, ...) for this rank's rows."""
        full = torch.randn(
            self._global(shape), generator=self.generator, device=device, dtype=dtype
        )
        return self._rows(full)

    def rand(
        self, shape: Sequence[int], device: torch.device, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """Uniform [0, 1) draws of `shape` (B, ...) for this rank's rows."""
        full = torch.rand(self._global(shape), generator=self.generator, device=device, dtype=dtype)
        return self._rows(full)

    def antithetic_t(self, batch: int, device: torch.device) -> Tensor:
        """This rank's (B,) times of the antithetic grid over the global batch."""
        return self._rows(antithetic_t(batch * self.world_size, self.generator, device))
