"""Streaming tar parts of a checkpoint folder, with CRC32C of every file and of every part.

A checkpoint's files are split into `workers` parts of similar size; each part is a tar stream
(optionally zstd or gzip compressed) written straight into a storage writer: no temporary
tarball, checksums computed on the fly.
"""
from __future__ import annotations

import base64
import gzip
import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

Compression = Literal["none", "zstd", "gzip"]
SUFFIX = {"none": ".tar", "zstd": ".tar.zst", "gzip": ".tar.gz"}


def _b64(checksum) -> str:  # type: ignore[no-untyped-def]
    return base64.b64encode(checksum.digest()).decode()


class CountingWriter(io.RawIOBase):
    """Forwards writes to `sink`, counting bytes and updating a CRC32C of them."""

    def __init__(self, sink: BinaryIO, checksum: bool = True):
        import google_crc32c

        self.sink = sink
        self.crc = google_crc32c.Checksum() if checksum else None
        self.bytes = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[no-untyped-def, override]
        data = data if isinstance(data, bytes) else bytes(data)
        if self.crc is not None:
            self.crc.update(data)
        self.sink.write(data)
        self.bytes += len(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:  # never close the storage writer: its owner finalizes it
        pass


class HashingReader(io.RawIOBase):
    """Reads a file for tarfile while computing its CRC32C."""

    def __init__(self, f: BinaryIO):
        import google_crc32c

        self.f = f
        self.crc = google_crc32c.Checksum()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.crc.update(data)
        return data


@dataclass
class FileEntry:
    path: str  # relative to the checkpoint folder
    size: int
    crc32c: str = ""
    part: str = ""


@dataclass
class PartResult:
    name: str
    size: int
    crc32c: str
    files: list[FileEntry] = field(default_factory=list)


def plan_parts(files: list[tuple[str, int]], workers: int) -> list[list[tuple[str, int]]]:
    """Split (path, size) pairs into at most `workers` groups of similar total size (largest first)."""
    groups: list[list[tuple[str, int]]] = [[] for _ in range(max(1, min(workers, len(files))))]
    loads = [0] * len(groups)
    for path, size in sorted(files, key=lambda x: (-x[1], x[0])):
        i = loads.index(min(loads))
        groups[i].append((path, size))
        loads[i] += size
    return [sorted(g) for g in groups if g]


def write_part(root: Path, files: list[tuple[str, int]], sink: BinaryIO, compression: Compression, name: str,
               part_checksum: bool = True) -> PartResult:
    """Stream a tar of `files` (relative to `root`) into `sink`; return sizes and checksums.

    `part_checksum=False` skips the CRC32C of the whole part (the storage client computes and
    verifies it itself); every file's CRC32C is always computed.
    """
    counter = CountingWriter(sink, part_checksum)
    if compression == "zstd":
        import zstandard

        stream: BinaryIO = zstandard.ZstdCompressor(level=1, threads=2).stream_writer(counter, closefd=False)  # type: ignore[assignment]
    elif compression == "gzip":
        stream = gzip.GzipFile(fileobj=counter, mode="wb", compresslevel=1, mtime=0)  # type: ignore[assignment]
    else:
        stream = counter  # type: ignore[assignment]
    entries = []
    with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for rel, _ in files:
            path = root / rel
            info = tar.gettarinfo(str(path), arcname=rel)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(path, "rb") as f:
                reader = HashingReader(f)
                tar.addfile(info, reader)
            entries.append(FileEntry(rel, info.size, _b64(reader.crc), name))
    if stream is not counter:
        stream.close()  # flush the compressor's frame into the counter (which does not close the sink)
    return PartResult(name, counter.bytes, _b64(counter.crc) if counter.crc is not None else "", entries)
