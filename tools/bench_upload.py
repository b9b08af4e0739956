#!/usr/bin/env python
"""Upload benchmarks: compression, uploader vs raw client, and the training-step cost of an upload.

    python tools/bench_upload.py [--mb 256] [--files 8] [--steps 40]

1. Compression of weight-like data (fp32 normal values): ratio and MB/s for none, zstd, gzip.
2. Throughput: our uploader (tar parts streamed through resumable uploads, CRC32C on the fly,
   manifest, verification) / the raw google-cloud-storage client uploading the same files with
   `transfer_manager.upload_many` and the same parallelism, against fake-gcs-server on 127.0.0.1.
3. Training step time with a background upload in flight / without (1 CPU rank, neox-tiny,
   file:// target), measured in alternating windows so machine noise hits both sides.
All ratios come from one run. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
MB = 1024 * 1024


def make_checkpoint(root: Path, total_mb: int, files: int, step: int = 1) -> Path:
    import numpy as np

    from trainer.checkpoint.store import CheckpointStore

    store = CheckpointStore(root)
    d = store.path(f"step-{step:08d}")
    d.mkdir(parents=True)
    rng = np.random.default_rng(step)
    per = total_mb * MB // files // 4
    for i in range(files):
        rng.standard_normal(per, dtype=np.float32).tofile(d / f"zero_pp_rank_{i}_mp_rank_00_optim_states.pt")
    (d / "rng_state_rank00000.pt").write_bytes(b"rng")
    store.commit(d.name, {"step": step, "tag": d.name, "run_id": root.name, "world_size": 1}, {})
    return d


def bench_compression(ckpt: Path) -> None:
    from trainer.upload.archive import TarStream, compress_into
    from trainer.upload.uploader import NodeInfo, local_files

    files = local_files(ckpt, NodeInfo())
    total = sum(s for _, s in files)
    print("\n| compression | ratio | MB/s (tar + compress + CRC32C, one stream) |\n|---|---|---|")
    for comp in ("none", "zstd", "gzip"):
        t0 = time.perf_counter()
        with TarStream(ckpt, files) as tar:
            if comp == "none":
                size = sum(len(block) for block in iter(lambda: tar.read(8 * MB), b""))
            else:
                size, _ = compress_into(tar, _NullSink(), comp)  # type: ignore[arg-type]
            tar.entries()  # every file's CRC32C
        dt = time.perf_counter() - t0
        print(f"| {comp} | {total / size:.3f} | {total / MB / dt:,.0f} |")


class _NullSink:
    def write(self, data: bytes) -> int:
        return len(data)


def bench_throughput(ckpt: Path, workers: int, tmp: Path) -> None:
    from google.cloud.storage import transfer_manager

    from storage_servers import BUCKET, Emulator
    from trainer.storage import open_storage
    from trainer.upload.uploader import CheckpointUploader

    emu = Emulator("fake-gcs-server", tmp / "emu").start()
    os.environ["STORAGE_EMULATOR_HOST"] = emu.url
    try:
        storage = open_storage(f"gs://{BUCKET}/bench")
        files = sorted(p for p in ckpt.iterdir() if p.is_file() and p.name != "upload_state.json")
        total = sum(p.stat().st_size for p in files)
        ours, raw = [], []
        for trial in range(5):
            blobs = [storage.bucket.blob(f"raw/{trial}/{p.name}") for p in files]  # type: ignore[attr-defined]
            t0 = time.perf_counter()
            results = transfer_manager.upload_many(
                list(zip([str(p) for p in files], blobs)),
                max_workers=workers,
                worker_type=transfer_manager.THREAD,
                raise_exception=True,
            )
            raw.append(total / MB / (time.perf_counter() - t0))
            assert all(r is None for r in results)
            (ckpt / "upload_state.json").unlink(missing_ok=True)
            meta_file = ckpt / "metadata.json"
            import json

            meta = json.loads(meta_file.read_text())
            meta["run_id"] = f"ours{trial}"
            meta_file.write_text(json.dumps(meta))
            t0 = time.perf_counter()
            CheckpointUploader(storage, "none", workers=workers).upload(ckpt)
            ours.append(total / MB / (time.perf_counter() - t0))
        r_ours, r_raw = statistics.median(ours), statistics.median(raw)
        trials = " / ".join(f"{o / r:.2f}" for o, r in zip(ours, raw))
        print(
            "\n| bytes | workers | raw client upload_many (MB/s) | uploader (MB/s) | ratio of medians | per-trial "
            "ratios |"
            f"\n|---|---|---|---|---|---|\n| {total / MB:.0f} MB in {len(files)} files | {workers} | {r_raw:,.0f} | "
            f"{r_ours:,.0f} |"
            f" {r_ours / r_raw:.2f} | {trials} |"
        )
    finally:
        emu.stop()


def bench_step_time(steps: int, tmp: Path, upload_mb: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import numpy as np

    from trainer.config.schema import RunConfig
    from trainer.engine.loop import Trainer
    from trainer.launcher.command import become_one_rank
    from trainer.tasks import build_task
    from trainer.storage import open_storage
    from trainer.upload.background import BackgroundUploader
    from trainer.upload.uploader import CheckpointUploader

    become_one_rank()
    data = tmp / "shards"
    data.mkdir()
    np.save(data / "shard_00000.npy", np.random.default_rng(0).integers(0, 512, 2_000_000, dtype=np.int32))
    cfg = RunConfig.model_validate(
        {
            "run_dir": str(tmp / "runs"),
            "data": {"path": str(data)},
            "optim": {"warmup_steps": 1},
            "train": {"max_steps": 10**6, "micro_batch_size": 8},
            "tracking": {"enabled": False},
        }
    )
    trainer = Trainer(cfg, build_task(cfg), source="bench")
    trainer.setup()
    for _ in range(5):
        trainer.train_step()
    storage = open_storage(f"file://{tmp / 'bucket'}")
    uploads = [make_checkpoint(tmp / "up" / f"run{i}", upload_mb, 4, step=i + 1) for i in range(2)]
    quiet, busy = [], []
    for rnd in range(6):
        background = rnd % 2 == 1
        bg = None
        if background:
            bg = BackgroundUploader(CheckpointUploader(storage, "none", workers=4), url=storage.url)
            for u in uploads:
                (u / "upload_state.json").unlink(missing_ok=True)
                bg.submit(u)
            time.sleep(0.2)  # the upload is under way
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - t0)
        if bg is not None:
            in_flight = bool(bg.pending())
            bg.close()
            for u in uploads:  # upload again next round
                for p in (tmp / "bucket").rglob("*"):
                    if p.is_file():
                        p.unlink()
            if not in_flight:
                print(f"(round {rnd}: the upload finished before the steps did; raise --upload-mb)")
        (busy if background else quiet).extend(times)
    q, b = statistics.median(quiet), statistics.median(busy)
    print("\n| step time, no upload (s) | step time, upload in flight (s) | ratio |\n|---|---|---|")
    print(f"| {q:.4f} | {b:.4f} | {b / q:.3f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=256, help="checkpoint size for compression and throughput")
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--steps", type=int, default=40, help="training steps per window")
    p.add_argument("--upload-mb", type=int, default=512, help="bytes in flight while stepping")
    p.add_argument("--only", choices=["compression", "throughput", "step"], default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-upload-") as t:
        tmp = Path(t)
        ckpt = make_checkpoint(tmp / "runs" / "run0", args.mb, args.files)
        if args.only in (None, "compression"):
            bench_compression(ckpt)
        if args.only in (None, "throughput"):
            bench_throughput(ckpt, args.workers, tmp)
        if args.only in (None, "step"):
            bench_step_time(args.steps, tmp, args.upload_mb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
