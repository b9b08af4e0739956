"""Storage backends for uploaded checkpoints: `file:///path` and `gs://bucket/prefix`.

Both offer the same small interface over object names relative to the URL's prefix. Writes are
create-only (a generation precondition on GCS, an exclusive rename locally), so a retry can never
clobber an object written by someone else; objects become visible whole or not at all.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Protocol
from urllib.parse import urlparse

from trainer.errors import UserError
from trainer.log import get_logger

log = get_logger("storage")

# Resumable-upload chunk (a multiple of 256 KiB), held in memory once per parallel stream. 100 MiB is the
# client's own default: fewer round trips than 32 MiB (measured: 0.93-0.98 of the raw client's throughput
# with 32 MiB, 0.96-1.2 with 100 MiB).
CHUNK_BYTES = int(os.environ.get("TRAINER_UPLOAD_CHUNK_MB", "100")) * 1024 * 1024
READ_CHUNK_BYTES = 32 * 1024 * 1024  # one ranged GET of a streamed download (held once per stream)
STALE_PARTIAL_S = 60.0  # a file:// temporary file untouched this long belongs to a killed write


class ObjectExists(Exception):
    """A create-only write found the object already there."""


class DataMismatch(Exception):
    """What storage holds is not what was sent."""


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    size: int
    crc32c: Optional[str]  # base64 of the big-endian CRC32C, as GCS reports it


def b64_crc(checksum) -> str:  # type: ignore[no-untyped-def]
    """A google_crc32c.Checksum as GCS reports it: base64 of the big-endian CRC32C."""
    return base64.b64encode(checksum.digest()).decode()


def crc32c_of_file(path: Path, block: int = 8 * 1024 * 1024) -> str:
    import google_crc32c

    c = google_crc32c.Checksum()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            c.update(chunk)
    return b64_crc(c)


class Storage(Protocol):
    """Object storage under one URL prefix.

    `put_stream` uploads a seekable stream of known size and returns the stored object's size and
    CRC32C, checked against the bytes sent; `writer` takes a stream of unknown size (the caller
    checks it with `stat`). Both are create-only: `ObjectExists` if the object is already there.
    """

    url: str

    def check(self, timeout_s: float = 30.0) -> None: ...
    def writer(self, name: str) -> contextlib.AbstractContextManager[BinaryIO]: ...
    def put_stream(self, name: str, stream: BinaryIO, size: int) -> ObjectInfo: ...
    def put_bytes(self, name: str, data: bytes) -> None: ...
    def get_bytes(self, name: str) -> Optional[bytes]: ...
    def stat(self, name: str) -> Optional[ObjectInfo]: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def delete(self, name: str) -> None: ...
    def download(self, name: str, dest: Path) -> None: ...
    def reader(self, name: str) -> contextlib.AbstractContextManager[BinaryIO]: ...
    def display(self, name: str) -> str: ...


class PipelinedWriter:
    """Hands large blocks to a sending thread, so producing the bytes (read, tar, checksum) overlaps
    with sending the previous block. Errors of the sender surface on the next write or at finish."""

    BLOCK = 8 * 1024 * 1024

    def __init__(self, sink: BinaryIO, depth: int = 3):
        import queue

        self.sink = sink
        self._buf = bytearray()
        self._queue: "queue.Queue[Optional[bytes]]" = queue.Queue(maxsize=depth)
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._send, name="upload-send", daemon=True)
        self._thread.start()

    def _send(self) -> None:
        while (block := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.sink.write(block)
                except BaseException as exc:  # reported to the producer
                    self._error = exc

    def write(self, data: bytes) -> int:
        if self._error is not None:
            raise self._error
        self._buf += data
        if len(self._buf) >= self.BLOCK:
            self._queue.put(bytes(self._buf))
            self._buf.clear()
        return len(data)

    def finish(self) -> None:
        if self._buf:
            self._queue.put(bytes(self._buf))
            self._buf.clear()
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        self._error = self._error or RuntimeError("aborted")
        self._queue.put(None)
        self._thread.join(timeout=60)


class FileStorage:
    """`file:///path`: a folder (a mounted bucket, an NFS share, or a local test target)."""

    def __init__(self, url: str, root: Path):
        self.url = url
        self.root = root

    def display(self, name: str) -> str:
        return f"file://{self.root / name}"

    def check(self, timeout_s: float = 30.0) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"upload.url {self.url}: cannot create {self.root} ({exc.strerror})") from None
        if not os.access(self.root, os.W_OK):
            raise UserError(f"upload.url {self.url}: {self.root} is not writable")

    @contextlib.contextmanager
    def writer(self, name: str) -> Iterator[BinaryIO]:
        dest = self.root / name
        if dest.exists():
            raise ObjectExists(self.display(name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale_partials(dest)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, dest)  # create-only: fails if someone else wrote the object meanwhile
        except FileExistsError:
            raise ObjectExists(self.display(name)) from None
        finally:
            Path(tmp).unlink(missing_ok=True)

    @staticmethod
    def _remove_stale_partials(dest: Path) -> None:
        """Temporary files of earlier writes of `dest` that were killed (a hard stop mid-upload): a write in
        progress touches its file every few milliseconds, one untouched for a minute is dead."""
        for old in dest.parent.glob(f".{glob.escape(dest.name)}.*.partial"):
            try:
                if time.time() - old.stat().st_mtime > STALE_PARTIAL_S:
                    old.unlink()
            except FileNotFoundError:
                pass

    def put_stream(self, name: str, stream: BinaryIO, size: int) -> ObjectInfo:
        import google_crc32c

        crc, sent = google_crc32c.Checksum(), 0
        with self.writer(name) as f:
            while block := stream.read(8 * 1024 * 1024):
                crc.update(block)
                f.write(block)
                sent += len(block)
        info = self.stat(name)  # read back from the file system
        if info is None or info.size != sent or info.crc32c != b64_crc(crc):
            raise DataMismatch(f"{self.display(name)}: stored {info}, sent {sent} bytes crc32c {b64_crc(crc)}")
        return info

    def put_bytes(self, name: str, data: bytes) -> None:
        with self.writer(name) as f:
            f.write(data)

    def get_bytes(self, name: str) -> Optional[bytes]:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None

    def stat(self, name: str) -> Optional[ObjectInfo]:
        path = self.root / name
        if not path.is_file():
            return None
        return ObjectInfo(name, path.stat().st_size, crc32c_of_file(path))

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.exists():
            return []
        return sorted(
            str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file() and not p.name.endswith(".partial")
        )

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def download(self, name: str, dest: Path) -> None:
        shutil.copyfile(self.root / name, dest)

    @contextlib.contextmanager
    def reader(self, name: str) -> Iterator[BinaryIO]:
        """The object's bytes as a stream (the caller checks them against the manifest)."""
        with open(self.root / name, "rb") as f:
            yield f


