"""Non-blocking checkpoint writes behind DeepSpeed's own `save_checkpoint`.

`SnapshotCheckpointEngine` is a DeepSpeed checkpoint engine (the interface `engine.save_checkpoint`
hands every file's state dict to). In background mode its `save` copies the state into host
buffers (`HostBuffers`: kept between saves, pinned where the accelerator has pinned memory) and
queues the copy for `BackgroundWriter`, a thread that `torch.save`s and fsyncs each file while
training goes on; training is blocked only for the copy. In direct mode `save` writes and fsyncs
the live state at once (the emergency and final saves, and `checkpoint.async: false`).

Why not DeepSpeed's decoupled engine (`checkpoint.writer.decoupled`, 0.19): it hands the live
tensors to a spawned process through shared memory without copying them, and so must block the
next optimizer step until the whole file is written (`_commit_decoupled_checkpoint` in `step`);
at neox-1.2b on a GPU a step is ~1 s and a write 40-80 s, so nearly nothing would overlap.

The file bytes are DeepSpeed's: the same state dicts, written by the same `torch.save`, loaded
by DeepSpeed's `load_checkpoint` unchanged. The commit (metadata.json) stays the caller's.
"""

from __future__ import annotations

import collections
import copy
import errno
import os
import shutil
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from trainer.checkpoint.integrity import file_record
from trainer.checkpoint.store import fsync_tree
from trainer.log import get_logger

log = get_logger("checkpoint")

MEMORY_RESERVE_FRACTION = 0.05  # keep this much of the host's RAM free when sizing a snapshot


class DiskFull(OSError):
    """A checkpoint file did not fit on its disk (`errno` ENOSPC)."""


def write_file(path: Path | str, obj: Any, zipfile: bool = True) -> dict:
    """`torch.save` then fsync: on disk for good when this returns. Returns the file's size and CRC32C
    (`integrity.file_record`: read back while the file is still in the page cache, ~0.2 s per GB here).

    `DiskFull` when the disk ran out of space (torch's zip writer reports that as a RuntimeError without an errno,
    so the free space decides)."""
    import torch

    try:
        torch.save(obj, str(path), _use_new_zipfile_serialization=zipfile)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except (OSError, RuntimeError) as exc:
        if _out_of_space(exc, Path(path), tensor_bytes(obj)):
            raise DiskFull(errno.ENOSPC, "no space left on device", str(path)) from exc
        raise
    return file_record(path)


def _out_of_space(exc: BaseException, path: Path, need: int) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    try:  # torch's zip writer: a RuntimeError with no errno; the free space tells
        return shutil.disk_usage(path.parent).free < max(need, 1 << 20)
    except OSError:
        return False


HUGE_PAGE_MIN_BYTES = 2 << 20  # buffers at least this large are mapped with transparent huge pages


def _host_tensor(dtype: Any, numel: int, pin: bool) -> Any:
    """An uninitialised host tensor. Large ones are anonymous mappings advised to use huge pages:
    their first touch faults 2 MB at a time instead of 4 kB (0.1 s per GiB here against 0.4-1.1 s)."""
    import mmap

    import torch

    nbytes = dtype.itemsize * numel
    if pin or nbytes < HUGE_PAGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(numel, dtype=dtype, pin_memory=pin)
    area = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        area.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        pass  # huge pages off on this host: ordinary pages
    return torch.frombuffer(area, dtype=dtype, count=numel)  # the tensor keeps the mapping alive


class HostBuffers:
    """Host memory for snapshots, reused from one save to the next (one checkpoint's worth at most).

    Reuse is what makes the copy fast: new pages cost a fault each on first touch (1.1 s per GiB
    here against 0.2 s for a copy into a buffer already touched), and pinned allocations on GPUs
    are slower still. `reserve` allocates and touches the buffers of a save before it comes, in a
    thread, so that the first save of a process (after every restart) is as fast as the others.
    The price is host RAM the size of one rank's state, held from then on.
    """

    def __init__(self, pin: bool):
        self.pin = pin
        self._free: dict[tuple[Any, int], list[Any]] = collections.defaultdict(list)
        self._lent: list[Any] = []
        self.bytes_held = 0
        self._lock = threading.Lock()
        self._reserving: Optional[threading.Thread] = None

    def take(self, dtype: Any, numel: int) -> Any:
        self.wait_reserved()
        free = self._free[(dtype, numel)]
        if free:
            buf = free.pop()
        else:
            buf = _host_tensor(dtype, numel, self.pin)
            self.bytes_held += buf.element_size() * numel
        self._lent.append(buf)
        return buf

    def reserve(self, sizes: list[tuple[Any, int]]) -> None:
        """Allocate and touch buffers of these (dtype, numel) beyond the free ones, in a background thread."""
        todo = self._unmatched(sizes)

        def run() -> None:
            for dtype, numel in todo:
                buf = _host_tensor(dtype, numel, self.pin)
                buf.zero_()  # fault the pages in now, off the training thread
                with self._lock:
                    self._free[(dtype, numel)].append(buf)
                    self.bytes_held += buf.element_size() * numel

        if todo:
            self._reserving = threading.Thread(target=run, name="snapshot-reserve", daemon=True)
            self._reserving.start()

    def wait_reserved(self) -> None:
        if self._reserving is not None:
            self._reserving.join()
            self._reserving = None

    def missing_bytes(self, tensors: list[Any]) -> int:
        """Bytes these tensors would need beyond the free buffers."""
        self.wait_reserved()
        return sum(dtype.itemsize * numel for dtype, numel in self._unmatched([(t.dtype, t.numel()) for t in tensors]))

    def _unmatched(self, sizes: list[tuple[Any, int]]) -> list[tuple[Any, int]]:
        """The (dtype, numel) of `sizes` that no free buffer covers."""
        have = collections.Counter({k: len(v) for k, v in self._free.items()})
        out = []
        for key in sizes:
            if have[key] > 0:
                have[key] -= 1
            else:
                out.append(key)
        return out

    def give_back(self) -> None:
        """Every buffer lent since the last call is free again (its write is on disk)."""
        with self._lock:
            for b in self._lent:
                self._free[(b.dtype, b.numel())].append(b)
            self._lent = []


