"""Training tasks: each builds its model, data and loss; the engine runs any of them."""
from __future__ import annotations

from trainer.config.schema import RunConfig
from trainer.tasks.base import Task


def build_task(cfg: RunConfig) -> Task:
    if cfg.task == "pretrain":
        from trainer.tasks.pretrain import PretrainTask

        return PretrainTask(cfg)
    if cfg.task == "lora":
        from trainer.tasks.lora import LoraTask

        return LoraTask(cfg)
    raise AssertionError(f"unhandled task {cfg.task!r}")  # the config schema admits no other
