"""Goodput: where a run's wall time went, across all its restarts.

Each process's time is split into phases by a `PhaseClock`:

    startup     process start to the first step (imports, process group, model, data), minus restore
    restore     bringing a checkpoint back (download from the bucket, DeepSpeed's load)
    productive  training steps whose results survive (they led to the checkpoint the run goes on from)
    recomputed  training steps that were done twice: an earlier attempt ran them after its last
                checkpoint, and the work was lost when it stopped
    checkpoint  training blocked by saves (the snapshot, a write that was not done in time, a direct write)
    eval        held-out evaluation (the model is measured, not trained)
    exit        from the stop or the last step to leaving (upload drain, tracking, status)

goodput = productive / total. The totals travel in every checkpoint's metadata (`goodput`), as of
the moment its state was captured. The run folder keeps a ledger of its attempts
(`goodput.json`, rank 0): when an attempt resumes from checkpoint k, the time earlier attempts spent
after k was lost, and is carried as `recomputed` (steps) or in its own phase (saves, exits). A
fresh machine has no ledger: the time a lost VM spent after its last checkpoint in the bucket is
not known there and is left out (`unrecorded_attempts` says when that happened).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from trainer.checkpoint.layout import utc_now

PHASES = ("startup", "restore", "productive", "recomputed", "checkpoint", "eval", "exit")
LEDGER = "goodput.json"


def zero() -> dict[str, float]:
    return {p: 0.0 for p in PHASES}


def add(a: dict[str, float], b: dict[str, float], sign: float = 1.0) -> dict[str, float]:
    return {p: a.get(p, 0.0) + sign * b.get(p, 0.0) for p in PHASES}


def summary(seconds: dict[str, float], attempts: int = 1) -> dict[str, Any]:
    """The record stored in metadata and status: seconds per phase, total, goodput and attempts."""
    total = sum(seconds.get(p, 0.0) for p in PHASES)
    return {
        "seconds": {p: round(seconds.get(p, 0.0), 3) for p in PHASES},
        "total_s": round(total, 3),
        "goodput": round(seconds.get("productive", 0.0) / total, 4) if total > 0 else None,
        "attempts": attempts,
    }


def describe(record: Optional[dict]) -> str:
    """`goodput 91.2% of 2.1 h over 3 attempts: productive 1.9 h, recomputed 4.0 min, ...` ('' without a record)."""
    if not record or not record.get("seconds") or record.get("goodput") is None:
        return ""
    secs = record["seconds"]
    parts = ", ".join(f"{p} {_duration(secs.get(p, 0.0))}" for p in PHASES if secs.get(p, 0.0) >= 0.05)
    n = int(record.get("attempts") or 1)
    attempts = f"{n} attempt{'s' if n != 1 else ''}"
    return f"goodput {record['goodput']:.1%} of {_duration(record['total_s'])} over {attempts}: {parts}"


def _duration(s: float) -> str:
    return f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"


class PhaseClock:
    """The current phase and the seconds spent in each, this process only."""

    def __init__(self, phase: str = "startup", since: Optional[float] = None):
        self.seconds = zero()
        self.phase = phase
        self._since = time.monotonic() if since is None else since

    def switch(self, phase: str) -> str:
        """Close the current phase and start `phase`; returns the one that was current."""
        assert phase in PHASES, phase
        now = time.monotonic()
        self.seconds[self.phase] += now - self._since
        previous, self.phase, self._since = self.phase, phase, now
        return previous

    @contextlib.contextmanager
    def phase_of(self, phase: str) -> Iterator[None]:
        previous = self.switch(phase)
        try:
            yield
        finally:
            self.switch(previous)

    def now(self) -> dict[str, float]:
        """Seconds per phase up to this moment (the current phase included)."""
        out = dict(self.seconds)
        out[self.phase] += time.monotonic() - self._since
        return out


def process_started_monotonic() -> float:
    """When this process started, on the monotonic clock (imports count as start-up)."""
    try:
        import psutil

        age = time.time() - psutil.Process().create_time()
    except Exception:
        age = 0.0
    return time.monotonic() - max(0.0, age)


class Goodput:
    """This attempt's clock plus what the run carried into it; rank 0 keeps the run's ledger."""

    def __init__(self, clock: PhaseClock):
        self.clock = clock
        self.carried = zero()  # the run's time before this attempt (lineage + lost work)
        self.attempts = 1
        self.unrecorded = 0
        self.ledger_path: Optional[Path] = None
        self._ledger: dict = {"attempts": []}
        self._me: Optional[dict] = None

    def begin(
        self, run_root: Path, resumed: Optional[dict], source_run_root: Optional[Path], attempt_id: str, writer: bool
    ) -> None:
        """Start this attempt: carry the resumed checkpoint's totals and the work lost after it.

        `source_run_root`: the run folder the resumed checkpoint belongs to (a branch starts a new one)."""
        self.ledger_path = Path(run_root) / LEDGER if writer else None
        ledger = _read(Path(run_root) / LEDGER)
        if resumed is not None:
            rec = resumed.get("goodput") or {}
            self.carried = add(zero(), rec.get("seconds") or {})
            self.attempts = int(rec.get("attempts") or 1) + 1
            self.unrecorded = int(rec.get("unrecorded_attempts") or 0)
            source = (
                ledger
                if source_run_root is None or Path(source_run_root) == Path(run_root)
                else _read(Path(source_run_root) / LEDGER)
            )
            lost, found = _lost_after(source["attempts"], int(resumed["step"]))
            self.carried = add(self.carried, lost)
            if not found:
                self.unrecorded += 1
        self._ledger = ledger
        self._me = {
            "id": attempt_id,
            "started_at": utc_now(),
            "resumed_from_step": None if resumed is None else int(resumed["step"]),
            "seconds": zero(),
            "commits": {},
        }
        ledger["attempts"].append(self._me)
        self.flush()

    def totals(self) -> dict[str, float]:
        return add(self.carried, self.clock.now())

    def record(self) -> dict[str, Any]:
        out = summary(self.totals(), self.attempts)
        if self.unrecorded:
            out["unrecorded_attempts"] = self.unrecorded
        return out

    def captured(self, step: int) -> dict[str, Any]:
        """The record for a checkpoint whose state is captured now (its metadata's `goodput`)."""
        rec = self.record()
        if self._me is not None:
            self._me["commits"][str(step)] = self.clock.now()
        return rec

    def flush(self) -> None:
        """Rank 0: rewrite the ledger with this attempt's time so far (cheap; at log points and exit)."""
        if self.ledger_path is None or self._me is None:
            return
        self._me["seconds"] = self.clock.now()
        self._me["updated_at"] = utc_now()
        tmp = self.ledger_path.with_name(f".{LEDGER}.tmp")
        try:
            tmp.write_text(json.dumps(self._ledger, indent=1) + "\n")
            tmp.replace(self.ledger_path)
        except OSError:  # a full disk must not stop training over an accounting file
            tmp.unlink(missing_ok=True)


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"attempts": []}
    return data if isinstance(data, dict) and isinstance(data.get("attempts"), list) else {"attempts": []}


def _lost_after(attempts: list[dict], step: int) -> tuple[dict[str, float], bool]:
    """Time the ledger's attempts spent after the state of `step` was captured (steps: recomputed).

    The last attempt that captured `step` lost what it did afterwards; every later attempt lost all
    of its time (none of its checkpoints is the one resumed). Returns (lost seconds, whether that
    attempt is in the ledger)."""
    key = str(step)
    at = next((i for i in range(len(attempts) - 1, -1, -1) if key in (attempts[i].get("commits") or {})), None)
    if at is None:
        return zero(), False
    lost = add(attempts[at].get("seconds") or {}, attempts[at]["commits"][key], -1.0)
    for a in attempts[at + 1 :]:
        lost = add(lost, a.get("seconds") or {})
    lost["recomputed"] += lost["productive"]
    lost["productive"] = 0.0
    return {p: max(0.0, v) for p, v in lost.items()}, True
