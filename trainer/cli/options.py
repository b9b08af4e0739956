"""Option aliases shared by the commands that take a run config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ConfigArg = Annotated[
    Path, typer.Argument(help="Run config YAML, e.g. configs/pretrain_tiny.yaml.", show_default=False)
]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", help="Override any field: --set optim.lr=3e-4 (repeatable).")
]
MaxStepsOpt = Annotated[Optional[int], typer.Option("--max-steps", help="train.max_steps")]
NumEpochsOpt = Annotated[Optional[float], typer.Option("--num-epochs", help="train.epochs (instead of --max-steps)")]
BatchSizeOpt = Annotated[Optional[int], typer.Option("--batch-size", help="train.micro_batch_size")]
LearningRateOpt = Annotated[Optional[float], typer.Option("--learning-rate", help="optim.lr")]
ResumeOpt = Annotated[Optional[str], typer.Option("--resume", help="auto | latest | TAG | RUN_ID/TAG | PATH")]
HostfileOpt = Annotated[
    Optional[Path], typer.Option("--hostfile", help="DeepSpeed hostfile (HOSTNAME slots=N per line).")
]
NumRanksOpt = Annotated[Optional[int], typer.Option("--num-ranks", min=1, help="Ranks on this machine (no hostfile).")]


def overrides(sets, max_steps, batch_size, learning_rate, resume=None, epochs=None):  # type: ignore[no-untyped-def]
    from trainer.config.load import Overrides

    return Overrides(
        sets=list(sets or []),
        max_steps=max_steps,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        resume=resume,
    )
