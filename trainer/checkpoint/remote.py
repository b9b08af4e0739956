"""Checkpoints in a bucket, read-only: manifests, and whether a checkpoint there is whole.

A remote checkpoint is the prefix `<run_id>/<tag>/` holding tar parts and `manifest.json`
(written last: every file with size and CRC32C, every part, and the checkpoint's metadata). A
prefix without a readable manifest does not exist for readers. Writing them is `upload/`'s job.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from trainer.checkpoint.layout import MANIFEST
from trainer.checkpoint.store import Checkpoint, recency
from trainer.log import get_logger
from trainer.storage import Storage

log = get_logger("checkpoint")


def verify_remote(storage: Storage, prefix: str) -> tuple[bool, str, Optional[dict]]:
    """Is `<prefix>/manifest.json` there, and does every part it names have its size and CRC32C?"""
    raw = storage.get_bytes(f"{prefix}/{MANIFEST}")
    if raw is None:
        return False, "no manifest", None
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError:
        return False, "manifest is not valid JSON", None
    for part in manifest.get("parts", []):
        info = storage.stat(f"{prefix}/{part['name']}")
        if info is None:
            return False, f"part {part['name']} is missing", manifest
        if info.size != part["size"] or (info.crc32c and info.crc32c != part["crc32c"]):
            return (
                False,
                f"part {part['name']} has size {info.size} crc32c {info.crc32c}, manifest says {part['size']} "
                f"{part['crc32c']}",
                manifest,
            )
    return True, "verified", manifest


def read_manifests(storage: Storage, threads: int = 8) -> tuple[list[tuple[str, dict]], list[str]]:
    """(prefix, manifest) of every checkpoint under the URL with a readable manifest, and one line
    per manifest that cannot be read. The manifests are fetched `threads` at a time (one request
    each: on a bucket the round trips, not the bytes, are the cost)."""
    from concurrent.futures import ThreadPoolExecutor

    names = [n for n in storage.list() if n.endswith("/" + MANIFEST)]

    def fetch(name: str) -> tuple[str, Optional[dict], str]:
        try:
            manifest = json.loads(storage.get_bytes(name) or b"")
            dict(manifest["checkpoint"])
            int(manifest["step"])
        except (ValueError, KeyError, TypeError) as exc:
            return name, None, f"{storage.display(name)}: unreadable manifest ({type(exc).__name__})"
        return name, manifest, ""

    found, problems = [], []
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(names)))) as pool:
        for name, manifest, problem in pool.map(fetch, names):
            if manifest is None:
                problems.append(problem)
            else:
                found.append((name[: -len(MANIFEST) - 1], manifest))
    return found, problems


def remote_checkpoints(
    storage: Storage, task: Optional[str] = None, model: Optional[dict] = None
) -> list[tuple[str, dict]]:
    """(prefix, manifest) of every checkpoint under the URL with a readable manifest, newest first,
    saved by the same task and model architecture when those are given."""
    found, problems = read_manifests(storage)
    for line in problems:
        log.warning("skipping %s", line)
    found = [(prefix, m) for prefix, m in found if Checkpoint(Path(prefix), m["checkpoint"]).matches(task, model)]
    return sorted(found, key=lambda pm: recency(pm[1]["checkpoint"]), reverse=True)
