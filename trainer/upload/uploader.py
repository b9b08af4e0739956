"""Uploading committed checkpoints: parts first, verified, then the manifest last.

Remote layout under the upload URL:

    <run_id>/<tag>/part-000.tar[.zst|.gz] ...   tar parts (node 0; other nodes: node01-part-000.tar ...)
    <run_id>/<tag>/node01.json ...              what nodes > 0 uploaded (multi-node runs only)
    <run_id>/<tag>/manifest.json                LAST: every file with size and CRC32C, every part

A checkpoint without `manifest.json` is incomplete and invisible to readers. The upload state of
each checkpoint lives in `upload_state.json` inside the local checkpoint folder, so other processes
(`trainer upload status`, retention) can read it. Training queues its checkpoints here through
upload/background.py; `trainer upload-all` calls `CheckpointUploader` directly.
"""

from __future__ import annotations

import json
import random
import re
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from trainer.checkpoint.layout import (
    MANIFEST,
    MANIFEST_FORMAT,
    MB,
    UPLOAD_STATE_FILE,
    UploadState,
    step_of,
    remote_prefix,
    utc_now,
    write_upload_state,
)
from trainer.checkpoint.remote import verify_remote
from trainer.checkpoint.store import Checkpoint, best_checkpoint, read_metadata
from trainer.checkpoint.universal import is_derived
from trainer.log import get_logger
from trainer.upload.archive import SUFFIX, Compression, PartResult, TarStream, compress_into, plan_parts
from trainer.storage import Storage, describe_error, is_permanent

if TYPE_CHECKING:  # pragma: no cover
    from trainer.config.schema import UploadConfig

log = get_logger("upload")

_RANKED_FILE = re.compile(r"(?:zero_pp_rank_|rng_state_rank)(\d+)")


@dataclass(frozen=True)
class NodeInfo:
    """Which node this process uploads for, and how ranks map to nodes (homogeneous nodes)."""

    node_rank: int = 0
    num_nodes: int = 1
    ranks_per_node: int = 1

    def owns(self, rel: str) -> bool:
        """Files written by this node's ranks; rank-less files (metadata, configs) belong to node 0."""
        if self.num_nodes == 1:
            return True
        m = _RANKED_FILE.search(Path(rel).name)
        if m is None:
            return self.node_rank == 0
        return int(m.group(1)) // self.ranks_per_node == self.node_rank

    @property
    def part_prefix(self) -> str:
        return "part" if self.node_rank == 0 else f"node{self.node_rank:02d}-part"


def local_files(ckpt_dir: Path, node: NodeInfo) -> list[tuple[str, int]]:
    """(relative path, size) of the checkpoint's files this node uploads."""
    out = []
    for p in sorted(Path(ckpt_dir).rglob("*")):
        rel = str(p.relative_to(ckpt_dir))
        if (
            p.is_file()
            and p.name != UPLOAD_STATE_FILE
            and not p.name.startswith(".")
            and not is_derived(rel)
            and node.owns(rel)
        ):
            out.append((rel, p.stat().st_size))
    return out


class UploadFailed(Exception):
    pass


def _check_against_metadata(meta: dict, results: list[PartResult]) -> None:
    """Every file sent has the size and CRC32C its checkpoint recorded when it was saved (`integrity.FILES`): a file
    damaged on this disk since then is never published as a verified checkpoint (its parts stay invisible)."""
    from trainer.checkpoint.integrity import FILES

    recorded = meta.get(FILES) or {}
    for part in results:
        for f in part.files:
            rec = recorded.get(f.path)
            if rec and (rec.get("size") != f.size or (rec.get("crc32c") and rec["crc32c"] != f.crc32c)):
                raise UploadFailed(
                    f"{f.path} no longer matches the size and CRC32C metadata.json recorded at the save"
                    f" ({f.size} bytes, CRC32C {f.crc32c}; recorded {rec.get('size')}, {rec.get('crc32c')}):"
                    " damaged on this disk since; not uploaded"
                )


