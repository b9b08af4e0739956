"""The training loop's side of uploads: a queue that never blocks training (`BackgroundUploader`, each upload in
a child process, `python -m trainer.upload.worker`) or, with `upload.background: false`, an upload right after each
save (`SyncUploader`). Both hand each checkpoint to a `CheckpointUploader`."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from trainer.checkpoint.layout import METADATA, UploadState, read_upload_state, utc_now, write_upload_state
from trainer.log import get_logger
from trainer.upload.uploader import CheckpointUploader, NodeInfo, UploadFailed, checkpoint_uploader

if TYPE_CHECKING:  # pragma: no cover
    from trainer.config.schema import UploadConfig

log = get_logger("upload")


class BackgroundUploader:
    """One per node: a thread that uploads queued checkpoints in order; training never waits for it.

    `submit` never blocks and never drops a checkpoint: past `queue_size` waiting checkpoints it
    logs backpressure and keeps them queued.
    """

    def __init__(self, uploader: CheckpointUploader, queue_size: int = 2, url: Optional[str] = None):
        self.uploader = uploader
        self.queue_size = queue_size
        self.url = url  # set: each upload runs in a child process (python -m trainer.upload.worker)
        self._child: Optional[subprocess.Popen] = None
        self._waiting: collections.deque[Path] = collections.deque()
        self._cond = threading.Condition()
        self._in_flight: Optional[Path] = None
        self._requeue: Optional[Path] = None  # an upload stopped to let a newer one go first
        self._closed = False
        self.results: dict[str, str] = {}  # tag -> final state, in completion order
        self._thread = threading.Thread(target=self._run, name="checkpoint-uploader", daemon=True)
        self._thread.start()

    def submit(self, ckpt_dir: Path) -> None:
        write_upload_state(ckpt_dir, UploadState.PENDING, queued_at=utc_now())
        with self._cond:
            self._waiting.append(Path(ckpt_dir))
            waiting = len(self._waiting)
            self._cond.notify_all()
        log.info("queued %s for background upload", Path(ckpt_dir).name)
        if waiting > self.queue_size:
            log.warning(
                "upload backpressure: %d checkpoints waiting (uploads are slower than saves); none is skipped", waiting
            )

    def pending(self) -> list[Path]:
        with self._cond:
            return ([self._in_flight] if self._in_flight else []) + list(self._waiting)

    def prioritize_newest(self) -> None:
        """Before a deadline: the newest checkpoint first. An older upload in flight is stopped and
        queued again behind the newer ones (its parts have no manifest: nothing half-visible)."""
        with self._cond:
            self._waiting = collections.deque(sorted(self._waiting, key=lambda p: p.name, reverse=True))
            in_flight, child = self._in_flight, self._child
            if in_flight is not None and self._waiting and self._waiting[0].name > in_flight.name and child is not None:
                self._requeue = in_flight
                child.kill()
                log.info("upload of %s set aside for the newer %s", in_flight.name, self._waiting[0].name)

    def drain(self, timeout: Optional[float] = None, abort: Optional[Callable[[], bool]] = None) -> bool:
        """Wait until everything queued is uploaded (or failed); False if the timeout or `abort()` came first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._waiting or self._in_flight is not None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if (remaining is not None and remaining <= 0) or (abort is not None and abort()):
                    return False
                self._cond.wait(timeout=min(remaining, 0.5) if remaining is not None else 0.5)
        return True

    def close(self, timeout: Optional[float] = None, abort: Optional[Callable[[], bool]] = None) -> bool:
        """Drain (bounded), then stop: an upload still running is killed (its parts have no manifest, so
        nothing half-written is visible) and what never finished is marked failed; nothing starts later."""
        done = self.drain(timeout, abort)
        with self._cond:
            self._closed = True
            abandoned = ([self._in_flight] if self._in_flight else []) + list(self._waiting)
            self._waiting.clear()
            if self._child is not None and self._child.poll() is None:
                self._child.kill()
            self._cond.notify_all()
        for p in abandoned:
            write_upload_state(
                p,
                UploadState.FAILED,
                error="interrupted: the job ended before this upload finished",
                failed_at=utc_now(),
            )
        self._thread.join(timeout=5)
        return done

    def _upload(self, job: Path) -> str:
        if self.url is None:
            return self.uploader.upload(job)["state"]
        u, n = self.uploader, self.uploader.node
        cmd = [
            sys.executable,
            "-m",
            "trainer.upload.worker",
            str(job),
            "--url",
            self.url,
            "--compression",
            u.compression,
            "--workers",
            str(u.workers),
            "--retries",
            str(u.retries),
            "--node",
            f"{n.node_rank},{n.num_nodes},{n.ranks_per_node}",
            "--parent",
            str(os.getpid()),
        ]
        if u.keep_remote:
            cmd += ["--keep-remote", str(u.keep_remote)]
        with self._cond:
            if self._closed:  # close() came first: start nothing
                raise UploadFailed(f"{job.name}: interrupted before it started")
            child = self._child = subprocess.Popen(cmd, start_new_session=True)
        code = child.wait()
        with self._cond:
            self._child = None
        state = read_upload_state(job)
        if code != 0 or state.get("state") != UploadState.UPLOADED:
            raise UploadFailed(f"{job.name}: {state.get('error') or f'upload process exited with {code}'}")
        return "uploaded"

    def _run(self) -> None:
        # The upload processes start with SIGTERM and SIGINT blocked (a thread's mask is inherited through exec) and
        # ignore them once they run: a signal for the job that reaches them while they start (DeepSpeed's launcher
        # signals its ranks' whole process trees, a VM shutdown every process) must not kill the upload.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if not self._waiting:
                    return
                job = self._in_flight = self._waiting.popleft()
            try:
                if (job / METADATA).exists():
                    self.results[job.name] = self._upload(job)
            except UploadFailed as exc:
                if self._requeue == job:  # set aside by prioritize_newest: back in line, not failed
                    with self._cond:
                        self._requeue = None
                        self._waiting.append(job)
                    write_upload_state(job, UploadState.PENDING, queued_at=utc_now())
                    continue
                self.results[job.name] = "failed"
                if self._closed:
                    log.warning(
                        "upload of %s interrupted: the job is ending (the checkpoint stays local; `trainer"
                        " upload-all` uploads it)",
                        job.name,
                    )
                else:
                    log.error(
                        "upload failed after %d attempts: %s (the checkpoint stays local; `trainer upload-all`"
                        " retries)",
                        self.uploader.retries + 1,
                        exc,
                    )
            except Exception:
                self.results[job.name] = "failed"
                log.exception("upload of %s crashed", job.name)
            finally:
                with self._cond:
                    self._in_flight = None
                    self._cond.notify_all()


class SyncUploader:
    """`upload.background: false`: the upload runs in the training thread right after each save."""

    def __init__(self, uploader: CheckpointUploader):
        self.uploader = uploader

    def submit(self, ckpt_dir: Path) -> None:
        write_upload_state(ckpt_dir, UploadState.PENDING, queued_at=utc_now())
        try:
            self.uploader.upload(ckpt_dir)
        except UploadFailed as exc:
            log.error("upload failed: %s (the checkpoint stays local; `trainer upload-all` retries)", exc)

    def pending(self) -> list[Path]:
        return []

    def prioritize_newest(self) -> None:
        pass

    def close(self, timeout: Optional[float] = None, abort: Optional[Callable[[], bool]] = None) -> bool:
        return True


def make_uploader(u: "UploadConfig", node: NodeInfo) -> "BackgroundUploader | SyncUploader":
    """The training loop's uploader: background (uploads in a child process) or synchronous."""
    uploader = checkpoint_uploader(u, node)
    return BackgroundUploader(uploader, u.queue_size, url=u.url) if u.background else SyncUploader(uploader)
