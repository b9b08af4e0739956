"""What `trainer monitor` shows: a run's status.json, its checkpoints and uploads, and its log tail.

Everything is read from the run folder, so the monitor works from another shell, another user or a
cron job, and never touches the training processes.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from trainer.errors import UserError
from trainer.checkpoint.layout import UploadState
from trainer.runstatus import STATUS_FILE, JobState, process_alive, read_status

LOG_FILE = "train.log"


def find_run(path: Path) -> Path:
    """`path` if it is a run folder, else the run under it that was active last; `UserError` if none."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such run folder")

    def is_run(p: Path) -> bool:
        return (p / STATUS_FILE).is_file() or (p / LOG_FILE).is_file() or (p / "checkpoints").is_dir()

    if is_run(path):
        return path
    runs = [p for p in path.iterdir() if p.is_dir() and is_run(p)]
    if not runs:
        raise UserError(
            f"{path}: no run there (expected a run folder with {STATUS_FILE} or {LOG_FILE}, or a folder of runs)"
        )
    return max(runs, key=_last_activity)


def _last_activity(run: Path) -> float:
    return max(
        (p.stat().st_mtime for p in (run / STATUS_FILE, run / LOG_FILE) if p.exists()), default=run.stat().st_mtime
    )


def node_log(run: Path, node: int) -> tuple[Optional[str], Path]:
    """(None, path) for node `node`'s log on this machine, else (its host, the path there): a run folder has the
    same path on every node (the same config), and `logs/nodes.json` names the hosts."""
    import json

    from trainer.log import NODE_LOGS, NODES_FILE, node_log_name

    logs = run / NODE_LOGS
    here = sorted(logs.glob(f"node-{node}-*.log"))
    if here:
        return None, here[0]
    try:
        hosts = json.loads((logs / NODES_FILE).read_text())["hosts"]
    except (OSError, ValueError, KeyError):
        hosts = []
    if node >= len(hosts):
        known = f"the run had {len(hosts)} node(s)" if hosts else f"no {NODES_FILE} names the run's hosts"
        raise UserError(f"{run}: no log of node {node} here ({logs}) and {known}")
    return hosts[node], logs.absolute() / node_log_name(node, hosts[node])


def tail(path: Path, lines: int) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            return [line.rstrip("\n") for line in deque(f, maxlen=lines)]
    except OSError:
        return []


