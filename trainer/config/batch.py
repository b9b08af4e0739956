"""The global batch on this world size: `train.grad_accum` derived so that a run keeps its batch.

`global batch = micro_batch_size x grad_accum x world size`. With `train.global_batch_size` set,
`grad_accum` is derived from it on whatever world size the job got (8 ranks: 2, 4 ranks: 4), so the
LR schedule, the step count and the samples of every step stay the same. Without it, `grad_accum`
is taken as configured, except when a job resumes a checkpoint saved on another world size: then
the checkpoint's global batch is kept the same way. A world size that cannot keep the batch is
refused with the numbers.
"""

from __future__ import annotations

from typing import Optional

from trainer.config.schema import RunConfig
from trainer.errors import UserError
from trainer.log import get_logger

log = get_logger("config")


def saved_global_batch(meta: dict) -> Optional[int]:
    """The global batch a checkpoint was trained with (its plan; older metadata: its config and world size)."""
    plan = meta.get("plan") or {}
    if plan.get("global_batch"):
        return int(plan["global_batch"])
    train = (meta.get("config") or {}).get("train") or {}
    try:
        return int(train["micro_batch_size"]) * int(train.get("grad_accum", 1)) * int(meta["world_size"])
    except (KeyError, TypeError, ValueError):
        return None


def resolve_batch(cfg: RunConfig, world_size: int, source: str = "config", resume: Optional[dict] = None) -> RunConfig:
    """`cfg` with `train.grad_accum` and `train.global_batch_size` resolved for `world_size` ranks.

    `resume`: the metadata of the checkpoint this job continues (its global batch is kept when it was
    saved on another world size and the config sets no `global_batch_size`). `UserError` when the
    global batch is not a multiple of micro batch x world size, or contradicts an explicit grad_accum."""
    t = cfg.train
    per_step = t.micro_batch_size * world_size  # samples of one micro-batch over all ranks
    explicit_accum = "grad_accum" in t.model_fields_set
    saved_world = int(resume.get("world_size", world_size)) if resume else world_size
    target, kept_from = t.global_batch_size, None
    if target is None and resume is not None and saved_world != world_size:
        target, kept_from = saved_global_batch(resume), resume.get("tag") or f"step {resume.get('step')}"
    if target is None:
        return _with(cfg, t.grad_accum, per_step * t.grad_accum)
    if target % per_step:
        what = (
            f"the global batch {target} of {kept_from} ({saved_world} ranks)"
            if kept_from
            else f"{source}: train.global_batch_size {target}"
        )
        fits = [w for w in range(1, target + 1) if target % (t.micro_batch_size * w) == 0]
        raise UserError(
            f"{what} is not a multiple of train.micro_batch_size {t.micro_batch_size} x world size {world_size}"
            f" = {per_step}: the global batch cannot be kept on {world_size} rank(s) (world sizes that keep"
            f" it: {', '.join(map(str, fits[:8]))}; or change train.micro_batch_size)"
        )
    accum = target // per_step
    if explicit_accum and accum != t.grad_accum:
        if kept_from is None:
            raise UserError(
                f"{source}: train.global_batch_size: {target} != train.micro_batch_size {t.micro_batch_size}"
                f" x train.grad_accum {t.grad_accum} x world size {world_size} = {per_step * t.grad_accum};"
                " leave train.grad_accum out to derive it from the global batch on any world size"
            )
        log.info(
            "keeping the global batch %d of %s (saved on %d ranks): train.grad_accum %d -> %d on %d rank(s)",
            target,
            kept_from,
            saved_world,
            t.grad_accum,
            accum,
            world_size,
        )
    return _with(cfg, accum, target)


def _with(cfg: RunConfig, accum: int, global_batch: int) -> RunConfig:
    if cfg.train.grad_accum == accum and cfg.train.global_batch_size == global_batch:
        return cfg
    train = cfg.train.model_copy(update={"grad_accum": accum, "global_batch_size": global_batch})
    return cfg.model_copy(update={"train": train})
