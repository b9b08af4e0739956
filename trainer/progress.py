"""Progress of long I/O (a checkpoint restore, a shard download, a data scan), said in one short line.

Code doing the work calls `report("restoring step-00001200: 4.1 of 6.5 GB")` and knows nothing
about who listens. While ranks wait for one rank's I/O (`engine.dist.wait_for`), the listener
publishes the line to the waiting ranks, which log it instead of timing out in a collective.
Outside such a wait `report` only remembers the line.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator, Optional

_local = threading.local()


def report(line: str) -> None:
    """Say where the current long operation stands (cheap: call it as often as convenient)."""
    sink: Optional[Callable[[str], None]] = getattr(_local, "sink", None)
    _local.last = line
    if sink is not None:
        sink(line)


def last() -> str:
    return getattr(_local, "last", "")


@contextlib.contextmanager
def listening(sink: Callable[[str], None], every_s: float = 1.0) -> Iterator[None]:
    """Within the block, `report` lines reach `sink` (at most one per `every_s`, and always the first)."""
    state = {"at": 0.0}

    def throttled(line: str) -> None:
        now = time.monotonic()
        if now - state["at"] >= every_s:
            state["at"] = now
            sink(line)

    previous = getattr(_local, "sink", None)
    _local.sink = throttled
    try:
        yield
    finally:
        _local.sink = previous


def gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.1f} MB"