def _tensors_in(obj: Any, out: list[Any], seen: set[int]) -> list[Any]:
    import torch

    if isinstance(obj, torch.Tensor):
        if id(obj) not in seen:
            seen.add(id(obj))
            out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors_in(v, out, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors_in(v, out, seen)
    return out


def snapshot(obj: Any, buffers: HostBuffers, memo: Optional[dict[int, Any]] = None) -> Any:
    """A copy of `obj` whose tensors live in `buffers` (host memory), detached from training.

    Containers keep their types (OrderedDict with its `_metadata`, namedtuples, torch.Size);
    a tensor referenced twice is copied once and stays shared; other objects are deep-copied.
    """
    import torch

    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) in memo:
            return memo[id(obj)]
        src = obj.detach()
        buf = buffers.take(src.dtype, src.numel()).view(src.shape)
        buf.copy_(src, non_blocking=buffers.pin)
        out: Any = (
            torch.nn.Parameter(buf, requires_grad=obj.requires_grad) if isinstance(obj, torch.nn.Parameter) else buf
        )
        memo[id(obj)] = out
        return out
    if isinstance(obj, dict):
        out = copy.copy(obj)  # same type and instance attributes (a state_dict's _metadata)
        for k, v in obj.items():
            out[k] = snapshot(v, buffers, memo)
        return out
    if isinstance(obj, torch.Size):
        return obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(snapshot(v, buffers, memo) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v, buffers, memo) for v in obj)
    return copy.deepcopy(obj)


def tensor_bytes(obj: Any) -> int:
    return sum(t.element_size() * t.numel() for t in _tensors_in(obj, [], set()))


@dataclass
class WriteJob:
    """The files of one checkpoint on one rank, written in the background."""

    tag: str
    folder: Path
    bytes_total: int = 0  # of the files handed over so far
    bytes_done: int = 0
    files: int = 0
    sealed: bool = False
    started: float = field(default_factory=time.monotonic)
    finished: Optional[float] = None
    write_s: float = 0.0  # time spent writing (the thread may wait for the first file)
    error: Optional[BaseException] = None
    done: threading.Event = field(default_factory=threading.Event)
    records: dict[str, dict] = field(default_factory=dict)  # relative path -> size and CRC32C, as each file is written

    def written(self, path: Path | str, record: dict) -> int:
        """Note a file on disk (with its `write_file` record); returns its size."""
        self.records[os.path.relpath(path, self.folder)] = record
        return int(record["size"])

    def remaining_s(self, rate_bps: Optional[float]) -> float:
        """Expected seconds until this job is on disk at `rate_bps` (its own rate so far, else the given one)."""
        if self.done.is_set():
            return 0.0
        own = self.bytes_done / self.write_s if self.write_s > 0.5 and self.bytes_done else None
        rate = own or rate_bps
        left = max(0, self.bytes_total - self.bytes_done)
        return left / rate if rate else float("inf")


class BackgroundWriter:
    """One thread per rank that writes queued snapshots in order, then fsyncs their folders."""

    _SEAL = object()

    def __init__(self, zipfile: bool = True, on_job_done: Optional[Callable[[WriteJob], None]] = None):
        self.zipfile = zipfile
        self.on_job_done = on_job_done
        self._queue: "queue.Queue[tuple[WriteJob, Any, Any]]" = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def put(self, job: WriteJob, path: Path, obj: Any, nbytes: int) -> None:
        job.bytes_total += nbytes
        job.files += 1
        self._queue.put((job, path, obj))

    def seal(self, job: WriteJob) -> None:
        """No more files for `job`: once they are written, fsync its folder and mark it done."""
        job.sealed = True
        self._queue.put((job, self._SEAL, None))

    def _run(self) -> None:
        while True:
            job, path, obj = self._queue.get()
            if path is self._SEAL:
                if job.error is None:
                    try:
                        fsync_tree(job.folder)  # (the files themselves were fsynced)
                    except OSError as exc:
                        job.error = exc
                job.finished = time.monotonic()
                if self.on_job_done is not None:
                    self.on_job_done(job)
                job.done.set()
                continue
            if job.error is not None:
                continue  # a file of this job failed: the rest is pointless, the job reports the error
            t0 = time.monotonic()
            try:
                job.written(path, write_file(path, obj, self.zipfile))
                job.bytes_done += tensor_bytes(obj)
            except BaseException as exc:  # a full disk, say: reported to the training thread, which raises it
                job.error = exc
            finally:
                job.write_s += time.monotonic() - t0
                del obj


