#!/usr/bin/env python
"""What checkpoint integrity costs: writing a checkpoint's files with and without their CRC32C, and verifying them.

    python tools/bench_integrity.py                 # neox-410m's full state (ZeRO-2, fp32: ~6.5 GB), 3 rounds
    python tools/bench_integrity.py --gb 0.003      # neox-tiny's

Files shaped like DeepSpeed's ZeRO-2 fp32 checkpoint of one rank: the model states (a quarter of the bytes: the fp32
weights) and the optimizer states (the rest: master weights, Adam's two moments). Each round, alternating:

- `plain`: `torch.save` + fsync of every file (the write before this change);
- `recorded`: `trainer.engine.snapshot.write_file` (the same, then each file's size and CRC32C read back);
- `verify`: `trainer.checkpoint.integrity.damaged_files` over the folder (what a resume checks first), with the
  files in the page cache, and after dropping it (`/proc/sys/vm/drop_caches`, when root) as on a fresh start.

Prints one markdown table row per mode: median seconds and GB/s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def state(gb: float) -> dict[str, dict]:
    import torch

    n = int(gb * 1e9 / 4)
    return {
        "mp_rank_00_model_states.pt": {"module": torch.randn(n // 4)},
        "zero_pp_rank_0_mp_rank_00_optim_states.pt": {
            "fp32": torch.randn(n // 4),
            "exp_avg": torch.randn(n // 4),
            "exp_avg_sq": torch.rand(n - 3 * (n // 4)),
        },
    }


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=6.5, help="bytes of state per rank (neox-410m ZeRO-2 fp32: 6.5)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder on this disk)")
    args = p.parse_args()

    import torch

    from trainer.checkpoint.integrity import damaged_files
    from trainer.engine.snapshot import write_file

    files = state(args.gb)
    total = sum(t.numel() * t.element_size() for f in files.values() for t in f.values())
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench-integrity-"))
    times: dict[str, list[float]] = {"plain": [], "recorded": [], "verify (page cache)": [], "verify (cold)": []}
    try:
        for r in range(args.rounds):
            order = ["plain", "recorded"] if r % 2 == 0 else ["recorded", "plain"]
            for mode in order:
                folder = root / f"{mode}-{r}"
                folder.mkdir()
                records = {}
                t0 = time.perf_counter()
                for name, obj in files.items():
                    if mode == "plain":
                        torch.save(obj, str(folder / name))
                        fd = os.open(folder / name, os.O_RDONLY)
                        os.fsync(fd)
                        os.close(fd)
                    else:
                        records[name] = write_file(folder / name, obj)
                times[mode].append(time.perf_counter() - t0)
                if mode == "recorded":
                    meta = {"files": records}
                    t0 = time.perf_counter()
                    assert not damaged_files(folder, meta)
                    times["verify (page cache)"].append(time.perf_counter() - t0)
                    if drop_caches():
                        t0 = time.perf_counter()
                        assert not damaged_files(folder, meta)
                        times["verify (cold)"].append(time.perf_counter() - t0)
                shutil.rmtree(folder)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    size = total
    print(f"\n{args.gb:g} GB of state in {len(files)} files, {args.rounds} rounds alternated, median (range)\n")
    print("| mode | seconds | GB/s |")
    print("|---|---|---|")
    for mode, ts in times.items():
        if ts:
            med = statistics.median(ts)
            print(f"| {mode} | {med:.2f} ({min(ts):.2f}-{max(ts):.2f}) | {size / 1e9 / med:.2f} |")
    if times["plain"] and times["recorded"]:
        print(f"\nrecorded / plain: {statistics.median(times['recorded']) / statistics.median(times['plain']):.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
