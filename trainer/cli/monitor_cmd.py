"""`trainer monitor RUN_DIR`: a live view of a run (status, checkpoints, uploads, log tail)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer


def monitor(
    run_dir: Annotated[
        Path, typer.Argument(help="A run folder, or a folder of runs (the one active last is shown).")
    ] = Path("runs"),
    refresh: Annotated[float, typer.Option("--refresh", min=0.2, help="Seconds between refreshes.")] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="Print one snapshot and exit (scripts, cron).")] = False,
    logs_only: Annotated[
        bool, typer.Option("--logs-only", help="Only the log: its tail, followed as it grows.")
    ] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", min=1, help="Log lines to show.")] = 12,
    node: Annotated[
        Optional[int],
        typer.Option(
            "--node",
            min=0,
            help="Node N's log (logs/node-N-HOST.log), followed; another node's is read over ssh from its host.",
        ),
    ] = None,
) -> int:
    """Watch a run: step, loss, tokens/s, ETA, last checkpoint, upload queue and the log tail. Ctrl-C leaves."""
    from rich.console import Console

    from trainer.monitor import LOG_FILE, find_run, render, snapshot

    run = find_run(run_dir)
    if node is not None:
        return _node_log(run, node, lines, refresh, once)
    if logs_only:  # plain lines, as `tail` prints them
        _follow(run / LOG_FILE, lines, refresh, once)
        return 0
    console = Console(width=max(120, Console().width), highlight=False)
    if once:
        console.print(render(snapshot(run, lines), wrap_log=True))
        return 0
    from rich.live import Live

    try:
        with Live(render(snapshot(run, lines)), console=console, refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(refresh)
                live.update(render(snapshot(find_run(run_dir), lines)))
    except KeyboardInterrupt:
        pass
    return 0


def _node_log(run: Path, node: int, lines: int, refresh: float, once: bool) -> int:
    """This machine's file like --logs-only; another node's through `ssh HOST tail` (-F unless --once)."""
    import shlex
    import subprocess

    from trainer.errors import UserError
    from trainer.monitor import node_log

    host, path = node_log(run, node)
    if host is None:
        _follow(path, lines, refresh, once)
        return 0
    import shutil
    import sys

    if shutil.which("ssh") is None:
        raise UserError(f"node {node}'s log is on {host}: reading it needs an ssh client here")
    follow = "" if once else "-F "
    tty = ["-tt"] if not once and sys.stdin.isatty() else []  # Ctrl-C then ends the remote tail too
    cmd = [
        "ssh",
        *tty,
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=10",
        host,
        f"tail -n {lines} {follow}{shlex.quote(str(path))}",
    ]
    try:
        r = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    except KeyboardInterrupt:
        return 0
    if r.returncode != 0 and r.returncode != 130:
        why = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
        raise UserError(f"node {node}'s log {host}:{path}: {why}")
    return 0


def _follow(log: Path, lines: int, refresh: float, once: bool) -> None:
    """`tail -f` (`tail` with once): the last lines, then whatever is appended (a new file after a restart is picked
    up)."""
    from trainer.monitor import tail

    for line in tail(log, lines):
        typer.echo(line)
    if once:
        return
    pos = log.stat().st_size if log.exists() else 0
    try:
        while True:
            time.sleep(refresh)
            if not log.exists():
                continue
            size = log.stat().st_size
            if size < pos:  # truncated or replaced
                pos = 0
            if size > pos:
                with open(log, errors="replace") as f:
                    f.seek(pos)
                    typer.echo(f.read(), nl=False)
                    pos = f.tell()
    except KeyboardInterrupt:
        pass
