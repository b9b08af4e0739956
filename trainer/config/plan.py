"""The run's plan: the config resolved against the data and the world size.

`train.epochs`, `optim.warmup_ratio` and the `epoch` cadences of `eval.every` and
`checkpoint.save_every` depend on how many training samples there are and how many a step
consumes (the global batch). They are resolved once at start, printed, and stored in every
checkpoint's metadata; everything that needs a step count asks the plan, never the raw config.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional, Union

from trainer.config.schema import DEFAULT_MAX_STEPS, DEFAULT_WARMUP_STEPS, RunConfig
from trainer.errors import UserError


@dataclass(frozen=True)
class DataSizes:
    """What a task's preflight found: training samples (windows for pretrain) and validation samples."""

    train: int
    val: int = 0
    val_source: str = ""  # the config field the validation data comes from, for messages


@dataclass(frozen=True)
class Cadence:
    """`every N steps`, or `every epoch` (the step whose samples complete a pass over the data)."""

    every: Union[int, str]
    global_batch: int
    train_size: int

    def due(self, step: int) -> bool:
        if step < 1:
            return False
        if self.every == "epoch":
            return (step * self.global_batch) // self.train_size > ((step - 1) * self.global_batch) // self.train_size
        return step % int(self.every) == 0

    def next_after(self, step: int) -> int:
        """The first step after `step` at which this cadence is due."""
        if self.every == "epoch":
            done = (step * self.global_batch) // self.train_size  # epochs completed after `step`
            return -(-(done + 1) * self.train_size // self.global_batch)
        return (step // int(self.every) + 1) * int(self.every)


@dataclass(frozen=True)
class Plan:
    max_steps: int
    warmup_steps: int
    decay_steps: int
    global_batch: int
    train_size: int
    val_size: int
    epochs: Optional[float]  # as configured (None: the run's length was given in steps)
    eval_every: Union[int, str]
    save_every: Union[int, str]
    evaluates: bool
    best_metric: str  # val_loss | train_loss

    @property
    def steps_per_epoch(self) -> float:
        return self.train_size / self.global_batch

    def epoch_of(self, step: int) -> float:
        """Passes over the training data completed after `step` optimizer steps (fractional)."""
        return step * self.global_batch / self.train_size

    def eval_due(self, step: int) -> bool:
        return self.evaluates and (
            step == self.max_steps or Cadence(self.eval_every, self.global_batch, self.train_size).due(step)
        )

    def save_due(self, step: int) -> bool:
        return Cadence(self.save_every, self.global_batch, self.train_size).due(step)

    def next_save(self, step: int) -> int:
        return Cadence(self.save_every, self.global_batch, self.train_size).next_after(step)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "steps_per_epoch": round(self.steps_per_epoch, 6)}

    def describe(self) -> str:
        length = (
            f"train.epochs {self.epochs:g} x {self.train_size:,} samples / global batch {self.global_batch}"
            f" ({self.steps_per_epoch:.2f} steps per epoch) = {self.max_steps} steps"
            if self.epochs is not None
            else f"{self.max_steps} steps = {self.epoch_of(self.max_steps):.2f} epochs of {self.train_size:,} samples"
            f" (global batch {self.global_batch})"
        )
        return f"plan: {length}; warmup {self.warmup_steps} steps"


def resolve_plan(cfg: RunConfig, sizes: DataSizes, world_size: int) -> Plan:
    """The plan of `cfg` on `world_size` ranks over data of `sizes`; `UserError` if the data cannot carry it."""
    t, o = cfg.train, cfg.optim
    global_batch = t.micro_batch_size * t.grad_accum * world_size
    if sizes.train < 1:
        raise UserError("the training data holds no samples")
    if t.epochs is not None:
        max_steps = max(1, math.ceil(t.epochs * sizes.train / global_batch - 1e-9))
    else:
        max_steps = t.max_steps or DEFAULT_MAX_STEPS
    decay = o.decay_steps or max_steps
    if o.warmup_ratio is not None:
        warmup = int(round(o.warmup_ratio * decay))
    elif o.warmup_steps is not None:
        warmup = o.warmup_steps
        if warmup > decay:
            raise UserError(
                f"optim.warmup_steps ({warmup}) must not exceed the schedule length ({decay} steps"
                f"{', derived from train.epochs' if t.epochs is not None and not o.decay_steps else ''})"
            )
    else:
        warmup = min(DEFAULT_WARMUP_STEPS, decay)
    evaluates = cfg.eval.enabled and sizes.val > 0
    eval_batch = t.micro_batch_size * world_size
    if evaluates and sizes.val < eval_batch:
        raise UserError(
            f"{sizes.val_source or 'validation data'}: {sizes.val} validation sample(s), fewer than one evaluation"
            f" batch (train.micro_batch_size {t.micro_batch_size} x {world_size} rank(s) = {eval_batch}); add"
            " validation data or lower train.micro_batch_size"
        )
    best = cfg.checkpoint.best_metric or ("val_loss" if evaluates else "train_loss")
    if best == "val_loss" and not evaluates:
        raise UserError(
            "checkpoint.best_metric val_loss: this run has no validation data (set data.val_path, data.val_fraction"
            " or data.val_file) or eval.enabled is false"
        )
    if cfg.checkpoint.save_best and not evaluates:
        raise UserError("checkpoint.save_best: this run does not evaluate (no validation data, or eval.enabled false)")
    return Plan(
        max_steps=max_steps,
        warmup_steps=warmup,
        decay_steps=decay,
        global_batch=global_batch,
        train_size=sizes.train,
        val_size=sizes.val,
        epochs=t.epochs,
        eval_every=cfg.eval.every,
        save_every=cfg.checkpoint.save_every,
        evaluates=evaluates,
        best_metric=best,
    )