class CheckpointUploader:
    """Uploads one checkpoint folder at a time; used by the background thread and the CLI."""

    def __init__(
        self,
        storage: Storage,
        compression: Compression = "none",
        workers: int = 4,
        retries: int = 5,
        node: NodeInfo = NodeInfo(),
        node_wait_s: float = 600.0,
        backoff_s: float = 1.0,
        keep_remote: Optional[int] = None,
    ):
        self.storage = storage
        self.compression = compression
        self.workers = workers
        self.retries = retries
        self.node = node
        self.node_wait_s = node_wait_s
        self.backoff_s = backoff_s
        self.keep_remote = keep_remote

    def upload(self, ckpt_dir: Path, progress: Optional[Callable[[int], None]] = None) -> dict:
        """Upload `ckpt_dir` unless it is already verified remotely; return the final state."""
        ckpt_dir = Path(ckpt_dir)
        meta = read_metadata(ckpt_dir)
        prefix = remote_prefix(meta)
        tag = ckpt_dir.name
        try:
            ok, _, manifest = verify_remote(self.storage, prefix)
        except Exception as exc:
            reason = describe_error(exc)[:500]
            write_upload_state(
                ckpt_dir, UploadState.FAILED, url=self.storage.display(prefix), error=reason, failed_at=utc_now()
            )
            raise UploadFailed(f"{tag}: {reason}") from exc
        if ok and manifest is not None:
            log.info("%s is already uploaded and verified at %s", tag, self.storage.display(prefix))
            return write_upload_state(
                ckpt_dir,
                UploadState.UPLOADED,
                url=self.storage.display(prefix),
                bytes=manifest.get("bytes"),
                manifest_crc32c=manifest.get("manifest_crc32c"),
                skipped=True,
            )
        files = local_files(ckpt_dir, self.node)
        if self.node.num_nodes == 1:
            missing = [
                r
                for r in range(int(meta.get("world_size", 1)))
                if not (ckpt_dir / f"rng_state_rank{r:05d}.pt").exists()
            ]
            if missing:
                reason = (
                    f"this folder lacks the files of rank(s) {missing[:8]} (a multi-node run without a shared"
                    " filesystem): each node uploads its own part during training"
                )
                write_upload_state(ckpt_dir, UploadState.FAILED, error=reason, failed_at=utc_now())
                raise UploadFailed(f"{tag}: {reason}")
        total = sum(size for _, size in files)
        groups = plan_parts(files, self.workers)
        started = time.monotonic()
        write_upload_state(
            ckpt_dir, UploadState.UPLOADING, url=self.storage.display(prefix), bytes=total, started_at=utc_now()
        )
        log.info(
            "archiving %s: %d files, %.1f MB into %d part(s) (%s)",
            tag,
            len(files),
            total / MB,
            len(groups),
            self.compression,
        )
        log.info("uploading %s to %s", tag, self.storage.display(prefix))
        try:
            self._remove_stale_parts(prefix)
            names = [f"{self.node.part_prefix}-{i:03d}{SUFFIX[self.compression]}" for i in range(len(groups))]
            pool = ThreadPoolExecutor(
                max_workers=max(1, min(self.workers, len(groups))), thread_name_prefix="upload-part"
            )
            try:  # the largest parts first; the first failure cancels the parts not yet started
                futures = [
                    pool.submit(self._upload_part, ckpt_dir, prefix, n, g, progress) for n, g in zip(names, groups)
                ]
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                for f in done:
                    if f.exception() is not None:
                        raise f.exception()  # type: ignore[misc]
                results = [f.result() for f in futures]
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
            _check_against_metadata(meta, results)
            manifest = self._publish(prefix, meta, results)
        except Exception as exc:
            reason = describe_error(exc)[:500]
            if is_permanent(
                exc
            ):  # e.g. a full disk: free what the parts that did finish took (unreachable: the next try sweeps)
                try:
                    self._remove_stale_parts(prefix)
                except Exception as cleanup_exc:
                    log.warning("could not remove the parts of the failed upload: %s", describe_error(cleanup_exc))
            write_upload_state(
                ckpt_dir,
                UploadState.FAILED,
                url=self.storage.display(prefix),
                bytes=total,
                error=reason,
                failed_at=utc_now(),
            )
            raise UploadFailed(f"{tag}: {reason}") from exc
        seconds = time.monotonic() - started
        rate = total / MB / seconds if seconds > 0 else 0.0
        log.info("uploaded %s: %.1f MB in %.1f s = %.1f MB/s (verified)", tag, total / MB, seconds, rate)
        if self.keep_remote and self.node.node_rank == 0:
            try:
                self.prune_remote(meta["run_id"], self.keep_remote)
            except Exception as exc:  # the upload itself is complete; pruning is retried after the next one
                log.warning("remote retention failed: %s", str(exc)[:300])
        return write_upload_state(
            ckpt_dir,
            UploadState.UPLOADED,
            url=self.storage.display(prefix),
            bytes=total,
            seconds=round(seconds, 3),
            rate_mb_s=round(rate, 2),
            parts=len(results),
            manifest_crc32c=manifest.get("manifest_crc32c"),
        )

    def prune_remote(self, run_id: str, keep: int) -> list[str]:
        """Remote retention: keep the run's newest `keep` complete checkpoints and the best by its best metric."""
        complete = []
        for name in self.storage.list(f"{run_id}/"):
            if name.endswith("/" + MANIFEST):
                raw = self.storage.get_bytes(name)
                if raw:
                    m = json.loads(raw)
                    complete.append(
                        Checkpoint(Path(name.rsplit("/", 1)[0]), {"step": int(m["step"]), **m.get("checkpoint", {})})
                    )
        complete.sort(key=lambda c: c.step)
        keepers = {str(c.path) for c in complete[-keep:]}
        best = best_checkpoint(complete)
        if best is not None:
            keepers.add(str(best.path))
        deleted = []
        for prefix in (str(c.path) for c in complete):
            if prefix not in keepers:
                self.storage.delete(f"{prefix}/{MANIFEST}")  # invisible first, then the parts
                for name in self.storage.list(prefix + "/"):
                    self.storage.delete(name)
                deleted.append(prefix)
                log.info("remote retention: deleted %s", self.storage.display(prefix))
        return deleted

    def sweep_incomplete(self, run_id: str, local_tags: set[str]) -> list[str]:
        """Delete what uploads of `run_id` left without a manifest for checkpoints not in `local_tags` (their local
        copy is gone: a VM replaced mid-upload), so nothing will ever complete them. Returns the prefixes.

        Only tags older than the newest local one: an upload still in flight elsewhere (another node's part of the
        newest checkpoint, which that node may already have deleted locally) is left alone."""
        newest = max((s for t in local_tags if (s := step_of(t)) is not None), default=-1)
        by_prefix: dict[str, list[str]] = {}
        for name in self.storage.list(f"{run_id}/"):
            prefix, _, base = name.rpartition("/")
            by_prefix.setdefault(prefix, []).append(base)
        swept = []
        for prefix, bases in sorted(by_prefix.items()):
            tag = prefix.rsplit("/", 1)[-1]
            step = step_of(tag)
            if MANIFEST in bases or tag in local_tags or step is None or step >= newest:
                continue
            for base in bases:
                self.storage.delete(f"{prefix}/{base}")
            swept.append(prefix)
            log.info(
                "removed %s: an upload that never completed, of a checkpoint no longer on this machine",
                self.storage.display(prefix),
            )
        return swept

    def _remove_stale_parts(self, prefix: str) -> None:
        """Parts left by an earlier failed attempt: no manifest refers to them, so they are ours to replace."""
        for name in self.storage.list(prefix + "/"):
            base = name.rsplit("/", 1)[-1]
            if base.startswith(self.node.part_prefix + "-") or base == f"node{self.node.node_rank:02d}.json":
                self.storage.delete(name)

    def _upload_part(
        self,
        ckpt_dir: Path,
        prefix: str,
        name: str,
        files: list[tuple[str, int]],
        progress: Optional[Callable[[int], None]],
    ) -> PartResult:
        key = f"{prefix}/{name}"
        last_exc: Optional[BaseException] = None
        for attempt in range(self.retries + 1):
            if attempt:
                delay = min(60.0, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                log.warning(
                    "retrying %s in %.1f s (attempt %d of %d): %s",
                    self.storage.display(key),
                    delay,
                    attempt + 1,
                    self.retries + 1,
                    str(last_exc)[:200],
                )
                time.sleep(delay)
                self.storage.delete(key)
            try:
                with TarStream(ckpt_dir, files, name) as tar:
                    if self.compression == "none":  # the backend checks what it stored against what it read
                        info = self.storage.put_stream(key, tar, tar.size)  # type: ignore[arg-type]
                        sent = (tar.size, info.crc32c)
                    else:
                        with self.storage.writer(key) as sink:
                            sent = compress_into(tar, sink, self.compression)
                        info = self.storage.stat(key)
                    if info is None or info.size != sent[0] or (info.crc32c and info.crc32c != sent[1]):
                        raise UploadFailed(
                            f"{self.storage.display(key)} does not match what was sent"
                            f" (sent {sent[0]} bytes crc32c {sent[1]}, stored {info})"
                        )
                    result = PartResult(name, info.size, info.crc32c or str(sent[1]), tar.entries())
                if progress is not None:
                    progress(sum(size for _, size in files))
                return result
            except Exception as exc:  # network errors, server restarts, checksum mismatches: re-upload the part
                last_exc = exc
                if is_permanent(exc):
                    break
        assert last_exc is not None
        raise last_exc

    def _publish(self, prefix: str, meta: dict, results: list[PartResult]) -> dict:
        """Nodes > 0 record their parts; node 0 waits for them, then writes the manifest last."""
        mine = {"node": self.node.node_rank, "parts": [self._part_json(r) for r in results]}
        if self.node.node_rank > 0:
            self.storage.put_bytes(f"{prefix}/node{self.node.node_rank:02d}.json", json.dumps(mine).encode())
            return {}
        parts = list(mine["parts"])
        deadline = time.monotonic() + self.node_wait_s
        for other in range(1, self.node.num_nodes):
            while (raw := self.storage.get_bytes(f"{prefix}/node{other:02d}.json")) is None:
                if time.monotonic() > deadline:
                    raise UploadFailed(f"node {other} did not report its parts within {self.node_wait_s:.0f} s")
                time.sleep(1.0)
            parts += json.loads(raw)["parts"]
        files = [f for p in parts for f in p.pop("files")]
        manifest = {
            "format": MANIFEST_FORMAT,
            "run_id": meta["run_id"],
            "tag": meta.get("tag"),
            "step": meta["step"],
            "world_size": meta.get("world_size"),
            "zero_stage": meta.get("zero_stage"),
            "config_hash": meta.get("config_hash"),
            "compression": self.compression,
            "created_at": utc_now(),
            "bytes": sum(f["size"] for f in files),
            "files": sorted(files, key=lambda f: f["path"]),
            "parts": parts,
            "checkpoint": meta,
        }
        self.storage.put_bytes(f"{prefix}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
        info = self.storage.stat(f"{prefix}/{MANIFEST}")
        manifest["manifest_crc32c"] = info.crc32c if info else None
        return manifest

    @staticmethod
    def _part_json(r: PartResult) -> dict:
        return {"name": r.name, "size": r.size, "crc32c": r.crc32c, "files": [asdict(f) for f in r.files]}


def checkpoint_uploader(u: "UploadConfig", node: NodeInfo = NodeInfo()) -> CheckpointUploader:
    """The uploader for an `upload` config section (training and the CLI build it the same way)."""
    from trainer.storage import open_storage

    assert u.url, "upload.url is required"
    return CheckpointUploader(open_storage(u.url), u.compression, u.workers, u.retries, node, keep_remote=u.keep_remote)