@dataclass
class Snapshot:
    run: Path
    status: Optional[dict]
    state: str  # running | finished | stopped | failed | not running | unknown
    state_detail: str
    checkpoints: list[dict] = field(default_factory=list)  # tag, step, loss, committed_at, upload
    log: list[str] = field(default_factory=list)

    @property
    def uploads(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for c in self.checkpoints:
            out.setdefault(c["upload"], []).append(c["tag"])
        return out


def snapshot(run: Path, log_lines: int = 12) -> Snapshot:
    from trainer.checkpoint.layout import read_upload_state
    from trainer.checkpoint.store import CheckpointStore

    status = read_status(run)
    state, detail = _state(status)
    ckpts = [
        {
            "tag": c.tag,
            "step": c.step,
            "loss": c.loss,
            "committed_at": c.metadata.get("committed_at"),
            "reason": c.metadata.get("reason"),
            "task": c.metadata.get("task"),
            "world_size": c.metadata.get("world_size"),
            "upload": read_upload_state(c.path)["state"],
            "goodput": c.metadata.get("goodput"),
        }
        for c in CheckpointStore(run).committed([])
    ]
    return Snapshot(run, status, state, detail, ckpts, tail(run / LOG_FILE, log_lines))


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _state(status: Optional[dict]) -> tuple[str, str]:
    if status is None:
        return "unknown", f"no {STATUS_FILE} (a run from an older trainer, or not started yet)"
    age = time.time() - float(status.get("updated_at") or status.get("started_at") or 0)
    state = str(status.get("state", "unknown"))
    where = f"pid {status.get('pid')} on {status.get('host')}"
    if state not in (JobState.RUNNING, JobState.STOPPING):
        extra = f"by {status['stop_signal']}, " if status.get("stop_signal") else ""
        return state, f"{extra}{_ago(age)} ({where})"
    alive = process_alive(status)
    if alive is False:
        return "not running", f"the process is gone without a final status (killed?); last update {_ago(age)} ({where})"
    step_time = float(status.get("step_time_s") or 0)
    if alive is None and age > max(120.0, 20 * step_time * max(1, int(status.get("log_every") or 1))):
        return "stalled?", f"no update for {_ago(age)[:-4]} ({where}, not this machine: cannot check the process)"
    return state, f"updated {_ago(age)} ({where})"


def _fmt_eta(seconds: Optional[float]) -> str:
    if seconds is None:
        return ""
    return str(dt.timedelta(seconds=int(seconds)))


def render(s: Snapshot, wrap_log: bool = False) -> Any:
    """A rich renderable of the snapshot; log lines are cut at the panel's width unless `wrap_log`."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    log_text = Text(
        "\n".join(s.log) if s.log else f"(no {LOG_FILE} yet)",
        no_wrap=not wrap_log,
        overflow="fold" if wrap_log else "ellipsis",
    )
    log_panel = Panel(log_text, title=f"{s.run / LOG_FILE} (last {len(s.log)} lines)", title_align="left")
    st = s.status or {}
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    color = {
        JobState.RUNNING.value: "green",
        JobState.FINISHED.value: "blue",
        JobState.STOPPED.value: "yellow",
        JobState.STOPPING.value: "yellow",
    }.get(s.state, "red")
    last = s.checkpoints[-1] if s.checkpoints else {}
    task, world = st.get("task") or last.get("task"), st.get("world_size") or last.get("world_size")
    about = ", ".join(x for x in (task, f"{world} rank(s)" if world else "") if x)
    grid.add_row("run", f"{st.get('run_id', s.run.name)}" + (f" ({about})" if about else ""))
    grid.add_row("state", Text(f"{s.state}: {s.state_detail}", style=color))
    step, max_steps = st.get("step"), st.get("max_steps")
    if step is not None and max_steps:
        bar = Table.grid(padding=(0, 1))
        epoch = (
            f", epoch {st['epoch']:.2f}" + (f" of {st['epochs']:g}" if st.get("epochs") else "")
            if st.get("epoch") is not None
            else ""
        )
        bar.add_row(
            ProgressBar(total=float(max_steps), completed=float(step), width=40), f"step {step}/{max_steps}{epoch}"
        )
        grid.add_row("progress", bar)
    if st.get("loss") is not None:
        grid.add_row(
            "loss",
            f"{st['loss']:.4f}"
            + (
                f" (best {st['best_loss']:.4f} at step {st.get('best_step')})"
                if st.get("best_loss") is not None
                else ""
            ),
        )
    if st.get("val_loss") is not None:
        ppl = f", ppl {st['val_ppl']:.3f}" if st.get("val_ppl") is not None else ""
        trend = (st.get("validation_metrics") or {}).get("trend")
        grid.add_row(
            "val loss",
            f"{st['val_loss']:.4f} at step {st.get('val_step')}{ppl} (best {st['best_val_loss']:.4f} at step"
            f" {st.get('best_val_step')}{', ' + trend if trend else ''})",
        )
    if st.get("lr") is not None:
        grid.add_row("learning rate", f"{st['lr']:.3e}")
    if st.get("tokens_per_s") is not None:
        speed = f"{st['tokens_per_s']:,.0f} tokens/s, {st.get('step_time_s', 0):.3f} s/step"
        if st.get("mfu") is not None:
            speed += f", MFU {st['mfu']:.1%}"
        grid.add_row("speed", speed)
    good = st.get("goodput") or (s.checkpoints[-1].get("goodput") if s.checkpoints else None)
    if good:
        from trainer.engine.goodput import describe

        grid.add_row("goodput", describe(good).removeprefix("goodput "))
    if s.state == JobState.RUNNING and st.get("eta_s") is not None:
        age = time.time() - float(st.get("updated_at") or time.time())
        grid.add_row("ETA", _fmt_eta(max(0.0, float(st["eta_s"]) - age)))
    if s.checkpoints:
        c = s.checkpoints[-1]
        loss = f", loss {c['loss']:.4f}" if c.get("loss") is not None else ""
        grid.add_row(
            "last checkpoint",
            f"{c['tag']} (step {c['step']}{loss}, {c.get('reason')}, {c.get('committed_at')}, upload {c['upload']})",
        )
        up = s.uploads
        busy = (UploadState.UPLOADING, UploadState.PENDING, UploadState.FAILED)
        queue = [
            f"{len(up[k.value])} {k.word}" + (f" ({', '.join(up[k.value][-3:])})" if k in busy else "")
            for k in (*busy, UploadState.UPLOADED, UploadState.LOCAL)
            if up.get(k.value)
        ]
        grid.add_row("uploads", "; ".join(queue))
        grid.add_row("checkpoints", f"{len(s.checkpoints)} committed")
    else:
        grid.add_row("last checkpoint", "none yet")
    return Group(Panel(grid, title=f"trainer monitor: {s.run}", title_align="left"), log_panel)
