"""Everything checked before any process starts: config consistency, data, resume target, storage."""

from __future__ import annotations

from typing import Optional

from trainer.checkpoint.store import Checkpoint, resolve_resume
from trainer.checkpoint.universal import missing_states, missing_states_error
from trainer.config.load import model_identity
from trainer.config.resolve import resolve_run
from trainer.config.schema import RunConfig
from trainer.tasks import build_task


def preflight(cfg: RunConfig, world_size: int, source: str) -> Optional[Checkpoint]:
    """Raise `UserError` for anything that would fail after launch; return the checkpoint to resume."""
    task = build_task(cfg)
    hidden = task.model_hints().get("hidden_size")
    resolve_run(cfg, world_size, source, hidden)  # batch and DeepSpeed settings, before the data is read
    sizes = task.preflight()  # None: remote shards not downloaded yet; the ranks resolve the plan then
    model = model_identity(cfg)
    # sizes only (rank 0 checks CRC32Cs); with a bucket none: rank 0 may repair a damaged checkpoint from it
    ckpt = resolve_resume(
        cfg.run_dir, cfg.checkpoint.resume, task=cfg.task, model=model, verify="none" if cfg.upload.url else "sizes"
    )
    run = resolve_run(cfg, world_size, source, hidden, sizes, ckpt.metadata if ckpt else None)
    cfg, plan = run.cfg, run.plan  # (a resumed run keeps its global batch)
    if ckpt is not None:
        ckpt.check_resumable(
            str(cfg.checkpoint.resume), world_size, cfg.task, plan.max_steps if plan else None, model, run.stage
        )
        saved_world = int(ckpt.metadata.get("world_size", world_size))
        if saved_world != world_size and not cfg.upload.url and (missing := missing_states(ckpt.path, saved_world)):
            raise missing_states_error(ckpt.path, saved_world, missing, None)  # (with a bucket, the ranks fetch them)
    if cfg.upload.url:
        from trainer.storage import open_storage

        open_storage(cfg.upload.url).check()
    return ckpt
