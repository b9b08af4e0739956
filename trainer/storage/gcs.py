"""`gs://bucket/prefix` through google-cloud-storage, and the reading of storage errors (which are worth a retry,
which are permanent, one line for a user)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO, Iterator, Optional

from trainer.errors import UserError
from trainer.log import get_logger
from trainer.storage.base import ObjectExists, ObjectInfo, PipelinedWriter

log = get_logger("storage")

# Resumable-upload chunk (a multiple of 256 KiB), held in memory once per parallel stream. 100 MiB is the
# client's own default: fewer round trips than 32 MiB (measured: 0.93-0.98 of the raw client's throughput
# with 32 MiB, 0.96-1.2 with 100 MiB).
CHUNK_BYTES = int(os.environ.get("TRAINER_UPLOAD_CHUNK_MB", "100")) * 1024 * 1024
READ_CHUNK_BYTES = 32 * 1024 * 1024  # one ranged GET of a streamed download (held once per stream)


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