class GCSStorage:
    """`gs://bucket/prefix` through google-cloud-storage (Application Default Credentials).

    Anonymous credentials are used only when STORAGE_EMULATOR_HOST points at a local emulator.
    """

    def __init__(self, url: str, bucket: str, prefix: str, retry_deadline_s: float = 120.0):
        from google.cloud import storage
        from google.cloud.storage.retry import DEFAULT_RETRY

        self.url = url
        # Every call retries transient errors (google.api_core, exponential backoff) up to this deadline;
        # the uploader re-sends a whole part on top of that.
        self.retry = DEFAULT_RETRY.with_timeout(retry_deadline_s)
        self.bucket_name = bucket
        self.prefix = prefix.strip("/")
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            from google.auth.credentials import AnonymousCredentials

            self.client = storage.Client(project="emulator", credentials=AnonymousCredentials())
        else:
            try:
                self.client = storage.Client()
            except Exception as exc:  # google.auth.exceptions.DefaultCredentialsError and friends
                raise UserError(
                    f"upload.url {url}: no Google Cloud credentials ({type(exc).__name__}); set"
                    " GOOGLE_APPLICATION_CREDENTIALS or run on a VM with a service account"
                ) from None
        self.bucket = self.client.bucket(bucket)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def display(self, name: str) -> str:
        return f"gs://{self.bucket_name}/{self._key(name)}"

    def check(self, timeout_s: float = 30.0) -> None:
        """Can we list objects under the prefix? (objects.list: the permission uploads need, unlike
        buckets.get, which least-privilege service accounts often lack.)"""
        try:
            next(
                iter(
                    self.client.list_blobs(
                        self.bucket_name,
                        prefix=self._key(""),
                        max_results=1,
                        timeout=timeout_s,
                        retry=self.retry.with_timeout(timeout_s),
                    )
                ),
                None,
            )
        except Exception as exc:
            raise UserError(f"upload.url {self.url}: {describe_error(exc, self.bucket_name)}") from None

    @contextlib.contextmanager
    def writer(self, name: str) -> Iterator[BinaryIO]:
        from google.api_core import exceptions as gexc

        blob = self.bucket.blob(self._key(name))
        f = blob.open("wb", chunk_size=CHUNK_BYTES, if_generation_match=0, ignore_flush=True, retry=self.retry)
        pipe = PipelinedWriter(f)
        try:
            yield pipe  # type: ignore[misc]
            pipe.finish()
        except BaseException:
            pipe.abort()
            try:
                f.terminate()  # cancel the resumable session; never let its error hide the original
            except Exception as exc:
                log.debug("cancelling the upload session of %s failed: %s", name, exc)
            raise
        try:
            f.close()
        except gexc.PreconditionFailed:
            raise ObjectExists(self.display(name)) from None

    def put_stream(self, name: str, stream: BinaryIO, size: int) -> ObjectInfo:
        """A resumable upload read straight from `stream` (seekable: a failed chunk is resent from the
        server's offset). The client computes the CRC32C of what it sends and compares it with the
        server's when the upload is finalized (DataCorruption on a mismatch)."""
        from google.api_core import exceptions as gexc

        blob = self.bucket.blob(self._key(name), chunk_size=CHUNK_BYTES)
        try:
            blob.upload_from_file(stream, size=size, if_generation_match=0, checksum="crc32c", retry=self.retry)
        except gexc.PreconditionFailed:
            raise ObjectExists(self.display(name)) from None
        if blob.size is None or not blob.crc32c:  # the server's answer lacked them: ask
            return self.stat(name) or ObjectInfo(name, -1, None)
        return ObjectInfo(name, int(blob.size), blob.crc32c)

    def put_bytes(self, name: str, data: bytes) -> None:
        from google.api_core import exceptions as gexc

        try:
            self.bucket.blob(self._key(name)).upload_from_string(
                data, if_generation_match=0, checksum="crc32c", retry=self.retry
            )
        except gexc.PreconditionFailed:
            raise ObjectExists(self.display(name)) from None

    def get_bytes(self, name: str) -> Optional[bytes]:
        from google.api_core import exceptions as gexc

        try:
            return self.bucket.blob(self._key(name)).download_as_bytes(checksum="crc32c", retry=self.retry)
        except gexc.NotFound:
            return None

    def stat(self, name: str) -> Optional[ObjectInfo]:
        blob = self.bucket.get_blob(self._key(name), retry=self.retry)
        if blob is None:
            return None
        return ObjectInfo(name, int(blob.size), blob.crc32c)

    def list(self, prefix: str = "") -> list[str]:
        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        cut = len(self.prefix) + 1 if self.prefix else 0
        return sorted(b.name[cut:] for b in self.client.list_blobs(self.bucket_name, prefix=full, retry=self.retry))

    def delete(self, name: str) -> None:
        from google.api_core import exceptions as gexc

        try:
            self.bucket.blob(self._key(name)).delete(retry=self.retry)
        except gexc.NotFound:
            pass

    def download(self, name: str, dest: Path) -> None:
        self.bucket.blob(self._key(name)).download_to_filename(str(dest), checksum="crc32c", retry=self.retry)

    @contextlib.contextmanager
    def reader(self, name: str) -> Iterator[BinaryIO]:
        """The object's bytes as a stream of ranged reads (READ_CHUNK_BYTES each, retried), pinned to the
        generation seen first. The client checks no checksum on ranged reads: the caller must (the
        restore checks every part's and every file's CRC32C as the bytes go by)."""
        blob = self.bucket.get_blob(self._key(name), retry=self.retry)
        if blob is None:
            from google.api_core import exceptions as gexc

            raise gexc.NotFound(f"{self.display(name)} does not exist")
        with blob.open("rb", chunk_size=READ_CHUNK_BYTES, retry=self.retry, if_generation_match=blob.generation) as f:
            yield f


