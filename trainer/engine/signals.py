"""Stop requests from signals: handlers only set a flag; the loop acts on it at a step boundary."""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Optional

from trainer.log import get_logger

log = get_logger("signals")


class StopFlag:
    """Set by SIGTERM/SIGINT (or by hand); counts signals so a second one can cut waits short."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signals = 0
        self.first_at: Optional[float] = None
        self.signal_name: Optional[str] = None

    def install(self, signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> "StopFlag":
        for s in signums:
            signal.signal(s, self._handler)
        return self

    def _handler(self, signum: int, frame: object) -> None:
        self.signals += 1
        if self.signals >= 3:  # a third signal: stop now, whatever is in progress (a hung collective, say)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.first_at is None:
            self.first_at = time.monotonic()
            self.signal_name = signal.Signals(signum).name
        self._event.set()

    def request(self, reason: str = "request") -> None:
        if self.first_at is None:
            self.first_at = time.monotonic()
            self.signal_name = reason
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def elapsed(self) -> float:
        """Seconds since the first stop request (0 if none reached this process)."""
        return 0.0 if self.first_at is None else time.monotonic() - self.first_at

    @property
    def urgent(self) -> bool:
        """A second signal: stop waiting for anything."""
        return self.signals >= 2
