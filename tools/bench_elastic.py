#!/usr/bin/env python
"""What converting a checkpoint for another world size costs, against the disk it runs on.

    python tools/bench_elastic.py --preset neox-410m             # a 2-rank ZeRO-2 checkpoint (~6.5 GB), then 2 rounds
    python tools/bench_elastic.py --preset neox-tiny --rounds 3
    python tools/bench_elastic.py --checkpoint runs/<run>/checkpoints/step-00000100

Makes (or takes) a ZeRO checkpoint saved on `--ranks` ranks, then, in alternating rounds with the page
cache dropped before each (when allowed):
- the conversion a resume on another world size runs (`trainer.checkpoint.universal.ensure_universal`:
  DeepSpeed's `ds_to_universal` in a child process, fsync, rename), from a fresh start each round;
- the floor: reading the same ZeRO files once (8 MiB reads) and writing as many bytes as the
  conversion wrote, fsynced, to the same filesystem.
The conversion is I/O-bound: DeepSpeed's converter reads every rank's states, writes each parameter's
fragments to a temporary folder, reads them back and writes the merged files, so about twice the floor is
its shape. Prints a Markdown table; the ratio is from this one run.
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
CHUNK = 8 * 1024 * 1024


def drop_caches() -> bool:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def make_checkpoint(args: argparse.Namespace, work: Path) -> Path:
    import yaml

    shards = work / "shards"
    if not shards.is_dir():
        subprocess.run([sys.executable, str(REPO / "tools" / "make_synthetic_shards.py"), "--out", str(shards), "--vocab",
                        str(args.vocab), "--tokens", "400000", "--shards", "2"], check=True, capture_output=True)
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    cfg = {"task": "pretrain", "run_dir": str(runs),
           "model": {"preset": args.preset, "vocab_size": args.vocab, "seq_len": 128},
           "data": {"path": str(shards)}, "optim": {"warmup_steps": 1, "decay_steps": 10},
           "train": {"max_steps": args.steps, "micro_batch_size": 1, "log_every": 1},
           "eval": {"enabled": False}, "checkpoint": {"save_every": args.steps, "async": False},
           "tracking": {"enabled": False}, "deepspeed": {"template": f"zero{args.stage}"}}
    path = work / "make.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1"}
    print(f"training {args.steps} step(s) of {args.preset} on {args.ranks} rank(s) to make a checkpoint ...", flush=True)
    r = subprocess.run([sys.executable, "-m", "trainer.cli.main", "train", str(path), "--num-ranks", str(args.ranks)], env=env,
                       capture_output=True, text=True, cwd=REPO)
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="neox-410m")
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--ranks", type=int, default=2, help="world size of the checkpoint made")
    p.add_argument("--stage", type=int, default=2, choices=(1, 2))
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--checkpoint", type=Path, help="convert this checkpoint instead of making one")
    p.add_argument("--work", type=Path, default=REPO / "build" / "bench_elastic")
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    from trainer.checkpoint.universal import ensure_universal, universal_dir
    from trainer.progress import gb

    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = args.checkpoint or make_checkpoint(args, args.work)
    files = zero_files(ckpt)
    bytes_in = sum(f.stat().st_size for f in files)
    conv, floor_read, floor_write, bytes_out = [], [], [], 0
    dropped = True
    for i in range(args.rounds):
        shutil.rmtree(universal_dir(ckpt), ignore_errors=True)
        dropped &= drop_caches()
        c = ensure_universal(ckpt)
        assert c.seconds is not None
        conv.append(c.seconds)
        bytes_out = c.bytes
        dropped &= drop_caches()
        floor_read.append(read_all(files))
        floor_write.append(write_bytes(ckpt.parent / ".bench-floor", bytes_out))
        print(f"round {i + 1}: conversion {conv[-1]:.1f} s; floor read {floor_read[-1]:.1f} s + write {floor_write[-1]:.1f} s",
              flush=True)
    med = statistics.median
    floor = med(floor_read) + med(floor_write)
    print(f"\n{ckpt} ({len(files)} ZeRO files), {args.rounds} round(s), page cache {'dropped' if dropped else 'NOT dropped'}"
          " before each conversion and each floor read\n")
    print("| what | bytes in | bytes out | seconds (median) | MB/s of in+out |")
    print("|---|---:|---:|---:|---:|")
    print(f"| conversion (ds_to_universal + fsync + rename) | {gb(bytes_in)} | {gb(bytes_out)} |"
          f" {med(conv):.1f} | {(bytes_in + bytes_out) / 1e6 / med(conv):.0f} |")
    print(f"| floor: read the ZeRO files + write as many bytes, fsync | {gb(bytes_in)} | {gb(bytes_out)} |"
          f" {floor:.1f} ({med(floor_read):.1f} + {med(floor_write):.1f}) | {(bytes_in + bytes_out) / 1e6 / floor:.0f} |")
    print(f"\nconversion / floor: {med(conv) / floor:.2f}x (goal <= 2x); all rounds: conversion "
          f"{', '.join(f'{x:.1f}' for x in conv)} s, floor {', '.join(f'{r + w:.1f}' for r, w in zip(floor_read, floor_write))} s")


if __name__ == "__main__":
    main()
