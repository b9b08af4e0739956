"""Storage backends for uploaded checkpoints: `file:///path` and `gs://bucket/prefix`.

Both offer the same small interface over object names relative to the URL's prefix. Writes are
create-only (a generation precondition on GCS, an exclusive rename locally), so a retry can never
clobber an object written by someone else; objects become visible whole or not at all.

The backends live in storage/local.py and storage/gcs.py; what they share in storage/base.py. Import from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from trainer.errors import UserError
from trainer.storage.base import DataMismatch, ObjectExists, ObjectInfo, Storage, b64_crc, crc32c_of_file
from trainer.storage.gcs import GCSStorage, describe_error, is_permanent, is_storage_error
from trainer.storage.local import FileStorage

__all__ = [
    "DataMismatch",
    "FileStorage",
    "GCSStorage",
    "ObjectExists",
    "ObjectInfo",
    "Storage",
    "b64_crc",
    "crc32c_of_file",
    "describe_error",
    "is_permanent",
    "is_storage_error",
    "open_storage",
    "url_problem",
]


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
