#!/usr/bin/env python
"""What converting a checkpoint for another world size costs, against the disk it runs on.

    python tools/bench_elastic.py --preset neox-410m             # a 2-rank ZeRO-2 checkpoint (~6.5 GB), then 2 rounds
    python tools/bench_elastic.py --preset neox-tiny --rounds 3
    python tools/bench_elastic.py --checkpoint runs/<run>/checkpoints/step-00000100

Makes (or takes) a ZeRO checkpoint saved on `--ranks` ranks, then, in alternating rounds with the page
cache dropped before each measurement (when allowed):
- DeepSpeed's `ds_to_universal` on the same files (the fallback for layouts the one pass does not read);
- the conversion a resume on another world size runs (`trainer.checkpoint.universal.ensure_universal`:
  one pass for plain data-parallel ZeRO-1/2, fsync, rename), from a fresh start each round;
- the floor: reading the same ZeRO files once (8 MiB reads) and writing as many bytes as the one pass
  wrote (its hard link to the model states is not a write), fsynced, to the same filesystem.
Prints a Markdown table; the ratios are from this one run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tools.bench_checkpoint import drop_caches  # noqa: E402

CHUNK = 8 * 1024 * 1024


def make_checkpoint(args: argparse.Namespace, work: Path) -> Path:
    import yaml

    shards = work / "shards"
    if not shards.is_dir():
        subprocess.run(
            [
                sys.executable,
                str(REPO / "tools" / "make_synthetic_shards.py"),
                "--out",
                str(shards),
                "--vocab",
                str(args.vocab),
                "--tokens",
                "400000",
                "--shards",
                "2",
            ],
            check=True,
            capture_output=True,
        )
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    cfg = {
        "task": "pretrain",
        "run_dir": str(runs),
        "model": {"preset": args.preset, "vocab_size": args.vocab, "seq_len": 128},
        "data": {"path": str(shards)},
        "optim": {"warmup_steps": 1, "decay_steps": 10},
        "train": {"max_steps": args.steps, "micro_batch_size": 1, "log_every": 1},
        "eval": {"enabled": False},
        "checkpoint": {"save_every": args.steps, "async": False},
        "tracking": {"enabled": False},
        "deepspeed": {"template": f"zero{args.stage}"},
    }
    path = work / "make.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1"}
    print(
        f"training {args.steps} step(s) of {args.preset} on {args.ranks} rank(s) to make a checkpoint ...", flush=True
    )
    r = subprocess.run(
        [sys.executable, "-m", "trainer.cli.main", "train", str(path), "--num-ranks", str(args.ranks)],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if r.returncode != 0:
        sys.exit(r.stdout[-3000:] + r.stderr[-3000:])
    (ckpt,) = sorted(runs.glob("*/checkpoints/step-*"))
    return ckpt


def zero_files(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.iterdir() if p.name.endswith(("_model_states.pt", "_optim_states.pt")))


def read_all(files: list[Path]) -> float:
    t0 = time.perf_counter()
    buf = bytearray(CHUNK)
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


def write_bytes(folder: Path, n: int) -> float:
    folder.mkdir(parents=True, exist_ok=True)
    block = os.urandom(CHUNK)
    t0 = time.perf_counter()
    with open(folder / "floor.bin", "wb", buffering=0) as f:
        left = n
        while left > 0:
            left -= f.write(block[: min(CHUNK, left)])
        os.fsync(f.fileno())
    took = time.perf_counter() - t0
    shutil.rmtree(folder)
    return took


def written_bytes(folder: Path) -> int:
    """Bytes a conversion wrote (a hard link to a source file is not a write)."""
    return sum(st.st_size for p in folder.rglob("*") if p.is_file() and (st := p.stat()).st_nlink == 1)


def deepspeed_converter(ckpt: Path, workers: int) -> tuple[float, int]:
    """DeepSpeed's ds_to_universal on the same inputs (the fallback path), as a child process; fsync included."""
    from trainer.checkpoint.store import fsync_tree

    staging = ckpt.parent / ".bench-ds"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "in").mkdir(parents=True)
    for f in zero_files(ckpt):
        (staging / "in" / f.name).symlink_to(f.resolve())
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.checkpoint.universal",
            str(staging / "in"),
            str(staging / "out"),
            "--workers",
            str(workers),
        ],
        check=True,
        capture_output=True,
    )
    fsync_tree(staging / "out", files=True)
    took = time.perf_counter() - t0
    n = written_bytes(staging / "out")
    shutil.rmtree(staging)
    return took, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="neox-410m")
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--ranks", type=int, default=2, help="world size of the checkpoint made")
    p.add_argument("--stage", type=int, default=2, choices=(1, 2))
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument("--checkpoint", type=Path, help="convert this checkpoint instead of making one")
    p.add_argument("--work", type=Path, default=REPO / "build" / "bench_elastic")
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # noqa: F401  (imported by every rank before it converts: not part of the conversion's time)

    from trainer.checkpoint.universal import ensure_universal, universal_dir
    from trainer.progress import gb

    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = args.checkpoint or make_checkpoint(args, args.work)
    files = zero_files(ckpt)
    bytes_in = sum(f.stat().st_size for f in files)
    rows: dict[str, list[float]] = {"one-pass": [], "ds_to_universal": [], "read": [], "write": []}
    out_bytes: dict[str, int] = {}
    dropped = True
    for i in range(args.rounds):
        dropped &= drop_caches()
        took, out_bytes["ds_to_universal"] = deepspeed_converter(ckpt, args.workers)
        rows["ds_to_universal"].append(took)
        shutil.rmtree(universal_dir(ckpt), ignore_errors=True)
        dropped &= drop_caches()
        c = ensure_universal(ckpt, args.workers)
        assert c.seconds is not None
        rows["one-pass"].append(c.seconds)
        out_bytes["one-pass"] = written_bytes(c.path)
        dropped &= drop_caches()
        rows["read"].append(read_all(files))
        rows["write"].append(write_bytes(ckpt.parent / ".bench-floor", out_bytes["one-pass"]))
        print(
            f"round {i + 1}: ds_to_universal {rows['ds_to_universal'][-1]:.1f} s, one pass {rows['one-pass'][-1]:.1f} "
            "s;"
            f" floor read {rows['read'][-1]:.1f} s + write {rows['write'][-1]:.1f} s",
            flush=True,
        )
    med = statistics.median
    floor = med(rows["read"]) + med(rows["write"])
    print(
        f"\n{ckpt} ({len(files)} ZeRO files, {gb(bytes_in)}), {args.rounds} alternating round(s), page cache"
        f" {'dropped' if dropped else 'NOT dropped'} before each measurement\n"
    )
    print("| what | bytes read | bytes written | seconds (median) | / floor |")
    print("|---|---:|---:|---:|---:|")
    for name, label in (
        ("ds_to_universal", "DeepSpeed's ds_to_universal (child process, fsync)"),
        ("one-pass", "one-pass conversion, as a resume runs it (fsync, rename)"),
    ):
        print(
            f"| {label} | {gb(bytes_in)} | {gb(out_bytes[name])} | {med(rows[name]):.1f} | "
            f"{med(rows[name]) / floor:.2f}x |"
        )
    print(
        f"| floor: read the ZeRO files once, write the one-pass output's bytes, fsync | {gb(bytes_in)} |"
        f" {gb(out_bytes['one-pass'])} | {floor:.1f} ({med(rows['read']):.1f} + {med(rows['write']):.1f}) | 1.00x |"
    )
    print("\nall rounds (s): " + "; ".join(f"{k} {', '.join(f'{x:.1f}' for x in v)}" for k, v in rows.items()))


if __name__ == "__main__":
    main()
