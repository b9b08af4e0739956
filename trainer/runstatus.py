"""`<run_root>/status.json`: where a run is, for `trainer monitor` and scripts.

Rank 0 rewrites it at every log point, checkpoint and exit (a rename: readers see one whole
version). It is a convenience, not state: nothing resumes from it, so it is written without fsync.
"""

from __future__ import annotations

import json
import os
import platform
import time
from enum import Enum
from pathlib import Path
from typing import Any, Optional

STATUS_FILE = "status.json"


class JobState(str, Enum):
    """`state` in status.json (written as its value)."""

    RUNNING = "running"
    STOPPING = "stopping"  # a stop was agreed: saving and draining uploads before the exit
    FINISHED = "finished"
    STOPPED = "stopped"  # by a signal; the same command resumes
    FAILED = "failed"


class StatusWriter:
    """Keeps the fields of one run and writes them all on every update."""

    def __init__(self, run_root: Path, **fields: Any):
        self.path = Path(run_root) / STATUS_FILE
        self.fields: dict[str, Any] = {"pid": os.getpid(), "host": platform.node(), "started_at": time.time(), **fields}

    def update(self, **fields: Any) -> None:
        self.fields.update(fields)
        self.fields["updated_at"] = time.time()
        tmp = self.path.with_name(f".{STATUS_FILE}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.fields, default=str) + "\n")
            tmp.replace(self.path)
        except OSError:  # a full disk must not stop training over a progress file
            tmp.unlink(missing_ok=True)


def read_status(run_root: Path) -> Optional[dict]:
    """The run's last status, or None if it never wrote one (or it is unreadable)."""
    try:
        data = json.loads((Path(run_root) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def process_alive(status: dict) -> Optional[bool]:
    """Is the writer still running? None when that cannot be told from here (another host)."""
    if status.get("host") != platform.node() or not status.get("pid"):
        return None
    try:
        os.kill(int(status["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
