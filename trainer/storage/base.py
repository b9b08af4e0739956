"""What both storage backends share: the `Storage` interface, object info and CRC32C helpers, and the
pipelined writer that keeps a stream's compression apart from its network writes."""

from __future__ import annotations

import base64
import contextlib
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional, Protocol


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
