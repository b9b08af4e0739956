"""`trainer export CKPT --out DIR`: a checkpoint in the format its users load (Hugging Face / PEFT)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trainer.errors import UserError


def export(
    ckpt: Annotated[Path, typer.Argument(help="A committed checkpoint folder (RUN_DIR/RUN_ID/checkpoints/step-NNNNNNNN).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Folder to write (must not exist, or be empty).", show_default=False)],
) -> None:
    """Export a checkpoint: pretrain -> a transformers model folder; lora -> a PEFT adapter folder plus projectors."""
    import shutil
    import tempfile

    from trainer.checkpoint.store import read_metadata
    from trainer.config.load import load_config
    from trainer.tasks import build_task

    meta = read_metadata(ckpt)
    if not (ckpt / "config.yaml").is_file():
        raise UserError(f"{ckpt}: no config.yaml beside the metadata (a checkpoint from an older trainer?)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty folder (nothing was written)")
    task = build_task(load_config(ckpt / "config.yaml"))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        files = task.export(ckpt, staging, meta)
        if out.exists():
            out.rmdir()
        staging.rename(out)  # all or nothing: a failed export leaves no half-written folder
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    typer.echo(f"exported {meta.get('task', task.name)} checkpoint {ckpt.name} (step {meta['step']}) to {out}: {', '.join(files)}")
