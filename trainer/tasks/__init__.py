"""Training tasks: each builds its model, data and loss; the engine runs any of them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

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


def export_checkpoint(ckpt: Path, out: Path, task: Optional[Task] = None) -> tuple[dict, list[str]]:
    """Write a committed checkpoint in the format its users load (the task's `export`) to `out`.

    All or nothing: the files go to a staging folder beside `out`, renamed into place at the end.
    `out` must not exist or be an empty folder. Returns (metadata, names of the files written).
    """
    import shutil
    import tempfile

    from trainer.checkpoint.store import read_metadata
    from trainer.config.load import load_config
    from trainer.errors import UserError

    ckpt, out = Path(ckpt), Path(out)
    meta = read_metadata(ckpt)
    if task is None:
        if not (ckpt / "config.yaml").is_file():
            raise UserError(f"{ckpt}: no config.yaml beside the metadata (a checkpoint from an older trainer?)")
        task = build_task(load_config(ckpt / "config.yaml"))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty folder (nothing was written)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        files = task.export(ckpt, staging, meta)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return meta, files
