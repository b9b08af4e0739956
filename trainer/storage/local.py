"""`file:///path`: a local or mounted folder as a bucket (create-only writes through an exclusive rename)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Iterator, Optional

from trainer.errors import UserError
from trainer.storage.base import DataMismatch, ObjectExists, ObjectInfo, b64_crc, crc32c_of_file

STALE_PARTIAL_S = 60.0  # a file:// temporary file untouched this long belongs to a killed write


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
