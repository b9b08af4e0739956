"""`trainer train`: validate everything, then start the `deepspeed` launcher as one process group."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer

from trainer.cli.options import (
    BatchSizeOpt,
    ConfigArg,
    HostfileOpt,
    LearningRateOpt,
    MaxStepsOpt,
    NumEpochsOpt,
    NumRanksOpt,
    ResumeOpt,
    SetOpt,
    overrides,
)
from trainer.errors import UserError


def default_num_ranks() -> int:
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def train(
    config: ConfigArg,
    hostfile: HostfileOpt = None,
    num_ranks: NumRanksOpt = None,
    sets: SetOpt = None,
    max_steps: MaxStepsOpt = None,
    num_epochs: NumEpochsOpt = None,
    batch_size: BatchSizeOpt = None,
    learning_rate: LearningRateOpt = None,
    resume: ResumeOpt = None,
    node_rank: Annotated[
        Optional[int],
        typer.Option("--node-rank", min=0, help="Start only this node's ranks (no ssh); run once per node."),
    ] = None,
    master_addr: Annotated[
        Optional[str], typer.Option("--master-addr", help="Address of the node with rank 0.")
    ] = None,
    master_port: Annotated[
        Optional[int],
        typer.Option("--master-port", help="Rendezvous port (default: a free one on one machine, 29500 across nodes)."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate and print the launcher command, run nothing.")
    ] = False,
    no_background_upload: Annotated[
        bool,
        typer.Option(
            "--no-background-upload",
            help="Upload each checkpoint before training goes on (upload.background: false; training waits).",
        ),
    ] = False,
) -> int:
    """Train a run config with DeepSpeed: checks the config, hostfile and data, then launches the ranks."""
    from trainer.config.load import load_config
    from trainer.data.shards import SHARDS_CHECKED_ENV
    from trainer.launcher.command import LaunchPlan, free_port, run_process_group
    from trainer.launcher.hostfile import parse_hostfile
    from trainer.launcher.preflight import preflight

    if no_background_upload:
        sets = [*(sets or []), "upload.background=false"]
    ov = overrides(sets, max_steps, batch_size, learning_rate, resume, num_epochs)
    cfg = load_config(config, ov)
    if hostfile is not None and num_ranks is not None:
        raise UserError("--hostfile and --num-ranks: give one (the hostfile's slots set the ranks)")
    if hostfile is not None:
        hosts = parse_hostfile(hostfile)
    else:
        hosts = {"localhost": num_ranks or default_num_ranks()}
    plan = LaunchPlan(
        hostfile=hostfile or Path("<generated>"),
        hosts=hosts,
        master_addr=master_addr,
        master_port=master_port,
        node_rank=node_rank,
    )
    if node_rank is not None and node_rank >= len(hosts):
        raise UserError(f"--node-rank {node_rank}: the hostfile has {len(hosts)} host(s)")
    preflight(cfg, plan.world_size, str(config))
    if plan.uses_ssh and not dry_run:
        _check_nodes(list(hosts), hostfile)
    if plan.master_port is None:  # across nodes every node must use the same port: DeepSpeed's default
        plan.master_port = free_port() if node_rank is None and not plan.uses_ssh else 29500
    cmd = plan.command(str(config), ov.to_argv())
    typer.echo(f"world size {plan.world_size} on {len(hosts)} host(s); launcher:\n  {shlex.join(cmd)}")
    if dry_run:
        return 0
    env = dict(os.environ)
    env[SHARDS_CHECKED_ENV] = "1"
    _default_to_cpu(env)
    if plan.uses_ssh:
        from trainer.launcher.over_ssh import run_over_ssh

        return run_over_ssh(cmd, env, list(hosts), plan.master_port, cfg.preemption.grace_s)
    return run_process_group(cmd, env, cfg.preemption.grace_s)


def _check_nodes(hosts: list[str], hostfile: Optional[Path]) -> None:
    """Before the runner: pdsh is here and every host answers ssh without a password (one line per host if not)."""
    import shutil

    from trainer.launcher.over_ssh import ssh_unreachable

    if shutil.which("pdsh") is None:
        raise UserError(
            f"{hostfile}: the hosts are reached through pdsh (DeepSpeed's runner), which is not installed here"
            " (Debian: apt-get install pdsh); or start each node yourself with --node-rank N --master-addr ADDR"
        )
    bad = ssh_unreachable(hosts)
    if bad:
        raise UserError(
            "\n".join(
                f"{hostfile}: host {h} is not reachable by ssh without a password: {why}" for h, why in bad.items()
            )
        )


def _default_to_cpu(env: dict[str, str]) -> None:
    """No GPU here: DeepSpeed's CPU accelerator and one thread per rank, unless the environment says otherwise.

    torch is imported (about 2 s before the launcher starts) only when the environment has not set both already."""
    if {"DS_ACCELERATOR", "OMP_NUM_THREADS"} <= env.keys():
        return
    import torch

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
