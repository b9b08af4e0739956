"""Batches prepared ahead of the step in worker processes, in the order the loop asks for them.

A task whose batches are expensive to make (decode images and audio, tokenize) hands `Prefetcher` a pure
function `make(step, micro)`. The loop asks for `(step, micro)` keys in order: micro-batches 0..ga-1 of
step s, then of step s+1. torch's DataLoader runs `make` for the keys ahead of the one asked for in
`workers` processes and returns results in key order, so what the step gets is exactly what `make` would
return on the training thread; a key out of sequence (the first after a resume, a retried step) starts the
stream again from it. Workers ignore SIGTERM and SIGINT: a stop signal is the training process's to act on
(it saves, then closes the loader), and a worker killed by it would fail the next batch instead. So they are
stopped through their queues, at exit before multiprocessing's own exit handler (which would wait for ever on
workers that ignore its SIGTERM); a training process killed outright leaves none behind either (torch's
workers exit when their parent is gone).
"""

from __future__ import annotations

import atexit
import os
import signal
from typing import Any, Callable, Iterator, Optional

Key = tuple[int, int]


def _ignore_stop_signals(_worker_id: int) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _as_is(x: Any) -> Any:
    return x


class _Keys:
    """(step, micro) from `start` on, for ever (the DataLoader's sampler)."""

    def __init__(self, start: Key, grad_accum: int):
        self.start, self.ga = start, grad_accum

    def __iter__(self) -> Iterator[Key]:
        step, micro = self.start
        while True:
            yield step, micro
            step, micro = (step, micro + 1) if micro + 1 < self.ga else (step + 1, 0)


class _Made:
    """Map-style dataset over keys: `make(*key)`."""

    def __init__(self, make: Callable[[int, int], Any]):
        self.make = make

    def __getitem__(self, key: Key) -> Any:
        return self.make(*key)


def default_workers(configured: Optional[int], local_ranks: int) -> int:
    """`data.num_workers`, or its default: 2 on a GPU host with at least 4 CPU cores per local rank, else 0 (on a
    CPU host the workers would take the cores the ranks compute on)."""
    if configured is not None:
        return configured
    import torch

    return 2 if torch.cuda.is_available() and (os.cpu_count() or 1) >= 4 * max(1, local_ranks) else 0


class Prefetcher:
    def __init__(self, make: Callable[[int, int], Any], grad_accum: int, workers: int, ahead: int = 2):
        self.make, self.ga, self.workers, self.ahead = make, grad_accum, workers, ahead
        self._it: Optional[Iterator[Any]] = None
        self._next: Optional[Key] = None
        self.restarts = 0  # streams started (1 for a run that never jumps)

    def _start(self, key: Key) -> None:
        from torch.utils.data import DataLoader

        self.close()
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the fast tokenizers' threads do not survive a fork
        loader = DataLoader(
            _Made(self.make),
            sampler=_Keys(key, self.ga),
            batch_size=None,
            collate_fn=_as_is,  # type: ignore[arg-type]
            num_workers=self.workers,
            prefetch_factor=self.ahead,
            worker_init_fn=_ignore_stop_signals,
            multiprocessing_context="fork",
        )
        self._it, self._next = iter(loader), key
        if not self.restarts:
            atexit.register(self.close)  # runs before multiprocessing's handler, registered earlier
        self.restarts += 1

    def get(self, step: int, micro: int) -> Any:
        """What `make(step, micro)` returns, prepared ahead by the workers."""
        if self._next != (step, micro) or self._it is None:
            self._start((step, micro))
        assert self._it is not None
        out = next(self._it)
        self._next = (step, micro + 1) if micro + 1 < self.ga else (step + 1, 0)
        return out

    def close(self) -> None:
        """Stop the workers (they are also stopped when this process exits)."""
        it, self._it, self._next = self._it, None, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
