"""Bringing checkpoints back from the bucket: the newest complete one, verified, extracted safely.

A fresh VM has an empty run folder; `--resume auto` then looks here. Only checkpoints with a
manifest count. Every part is downloaded (the client checks its CRC32C), checked against the
manifest, and unpacked into a hidden staging folder accepting only regular files the manifest
names, at relative paths that stay inside the folder. Every file's size and CRC32C is checked,
then the staging folder is renamed into place: the checkpoint appears committed, whole, at once.
A checkpoint that fails any check is skipped with a warning and the next older one is tried.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import time
from pathlib import Path, PurePosixPath
from typing import Callable, Optional

from trainer.checkpoint.layout import MB, UploadState, write_upload_state
from trainer.checkpoint.remote import remote_checkpoints
from trainer.checkpoint.store import CheckpointStore, fsync_dir, fsync_tree
from trainer.log import get_logger
from trainer.progress import gb, report
from trainer.storage import Storage, b64_crc

log = get_logger("restore")


class RestoreFailed(Exception):
    """A remote checkpoint that cannot be used: missing part, checksum mismatch, unsafe archive."""


RESTORE_STREAMS = 4  # parts downloaded and unpacked at once


def restore(
    storage: Storage,
    prefix: str,
    manifest: dict,
    run_dir: Path,
    progress: Optional[Callable[[int], None]] = None,
    streams: int = RESTORE_STREAMS,
) -> Path:
    """Download, verify and unpack one remote checkpoint into `<run_dir>/<run_id>/checkpoints/<tag>`.

    Each part streams from the bucket straight into the unpacker (no temporary archive), `streams`
    parts at a time; the CRC32C of every part and of every file is computed as the bytes go by and
    checked against the manifest, and every file is fsynced before the folder is renamed into place.
    Says how far it is through `trainer.progress` (ranks waiting for this one log it) and, every
    15 s, in the log."""
    import threading
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    meta = manifest["checkpoint"]
    store = CheckpointStore(Path(run_dir) / str(manifest["run_id"]))
    final = store.path(str(meta.get("tag") or PurePosixPath(prefix).name))
    if (final / "metadata.json").is_file():
        return final  # already here (this node restored it, or never lost it)
    staging = store.root / f".restore-{final.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    parts = list(manifest["parts"])
    started, total = time.monotonic(), int(manifest.get("bytes") or 0)
    log.info(
        "downloading %s from %s (%.1f MB in %d part(s), %d at a time)",
        final.name,
        storage.display(prefix),
        total / MB,
        len(parts),
        max(1, min(streams, len(parts))),
    )
    files = {f["path"]: f for f in manifest["files"]}
    lock = threading.Lock()
    tally = {"bytes": 0, "parts": 0, "said": started}

    def one(part: dict) -> set[str]:
        got = _fetch_part(storage, prefix, part, manifest.get("compression", "none"), files, staging)
        n = sum(files[p]["size"] for p in got)
        with lock:
            tally["bytes"] += n
            tally["parts"] += 1
            line = (
                f"restoring {final.name}: {gb(tally['bytes'])} of {gb(total)} ({tally['parts']} of {len(parts)} parts)"
            )
            report(line)
            if time.monotonic() - tally["said"] >= 15:
                tally["said"] = time.monotonic()
                log.info("%s, %.0f MB/s", line, tally["bytes"] / MB / max(1e-9, tally["said"] - started))
        if progress is not None:
            progress(n)
        return got

    try:
        pool = ThreadPoolExecutor(max_workers=max(1, min(streams, len(parts))), thread_name_prefix="restore-part")
        try:
            futures = [pool.submit(one, part) for part in parts]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for f in done:
                if f.exception() is not None:
                    raise f.exception()  # type: ignore[misc]
            seen = set().union(*(f.result() for f in futures)) if futures else set()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if seen != set(files):
            raise RestoreFailed(f"the parts lack {sorted(set(files) - seen)[:5]} that the manifest lists")
        write_upload_state(
            staging,
            UploadState.UPLOADED,
            url=storage.display(prefix),
            bytes=manifest.get("bytes"),
            manifest_crc32c=manifest.get("manifest_crc32c"),
            restored=True,
        )
        fsync_tree(staging)  # (every file was fsynced as it was unpacked)
        os.rename(staging, final)  # metadata.json is inside: committed whole, at once
        fsync_dir(store.root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    seconds = time.monotonic() - started
    log.info(
        "restored %s: %.1f MB in %.1f s = %.0f MB/s (every part's and file's CRC32C verified)",
        final,
        total / MB,
        seconds,
        total / MB / max(seconds, 1e-9),
    )
    return final


def fill_missing(
    storage: Storage, prefix: str, manifest: dict, ckpt_dir: Path, wanted: Optional[Callable[[str], bool]] = None
) -> list[str]:
    """Download into the local checkpoint `ckpt_dir` the files its manifest lists that are not there (a node of a
    run without a shared filesystem holds only its own ranks' files), or only those `wanted` accepts, each verified
    like a restore. Only the parts holding them are fetched; the files are moved in when all are verified. Returns
    their names."""
    ckpt_dir = Path(ckpt_dir)
    files = {f["path"]: f for f in manifest["files"]}
    missing = sorted(p for p in files if not (ckpt_dir / p).is_file() and (wanted is None or wanted(p)))
    if not missing:
        return []
    parts = [part for part in manifest["parts"] if any(files[p]["part"] == part["name"] for p in missing)]
    staging = ckpt_dir.parent / f".fill-{ckpt_dir.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    started = time.monotonic()
    log.info(
        "fetching %d file(s) of %s that this node lacks from %s (%d part(s))",
        len(missing),
        ckpt_dir.name,
        storage.display(prefix),
        len(parts),
    )
    try:
        for part in parts:
            _fetch_part(storage, prefix, part, manifest.get("compression", "none"), files, staging)
        for name in missing:
            (ckpt_dir / name).parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging / name, ckpt_dir / name)
        fsync_dir(ckpt_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "fetched %s into %s in %.1f s (CRC32C verified)", ", ".join(missing), ckpt_dir.name, time.monotonic() - started
    )
    return missing


def restore_newest(
    storage: Storage, run_dir: Path, task: Optional[str] = None, model: Optional[dict] = None
) -> Optional[Path]:
    """The newest remote checkpoint that restores and verifies, as a local folder; None if there is none.

    One whose bytes do not match its manifest is skipped for the next older. A storage failure (the service
    unreachable or not answering, after the client's retries) is raised: starting from an older checkpoint, or from
    scratch, because the bucket did not answer would throw away the training the newest one holds."""
    for prefix, manifest in remote_checkpoints(storage, task, model):
        try:
            return restore(storage, prefix, manifest, run_dir)
        except RestoreFailed as exc:
            log.warning("skipping %s: %s", storage.display(prefix), exc)
    return None


class _Checksummed:
    """A read-only stream that counts and CRC32Cs what is read through it."""

    def __init__(self, raw: "object"):
        import google_crc32c

        self.raw, self.size, self.crc = raw, 0, google_crc32c.Checksum()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)  # type: ignore[attr-defined]
        self.size += len(data)
        self.crc.update(data)
        return data

    def drain(self) -> None:
        while self.read(8 * MB):
            pass


def _fetch_part(
    storage: Storage, prefix: str, part: dict, compression: str, files: dict[str, dict], dest: Path
) -> set[str]:
    """Stream one part into `dest`: exactly its manifest files, each checked as written; then the part's own
    size and CRC32C. Returns the files written."""
    import gzip

    import zstandard
    from google.api_core.exceptions import NotFound

    label = part["name"]
    expected = {p for p, f in files.items() if f["part"] == label}
    try:
        with storage.reader(f"{prefix}/{label}") as raw:
            counted = _Checksummed(raw)
            seen = _unpack(counted, label, compression, expected, files, dest)
            counted.drain()  # the tar's end-of-archive padding: the part checksum covers every byte
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zstandard.ZstdError, FileNotFoundError, NotFound) as exc:
        raise RestoreFailed(f"part {label} is damaged or missing ({type(exc).__name__}: {exc})") from None
    if counted.size != part["size"] or b64_crc(counted.crc) != part["crc32c"]:
        raise RestoreFailed(
            f"part {label} does not match the manifest (size {counted.size} crc32c {b64_crc(counted.crc)},"
            f" manifest {part['size']} {part['crc32c']})"
        )
    return seen


def _unpack(
    stream: "_Checksummed", label: str, compression: str, expected: set[str], files: dict[str, dict], dest: Path
) -> set[str]:
    """Extract exactly the `expected` regular files, each with the size and CRC32C the manifest gives it;
    anything else in the archive is an error."""
    import google_crc32c

    if compression == "zstd":
        import zstandard

        tar = tarfile.open(fileobj=zstandard.ZstdDecompressor().stream_reader(stream, closefd=False), mode="r|")
    else:
        tar = tarfile.open(fileobj=stream, mode="r|gz" if compression == "gzip" else "r|")  # type: ignore[call-overload]
    seen: set[str] = set()
    with tar:
        for member in tar:
            name = member.name
            pure = PurePosixPath(name)
            if pure.is_absolute() or ".." in pure.parts or not member.isfile() or name not in expected or name in seen:
                raise RestoreFailed(f"unsafe or unexpected archive member {name!r} in {label}")
            target = dest / pure
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            crc, size = google_crc32c.Checksum(), 0
            with open(target, "xb") as out:  # never follow or overwrite anything already there
                while block := src.read(8 * MB):
                    crc.update(block)
                    out.write(block)
                    size += len(block)
                out.flush()
                os.fsync(out.fileno())
            want = files[name]
            if size != want["size"] or b64_crc(crc) != want["crc32c"]:
                raise RestoreFailed(
                    f"{name} does not match the manifest after unpacking (size {size}, crc32c {b64_crc(crc)})"
                )
            seen.add(name)
    if seen != expected:
        raise RestoreFailed(f"part {label} lacks {sorted(expected - seen)[:5]}")
    return seen
