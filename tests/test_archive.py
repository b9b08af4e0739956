"""Tar parts: the streamed archive is a real tar, seekable, with every file's CRC32C; parts are balanced."""

from __future__ import annotations

import base64
import io
import os
import random
import tarfile
from pathlib import Path

import pytest

from trainer.upload.archive import MAX_PART_BYTES, MIN_PART_BYTES, FileChanged, TarStream, plan_parts

MB = 1024 * 1024


def crc32c_b64(data: bytes) -> str:
    import google_crc32c

    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode()


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, list[tuple[str, int]]]:
    """Files whose sizes hit the tar block edges, a nested path and a name too long for a ustar header."""
    sizes = {
        "empty.pt": 0,
        "b511.pt": 511,
        "b512.pt": 512,
        "b513.pt": 513,
        "sub/dir/meta.json": 100_000,
        "x" * 140 + ".bin": 7_777,
        "mp_rank_00_model_states.pt": 3 * MB + 5,
    }
    for rel, size in sizes.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(os.urandom(size))
    return tmp_path, sorted(sizes.items())


def test_tar_stream_is_byte_for_byte_what_tarfile_writes(folder) -> None:
    root, files = folder
    with TarStream(root, files) as stream:
        data = stream.read()
        assert len(data) == stream.size and stream.read() == b""
        entries = stream.entries()
    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for rel, _ in files:
            info = tar.gettarinfo(str(root / rel), arcname=rel)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = int(info.mtime)
            with open(root / rel, "rb") as f:
                tar.addfile(info, f)
    assert data == expected.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # and it unpacks to the same bytes
        assert sorted(m.name for m in tar.getmembers()) == [rel for rel, _ in files]
        for m in tar.getmembers():
            assert tar.extractfile(m).read() == (root / m.name).read_bytes()  # type: ignore[union-attr]
    assert [(e.path, e.size, e.crc32c) for e in entries] == [
        (rel, size, crc32c_b64((root / rel).read_bytes())) for rel, size in files
    ]


def test_seeking_back_and_reading_again_gives_the_same_bytes_and_checksums(folder) -> None:
    """What a resumed upload does: seek back to the server's offset and read the rest again."""
    root, files = folder
    with TarStream(root, files) as once:
        whole = once.read()
    rng = random.Random(0)
    out = bytearray()
    with TarStream(root, files) as stream:
        while len(out) < stream.size:
            chunk = stream.read(rng.randint(1, 700_000))
            if rng.random() < 0.4:  # a failed chunk: back to somewhere earlier, read again
                stream.seek(max(0, len(out) - rng.randint(0, 2 * MB)))
                stream.read(rng.randint(1, 1_000_000))
                stream.seek(len(out) + len(chunk))
            out += chunk
        assert stream.tell() == stream.size and stream.seek(0, os.SEEK_END) == stream.size
        entries = stream.entries()
    assert bytes(out) == whole
    assert [e.crc32c for e in entries] == [crc32c_b64((root / rel).read_bytes()) for rel, _ in files]


def test_a_file_that_changes_while_archived_is_an_error(folder) -> None:
    root, files = folder
    with TarStream(root, files) as stream:
        (root / "mp_rank_00_model_states.pt").write_bytes(b"short now")
        with pytest.raises(FileChanged, match="changed while it was being archived"):
            stream.read()
    with TarStream(root, files) as stream:  # not every byte read: no checksums to hand out
        stream.read(1000)
        with pytest.raises(RuntimeError, match="bytes were archived"):
            stream.entries()


def test_parts_two_per_stream_bounded_and_balanced() -> None:
    big = [(f"zero_pp_rank_{i}_optim_states.pt", 32 * MB) for i in range(8)] + [
        ("metadata.json", 2_000),
        ("rng.pt", 100),
    ]
    parts = plan_parts(big, workers=4)
    assert len(parts) == 8  # two per stream
    assert sorted(f for p in parts for f in p) == sorted(big)  # every file exactly once
    loads = [sum(s for _, s in p) for p in parts]
    assert loads == sorted(loads, reverse=True) and max(loads) - min(loads) <= 32 * MB
    # Tiny checkpoints: no part below the minimum size, but at least one part per stream (while files last).
    small = [(f"f{i}", 1000) for i in range(10)]
    assert len(plan_parts(small, workers=3)) == 3
    assert len(plan_parts(small[:2], workers=3)) == 2
    # A huge checkpoint: parts stay under the maximum unless one file alone is larger.
    huge = [(f"shard{i}", 300 * MB) for i in range(40)] + [("giant", 3 * MAX_PART_BYTES)]
    parts = plan_parts(huge, workers=2)
    assert all(sum(s for _, s in p) <= MAX_PART_BYTES or p == [("giant", 3 * MAX_PART_BYTES)] for p in parts)
    assert all(sum(s for _, s in p) >= MIN_PART_BYTES for p in parts)
