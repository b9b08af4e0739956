"""Held-out evaluation: the same fixed validation samples at every evaluation, split over the ranks.

The subset is a pure function of the validation set's size and the eval batch shape: a permutation
with a fixed seed (not `train.seed`: runs with other seeds are measured on the same samples), of
which the first `eval.batches x micro_batch_size x world size` samples are used (all of them with
`eval.batches: 0`). Rank r takes its own micro-batches of them; every rank runs the same number of
forward passes (ZeRO-3 gathers parameters collectively), a rank without samples left in the last
batch runs one sample and counts nothing. The summed loss and the token count go through one
all-reduce: the token-weighted mean over the subset, whatever the world size.

Evaluation leaves training as it was: modules return to the train/eval mode they had, and the RNG
states (Python, NumPy, torch, CUDA) are put back, so a run's training losses are the same bit for
bit with evaluation on or off.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from trainer.engine import dist
from trainer.engine.rng import capture_rng, restore_rng
from trainer.ranks import RankInfo

SUBSET_SEED = 0x5EED  # the validation subset does not depend on train.seed


@dataclass(frozen=True)
class EvalResult:
    step: int
    loss: float
    perplexity: Optional[float]
    tokens: int
    samples: int
    seconds: float


def eval_subset(val_size: int, batches: int, micro_batch: int, world_size: int) -> np.ndarray:
    """The validation sample indices every evaluation uses, in evaluation order."""
    order = np.random.Generator(np.random.PCG64(SUBSET_SEED)).permutation(val_size)
    return order if batches == 0 else order[: min(val_size, batches * micro_batch * world_size)]


def rank_batches(subset: np.ndarray, micro_batch: int, ranks: RankInfo) -> list[list[int]]:
    """This rank's micro-batches of `subset` (possibly empty ones at the end, so all ranks run as many)."""
    per = micro_batch * ranks.world_size
    out = []
    for start in range(0, len(subset), per):
        lo = start + ranks.rank * micro_batch
        out.append([int(i) for i in subset[lo : min(lo + micro_batch, start + per, len(subset))]])
    return out


class Evaluator:
    def __init__(self, task: Any, engine: Any, ranks: RankInfo, micro_batch: int, batches: int):
        self.task, self.engine, self.ranks = task, engine, ranks
        self.subset = eval_subset(task.val_size(), batches, micro_batch, ranks.world_size)
        self.batches = rank_batches(self.subset, micro_batch, ranks)

    def describe(self) -> str:
        return (
            f"evaluation: {len(self.subset):,} of {self.task.val_size():,} validation samples"
            f" ({len(self.batches)} batch(es) per rank), the same ones every time"
        )

    def run(self, step: int) -> EvalResult:
        """Evaluate the model as it is now (collective)."""
        import torch

        t0 = time.perf_counter()
        module = self.engine.module
        modes = [(m, m.training) for m in module.modules()]
        rng = capture_rng()
        total: Any = 0.0
        tokens = 0
        module.eval()
        try:
            with torch.no_grad():
                for indices in self.batches:
                    real = bool(indices)
                    batch = self.task.val_batch(indices if real else [int(self.subset[0])], self.engine.device)
                    loss_sum, count = self.task.eval_loss(self.engine, batch)
                    if real:
                        total = total + loss_sum.detach().double()
                        tokens += count
        finally:
            for m, training in modes:
                m.training = training
            restore_rng(rng)
        loss_sum, token_sum = dist.all_reduce_sum([float(total), float(tokens)])
        loss = loss_sum / token_sum if token_sum else float("nan")
        ppl = (math.exp(loss) if loss < 700 else float("inf")) if getattr(self.task, "perplexity", False) else None
        return EvalResult(step, loss, ppl, int(token_sum), len(self.subset), time.perf_counter() - t0)
