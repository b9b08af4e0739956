"""Stop requests from signals: handlers only set a flag; the loop acts on it at a step boundary."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable, Optional

from trainer.log import get_logger

log = get_logger("signals")


class StopFlag:
    """Set by SIGTERM/SIGINT (or by hand); counts signals so a second one can cut waits short."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signals = 0
        self.first_at: Optional[float] = None
        self.signal_name: Optional[str] = None
        self._arrived: Optional[float] = None  # when the first signal reached the process (see install)
        # Set while the job starts (restoring, converting, building the engine): nothing is trained yet, so
        # nothing needs saving, and a restore from a slow or hung bucket must not hold the grace period. A
        # stop then calls it with the reason, and it leaves the process.
        self.leave_now: Optional[Callable[[str], None]] = None

    def install(self, signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> "StopFlag":
        """Handle `signums` (main thread). Python runs a handler only between bytecodes of the main
        thread, which can be seconds after the signal while it is inside one long call (a backward
        pass, a large copy); the grace period starts at the signal, so a thread reading the
        interpreter's wakeup fd (written by the C-level handler at once) notes the arrival time. While the
        job starts (`leave_now` set) that thread also leaves: the main thread may be blocked for minutes in a
        collective whose peer already left, where no Python handler runs."""
        for s in signums:
            signal.signal(s, self._handler)
        try:
            r, w = os.pipe()
            os.set_blocking(w, False)
            signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except (ValueError, OSError):  # not the main thread: the handler's own time is used
            return self
        watched = set(int(x) for x in signums)

        def watch() -> None:
            while data := os.read(r, 64):
                if got := watched.intersection(data):
                    if self._arrived is None:
                        self._arrived = time.monotonic()
                    if self.leave_now is not None:  # while starting: leave from here if the main thread is stuck
                        self.leave_now(signal.Signals(min(got)).name)  # in a C call (a collective with a rank gone)

        threading.Thread(target=watch, name="signal-arrival", daemon=True).start()
        return self

    def _handler(self, signum: int, frame: object) -> None:
        self.signals += 1
        if self.signals >= 3:  # a third signal: stop now, whatever is in progress (a hung collective, say)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.first_at is None:
            now = time.monotonic()
            self.first_at = min(now, self._arrived) if self._arrived is not None else now
            self.signal_name = signal.Signals(signum).name
        self._event.set()
        if self.leave_now is not None:
            self.leave_now(signal.Signals(signum).name)

    def request(self, reason: str = "request") -> None:
        if self.first_at is None:
            self.first_at = time.monotonic()
            self.signal_name = reason
        self._event.set()
        if self.leave_now is not None:
            self.leave_now(reason)

    def is_set(self) -> bool:
        return self._event.is_set()

    def elapsed(self) -> float:
        """Seconds since the first stop request (0 if none reached this process)."""
        return 0.0 if self.first_at is None else time.monotonic() - self.first_at

    @property
    def urgent(self) -> bool:
        """A second signal: stop waiting for anything."""
        return self.signals >= 2


def _is_deepspeed_launcher(proc: "object") -> bool:
    try:
        cmd = proc.cmdline()  # type: ignore[attr-defined]
    except Exception:
        return False
    head = " ".join(cmd[:4])
    return (
        "deepspeed.launcher" in head
        or "trainer.launcher.ds_" in head  # DeepSpeed's, or started through our shims
        or any(os.path.basename(a) == "deepspeed" for a in cmd[:2])
    )


def watch_launchers(stop: StopFlag, interval_s: float = 0.5) -> Optional[threading.Thread]:
    """Treat the end of this rank's DeepSpeed launcher or runner as a stop request.

    DeepSpeed's runner has no signal handler: a SIGTERM kills it and its ranks train on,
    orphaned. A thread polls the launcher processes above this rank; when one is gone (or a
    zombie), the rank asks to stop, the ranks agree on the step, save and exit as after a signal.
    """
    import psutil

    try:
        watched = [p for p in psutil.Process().parents() if _is_deepspeed_launcher(p)]
    except psutil.Error:
        return None
    if not watched:
        return None

    def gone(p: "psutil.Process") -> bool:
        try:
            return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True

    def run() -> None:
        while not stop.is_set():
            for p in watched:
                if gone(p):
                    log.warning("the DeepSpeed launcher (pid %d) is gone: stopping", p.pid)
                    stop.request("launcher gone")
                    return
            time.sleep(interval_s)

    t = threading.Thread(target=run, name="launcher-watch", daemon=True)
    t.start()
    return t


def reap_sibling_ranks_later(wait_s: float = 2.0) -> int:
    """For a rank leaving while the job starts: SIGKILL, `wait_s` from now, the other ranks of this node's DeepSpeed
    launcher that are still there. While any rank is starting no rank has trained a step, so none has anything to
    save; and those that got the stop leave on their own well before. But a sibling may be blocked in a collective
    with this rank, in a call that holds the interpreter (DeepSpeed's shared-memory all-reduce on CPU spins in C),
    where no signal handler or thread of it runs, and DeepSpeed's launcher SIGKILLs it only 30 s after this rank
    left: past a preemptible VM's whole notice. A detached `sh` does the waiting, so this rank leaves at once (and
    two ranks leaving together do not wait for each other). Returns how many siblings it watches."""
    import subprocess

    import psutil

    try:
        parent = psutil.Process().parent()
        if parent is None or not _is_deepspeed_launcher(parent):
            return 0
        pids = [str(p.pid) for p in parent.children() if p.pid != os.getpid()]
    except psutil.Error:
        return 0
    if pids:
        subprocess.Popen(
            ["sh", "-c", f"sleep {wait_s:g}; kill -KILL {' '.join(pids)} 2>/dev/null"],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    return len(pids)
