"""The CheckpointManager: saving, committing, loading and handing checkpoints to the uploader.

One object with a small interface for the loop:

    maybe_save(step, reason)   scheduled saves when due; `final` and `preemption` saves always
    poll(write_state)          commit a background write once every rank's files are on disk
    wait(deadline)             finish the write in flight (bounded), then commit it
    save_fits(deadline)        the grace-budget question: does a direct save fit before the deadline?
    load(ckpt_dir, meta)       model, optimizer, scheduler and RNG back from a checkpoint
    drain(stopped, deadline)   wait for uploads, then say where every checkpoint is

A save (all ranks, collectively): DeepSpeed's `save_checkpoint` hands each file's state to our
`SnapshotCheckpointEngine`, which copies it to host memory and queues it for a background writer
(`checkpoint.async`), or writes it directly. Training goes on while the files are written; the
loop's per-step all-reduce carries each rank's write state, and once every rank's files are on
disk (fsynced) the first rank of each node commits: side files, then `metadata.json` last and
atomically. Only then is the checkpoint queued for upload and retention runs. At most one save
is in flight: one that comes due while the previous is still being written waits for it (a
stall, logged and counted). The protocol on disk is unchanged: a folder without metadata is
partial, never listed or resumed, and removed at the next start.
"""

from __future__ import annotations

import collections
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from trainer.checkpoint.layout import (
    UploadState,
    is_uploaded,
    read_upload_state,
    rng_file_name,
    tag_for,
    upload_wording,
    utc_now,
)
from trainer.checkpoint.store import CheckpointStore, checkpoint_bytes
from trainer.engine import dist
from trainer.engine.goodput import Goodput
from trainer.engine.rng import capture_rng, restore_rng
from trainer.engine.snapshot import DiskFull, SnapshotCheckpointEngine, WriteJob
from trainer.errors import UserError
from trainer.log import get_logger
from trainer.progress import gb
from trainer.ranks import RankInfo

log = get_logger("checkpoint")

# The write state each rank contributes to the loop's all-reduce (MAX over ranks: a full disk anywhere is one line
# everywhere).
WRITE_DONE, WRITE_BUSY, WRITE_FAILED, WRITE_DISK_FULL = 0.0, 1.0, 2.0, 3.0


def report_locations(ckpts: list[Any], uploaded_too: bool = True) -> None:
    """Where each committed checkpoint is, as a job says when it leaves: uploaded (URL), or still local (why, path)."""
    for c in ckpts:
        st = read_upload_state(c.path)
        if st["state"] == UploadState.UPLOADED:
            if uploaded_too:
                log.info("checkpoint %s: uploaded (%s)", c.tag, st.get("url", ""))
        else:
            log.warning("checkpoint %s: %s, still local (%s)", c.tag, upload_wording(st), c.path)


class CheckpointWriteFailed(RuntimeError):
    """A rank could not write its checkpoint files."""


def is_disk_full(exc: Optional[BaseException]) -> bool:
    import errno

    return isinstance(exc, DiskFull) or (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT))


def disk_of(path: Path) -> str:
    """The mount point holding `path`, and its device where known: `/mnt/disk (/dev/sdb1)`."""
    import os

    import psutil

    p = Path(path).resolve()
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    device = next((part.device for part in psutil.disk_partitions(all=True) if part.mountpoint == str(p)), None)
    return f"the disk mounted at {p}" + (f" ({device})" if device else "")


@dataclass
class PendingSave:
    """A save whose state is captured and being written; committed when every rank's files are on disk."""

    step: int
    tag: str
    reason: str
    metadata: dict
    job: WriteJob
    blocked_s: float


@dataclass
class SaveTimes:
    """What the recent saves cost on this rank: for the grace budget and the log."""

    bytes: int = 0
    write_rate_bps: Optional[float] = None  # to disk, measured (background or direct)
    snapshot_s: Optional[float] = None

    def direct_write_s(self) -> Optional[float]:
        return self.bytes / self.write_rate_bps if self.write_rate_bps and self.bytes else None


