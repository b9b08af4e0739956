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
from trainer.checkpoint.store import CheckpointStore, fsync_dir
from trainer.log import get_logger
from trainer.storage import Storage, crc32c_of_file, describe_error

log = get_logger("restore")


class RestoreFailed(Exception):
    """A remote checkpoint that cannot be used: missing part, checksum mismatch, unsafe archive."""


def restore(storage: Storage, prefix: str, manifest: dict, run_dir: Path,
            progress: Optional[Callable[[int], None]] = None) -> Path:
    """Download, verify and unpack one remote checkpoint into `<run_dir>/<run_id>/checkpoints/<tag>`."""
    meta = manifest["checkpoint"]
    store = CheckpointStore(Path(run_dir) / str(manifest["run_id"]))
    final = store.path(str(meta.get("tag") or PurePosixPath(prefix).name))
    if (final / "metadata.json").is_file():
        return final  # already here (this node restored it, or never lost it)
    staging = store.root / f".restore-{final.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    started, total = time.monotonic(), int(manifest.get("bytes") or 0)
    log.info("downloading %s from %s (%.1f MB in %d part(s))", final.name, storage.display(prefix), total / MB,
             len(manifest["parts"]))
    try:
        files = {f["path"]: f for f in manifest["files"]}
        for part in manifest["parts"]:
            _fetch_part(storage, prefix, part, manifest.get("compression", "none"), files, staging)
            if progress is not None:
                progress(sum(f["size"] for f in files.values() if f["part"] == part["name"]))
        for rel, f in files.items():
            path = staging / rel
            if not path.is_file() or path.stat().st_size != f["size"] or crc32c_of_file(path) != f["crc32c"]:
                raise RestoreFailed(f"{rel} does not match the manifest after unpacking")
        write_upload_state(staging, UploadState.UPLOADED, url=storage.display(prefix), bytes=manifest.get("bytes"),
                    manifest_crc32c=manifest.get("manifest_crc32c"), restored=True)
        os.rename(staging, final)  # metadata.json is inside: committed whole, at once
        fsync_dir(store.root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    seconds = time.monotonic() - started
    log.info("restored %s: %.1f MB in %.1f s (every file's CRC32C verified)", final, total / MB, seconds)
    return final


def restore_newest(storage: Storage, run_dir: Path, task: Optional[str] = None, model: Optional[dict] = None) -> Optional[Path]:
    """The newest remote checkpoint that restores and verifies, as a local folder; None if there is none."""
    for prefix, manifest in remote_checkpoints(storage, task, model):
        try:
            return restore(storage, prefix, manifest, run_dir)
        except RestoreFailed as exc:
            log.warning("skipping %s: %s", storage.display(prefix), exc)
        except Exception as exc:  # a download that failed after the client's retries
            log.warning("skipping %s: %s", storage.display(prefix), describe_error(exc))
    return None


def _fetch_part(storage: Storage, prefix: str, part: dict, compression: str, files: dict[str, dict], dest: Path) -> None:
    tmp = dest / f".{part['name']}.download"
    try:
        storage.download(f"{prefix}/{part['name']}", tmp)  # GCS: the client checks the CRC32C as it downloads
        if tmp.stat().st_size != part["size"] or crc32c_of_file(tmp) != part["crc32c"]:
            raise RestoreFailed(f"part {part['name']} does not match the manifest (size or CRC32C)")
        _unpack(tmp, part["name"], compression, {p for p, f in files.items() if f["part"] == part["name"]}, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _unpack(archive: Path, label: str, compression: str, expected: set[str], dest: Path) -> None:
    """Extract exactly the `expected` regular files; anything else in the archive is an error."""
    with open(archive, "rb") as raw:
        if compression == "zstd":
            import zstandard

            fileobj = zstandard.ZstdDecompressor().stream_reader(raw)
            tar = tarfile.open(fileobj=fileobj, mode="r|")
        else:
            tar = tarfile.open(fileobj=raw, mode="r|gz" if compression == "gzip" else "r|")
        seen = set()
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
                with open(target, "xb") as out:  # never follow or overwrite anything already there
                    shutil.copyfileobj(src, out, 8 * MB)
                seen.add(name)
    if seen != expected:
        raise RestoreFailed(f"part {label} lacks {sorted(expected - seen)[:5]}")

