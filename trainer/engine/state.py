"""What the loop carries from step to step (`RunState`, into every checkpoint's metadata), the start's decision
(`RunDecision`: the run id and the checkpoint to resume) and the loss window between two log points."""

from __future__ import annotations

import datetime as dt
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from trainer.checkpoint.catalog import trend_of
from trainer.engine import dist
from trainer.engine.evaluate import EvalResult


def new_run_id() -> str:
    return f"{uuid.uuid4().hex}_{dt.datetime.now().strftime('%Y%m%d_%H%M%S')}"


@dataclass
class RunState:
    """What the loop carries from step to step and into every checkpoint's metadata."""

    step: int = 0
    loss_history: list[list[float]] = field(default_factory=list)
    lr_history: list[list[float]] = field(default_factory=list)
    best_loss: Optional[float] = None
    best_step: Optional[int] = None
    last_loss: Optional[float] = None
    val_history: list[list[float]] = field(default_factory=list)  # [step, val loss] of every evaluation
    best_val_loss: Optional[float] = None
    best_val_step: Optional[int] = None
    last_ppl: Optional[float] = None

    def record(self, step: int, loss: float, lr: float) -> None:
        self.loss_history.append([step, loss])
        self.lr_history.append([step, lr])
        self.last_loss = loss
        if math.isfinite(loss) and (self.best_loss is None or loss < self.best_loss):
            self.best_loss, self.best_step = loss, step

    def record_val(self, r: EvalResult) -> bool:
        """Add an evaluation; True if its loss is the best so far."""
        self.val_history.append([r.step, r.loss])
        self.last_ppl = r.perplexity
        better = math.isfinite(r.loss) and (self.best_val_loss is None or r.loss < self.best_val_loss)
        if better:
            self.best_val_loss, self.best_val_step = r.loss, r.step
        return better

    def val_at(self, step: int) -> Optional[float]:
        """The validation loss measured at `step` (None if that step was not evaluated)."""
        return self.val_history[-1][1] if self.val_history and self.val_history[-1][0] == step else None

    def best(self, metric: str) -> tuple[Optional[float], Optional[int]]:
        return (self.best_val_loss, self.best_val_step) if metric == "val_loss" else (self.best_loss, self.best_step)

    def validation_metrics(self, step: int, metric: str) -> Optional[dict]:
        """Where the held-out loss stands after `step` (None before the first evaluation)."""
        if not self.val_history:
            return None
        trend, change = trend_of([float(v) for _, v in self.val_history])
        last_step, last = self.val_history[-1]
        return {
            "current_val_loss": last,
            "current_step": last_step,
            "perplexity": self.last_ppl if last_step == step else None,
            "best_val_loss": self.best_val_loss,
            "best_val_step": self.best_val_step,
            "steps_since_best": step - self.best_val_step if self.best_val_step is not None else None,
            "evaluations": len(self.val_history),
            "trend": trend,
            "trend_change": round(change, 6) if change is not None else None,
            "best_metric": metric,
        }

    @classmethod
    def from_metadata(cls, meta: dict) -> "RunState":
        return cls(
            step=int(meta["step"]),
            loss_history=list(meta.get("loss_history", [])),
            lr_history=list(meta.get("lr_history", [])),
            best_loss=meta.get("best_loss"),
            best_step=meta.get("best_step"),
            last_loss=meta.get("loss"),
            val_history=list(meta.get("val_history") or []),
            best_val_loss=meta.get("best_val_loss"),
            best_val_step=meta.get("best_val_step"),
            last_ppl=(meta.get("validation_metrics") or {}).get("perplexity"),
        )


@dataclass(frozen=True)
class RunDecision:
    """Rank 0's choice at the start, shared with every rank: the run id and the checkpoint to resume (if any)."""

    run_id: str
    resume: Optional[str] = None  # the checkpoint folder
    metadata: Optional[dict] = None  # its metadata.json (mlflow_run_id cleared on a branch)
    branched_from: Optional[str] = None  # set when the checkpoint has newer ones: a new run continues it
    restored: Optional[str] = None  # the bucket prefix it was restored from on this start


class LossWindow:
    """Sums losses on the device between log points; one all-reduce turns them into a global mean."""

    def __init__(self) -> None:
        self.total: Any = 0.0
        self.count = 0
        self.steps = 0
        self.started = time.perf_counter()

    def restart_clock(self) -> None:
        """An empty window's time starts now (what came before it, an evaluation, is not step time)."""
        if self.count == 0:
            self.started = time.perf_counter()

    def add(self, loss: Any) -> None:
        self.total = self.total + loss.detach().float()
        self.count += 1

    def close(self) -> tuple[float, int, float]:
        """(global mean loss, steps in window, seconds) and start a new window. Collective."""
        local = float(self.total) if self.count else 0.0
        total, count = dist.all_reduce_sum([local, float(self.count)])
        elapsed = time.perf_counter() - self.started
        steps = self.steps
        self.__init__()
        return (total / count if count else float("nan")), steps, elapsed
