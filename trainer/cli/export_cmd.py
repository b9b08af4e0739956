"""`trainer export CKPT --out DIR`: a checkpoint in the format its users load (Hugging Face / PEFT)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def export(
    ckpt: Annotated[
        str,
        typer.Argument(
            help="A checkpoint folder, or a reference looked up under --runs: TAG, RUN/TAG,"
            " RUN (its newest), latest, best.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Folder to write (must not exist, or be empty).", show_default=False)
    ],
    runs: Annotated[str, typer.Option("--runs", "-r", help="Folder of runs where references are looked up.")] = "runs",
) -> None:
    """Export a checkpoint: pretrain -> a transformers model folder; lora -> a PEFT adapter folder plus projectors."""
    from trainer.checkpoint.catalog import resolve
    from trainer.errors import UserError
    from trainer.tasks import export_checkpoint

    entry = resolve(ckpt, runs)
    if entry.local is None:
        raise UserError(
            f"{ckpt}: a checkpoint in the bucket; restore it first (`trainer train` with --resume auto"
            " does) or export a local copy"
        )
    meta, files = export_checkpoint(entry.local, out)
    typer.echo(
        f"exported {meta.get('task', '')} checkpoint {entry.local.name} (step {meta['step']}) to {out}: "
        f"{', '.join(files)}"
    )
