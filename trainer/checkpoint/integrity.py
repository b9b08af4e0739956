"""The integrity of a local checkpoint: the size and CRC32C of every file, recorded in its `metadata.json`.

Each rank checksums the files it writes as it writes them (`file_record`, read back from the page
cache right after the fsync); the commit collects them under `files`, and checksums whatever else
the folder holds (side files, task exports). A resume verifies them before DeepSpeed loads anything,
so a truncated or bit-flipped shard is named in one line instead of failing deep inside `torch.load`.
The same CRC32C as the bucket's (`trainer.storage.crc32c_of_file`). Checkpoints saved before this
have no `files` and are not verified.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

from trainer.checkpoint.layout import METADATA, UPLOAD_STATE_FILE
from trainer.storage import crc32c_of_file

FILES = "files"  # the metadata key: {relative path: {"size": bytes, "crc32c": base64 big-endian CRC32C}}
NOT_RECORDED = (METADATA, UPLOAD_STATE_FILE)  # written after the commit, or the commit itself


def file_record(path: Path | str) -> dict:
    """Size and CRC32C of one file, as it is on disk now."""
    return {"size": os.path.getsize(path), "crc32c": crc32c_of_file(Path(path))}


def recorded_names(ckpt_dir: Path) -> list[str]:
    """The files of a checkpoint folder that its metadata records (not the derived conversion, nor the state files)."""
    from trainer.checkpoint.universal import is_derived  # (universal imports store, which imports this)

    out = []
    for d, _, names in os.walk(ckpt_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(d, name), ckpt_dir)
            if rel not in NOT_RECORDED and not is_derived(rel) and not name.startswith("."):
                out.append(rel)
    return sorted(out)


def complete_records(ckpt_dir: Path, known: dict[str, dict]) -> dict[str, dict]:
    """The record of every file in `ckpt_dir`: those in `known` (checksummed by the rank that wrote them), the rest
    read here (side files, small task exports)."""
    return {rel: known[rel] if rel in known else file_record(Path(ckpt_dir) / rel) for rel in recorded_names(ckpt_dir)}


def damaged_files(
    ckpt_dir: Path, meta: dict, deep: bool = True, wanted: Optional[Callable[[str], bool]] = None
) -> list[tuple[str, str]]:
    """(relative path, what is wrong) for each recorded file of a checkpoint (of those `wanted` says) that does not
    match its record; empty if all match, or if the checkpoint records none.

    `deep`: compare CRC32Cs too (reads every byte); otherwise sizes only (a truncated file, a missing one)."""
    records = meta.get(FILES)
    if not isinstance(records, dict):
        return []
    bad = []
    for rel, rec in sorted(records.items()):
        if wanted is not None and not wanted(rel):
            continue
        path = Path(ckpt_dir) / rel
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            bad.append((rel, f"{path} is missing"))
            continue
        if size != rec.get("size"):
            bad.append((rel, f"{path} has {size} bytes, {METADATA} says {rec.get('size')}"))
        elif deep and rec.get("crc32c") and (crc := crc32c_of_file(path)) != rec["crc32c"]:
            bad.append(
                (rel, f"{path} has CRC32C {crc}, {METADATA} says {rec['crc32c']} (its bytes changed after the save)")
            )
    return bad


def describe_damage(bad: list[tuple[str, str]]) -> str:
    """One line for `damaged_files`' answer."""
    more = f" (and {len(bad) - 1} more damaged file(s))" if len(bad) > 1 else ""
    return bad[0][1] + more
