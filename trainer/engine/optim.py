"""Optimizer parameter groups and the warmup + decay learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

from trainer.config.schema import OptimConfig


def param_groups(named_params: Iterable[tuple[str, Any]], weight_decay: float) -> list[dict]:
    """Two groups: matrices get weight decay, biases and norm weights (ndim < 2) do not."""
    decay, no_decay = [], []
    for _, p in named_params:
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))
        (decay if ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class LRSchedule:
    """Multiplier of the peak LR at optimizer step `step` (0-based): linear warmup, then decay.

    A callable object, not a lambda, so `LambdaLR.state_dict()` can save it with the checkpoint.
    """

    def __init__(self, warmup_steps: int, max_steps: int, schedule: str, min_ratio: float):
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.schedule = schedule
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.schedule == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * shape


def optimizer_factory(cfg: OptimConfig, fused: bool) -> Callable[[Any], Any]:
    """A callable DeepSpeed calls with the parameter groups: torch's AdamW (exact, resumable state)."""

    def make(groups: Any) -> Any:
        import torch

        kwargs = {"fused": True} if fused else {"foreach": True}
        return torch.optim.AdamW(
            groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, **kwargs
        )

    return make


def schedule_for(cfg: OptimConfig, plan: Any) -> LRSchedule:
    """The LR multiplier of `cfg` with the step counts the run's `Plan` resolved (warmup, decay length)."""
    return LRSchedule(plan.warmup_steps, plan.decay_steps, cfg.schedule, cfg.min_lr_ratio)


def scheduler_factory(cfg: OptimConfig, plan: Any) -> Callable[[Any], Any]:
    def make(optimizer: Any) -> Any:
        import torch

        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_for(cfg, plan))

    return make


def reapply_schedule(scheduler: Any, cfg: OptimConfig, plan: Any) -> None:
    """After loading a checkpoint, make the configured schedule win over the saved one.

    `LambdaLR.load_state_dict` restores the schedule object's fields from the checkpoint; a resumed
    run that extends `max_steps` (or changes the decay) must follow its own config from here on.
    The step counter (`last_epoch`) stays as loaded.
    """
    fresh = schedule_for(cfg, plan)
    for fn in scheduler.lr_lambdas:
        fn.__dict__.update(fresh.__dict__)
    for group, base_lr, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * fn(scheduler.last_epoch)