class CheckpointManager:
    def __init__(
        self,
        cfg: Any,
        plan: Any,
        ranks: RankInfo,
        store: CheckpointStore,
        task: Any,
        goodput: Goodput,
        describe: Callable[[int, str], dict],
        side_files: Callable[[], dict[str, str]],
        uploader: Any = None,
        on_commit: Optional[Callable[[str, dict], None]] = None,
    ):
        self.cfg, self.plan, self.ranks, self.store, self.task, self.goodput = cfg, plan, ranks, store, task, goodput
        self.describe = describe  # (step, reason) -> the metadata of a checkpoint captured now
        self.side_files = side_files
        self.uploader = uploader
        self.on_commit = on_commit  # rank 0, after a commit: status.json, curves
        self.engine: Any = None
        self.files: Optional[SnapshotCheckpointEngine] = None
        self.pending: Optional[PendingSave] = None
        self.last_saved_step: Optional[int] = None  # newest committed by this run
        self.times = SaveTimes()
        self.recent_direct_s: collections.deque[float] = collections.deque(maxlen=3)
        self.stall_s = 0.0
        self.blocked_s = 0.0

    # ----------------------------------------------------------------------------------- setup
    def attach(self, engine: Any) -> None:
        """Route the engine's checkpoint files through our snapshot engine (same files, same loader)."""
        from deepspeed.accelerator import get_accelerator
        from deepspeed.runtime.model_checkpointing.constants import CHECKPOINT_SERIALIZATION

        self.engine = engine
        zipfile = bool(engine._config.checkpoint_config.get(CHECKPOINT_SERIALIZATION, True))
        pin = get_accelerator().device_name() != "cpu"  # page-locked buffers: fast copies from the device
        self.files = SnapshotCheckpointEngine(zipfile=zipfile, pin=pin)
        engine.checkpoint_engine = self.files

    # ---------------------------------------------------------------------------------- saving
    def prepare(self, step: int) -> None:
        """Reserve the host buffers of background saves now, if one lies ahead, so that the first save of
        this process blocks no longer than the later ones (call after the first step: the optimizer state
        exists then). Collective."""
        if not self.cfg.checkpoint.async_save or self.files is None or self.plan.next_save(step) >= self.plan.max_steps:
            return
        t0 = time.monotonic()
        scratch = tempfile.mkdtemp(prefix="trainer-sizing-")  # this rank's own: DeepSpeed creates folders in it
        try:
            with self.goodput.clock.phase_of("checkpoint"):
                reserved = self.files.prepare(
                    lambda: self.engine.save_checkpoint(
                        scratch,
                        tag="sizing",
                        client_state={"trainer_step": step},
                        save_latest=False,
                        exclude_frozen_parameters=not self.task.save_frozen,
                    )
                )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if reserved:
            log.info(
                "reserving %s of host memory for background saves (sized in %.2f s; filled in the background)",
                gb(reserved),
                time.monotonic() - t0,
            )

    def due(self, step: int) -> bool:
        return self.plan.save_due(step)

    def write_state(self) -> float:
        """This rank's part of the loop's all-reduce: done, busy or failed (for the save in flight)."""
        if self.pending is None:
            return WRITE_DONE
        job = self.pending.job
        if not job.done.is_set():
            return WRITE_BUSY
        if job.error is None:
            return WRITE_DONE
        return WRITE_DISK_FULL if is_disk_full(job.error) else WRITE_FAILED

    def poll(self, write_state: float) -> None:
        """After the loop's all-reduce (the MAX of every rank's `write_state`): commit, or raise a failure."""
        if self.pending is None or write_state == WRITE_BUSY:
            return
        if write_state in (WRITE_FAILED, WRITE_DISK_FULL):
            self._raise_failed(write_state)
        self._commit(self.pending)

    def maybe_save(self, step: int, reason: str, rng: Optional[dict] = None) -> Optional[str]:
        """Save at `step` (collective): `scheduled` when due and `best` (a new best val_loss between scheduled
        saves) in the background if `checkpoint.async`; `final` and `preemption` always, written directly and
        committed before returning. Returns the tag."""
        if reason == "scheduled" and not self.due(step):
            return None
        if self.last_saved_step == step or (self.pending is not None and self.pending.step == step):
            return tag_for(step)  # this state is saved (or being saved) already
        background = reason in ("scheduled", "best") and self.cfg.checkpoint.async_save
        with self.goodput.clock.phase_of("checkpoint"):
            if self.pending is not None:
                t0 = time.monotonic()
                self.wait()
                stall = time.monotonic() - t0
                self.stall_s += stall
                log.warning(
                    "the save of %s waited %.1f s for the write of the previous checkpoint to finish (saves come"
                    " faster than the disk takes them: raise checkpoint.save_every)",
                    tag_for(step),
                    stall,
                )
            try:
                pending = self._capture(step, reason, background, rng)
            except OSError as exc:
                if is_disk_full(exc):
                    raise self._disk_full(tag_for(step)) from exc
                raise
            if background:
                self.pending = pending
                log.info(
                    "checkpoint %s (%s): state captured in %.2f s, writing %s in the background",
                    pending.tag,
                    reason,
                    pending.blocked_s,
                    gb(pending.job.bytes_total),
                )
            else:
                dist.barrier()  # every rank's files are on disk before anyone commits
                self._commit(pending)
        return pending.tag

    def _capture(self, step: int, reason: str, background: bool, rng: Optional[dict]) -> PendingSave:
        """Hand every file of a checkpoint to the writer (background) or write it (direct). Collective."""
        assert self.files is not None and self.engine is not None
        tag = tag_for(step)
        t0 = time.monotonic()
        self.files.background = background
        self.engine.save_checkpoint(
            str(self.store.root),
            tag=tag,
            client_state={"trainer_step": step},
            save_latest=False,
            exclude_frozen_parameters=not self.task.save_frozen,
        )
        folder = self.store.path(tag)
        self.files.add(folder / rng_file_name(self.ranks.rank), rng if rng is not None else capture_rng())
        extra = self.task.on_save(self.engine.module, folder, self.ranks.is_main, reason == "final")
        job = self.files.seal()
        blocked = time.monotonic() - t0
        metadata = {**self.describe(step, reason), **extra, "goodput": self.goodput.captured(step)}
        if background:
            self.times.snapshot_s = blocked
        else:
            self.recent_direct_s.append(blocked)
        self.blocked_s += blocked
        return PendingSave(step, tag, reason, metadata, job, blocked)

    def _commit(self, p: PendingSave) -> None:
        """Every rank's files are on disk (agreed): commit on each node, queue the upload, apply retention."""
        self.pending = None
        job = p.job
        total = job.bytes_total + (self.files.direct_bytes if self.files and not job.bytes_total else 0)
        if job.bytes_total and job.write_s > 0:
            self.times.write_rate_bps = job.bytes_done / job.write_s
        elif p.blocked_s > 0 and total:
            self.times.write_rate_bps = total / p.blocked_s
        self.times.bytes = total or self.times.bytes
        records: dict[str, dict] = {}
        for rank_records in dist.all_gather_object(
            job.records
        ):  # each file's size and CRC32C, from the rank that wrote it
            records.update(rank_records)
        if self.ranks.is_local_main:
            try:
                self.store.commit(
                    p.tag,
                    {**p.metadata, "committed_at": utc_now(), "save": self._save_record(p)},
                    self.side_files(),
                    records,
                )
            except OSError as exc:
                if is_disk_full(exc):
                    raise self._disk_full(p.tag) from exc
                raise
            if self.uploader is not None:
                self._submit_upload(self.store.path(p.tag))
            self.retention()
        self.last_saved_step = p.step
        written = f", written in {job.finished - job.started:.1f} s while training went on" if job.bytes_total else ""
        log.info(
            "saved checkpoint %s (%s): training blocked %.2f s%s",
            self.store.path(p.tag),
            p.reason,
            p.blocked_s,
            written,
        )
        if self.ranks.is_main and self.on_commit is not None:
            self.on_commit(p.tag, p.metadata)

    def _save_record(self, p: PendingSave) -> dict:
        job = p.job
        rec: dict[str, Any] = {"async": bool(job.bytes_total), "blocked_s": round(p.blocked_s, 3)}
        if job.bytes_total:
            rec.update(
                write_s=round(job.write_s, 3),
                bytes=job.bytes_total,
                written_after_s=round((job.finished or time.monotonic()) - job.started, 3),
            )
        return rec

    def _submit_upload(self, path: Path) -> None:
        if getattr(self.uploader, "synchronous", False):  # the other ranks wait here, reported, without a timeout
            dist.wait_for(
                lambda: self.uploader.submit(path), dist.local_mains(self.ranks), f"the upload of {path.name}"
            )
        else:
            self.uploader.submit(path)

    def _raise_failed(self, state: float = WRITE_FAILED) -> None:
        job = self.pending.job if self.pending else None
        tag = self.pending.tag if self.pending else "?"
        self.pending = None
        if state == WRITE_DISK_FULL:  # on every rank, whichever ran out of space: the same line
            raise self._disk_full(tag, shared=True) from (job.error if job is not None else None)
        if job is not None and job.error is not None:
            raise CheckpointWriteFailed(
                f"writing checkpoint {tag} failed on rank {self.ranks.rank}: {job.error}"
            ) from job.error
        raise CheckpointWriteFailed(f"writing checkpoint {tag} failed on another rank (its log names the error)")

    def _disk_full(self, tag: str, shared: bool = False) -> UserError:
        """One line for a save that did not fit: the disk, what a checkpoint takes there, what is free once the
        partial folder is gone (removed here: it is never listed, and the committed checkpoints stay as they were)."""
        folder = self.store.path(tag)
        if self.ranks.is_local_main:
            shutil.rmtree(folder, ignore_errors=True)
        committed = self.store.committed()
        need = checkpoint_bytes(committed[-1].path) if committed else (self.times.bytes or 0)
        free = shutil.disk_usage(self.store.root).free
        keep = self.cfg.checkpoint.keep_last
        newest = committed[-1].tag if committed else "none"
        return UserError(
            f"checkpoint {tag}: no space left on {disk_of(self.store.root)}: a checkpoint takes {gb(need)} on this "
            "node,"
            f" {gb(free)} is free, so {gb(max(0, need - free))} more is needed (checkpoint.keep_last {keep} keeps "
            f"{keep} +"
            " the one being saved); the partial save was removed, the committed checkpoints are intact (newest: "
            f"{newest})",
            shared=shared,
        )

    def wait(self, deadline: Optional[float] = None) -> bool:
        """Wait for the write in flight (until `deadline`, monotonic), then commit it. Collective.

        False if it was not on disk everywhere by then: it is abandoned (a partial folder, removed
        at the next start) and the newest committed checkpoint stays the newest."""
        if self.pending is None:
            return True
        p = self.pending
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        p.job.done.wait(timeout)
        state = dist.all_reduce_max([self.write_state()])[0]
        if state in (WRITE_FAILED, WRITE_DISK_FULL):
            self._raise_failed(state)
        if state == WRITE_BUSY:
            self.pending = None
            newest = tag_for(self.last_saved_step) if self.last_saved_step is not None else "none"
            log.warning(
                "abandoned the write of %s: not on disk on every rank by the deadline (a partial folder, removed at"
                " the next start); newest committed checkpoint: %s",
                p.tag,
                newest,
            )
            return False
        self._commit(p)
        return True

    def in_flight_remaining_s(self) -> float:
        """Seconds until the write in flight is on disk on every rank (estimated). Collective."""
        local = 0.0 if self.pending is None else self.pending.job.remaining_s(self.times.write_rate_bps)
        return dist.all_reduce_max([min(local, 1e9)])[0]

    def save_fits(self, step: int, deadline: float) -> bool:
        """Does a direct save at `step` fit before `deadline` minus the exit reserve? Collective.

        It is expected to take as long as the slowest recent direct save, or this rank's state
        written at the measured disk rate; unknown before the first save, when it is tried."""
        need_local = max([*self.recent_direct_s, self.times.direct_write_s() or 0.0])
        need = dist.all_reduce_max([need_local])[0]
        left = deadline - time.monotonic() - self.cfg.preemption.exit_reserve_s
        fits = bool(dist.broadcast_object(left >= 1.2 * need))
        if not fits:
            newest = tag_for(self.last_saved_step) if self.last_saved_step is not None else "none"
            log.warning(
                "not saving at step %d: %.1f s of the %.0f s grace left, a save takes ~%.1f s (newest committed"
                " checkpoint: %s)",
                step,
                left,
                self.cfg.preemption.grace_s,
                need,
                newest,
            )
        return fits

    def emergency_save_s(self) -> Optional[float]:
        """What a direct save (the emergency one) takes on this rank, as measured (None before the first save)."""
        known = [*self.recent_direct_s, self.times.direct_write_s() or 0.0]
        return max(known) if any(known) else None

    # --------------------------------------------------------------------------------- loading
    def load(self, ckpt_dir: Path, meta: dict, universal: Optional[Path] = None) -> None:
        """Model, optimizer, LR scheduler (re-fitted to this config's schedule) and this rank's RNG.

        `universal`: the checkpoint's universal conversion, for an engine on another world size (built with
        `checkpoint.load_universal`); the weights and Adam moments come from it, sliced for this rank."""
        import torch

        from trainer.engine.optim import reapply_schedule

        self.task.check_resume(meta)
        source = universal or ckpt_dir
        with self.goodput.clock.phase_of("restore"):
            load_path, _ = self.engine.load_checkpoint(
                str(source.parent), tag=source.name, load_module_strict=self.task.save_frozen
            )
            if load_path is None:
                raise UserError(f"--resume: DeepSpeed found no loadable checkpoint in {source}")
            reapply_schedule(self.engine.lr_scheduler, self.cfg.optim, self.plan)
            rng_file = ckpt_dir / rng_file_name(self.ranks.rank)
            if rng_file.exists():
                restore_rng(torch.load(rng_file, weights_only=False))
            elif universal is not None:  # a rank the saving job did not have
                log.info(
                    "no RNG state for rank %d in %s (saved on %s ranks): this rank starts a fresh RNG stream",
                    self.ranks.rank,
                    ckpt_dir.name,
                    meta.get("world_size"),
                )
            else:
                log.warning("no RNG state for rank %d in %s; continuing with fresh RNG", self.ranks.rank, ckpt_dir)
        self.last_saved_step = int(meta["step"])

    # ------------------------------------------------------------------------------- retention
    def retention(self) -> None:
        c = self.cfg.checkpoint
        self.store.retention(
            c.keep_last,
            c.keep_best,
            deletable=is_uploaded if self.uploader is not None else None,
            metric=self.plan.best_metric,
        )

    # --------------------------------------------------------------------------------- uploads
    def drain(self, stopped: bool, deadline: Optional[float], stop: Any) -> None:
        """Wait for queued uploads (until `deadline` when stopped), then report where every checkpoint is.

        A second signal stops the waiting at once; so does a first one that comes during the final
        drain, once its grace period is spent."""
        if self.uploader is None or not self.ranks.is_local_main:
            return
        p = self.cfg.preemption

        def give_up() -> bool:
            return stop.urgent or (stop.is_set() and stop.elapsed() > p.grace_s - p.exit_reserve_s)

        if stopped:
            self.uploader.prioritize_newest()
            assert deadline is not None
            timeout = max(0.0, deadline - time.monotonic() - self.cfg.preemption.exit_reserve_s)
        else:
            timeout = self.cfg.upload.drain_timeout_s
        waiting = self.uploader.pending()
        if waiting:
            log.info(
                "waiting up to %.0f s for %d checkpoint upload(s): %s",
                timeout,
                len(waiting),
                ", ".join(x.name for x in waiting),
            )
        if not self.uploader.close(timeout, abort=give_up):
            log.warning("stopped waiting for uploads: %s", "a second signal" if stop.urgent else "the time is up")
        self.retention()
        report_locations(self.store.committed())

    def requeue_unfinished_uploads(self) -> None:
        """Committed checkpoints whose upload a hard stop cut short (or that failed) go first."""
        if self.uploader is None or not self.ranks.is_local_main:
            return
        for c in self.store.committed():
            if read_upload_state(c.path).get("state") != UploadState.UPLOADED:
                log.info("%s was never uploaded completely: queued again", c.tag)
                self.uploader.submit(c.path)