class SnapshotCheckpointEngine:
    """A DeepSpeed `CheckpointEngine`: snapshots to host memory (background) or writes directly."""

    def __init__(self, zipfile: bool, pin: bool):
        self.name = "TrainerSnapshotCheckpointEngine"
        self.zipfile = zipfile
        self.buffers = HostBuffers(pin)
        self.writer = BackgroundWriter(zipfile, on_job_done=lambda job: self.buffers.give_back())
        self.background = False  # set by the caller before each save_checkpoint
        self.sizing: Optional[list[tuple[Any, int]]] = None  # a dry run: the (dtype, numel) of every tensor handed over
        self.job: Optional[WriteJob] = None
        self.direct_bytes = 0  # written directly during the current save
        self.fallbacks = 0  # files written directly because the host lacked memory for their snapshot
        self._pin = pin

    # --- DeepSpeed's CheckpointEngine interface -------------------------------------------
    def create(self, info: Any) -> None:
        self.job = WriteJob(tag=str(info.tag), folder=Path(info.save_dir) / str(info.tag))
        self.direct_bytes = 0

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict: Any, path: str) -> None:
        self.add(Path(path), state_dict)

    def load(self, path: str, map_location: Any = None) -> Any:
        import torch

        return torch.load(path, map_location=map_location, weights_only=False)

    def commit(self, info: Any) -> bool:
        return True  # every file is handed over; the caller commits the checkpoint once they are on disk

    def is_data_parallel_writer(self, dp_rank: int) -> bool:
        return dp_rank == 0

    def is_decoupled(self) -> bool:
        return False

    def set_commit_info(self, info: Any) -> None:
        pass

    def get_commit_info(self) -> None:
        return None

    def cleanup(self) -> None:
        pass

    def preserves_storage_sharing(self) -> bool:
        # torch.save of live views writes their whole flat buffers, so DeepSpeed clones them first; a
        # snapshot is a compact copy already
        return not self.background and self.sizing is None

    # --- ours -------------------------------------------------------------------------------
    def add(self, path: Path, obj: Any) -> None:
        """One more file of the current save (RNG states, say): snapshotted or written as the mode says."""
        assert self.job is not None, "create() first"
        if self.sizing is not None:
            self.sizing += [(t.dtype, t.numel()) for t in _tensors_in(obj, [], set())]
        elif self.background:
            tensors = _tensors_in(obj, [], set())
            need = self.buffers.missing_bytes(tensors)
            if need and not self._memory_for(need):
                self.fallbacks += 1
                self.direct_bytes += self.job.written(path, write_file(path, obj, self.zipfile))
                return
            snap = snapshot(obj, self.buffers)
            if self._pin:
                from deepspeed.accelerator import get_accelerator

                get_accelerator().synchronize()  # the copies are complete before training touches the tensors again
            self.writer.put(self.job, path, snap, sum(t.element_size() * t.numel() for t in tensors))
        else:
            self.direct_bytes += self.job.written(path, write_file(path, obj, self.zipfile))

    def prepare(self, save: Callable[[], None]) -> int:
        """Reserve the host buffers of a background save before the first one comes: `save` runs the
        engine's save_checkpoint (collective) into a scratch folder as a dry run that records the
        tensors it would hand over and writes none of them; the buffers are then allocated and touched in a thread.
        Returns the bytes reserved (0 when the host lacks the memory: the first save allocates, or
        falls back to a direct write)."""
        self.sizing = []
        try:
            save()
        finally:
            sizes, self.sizing, self.job = self.sizing, None, None
        need = sum(dtype.itemsize * numel for dtype, numel in sizes)
        if not need or not self._memory_for(need, quiet=True):
            return 0
        self.buffers.reserve(sizes)
        return need

    def seal(self) -> WriteJob:
        """The current save has handed over all its files; returns its job (done at once if nothing was queued)."""
        assert self.job is not None
        job, self.job = self.job, None
        if self.background:
            self.writer.seal(job)
        else:
            fsync_tree(job.folder)
            job.finished = time.monotonic()
            job.done.set()
        return job

    def _memory_for(self, need: int, quiet: bool = False) -> bool:
        import psutil

        vm = psutil.virtual_memory()
        ok = vm.available - need >= MEMORY_RESERVE_FRACTION * vm.total
        if not ok and not quiet:
            log.warning(
                "not enough free host memory for a %.1f GB snapshot (%.1f GB available): writing this file"
                " directly (training waits for it)",
                need / 1e9,
                vm.available / 1e9,
            )
        return ok
