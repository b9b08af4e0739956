"""The run config resolved for the ranks that run it: the global batch on this world size (a resumed run's kept),
the DeepSpeed config rendered from its template, the ZeRO stage, and the plan once the data's size is known.

One definition of that sequence for the three places that check a config before work: `trainer train`'s
preflight (one process, before any launch), every rank's setup, and `trainer validate`. Each calls it first
without data sizes (inconsistent batch or DeepSpeed settings are one line before any data is read), then with
them and the metadata of the checkpoint it resumes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from trainer.config.batch import resolve_batch
from trainer.config.deepspeed import render_ds_config, zero_stage
from trainer.config.plan import DataSizes, Plan, resolve_plan
from trainer.config.schema import RunConfig


@dataclass(frozen=True)
class ResolvedRun:
    cfg: RunConfig  # train.grad_accum and train.global_batch_size resolved for the world size
    ds_config: dict
    stage: int
    plan: Optional[Plan]  # None until the data's size is known


def resolve_run(
    cfg: RunConfig,
    world_size: int,
    source: str,
    hidden_size: Optional[int],
    sizes: Optional[DataSizes] = None,
    resume: Optional[dict] = None,
) -> ResolvedRun:
    """`cfg` on `world_size` ranks; `resume`: the metadata of the checkpoint the run continues. `UserError` (naming
    `source` and the field) for settings that cannot run."""
    cfg = resolve_batch(cfg, world_size, source, resume)
    ds_config = render_ds_config(cfg, world_size, hidden_size, source)
    plan = resolve_plan(cfg, sizes, world_size) if sizes is not None else None
    return ResolvedRun(cfg, ds_config, zero_stage(ds_config), plan)
