"""The local checkpoint store: atomic commit, listing, retention and resume lookup.

Layout: `<run_dir>/<run_id>/checkpoints/step-00000100/` holds DeepSpeed's files, per-rank RNG
states, the resolved config and `metadata.json`. `metadata.json` is written last and atomically
(temp file, fsync, rename, fsync of the folder): a folder without it is partial, never listed or
resumed from, and removed at the next start.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from trainer.checkpoint.layout import METADATA, METADATA_FORMAT, TAG_PREFIX, CheckpointFacts
from trainer.config.load import architecture_difference
from trainer.errors import NothingToDo, UserError
from trainer.log import get_logger

log = get_logger("checkpoint")

T = TypeVar("T", bound=Any)  # a Checkpoint, or anything with .metadata, .loss and .step


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write `path` so that readers see the old file or the whole new one, never a torn one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def fsync_tree(folder: Path, files: bool = False) -> None:
    """fsync every folder from `folder` down (new entries durable), and with `files` every file too (for files
    written without their own fsync), before the tree is renamed into place or committed."""
    for d, _, names in os.walk(folder):
        if files:
            for name in names:
                fd = os.open(os.path.join(d, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(Path(d))


@dataclass(frozen=True)
class Checkpoint(CheckpointFacts):
    """A committed checkpoint folder and its metadata."""

    path: Path
    metadata: dict

    def matches(self, task: Optional[str], model: Optional[dict]) -> bool:
        """Was this checkpoint saved by the same task and model architecture (when it recorded them)?"""
        meta = self.metadata
        if task is not None and meta.get("task", task) != task:
            return False
        return model is None or meta.get("model") is None or not architecture_difference(meta["model"], model)

    def check_resumable(
        self,
        spec: str,
        world_size: int,
        task: str,
        max_steps: Optional[int],
        model: Optional[dict] = None,
        stage: Optional[int] = None,
    ) -> None:
        """`UserError` if this checkpoint cannot continue a job of that shape (`stage`: the job's ZeRO stage).

        Another world size is fine for ZeRO-1/2 on both sides (the checkpoint is converted to DeepSpeed's
        universal format); ZeRO-0 and ZeRO-3 checkpoints resume on the world size that saved them."""
        from trainer.checkpoint.universal import ELASTIC_STAGES, ds_version

        meta = self.metadata
        if (
            model is not None
            and meta.get("model") is not None
            and (diff := architecture_difference(meta["model"], model))
        ):
            raise UserError(f"--resume {spec}: {self.path} holds a different model than this config ({diff})")
        saved_world = int(meta.get("world_size", world_size))
        saved_stage = meta.get("zero_stage")
        if saved_world != world_size and not (saved_stage in ELASTIC_STAGES and stage in (None, *ELASTIC_STAGES)):
            now = f" with ZeRO stage {stage}" if stage is not None and stage != saved_stage else ""
            why = (
                f"DeepSpeed {ds_version()}'s universal load of ZeRO-3 states does not continue the run (its losses "
                "drift"
                " from the uninterrupted run's)"
                if 3 in (saved_stage, stage)
                else "they are converted to DeepSpeed's universal format"
            )
            raise UserError(
                f"--resume {spec}: {self.path} was saved by {saved_world} ranks with ZeRO stage {saved_stage}, this "
                "job has"
                f" {world_size}{now}; only ZeRO-1/2 checkpoints resume on another world size ({why}): run on"
                f" {saved_world} rank(s), or train with deepspeed.template zero1 or zero2 to resume on any world size"
            )
        if meta.get("task", task) != task:
            raise UserError(f"--resume {spec}: {self.path} is a {meta.get('task')!r} checkpoint, this run is {task!r}")
        if max_steps is not None and self.step >= max_steps:
            if spec == "auto":
                raise NothingToDo(
                    f"run {self.run_id} is complete ({self.tag}, train.max_steps {max_steps}); raise"
                    " --max-steps to train further, or pass --resume none for a new run"
                )
            raise UserError(
                f"--resume {spec}: {self.tag} is already at step {self.step} >= train.max_steps {max_steps};"
                " raise --max-steps to train further"
            )


def read_metadata(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / METADATA
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{ckpt_dir}: not a committed checkpoint (no {METADATA})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: corrupt checkpoint metadata ({exc.msg})") from None
    if not isinstance(data, dict) or "step" not in data or "run_id" not in data:
        raise UserError(f"{path}: checkpoint metadata lacks step/run_id")
    return data


def is_committed(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / METADATA).is_file()


class CheckpointStore:
    """The checkpoints of one run: `<run_root>/checkpoints/`."""

    def __init__(self, run_root: Path):
        self.run_root = Path(run_root)
        self.root = self.run_root / "checkpoints"

    def path(self, tag: str) -> Path:
        return self.root / tag

    def committed(self, problems: Optional[list[str]] = None) -> list[Checkpoint]:
        """Committed checkpoints, oldest step first. One with unreadable metadata is skipped with a
        warning, or its line appended to `problems` when a list is given."""
        out = []
        if self.root.is_dir():
            for d in self.root.iterdir():
                if d.is_dir() and d.name.startswith(TAG_PREFIX) and is_committed(d):
                    try:
                        out.append(Checkpoint(d, read_metadata(d)))
                    except UserError as exc:
                        if problems is None:
                            log.warning("skipping checkpoint with unreadable metadata: %s", exc)
                        else:
                            problems.append(str(exc))
        return sorted(out, key=lambda c: c.step)

    def remove_partials(self) -> list[Path]:
        """Delete checkpoint folders that were never committed (a crash or kill mid-save)."""
        removed = []
        if self.root.is_dir():
            for d in sorted(self.root.iterdir()):
                if d.is_dir() and not is_committed(d):
                    shutil.rmtree(d, ignore_errors=True)
                    removed.append(d)
                    log.warning("removed partial checkpoint %s (no %s: the save never completed)", d, METADATA)
        return removed

    def commit(
        self, tag: str, metadata: dict, side_files: dict[str, str], files: Optional[dict[str, dict]] = None
    ) -> Path:
        """Write the side files, then `metadata.json` last and atomically: the checkpoint exists.

        `files`: the size and CRC32C of files the ranks wrote (`integrity.file_record`); every other file in the
        folder is checksummed here, and all of them are recorded in the metadata."""
        from trainer.checkpoint.integrity import FILES, complete_records

        d = self.path(tag)
        d.mkdir(parents=True, exist_ok=True)
        for name, text in side_files.items():
            atomic_write(d / name, text)
        records = complete_records(d, files or {})
        atomic_write(
            d / METADATA,
            json.dumps({"format": METADATA_FORMAT, **metadata, FILES: records}, indent=2, default=str) + "\n",
        )
        return d

    def retention(
        self,
        keep_last: int,
        keep_best: bool,
        deletable: Optional[Callable[[Path], bool]] = None,
        metric: Optional[str] = None,
    ) -> list[Path]:
        """Delete committed checkpoints beyond the newest `keep_last` and the best by `metric` (see `best_checkpoint`).

        `deletable` vetoes deletions (with uploads on: only checkpoints verified in the bucket go).
        """
        ckpts = self.committed()
        keep = {c.path for c in ckpts[-keep_last:]}
        best = best_checkpoint(ckpts, metric) if keep_best else None
        if best is not None:
            keep.add(best.path)
        deleted = []
        for c in ckpts:
            if c.path not in keep and (deletable is None or deletable(c.path)):
                delete_checkpoint(c.path)
                deleted.append(c.path)
                log.info(
                    "cleaned up %s (keeping the newest %d and the best by %s%s)",
                    c.tag,
                    keep_last,
                    best_metric_of(ckpts, metric),
                    "; it is uploaded and verified" if deletable is not None else "",
                )
        return deleted


def checkpoint_bytes(ckpt_dir: Path) -> int:
    """What a checkpoint folder takes on disk, without its derived universal conversion."""
    from trainer.checkpoint.universal import is_derived

    d = Path(ckpt_dir)
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file() and not is_derived(str(p.relative_to(d))))


def delete_checkpoint(ckpt_dir: Path) -> None:
    """Un-commit first (remove metadata.json), then delete: a crash in between leaves a partial."""
    (Path(ckpt_dir) / METADATA).unlink(missing_ok=True)
    shutil.rmtree(ckpt_dir, ignore_errors=True)


def all_committed(run_dir: Path) -> list[Checkpoint]:
    """Committed checkpoints of every run under `run_dir`."""
    run_dir = Path(run_dir)
    out: list[Checkpoint] = []
    if run_dir.is_dir():
        for run_root in sorted(run_dir.iterdir()):
            if (run_root / "checkpoints").is_dir():
                out += CheckpointStore(run_root).committed()
    return out


def recency(meta: dict) -> tuple[str, int]:
    """Sort key of checkpoint metadata: commit time, then step (a branched run's steps restart)."""
    return str(meta.get("committed_at", "")), int(meta["step"])


def newest(ckpts: list[T]) -> T:
    """The most recently committed of `ckpts` (anything with `.metadata`)."""
    return max(ckpts, key=lambda c: recency(c.metadata))


METRICS = ("val_loss", "train_loss")


def metric_value(meta: dict, metric: str) -> Optional[float]:
    """A checkpoint's value of `metric`: `val_loss` as measured at its own step, `train_loss` its logged loss
    (None when it has none, or a non-finite one)."""
    v = meta.get("val_loss") if metric == "val_loss" else meta.get("loss")
    try:
        v = float(v) if v is not None else None
    except (TypeError, ValueError):
        return None
    return v if v is not None and math.isfinite(v) else None


def best_metric_of(ckpts: list[T], metric: Optional[str] = None) -> str:
    """`metric`, or the one the newest checkpoint was saved with (`best_metric` in its metadata; train_loss before)."""
    if metric:
        return metric
    recorded = newest(ckpts).metadata.get("best_metric") if ckpts else None
    return recorded if recorded in METRICS else "train_loss"


def best_checkpoint(ckpts: list[T], metric: Optional[str] = None) -> Optional[T]:
    """The checkpoint with the lowest finite `metric` (the newest step of equals), as retention keeps it and the
    `best` reference names it; None if none has a value."""
    name = best_metric_of(ckpts, metric)
    scored = [(v, c) for c in ckpts if (v := metric_value(c.metadata, name)) is not None]
    return min(scored, key=lambda t: (t[0], -t[1].step))[1] if scored else None


def run_roots(path: Path) -> list[Path]:
    """`path` itself if it is a run folder (or that folder's checkpoints/), else the run folders directly under it."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        return [path]
    if path.name == "checkpoints" and path.is_dir():
        return [path.parent]
    return sorted(p for p in path.iterdir() if (p / "checkpoints").is_dir()) if path.is_dir() else []


def resolve_resume(
    run_dir: Path,
    spec: Optional[str],
    task: Optional[str] = None,
    model: Optional[dict] = None,
    verify: str = "none",
    repair: Optional[Callable[[Checkpoint, list[str]], bool]] = None,
) -> Optional[Checkpoint]:
    """The checkpoint `--resume SPEC` names, None for a fresh start, `UserError` if missing (or damaged).

    SPEC: `auto` (newest committed checkpoint under run_dir of the same task and model, else a
    fresh start), `latest` (the same, but it is an error if there is none), a tag `step-00000100` (newest run
    holding it), `RUN_ID/step-00000100`, or the path of a checkpoint folder.

    `verify`: "full" compares every recorded file's size and CRC32C with its metadata (`integrity.damage`), "sizes"
    only sizes, "none" nothing. A damaged checkpoint is first given to `repair` (with the damaged files' relative
    paths; True when it replaced them, from the bucket, say), then checked again. `auto`/`latest` step back past one
    that stays damaged, with a warning naming the file; one named exactly is a `UserError`.
    """
    if spec is None or spec in ("", "none", "no"):
        return None
    run_dir = Path(run_dir)
    if spec in ("auto", "latest"):
        ckpts = [c for c in all_committed(run_dir) if c.matches(task, model)]  # never another job's checkpoint
        for c in sorted(ckpts, key=lambda c: recency(c.metadata), reverse=True):
            problem = _damage(c, verify, repair)
            if problem is None:
                return c
            log.warning("not resuming %s: %s; trying the checkpoint before it", c.path, problem)
        if spec == "auto":
            return None
        what = "no intact" if ckpts else "no"
        raise UserError(f"--resume latest: {what} committed checkpoint under {run_dir}/")
    ckpt = _named_checkpoint(run_dir, spec)
    if (problem := _damage(ckpt, verify, repair)) is not None:
        raise UserError(
            f"--resume {spec}: the checkpoint is damaged ({problem}); --resume auto steps back to the newest intact one"
        )
    return ckpt


def _damage(
    ckpt: Checkpoint, verify: str, repair: Optional[Callable[[Checkpoint, list[str]], bool]] = None
) -> Optional[str]:
    """What is wrong with `ckpt`'s files after any repair (None: intact)."""
    from trainer.checkpoint.integrity import damaged_files, describe_damage

    if verify == "none" or not (bad := damaged_files(ckpt.path, ckpt.metadata, deep=verify == "full")):
        return None
    if repair is not None:
        log.warning(
            "checkpoint %s is damaged (%s): replacing the damaged files from the bucket",
            ckpt.path,
            describe_damage(bad),
        )
    if repair is not None and repair(ckpt, [rel for rel, _ in bad]):
        if not (still := damaged_files(ckpt.path, ckpt.metadata, deep=verify == "full")):
            log.warning("repaired %s: %s replaced by verified copies", ckpt.path, ", ".join(rel for rel, _ in bad))
            return None
        bad = still
    return describe_damage(bad)


def _named_checkpoint(run_dir: Path, spec: str) -> Checkpoint:
    path = Path(spec)
    if path.is_dir():
        if not is_committed(path):
            raise UserError(
                f"--resume {spec}: {path} is not a committed checkpoint (no {METADATA}: partial or not a checkpoint)"
            )
        return Checkpoint(path, read_metadata(path))
    candidates: list[Checkpoint]
    if "/" in spec and not path.is_absolute():
        run_id, _, tag = spec.partition("/")
        candidates = [c for c in CheckpointStore(run_dir / run_id).committed() if c.tag == tag]
    else:
        candidates = [c for c in all_committed(run_dir) if c.tag == spec]
    if candidates:
        return newest(candidates)
    available = sorted({c.tag for c in all_committed(run_dir)})
    hint = f" (available: {', '.join(available[-5:])})" if available else " (there are none)"
    raise UserError(f"--resume {spec}: no committed checkpoint with that tag or path under {run_dir}/{hint}")
