"""Token shards in a bucket (`data.path: gs://BUCKET/PREFIX`): listed, then downloaded to a local
cache with their CRC32C verified, and read from there like a local folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from trainer.data.shards import SHARD_SUFFIXES
from trainer.errors import UserError
from trainer.log import get_logger
from trainer.progress import report

log = get_logger("data")


def is_remote(path: str) -> bool:
    return path.startswith("gs://")


def cache_dir_for(url: str, cache_root: Optional[str]) -> Path:
    root = (
        Path(cache_root)
        if cache_root
        else Path(os.environ.get("TRAINER_CACHE", Path.home() / ".cache" / "trainer")) / "shards"
    )
    return root / url.removeprefix("gs://").strip("/")


def list_remote_shards(url: str, max_files: Optional[int], field: str = "data.path") -> list[str]:
    """Shard object names under `url`, in name order; `UserError` if there are none or no bucket."""
    from trainer.storage import open_storage

    storage = open_storage(url)
    storage.check()
    names = sorted(n for n in storage.list("") if "/" not in n and n.endswith(SHARD_SUFFIXES))
    if not names:
        raise UserError(f"{field}: no .npy or .npz shards directly under {url}")
    return names[:max_files] if max_files else names


def fetch_shards(
    url: str, max_files: Optional[int], cache_root: Optional[str] = None, field: str = "data.path"
) -> Path:
    """Download the shards not yet cached (size and CRC32C must match the bucket's); return the folder."""
    from trainer.storage import crc32c_of_file, open_storage

    storage = open_storage(url)
    names = list_remote_shards(url, max_files, field)
    dest = cache_dir_for(url, cache_root)
    dest.mkdir(parents=True, exist_ok=True)
    fetched = 0
    for i, name in enumerate(names):
        report(f"fetching data shards into {dest}: {i} of {len(names)} done")
        info = storage.stat(name)
        local = dest / name
        if (
            info is not None
            and local.exists()
            and local.stat().st_size == info.size
            and crc32c_of_file(local) == info.crc32c
        ):
            continue
        tmp = dest / f".{name}.download"
        storage.download(name, tmp)  # the client verifies the CRC32C of what it received
        if info is not None and info.crc32c and crc32c_of_file(tmp) != info.crc32c:
            tmp.unlink(missing_ok=True)
            raise UserError(
                f"{field}: {storage.display(name)} changed while downloading (checksum mismatch); run again"
            )
        os.replace(tmp, local)
        fetched += 1
    log.info(
        "data: %d shard(s) from %s in %s (%d downloaded, %d cached)",
        len(names),
        url,
        dest,
        fetched,
        len(names) - fetched,
    )
    return dest