def describe_error(exc: BaseException, bucket: Optional[str] = None) -> str:
    """One readable line for a storage failure (no credentials or tokens: exception texts only)."""
    try:
        from google.api_core import exceptions as gexc
    except ImportError:  # pragma: no cover
        gexc = None  # type: ignore[assignment]
    if gexc is not None and isinstance(exc, gexc.RetryError) and exc.cause is not None:
        return f"{describe_error(exc.cause, bucket)}, still failing after retries"
    if gexc is not None and isinstance(exc, gexc.NotFound) and bucket:
        return f"bucket {bucket!r} does not exist"
    if gexc is not None and isinstance(exc, gexc.Forbidden):
        why = _server_message(exc.message)
        return f"no permission ({why})" if bucket is None else f"no permission to use bucket {bucket!r} ({why})"
    if gexc is not None and isinstance(exc, gexc.GoogleAPICallError):
        return f"storage error {exc.code}: {_server_message(exc.message)}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
    if type(exc).__module__.startswith(("requests", "urllib3", "google.auth")) or isinstance(
        exc, (ConnectionError, TimeoutError)
    ):
        return f"cannot reach the storage service ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}"


def _server_message(text: str) -> str:
    """The server's own reason from an error text that quotes the request and its JSON body (as the upload
    errors of google-cloud-storage do); the text itself when there is none."""
    import re

    m = re.search(r'"message":\s*"((?:[^"\\]|\\.)*)"', text or "")
    return m.group(1) if m else text


