"""Checkpoints as people look at them: local run folders and bucket prefixes read the same way.

A source is a checkpoint folder, a run folder (`<run_dir>/<run_id>`), a folder of runs
(`<run_dir>`), or an upload URL (`gs://BUCKET/PREFIX`, `file:///PATH`, down to one run or one
checkpoint). Locally a checkpoint is a folder with `metadata.json`; remotely it is a prefix with
`manifest.json` (the metadata travels inside it). Nothing here writes anything.

References (`resolve`): a path or URL; `RUN/TAG` (a run-id prefix); a tag (`step-00000100`, a
step number, `latest`, `best`); or a run id (prefix), meaning that run's newest checkpoint.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from trainer.checkpoint.layout import (
    MANIFEST,
    CheckpointFacts,
    METADATA,
    TAG_PREFIX,
    UploadState,
    read_upload_state,
    remote_prefix,
    tag_for,
)
from trainer.checkpoint.remote import read_manifests, verify_remote
from trainer.checkpoint.store import CheckpointStore, best_checkpoint, newest, read_metadata, recency, run_roots
from trainer.checkpoint.universal import is_derived
from trainer.errors import UserError


@dataclass
class Entry(CheckpointFacts):
    """One committed checkpoint, local or remote."""

    metadata: dict
    where: str  # the local folder, or the URL of the remote prefix
    files: list[tuple[str, int]]
    upload: dict  # {"state": local|pending|uploading|uploaded|failed|verified|unverified, "detail": ...}
    config: Optional[dict] = None
    local: Optional[Path] = None
    remote_prefix: Optional[str] = None  # remote entries: the prefix under `storage`
    storage: Any = None

    @property
    def size(self) -> int:
        return sum(s for _, s in self.files)

    @property
    def label(self) -> str:
        return f"{self.run_id[:8]}/{self.tag}"

    def run_root(self) -> Optional[Path]:
        return self.local.parent.parent if self.local is not None else None


@dataclass
class Catalog:
    source: str
    entries: list[Entry] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # unreadable metadata or manifests, one line each

    def runs(self) -> list[tuple[str, list[Entry]]]:
        """(run id, its checkpoints by step), the run with the newest checkpoint first."""
        by_run: dict[str, list[Entry]] = {}
        for e in self.entries:
            by_run.setdefault(e.run_id, []).append(e)
        groups = [(rid, sorted(es, key=lambda e: e.step)) for rid, es in by_run.items()]
        return sorted(groups, key=lambda g: recency(newest(g[1]).metadata), reverse=True)

    def find(self, ref: str) -> Entry:
        """The checkpoint a non-path reference names in this catalog; `UserError` otherwise."""
        run_part, _, tag_part = ref.rpartition("/")
        runs = self.runs()
        if run_part:
            chosen = self._run(run_part, runs)
            hit = self._tag(tag_part, chosen[1])
            if hit is None:
                raise UserError(
                    f"{ref}: run {chosen[0]} has no checkpoint {tag_part!r} (it has {_few(e.tag for e in chosen[1])})"
                )
            return hit
        hits = [(rid, h) for rid, es in runs if (h := self._tag(ref, es)) is not None]
        if len(hits) == 1:
            return hits[0][1]
        if len(hits) > 1:
            raise UserError(
                f"{ref}: in {len(hits)} runs under {self.source} ({_few(rid[:12] for rid, _ in hits)});"
                f" name one as RUN/{ref}"
            )
        matching = [g for g in runs if g[0].startswith(ref)]
        if len(matching) == 1:
            return newest(matching[0][1])
        if len(matching) > 1:
            raise UserError(
                f"{ref}: matches {len(matching)} runs ({_few(rid[:12] for rid, _ in matching)}); give more of the run "
                "id"
            )
        raise UserError(
            f"{ref}: no such checkpoint or run under {self.source} (tags: "
            f"{_few(sorted({e.tag for e in self.entries}))};"
            f" runs: {_few(rid[:12] for rid, _ in runs)})"
        )

    def _run(self, prefix: str, runs: list[tuple[str, list[Entry]]]) -> tuple[str, list[Entry]]:
        matching = [g for g in runs if g[0].startswith(prefix)]
        if not matching:
            raise UserError(
                f"{prefix}: no run with that id under {self.source} (runs: {_few(rid[:12] for rid, _ in runs)})"
            )
        if len(matching) > 1:
            raise UserError(
                f"{prefix}: matches {len(matching)} runs ({_few(rid[:12] for rid, _ in matching)}); give more of the "
                "run id"
            )
        return matching[0]

    def _tag(self, tag: str, entries: list[Entry]) -> Optional[Entry]:
        if not entries:
            return None
        if tag == "latest":
            return newest(entries)
        if tag == "best":
            return best_checkpoint(entries)
        if tag.isdigit():
            tag = tag_for(int(tag))
        same = [e for e in entries if e.tag == tag]
        return newest(same) if same else None


def _few(items: Any, n: int = 6) -> str:
    items = list(items)
    if not items:
        return "none"
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def is_url(source: str) -> bool:
    return "://" in str(source)


def scan(source: str | Path, timeout_s: float = 30.0) -> Catalog:
    """Every committed checkpoint under `source`. `UserError` if there is none or the source is unreachable."""
    cat = _scan_remote(str(source), timeout_s) if is_url(str(source)) else _scan_local(Path(source))
    if not cat.entries:
        if cat.problems:
            raise UserError("\n".join(cat.problems))
        raise UserError(
            f"{source}: no committed checkpoints there (expected a checkpoint, a run folder, a folder of"
            " runs, or an upload URL)"
        )
    return cat


def _scan_local(path: Path) -> Catalog:
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if not path.is_dir():
        raise UserError(f"{path}: not a folder (expected a checkpoint, a run folder or a folder of runs)")
    cat = Catalog(str(path))
    if (path / METADATA).is_file():
        ckpts = [(path, read_metadata(path))]
    elif path.name.startswith(TAG_PREFIX):
        raise UserError(f"{path}: not a committed checkpoint (no {METADATA}: a save that never completed)")
    else:
        ckpts = [(c.path, c.metadata) for r in run_roots(path) for c in CheckpointStore(r).committed(cat.problems)]
    for d, meta in ckpts:
        state = read_upload_state(d)
        detail = state.get("url", "") if state["state"] == UploadState.UPLOADED.value else state.get("error", "")
        files = sorted(
            (rel, p.stat().st_size)
            for p in d.rglob("*")
            if p.is_file() and not is_derived(rel := str(p.relative_to(d)))
        )
        cat.entries.append(
            Entry(
                meta, str(d), files, {"state": state["state"], "detail": detail or ""}, _local_config(d, meta), local=d
            )
        )
    return cat


def _local_config(ckpt: Path, meta: dict) -> Optional[dict]:
    import yaml

    if isinstance(meta.get("config"), dict):
        return meta["config"]
    try:
        data = yaml.safe_load((ckpt / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def open_reader(url: str, timeout_s: float) -> Any:
    """Storage at `url` for reading: `UserError` (one line) if it cannot be listed."""
    from trainer.storage import FileStorage, open_storage

    try:
        storage = open_storage(url, retry_deadline_s=timeout_s)
        if isinstance(storage, FileStorage):
            if not storage.root.is_dir():
                raise UserError(f"{url}: no such folder")
        else:
            storage.check(timeout_s)
    except UserError as exc:  # said of upload.url by the storage layer; here the URL is an argument
        raise UserError(str(exc).removeprefix("upload.url ")) from None
    return storage


def _scan_remote(url: str, timeout_s: float) -> Catalog:
    from trainer.storage import describe_error

    url = url.rstrip("/")
    storage = open_reader(url, timeout_s)
    only = None
    try:
        if storage.stat(MANIFEST) is not None and "/" in url.split("://", 1)[1]:  # the URL of one checkpoint
            url, only = url.rsplit("/", 1)
            storage = open_reader(url, timeout_s)
        found, problems = read_manifests(storage)
        if only is not None:
            found = [(prefix, m) for prefix, m in found if prefix == only]
    except UserError:
        raise
    except Exception as exc:  # unreachable after the client's retries
        raise UserError(f"{url}: {describe_error(exc)}") from None
    cat = Catalog(url, problems=problems)
    for prefix, m in found:
        meta = dict(m["checkpoint"])
        cat.entries.append(
            Entry(
                meta,
                storage.display(prefix),
                [(f["path"], int(f["size"])) for f in m.get("files", [])],
                {"state": "uploaded", "detail": f"manifest {m.get('created_at', '')}".strip()},
                meta.get("config") if isinstance(meta.get("config"), dict) else None,
                remote_prefix=prefix,
                storage=storage,
            )
        )
    return cat


def resolve(ref: str, default_source: str | Path, timeout_s: float = 30.0) -> Entry:
    """The checkpoint a reference names (see the module docstring)."""
    if is_url(ref) or Path(ref).exists():
        cat = scan(ref, timeout_s)
        runs = cat.runs()
        if len(runs) > 1:
            raise UserError(
                f"{ref}: holds {len(runs)} runs ({_few(rid[:12] for rid, _ in runs)}); name one run or checkpoint"
            )
        return newest(runs[0][1])
    return scan(default_source, timeout_s).find(ref)


def verify(cat: Catalog, url_override: Optional[str] = None, timeout_s: float = 30.0) -> None:
    """Check each checkpoint in its bucket (manifest there, every part with its size and CRC32C);
    sets upload state to `verified`, or `unverified` with the reason."""
    from trainer.storage import describe_error

    readers: dict[str, Any] = {}
    for e in cat.entries:
        try:
            if e.remote_prefix is not None:
                storage, prefix = e.storage, e.remote_prefix
            else:
                url = url_override or ((e.config or {}).get("upload") or {}).get("url")
                if not url:
                    e.upload = {"state": e.upload["state"], "detail": "no upload URL in its config (pass --url)"}
                    continue
                if url not in readers:
                    readers[url] = open_reader(url, timeout_s)
                storage, prefix = readers[url], remote_prefix(e.metadata)
            ok, why, _ = verify_remote(storage, prefix)
        except UserError as exc:
            ok, why = False, str(exc)
        except Exception as exc:
            ok, why = False, describe_error(exc)
        e.upload = {"state": "verified" if ok else "unverified", "detail": storage.display(prefix) if ok else why}


# ------------------------------------------------------------------------------------ metrics
def trend_of(values: list[float]) -> tuple[Optional[str], Optional[float]]:
    """(improving | flat | worsening, relative change) of the mean of the last few points against the few before."""
    if len(values) < 2:
        return None, None
    k = max(1, min(5, len(values) // 2))
    before, last = statistics.fmean(values[-2 * k : -k]), statistics.fmean(values[-k:])
    change = (last - before) / abs(before) if before else 0.0
    return ("improving" if change < -0.005 else "worsening" if change > 0.005 else "flat"), change


def loss_stats(meta: dict, which: str = "train") -> dict:
    """Current, best, mean, std and trend of the logged training loss (`which="train"`) or of the validation
    loss (`"val"`), from the history every checkpoint carries."""
    hist, best, best_step = (
        ("loss_history", "best_loss", "best_step")
        if which == "train"
        else ("val_history", "best_val_loss", "best_val_step")
    )
    points = [p for p in meta.get(hist) or [] if p[1] is not None and math.isfinite(float(p[1]))]
    values = [float(v) for _, v in points]
    current = meta.get("loss") if which == "train" else (values[-1] if values else None)
    out: dict[str, Any] = {
        "current": current,
        "best": meta.get(best),
        "best_step": meta.get(best_step),
        "points": len(values),
        "mean": None,
        "std": None,
    }
    if which == "val":
        out["current_step"] = int(points[-1][0]) if points else None
    if meta.get(best_step) is not None:
        out["steps_since_best"] = int(meta["step"]) - int(meta[best_step])
    if values:
        out["mean"] = statistics.fmean(values)
        out["std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
    out["trend"], out["trend_change"] = trend_of(values)
    return out


def current_lr(meta: dict) -> Optional[float]:
    hist = meta.get("lr_history") or []
    return float(hist[-1][1]) if hist else None


def config_differences(configs: list[Optional[dict]]) -> dict[str, list[Any]]:
    """Dotted config keys whose values differ between the configs (None: not recorded), in key order."""
    from trainer.config.load import flatten

    flat = [flatten(c) if c is not None else None for c in configs]
    keys = sorted({k for f in flat if f for k in f})
    missing = object()
    diffs = {}
    for k in keys:
        values = [f.get(k, missing) if f is not None else missing for f in flat]
        known = [v for v, f in zip(values, flat) if f is not None]
        if len({repr(v) for v in known}) > 1:
            diffs[k] = [None if v is missing else v for v in values]
    return diffs
