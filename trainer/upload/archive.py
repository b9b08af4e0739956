"""Tar parts of a checkpoint folder, with the CRC32C of every file.

A checkpoint's files are split into `workers` parts of similar size. Each part is a `TarStream`:
the tar archive of its files as a read-only, seekable stream whose size is known before a byte is
read. Headers come from `tarfile` (PAX format); file bytes are read straight from the files. An
uncompressed part goes to the storage client like a file on disk (a resumable upload that can
seek back and resend after a failure); a compressed part streams the tar through zstd or gzip
into a storage writer. No temporary tarball either way.
"""

from __future__ import annotations

import bisect
import gzip
import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal, Optional

from trainer.storage import b64_crc

Compression = Literal["none", "zstd", "gzip"]
SUFFIX = {"none": ".tar", "zstd": ".tar.zst", "gzip": ".tar.gz"}
BLOCK = 8 * 1024 * 1024  # read size when a part is compressed or copied


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


class FileChanged(Exception):
    """A file of a committed checkpoint changed size while it was being archived."""


MAX_PART_BYTES = 1024**3  # a failed part is sent again whole: keep that cheap (a larger single file is its own part)
MIN_PART_BYTES = 16 * 1024**2  # every object costs requests: no tiny parts


def plan_parts(files: list[tuple[str, int]], workers: int) -> list[list[tuple[str, int]]]:
    """Group (path, size) pairs into tar parts of similar size, the largest part first.

    Two parts per parallel stream, so a stream that finishes early takes another part instead of
    idling while the last one drains (measured: 0.6x of the raw client's throughput with one part
    per stream, ~0.95x with two); more parts when that keeps each under MAX_PART_BYTES; fewer when
    parts would be smaller than MIN_PART_BYTES, but never fewer than the streams (or the files).
    """
    total = sum(size for _, size in files)
    n = max(2 * workers, -(-total // MAX_PART_BYTES))
    n = min(n, max(1, total // MIN_PART_BYTES))
    n = max(1, min(max(n, workers), len(files)))
    while True:
        groups: list[list[tuple[str, int]]] = [[] for _ in range(n)]
        loads = [0] * n
        for path, size in sorted(files, key=lambda x: (-x[1], x[0])):
            i = loads.index(min(loads))
            groups[i].append((path, size))
            loads[i] += size
        if n == len(files) or all(load <= MAX_PART_BYTES or len(g) == 1 for g, load in zip(groups, loads)):
            break
        n += 1
    order = sorted(range(n), key=lambda i: -loads[i])
    return [sorted(groups[i]) for i in order if groups[i]]


class TarStream:
    """The tar archive of `files` (relative to `root`) as a seekable read-only stream of known `size`.

    The bytes equal what `tarfile.open(mode="w|", format=PAX_FORMAT)` writes for the same members
    (owner 0, empty user and group names, integer mtimes). Each file's CRC32C is computed as its
    bytes are first read in order; a seek back and a second read (a resumed upload) do not count
    them twice. `entries()` returns the files with their checksums once every byte has been read.
    """

    def __init__(self, root: Path, files: list[tuple[str, int]], part: str = ""):
        import google_crc32c

        self.root = Path(root)
        self.part = part
        self._starts: list[int] = []  # offset of each segment
        self._segments: list[bytes | int] = []  # header/padding bytes, or the index of a file
        self._files: list[tuple[str, int]] = []
        offset = 0
        for rel, _ in files:
            st = os.stat(self.root / rel)
            if not stat.S_ISREG(st.st_mode):
                raise FileChanged(f"{self.root / rel} is not a regular file")
            info = tarfile.TarInfo(rel)
            info.size, info.mtime, info.mode = st.st_size, int(st.st_mtime), stat.S_IMODE(st.st_mode)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            offset = self._add(offset, info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape"))
            offset = self._add(offset, len(self._files), st.st_size)
            self._files.append((rel, st.st_size))
            if st.st_size % tarfile.BLOCKSIZE:
                offset = self._add(offset, tarfile.NUL * (tarfile.BLOCKSIZE - st.st_size % tarfile.BLOCKSIZE))
        end = offset + 2 * tarfile.BLOCKSIZE  # end-of-archive marker, then padding to a whole record
        end += -end % tarfile.RECORDSIZE
        self._add(offset, tarfile.NUL * (end - offset))
        self.size = end
        self._pos = 0
        self._fds: dict[int, int] = {}
        self._crcs = [google_crc32c.Checksum() for _ in self._files]
        self._hashed = [0] * len(self._files)

    def _add(self, offset: int, seg: "bytes | int", length: Optional[int] = None) -> int:
        n = len(seg) if isinstance(seg, bytes) else int(length or 0)
        if n:
            self._starts.append(offset)
            self._segments.append(seg)
        return offset + n

    # The file-object interface the storage clients use.
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self._pos + n)
        pieces = []
        while self._pos < end:
            i = bisect.bisect_right(self._starts, self._pos) - 1
            seg, start = self._segments[i], self._starts[i]
            seg_len = len(seg) if isinstance(seg, bytes) else self._files[seg][1]
            take = min(end, start + seg_len) - self._pos
            if isinstance(seg, bytes):
                piece = seg[self._pos - start : self._pos - start + take]
            else:
                piece = self._read_file(seg, self._pos - start, take)
            pieces.append(piece)
            self._pos += take
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _read_file(self, i: int, offset: int, length: int) -> bytes:
        fd = self._fds.get(i)
        if fd is None:
            for j in [j for j in self._fds if j < i]:  # parts are read front to back: close what lies behind
                os.close(self._fds.pop(j))
            fd = self._fds[i] = os.open(self.root / self._files[i][0], os.O_RDONLY)
        data = os.pread(fd, length, offset)
        while len(data) < length:  # short reads happen only at end of file: the file shrank
            more = os.pread(fd, length - len(data), offset + len(data))
            if not more:
                raise FileChanged(
                    f"{self.root / self._files[i][0]} changed while it was being archived"
                    f" (expected {self._files[i][1]} bytes)"
                )
            data += more
        done = self._hashed[i]
        if offset <= done < offset + length:
            self._crcs[i].update(data if done == offset else data[done - offset :])  # a slice only after a seek back
            self._hashed[i] = offset + length
        return data

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "TarStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def entries(self) -> list[FileEntry]:
        """Every file with its size and CRC32C; an error if some bytes were never read."""
        for (rel, size), hashed in zip(self._files, self._hashed):
            if hashed != size:
                raise RuntimeError(f"{rel}: only {hashed} of {size} bytes were archived")
            if os.stat(self.root / rel).st_size != size:
                raise FileChanged(f"{self.root / rel} changed while it was being archived")
        return [FileEntry(rel, size, b64_crc(c), self.part) for (rel, size), c in zip(self._files, self._crcs)]


def compress_into(tar: TarStream, sink: BinaryIO, compression: Compression) -> tuple[int, str]:
    """Stream `tar` through the compressor into `sink`; return (bytes written, their CRC32C)."""
    import google_crc32c

    class Counter:  # what the compressor writes, counted and checksummed on the way to the sink
        def __init__(self) -> None:
            self.bytes, self.crc = 0, google_crc32c.Checksum()

        def write(self, data: bytes) -> int:
            self.crc.update(data)
            sink.write(data)
            self.bytes += len(data)
            return len(data)

        def flush(self) -> None:
            pass

    counter = Counter()
    if compression == "zstd":
        import zstandard

        stream = zstandard.ZstdCompressor(level=1, threads=2).stream_writer(counter, closefd=False)  # type: ignore[arg-type]
    elif compression == "gzip":
        stream = gzip.GzipFile(fileobj=counter, mode="wb", compresslevel=1, mtime=0)  # type: ignore[arg-type, assignment]
    else:
        raise ValueError(f"not a compression: {compression!r}")
    while block := tar.read(BLOCK):
        stream.write(block)
    stream.close()  # the last frame goes into the counter, which never closes the sink
    return counter.bytes, b64_crc(counter.crc)
