"""`trainer doctor [CONFIG] [--hostfile H]`: what to check first on a new VM, PASS/FAIL per check."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from trainer.cli.options import HostfileOpt, SetOpt, overrides


def doctor(
    config: Annotated[
        Optional[Path], typer.Argument(help="A run config: its run_dir, upload.url and tracking are checked too.")
    ] = None,
    hostfile: HostfileOpt = None,
    sets: SetOpt = None,
    build_ops: Annotated[
        bool,
        typer.Option(
            "--build-ops",
            help="Build (or load from the cache) DeepSpeed's ops, not only check"
            " that they can build (about a minute each the first time).",
        ),
    ] = False,
) -> int:
    """Torch, CUDA/NCCL and every GPU, DeepSpeed and its ops; with CONFIG: free disk for its checkpoints, the bucket
    (a probe object created and deleted) and MLflow; with --hostfile: every host over ssh. Exit 0 only if all pass."""
    from trainer.launcher.doctor import run_doctor

    cfg = None
    if config is not None:
        from trainer.config.load import load_config

        cfg = load_config(config, overrides(sets, None, None, None))
    return 0 if run_doctor(cfg, hostfile, typer.echo, build_ops) else 1
