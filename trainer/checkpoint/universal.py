"""Elastic resume: a checkpoint converted once to DeepSpeed's universal format, for another world size.

DeepSpeed ZeRO-1/2 checkpoints hold each rank's slice of the flat fp32 weights and Adam moments; they
load only on the world size that saved them. DeepSpeed's own converter (`ds_to_universal`) writes one
file per parameter and state (`zero/<name>/fp32.pt`, `exp_avg.pt`, `exp_avg_sq.pt`, `step.pt`),
which an engine with `checkpoint.load_universal` slices for any world size.

The conversion lives inside the checkpoint it came from, `step-NNNNNNNN/universal/`, so retention
removes it with its source and nothing lists it as a checkpoint. It is built in a hidden staging
folder beside the checkpoint (`.universal-<tag>-<id>/`, from links to DeepSpeed's files only) and
renamed into place when whole, fsynced, with `conversion.json` written last: a crash leaves only a
staging folder, which the next start removes like any partial, and a finished conversion is reused
by every later resume. Nodes without a shared filesystem each convert their own copy; where two
nodes share one, the first rename wins and the other's copy is dropped.

The converter runs in a child process (`python -m trainer.checkpoint.universal`): it forks worker
processes, which a rank holding threads and a process group must not do, and its memory is
returned to the system when it ends.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from trainer.checkpoint.store import atomic_write, fsync_dir
from trainer.errors import UserError
from trainer.log import get_logger
from trainer.progress import gb

log = get_logger("checkpoint")

UNIVERSAL_DIR = "universal"  # inside the source checkpoint
STAGING_PREFIX = ".universal-"  # hidden staging folders beside the source checkpoint (partials: removed at start)
RECORD = "conversion.json"  # written last inside the conversion: it is whole
ELASTIC_STAGES = (1, 2)  # ZeRO stages whose checkpoints resume on another world size here


@dataclass(frozen=True)
class Conversion:
    path: Path  # the universal folder (`<checkpoint>/universal`)
    seconds: Optional[float]  # None: an earlier conversion was reused
    bytes: int


def universal_dir(ckpt_dir: Path) -> Path:
    return Path(ckpt_dir) / UNIVERSAL_DIR


def is_derived(rel: str) -> bool:
    """True for a path (relative to a checkpoint folder) that is not part of the checkpoint as saved but
    derived from it (its universal conversion). Uploads, sizes and listings leave it out."""
    return rel.replace("\\", "/").split("/", 1)[0] == UNIVERSAL_DIR


def existing(ckpt_dir: Path) -> Optional[Path]:
    """The finished conversion of `ckpt_dir`, if there is one."""
    u = universal_dir(ckpt_dir)
    return u if (u / RECORD).is_file() else None


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def ensure_universal(ckpt_dir: Path, workers: Optional[int] = None) -> Conversion:
    """The universal conversion of the committed checkpoint `ckpt_dir`, converting it if not done yet."""
    ckpt_dir = Path(ckpt_dir)
    done = existing(ckpt_dir)
    if done is not None:
        return Conversion(done, None, int(json.loads((done / RECORD).read_text()).get("bytes") or _size(done)))
    sources = sorted(p for p in ckpt_dir.iterdir() if p.is_file() and p.name.endswith(("_model_states.pt", "_optim_states.pt")))
    if not any(p.name.endswith("_optim_states.pt") for p in sources):
        raise UserError(f"{ckpt_dir}: no ZeRO optimizer states (*_optim_states.pt) to convert for another world size")
    # The converter walks its input folder recursively: it reads a folder of links to DeepSpeed's files
    # only, never a conversion (or another node's staging folder) inside the checkpoint.
    staging = ckpt_dir.parent / f"{STAGING_PREFIX}{ckpt_dir.name}-{uuid.uuid4().hex[:8]}"
    inputs, out = staging / "in", staging / "out"
    inputs.mkdir(parents=True)
    for p in sources:
        (inputs / p.name).symlink_to(p.resolve())
    started = time.monotonic()
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    cmd = [sys.executable, "-m", "trainer.checkpoint.universal", str(inputs), str(out), "--workers", str(workers)]
    log.info("converting %s to DeepSpeed's universal format (%s of ZeRO states)", ckpt_dir.name,
             gb(sum(p.stat().st_size for p in sources)))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise RuntimeError(f"converting {ckpt_dir} to universal failed (exit {proc.returncode}):\n{tail}")
        seconds = time.monotonic() - started
        size = _size(out)
        _sync_tree(out)
        atomic_write(out / RECORD, json.dumps({
            "source": ckpt_dir.name, "seconds": round(seconds, 3), "bytes": size, "deepspeed": ds_version(),
        }, indent=2) + "\n")
        try:
            os.rename(out, universal_dir(ckpt_dir))
        except OSError:  # another node sharing this filesystem finished first: keep its copy
            if existing(ckpt_dir) is None:
                raise
            return Conversion(universal_dir(ckpt_dir), None, size)
        fsync_dir(ckpt_dir)
        return Conversion(universal_dir(ckpt_dir), seconds, size)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _sync_tree(folder: Path) -> None:
    """fsync every file and folder of a finished conversion before it is renamed into place."""
    for d, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(d, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(d))


def ds_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deepspeed")
    except PackageNotFoundError:  # pragma: no cover - deepspeed is a dependency
        return "(not installed)"


def _convert(src: Path, out: Path, workers: int) -> None:
    """DeepSpeed's converter, as its command line would run it (universal info injected: a plain
    data-parallel model has none, and needs none)."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(src), output_folder=str(out), num_extract_workers=workers,
                              num_merge_workers=max(1, workers // 2), keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    ds_to_universal.main(args)  # (it also points a `latest_universal` file in the staging folder at it)


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m trainer.checkpoint.universal",
                                description="Convert a DeepSpeed ZeRO-1/2 checkpoint folder to the universal format.")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    _convert(Path(a.src), Path(a.out), a.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
