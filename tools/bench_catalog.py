#!/usr/bin/env python
"""How fast `trainer checkpoints list gs://...` reads a bucket: manifests fetched one at a time vs in parallel.

    python tools/bench_catalog.py [--checkpoints 60] [--history 5000] [--rounds 3] [--rtt-ms 0]

Writes `--checkpoints` manifests shaped like a long run's (loss and LR histories of `--history`
points, 40 files) to fake-gcs-server on 127.0.0.1, then times `read_manifests` with 1 thread and
with 8, alternating in each round so machine noise hits both sides. Prints a Markdown table.
The emulator answers in about a millisecond; `--rtt-ms` adds a sleep before each manifest read to
model a bucket's round trip (a model, not a measurement of GCS: label it so when reporting).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def manifest(run_id: str, step: int, history: int) -> dict:
    meta = {
        "step": step,
        "tag": f"step-{step:08d}",
        "run_id": run_id,
        "loss": 2.0,
        "committed_at": f"2026-01-01T00:00:{step % 60:02d}",
        "loss_history": [[i, 5.0 / (1 + i)] for i in range(history)],
        "lr_history": [[i, 3e-4] for i in range(history)],
    }
    files = [
        {
            "path": f"zero_pp_rank_{i}_mp_rank_00_optim_states.pt",
            "size": 2**30,
            "crc32c": "AAAAAA==",
            "part": "part-000.tar",
        }
        for i in range(40)
    ]
    return {
        "format": 1,
        "run_id": run_id,
        "tag": meta["tag"],
        "step": step,
        "files": files,
        "parts": [{"name": "part-000.tar", "size": 40 * 2**30, "crc32c": "AAAAAA=="}],
        "checkpoint": meta,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", type=int, default=60)
    ap.add_argument("--history", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rtt-ms", type=float, default=0.0, help="simulated round trip added to each manifest read")
    args = ap.parse_args()

    from storage_servers import BUCKET, Emulator
    from trainer.storage import open_storage
    from trainer.checkpoint.remote import read_manifests

    with tempfile.TemporaryDirectory() as tmp:
        emu = Emulator("fake-gcs-server", Path(tmp) / "gcs").start()
        os.environ["STORAGE_EMULATOR_HOST"] = emu.url
        try:
            storage = open_storage(f"gs://{BUCKET}/bench")
            size = 0
            for i in range(args.checkpoints):
                data = json.dumps(manifest(f"run{i % 3}", 100 * (i + 1), args.history), indent=1).encode()
                size += len(data)
                storage.put_bytes(f"run{i % 3}/step-{100 * (i + 1):08d}/manifest.json", data)
            if args.rtt_ms:
                get = storage.get_bytes

                def slow_get(name: str) -> "bytes | None":
                    time.sleep(args.rtt_ms / 1000)
                    return get(name)

                storage.get_bytes = slow_get  # type: ignore[method-assign]
            times: dict[int, list[float]] = {1: [], 8: []}
            for _ in range(args.rounds):
                for threads in (1, 8):
                    t0 = time.perf_counter()
                    found, problems = read_manifests(storage, threads=threads)
                    times[threads].append(time.perf_counter() - t0)
                    assert len(found) == args.checkpoints and not problems
        finally:
            emu.stop()
    one, eight = statistics.median(times[1]), statistics.median(times[8])
    rtt = f", plus a simulated {args.rtt_ms:.0f} ms round trip per read" if args.rtt_ms else ""
    print(
        f"{args.checkpoints} manifests, {size / args.checkpoints / 1024:.0f} KiB each, fake-gcs-server on "
        f"127.0.0.1{rtt},"
        f" median of {args.rounds} alternating rounds\n"
    )
    print("| threads | seconds | manifests/s |\n|---|---|---|")
    for threads, t in ((1, one), (8, eight)):
        print(f"| {threads} | {t:.2f} | {args.checkpoints / t:.0f} |")
    print(f"\nspeed-up 8 threads / 1: {one / eight:.2f}x")


if __name__ == "__main__":
    main()