def is_storage_error(exc: BaseException) -> bool:
    """A failure of the storage service or the network to it (after the client's retries): not a bug of ours, not
    damaged data (a missing object is `NotFound`, which callers treat as such), not this machine's disk."""
    try:
        from google.api_core import exceptions as gexc

        if isinstance(exc, gexc.NotFound):
            return False
        if isinstance(exc, (gexc.GoogleAPICallError, gexc.RetryError)):
            return True
    except ImportError:  # pragma: no cover
        pass
    module = type(exc).__module__
    return module.startswith(("requests", "urllib3", "google.auth", "google.resumable_media")) or isinstance(
        exc, (ConnectionError, TimeoutError)
    )


def is_permanent(exc: BaseException) -> bool:
    """Failures that sending the same bytes again will not fix: a full or read-only disk, a denied
    permission, a missing bucket. Network errors and server restarts are worth another try."""
    import errno

    try:
        from google.api_core import exceptions as gexc

        if isinstance(exc, gexc.RetryError) and exc.cause is not None:
            return is_permanent(exc.cause)
        if isinstance(exc, (gexc.Forbidden, gexc.Unauthorized, gexc.NotFound)):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, OSError) and exc.errno in (
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
    )


def url_problem(url: str) -> Optional[str]:
    """What is wrong with a storage URL (None: one of the two forms the backends take). The config's validation
    and `open_storage` both ask this."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return None if parsed.netloc in ("", "localhost") else "expected file:///absolute/path (three slashes)"
    if parsed.scheme == "gs":
        return None if parsed.netloc else "names no bucket: expected gs://BUCKET/PREFIX"
    return "expected gs://BUCKET/PREFIX or file:///PATH"


def open_storage(url: str, retry_deadline_s: float = 120.0) -> Storage:
    """The backend for an upload URL; `UserError` for a URL that is not file:// or gs://."""
    if why := url_problem(url):
        raise UserError(f"upload.url {url}: {why}")
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return FileStorage(url, Path(parsed.path))
    return GCSStorage(url, parsed.netloc, parsed.path, retry_deadline_s)
