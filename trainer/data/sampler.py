"""Deterministic, resumable distributed sampling.

The sample indices a rank reads at optimizer step `step`, micro-batch `micro`, are a pure function
of (seed, step, micro, rank, world size, batch shape): nothing depends on what ran before, so a
resumed run reads exactly what the uninterrupted run would have read, without saving any sampler
state beyond the step. Each epoch is a fresh seeded permutation of all windows.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n)


class ResumableSampler:
    def __init__(self, num_samples: int, seed: int, rank: int, world_size: int, micro_batch: int, grad_accum: int):
        if num_samples < 1:
            raise ValueError("num_samples must be >= 1")
        self.n = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.micro_batch = micro_batch
        self.grad_accum = grad_accum

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def samples_before(self, step: int) -> int:
        """Global samples consumed by the steps before `step` (0-based)."""
        return step * self.global_batch

    def epoch_of(self, step: int) -> float:
        return self.samples_before(step) / self.n

    def indices(self, step: int, micro: int) -> np.ndarray:
        """Sample indices for this rank's micro-batch `micro` of optimizer step `step` (0-based)."""
        first = self.samples_before(step) + (micro * self.world_size + self.rank) * self.micro_batch
        g = np.arange(first, first + self.micro_batch, dtype=np.int64)
        epochs, positions = np.divmod(g, self.n)
        out = np.empty_like(g)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = _permutation(self.seed, int(epoch), self.n)[positions[sel]]
        return out
