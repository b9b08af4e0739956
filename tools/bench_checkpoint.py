#!/usr/bin/env python
"""Checkpoints at size: what a save, an upload, a preemption and a restore cost a training run.

    python tools/bench_checkpoint.py --preset neox-410m        # the rehearsal (6.2 GB checkpoints, ~35 min)
    python tools/bench_checkpoint.py --preset neox-tiny --steps 60 --save-every 20 --signal-delay 0.05

For `checkpoint.async` on and off (same config otherwise), one run of `--steps` steps on one CPU
rank (`launch/train.py`, ZeRO-2, fp32, micro batch 1 x grad_accum 4, seq 128) with a file://
bucket, preempted twice: SIGTERM `--signal-delay` s after the log line of step `save_every`, and
again after step 2 x `save_every` of the restarted attempt, then a third attempt runs to the end.
From the logs (each line stamped when it arrives), the checkpoint metadata and goodput.json:
- how long each scheduled save blocked training, and how long its write took in the background;
- the step time while a write is in flight and while an upload is in flight (for over a second of
  the step), against the other steps (the step after a save has the save's blocking time taken out:
  that is counted above); the last attempt runs several scheduled saves in one process;
- each attempt's peak RSS (VmHWM of the rank);
- after each SIGTERM: the seconds to exit, the exit code, what was committed, uploaded, or left local;
- the run's goodput over its three attempts.
Then a fresh-machine restore of the newest checkpoint from the async run's bucket (page cache dropped
when allowed) against `tar -x` of the same parts, one after another and 4 at a time, plus `sync`.
Prints Markdown tables; ratios are from this one run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MB = 1024 * 1024

STEP = re.compile(r"step (\d+)/(\d+) loss \S+ lr \S+ grad_norm \S+ step ([\d.]+)s")
CAPTURED = re.compile(r"checkpoint (step-\d+) \(scheduled\): state captured in ([\d.]+) s")
SAVED = re.compile(r"saved checkpoint \S*(step-\d+) \((\w+)\): training blocked ([\d.]+) s(?:, written in ([\d.]+) s)?")
UPLOADING = re.compile(r"uploading (step-\d+) to")
UPLOADED = re.compile(r"uploaded (step-\d+): ([\d.]+) MB in ([\d.]+) s")


@dataclass
class Attempt:
    lines: list[tuple[float, str]] = field(default_factory=list)
    started: float = 0.0
    signalled: Optional[float] = None
    ended: float = 0.0
    rc: int = 0
    peak_rss: int = 0

    def grep(self, pattern: re.Pattern) -> list[tuple[float, re.Match]]:
        return [(t, m) for t, line in self.lines if (m := pattern.search(line))]

    def has(self, text: str) -> list[str]:
        return [line for _, line in self.lines if text in line]


def write_config(
    path: Path, args: argparse.Namespace, shards: Path, run_dir: Path, bucket: Path, async_save: bool
) -> None:
    import yaml

    cfg = {
        "task": "pretrain",
        "run_dir": str(run_dir),
        "run_id": "bench",
        "model": {"preset": args.preset, "seq_len": 128, "vocab_size": args.vocab},
        "data": {"path": str(shards)},
        "optim": {"lr": 1e-4, "warmup_steps": 2, "schedule": "cosine"},
        "train": {
            "max_steps": args.steps,
            "micro_batch_size": 1,
            "grad_accum": 4,
            "precision": "fp32",
            "log_every": 1,
            "seed": 1,
        },
        "checkpoint": {"save_every": args.save_every, "keep_last": 1, "keep_best": False, "async": async_save},
        "upload": {"url": bucket.as_uri(), "keep_remote": 1},
        "preemption": {"grace_s": args.grace},
        "tracking": {"enabled": False},
        "deepspeed": {"template": "zero2"},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def run_attempt(config: Path, log_path: Path, trigger: Optional[str], delay: float, threads: int) -> Attempt:
    """One rank of launch/train.py; SIGTERM `delay` s after the first log line containing `trigger`."""
    from trainer.launcher.command import one_rank_env

    env = {
        **os.environ,
        **one_rank_env(),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": str(threads),
        "PYTHONUNBUFFERED": "1",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / "build" / "torch_extensions")),
    }
    a = Attempt(started=time.monotonic())
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    stop_rss = threading.Event()

    def rss() -> None:
        while not stop_rss.is_set():
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        a.peak_rss = max(a.peak_rss, int(line.split()[1]) * 1024)
            except OSError:
                return
            time.sleep(0.2)

    threading.Thread(target=rss, daemon=True).start()
    timer: Optional[threading.Timer] = None

    def fire() -> None:
        a.signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)

    with open(log_path, "w") as out:
        assert proc.stdout is not None
        for line in proc.stdout:
            a.lines.append((time.monotonic(), line.rstrip("\n")))
            out.write(line)
            if trigger and timer is None and trigger in line:
                timer = threading.Timer(delay, fire)
                timer.start()
    a.rc = proc.wait()
    a.ended = time.monotonic()
    stop_rss.set()
    if timer is not None:
        timer.cancel()
    return a


def step_classes(attempts: list[Attempt]) -> dict[str, list[float]]:
    """Step times (s) by what ran beside them: a background write, an upload, or nothing."""
    out: dict[str, list[float]] = {
        k: [] for k in ("write", "upload", "neither", "write_overlap", "upload_overlap", "neither_overlap")
    }
    for a in attempts:
        writes = []
        for t, m in a.grep(CAPTURED):
            saved = [(ts, s) for ts, s in a.grep(SAVED) if s.group(1) == m.group(1) and s.group(4)]
            if saved:
                writes.append((t, t + float(saved[0][1].group(4))))
        uploads = []
        for t, m in a.grep(UPLOADING):
            done = [ts for ts, u in a.grep(UPLOADED) if u.group(1) == m.group(1)]
            uploads.append((t, done[0] if done else a.ended))
        blocked_after = {}  # step time lines that include a save's blocking: the first step logged after it
        saves = [(t, float(m.group(2))) for t, m in a.grep(CAPTURED)] + [
            (t, float(m.group(3))) for t, m in a.grep(SAVED) if not m.group(4)
        ]
        steps = a.grep(STEP)
        for t_save, blocked in saves:
            after = [i for i, (t, _) in enumerate(steps) if t > t_save]
            if after:
                blocked_after[after[0]] = blocked
        for i, (t, m) in enumerate(steps):
            if int(m.group(1)) == 1 or i == 0:
                continue  # warm-up / first step after a restart
            dur = float(m.group(3)) - blocked_after.get(i, 0.0)
            lo, hi = t - dur, t

            def overlap(windows: list[tuple[float, float]]) -> float:
                return sum(max(0.0, min(hi, b) - max(lo, s)) for s, b in windows)

            w, u = overlap(writes), overlap(uploads)
            kind = "write" if w > 1.0 else "upload" if u > 1.0 else "neither"
            out[kind].append(dur)
            out[f"{kind}_overlap"].append(w if kind == "write" else u)
    return out


def newest_state(run_root: Path) -> tuple[list[str], list[str]]:
    from trainer.checkpoint.layout import is_uploaded

    ckpts = run_root / "bench" / "checkpoints"
    committed, uploaded = [], []
    for d in sorted(ckpts.glob("step-*")):
        if (d / "metadata.json").is_file():
            committed.append(d.name)
            if is_uploaded(d):
                uploaded.append(d.name)
    return committed, uploaded


def bench_mode(args: argparse.Namespace, shards: Path, work: Path, async_save: bool) -> dict:
    name = "async" if async_save else "sync"
    root = work / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    run_dir, bucket = root / "runs", root / "bucket"
    bucket.mkdir()
    config = root / "config.yaml"
    write_config(config, args, shards, run_dir, bucket, async_save)
    attempts: list[Attempt] = []
    stops = []
    triggers = [args.save_every * (k + 1) for k in range(args.signals)] + [None]
    for k, trigger_step in enumerate(triggers):
        trigger = f"step {trigger_step}/{args.steps} " if trigger_step else None
        a = run_attempt(config, root / f"attempt{k + 1}.log", trigger, args.signal_delay, args.threads)
        attempts.append(a)
        committed, uploaded = newest_state(run_dir)
        print(
            f"  {name} attempt {k + 1}: rc {a.rc}, {a.ended - a.started:.0f} s, peak RSS {a.peak_rss / 2**30:.1f} GiB,"
            f" committed {committed}, uploaded {uploaded}",
            flush=True,
        )
        if a.signalled is not None:
            stop = next((line for line in a.has("stop requested")), "no stop line")
            stops.append(
                {
                    "attempt": k + 1,
                    "exit_s": a.ended - a.signalled,
                    "rc": a.rc,
                    "committed": committed,
                    "uploaded": uploaded,
                    "stop": stop.split("] ", 1)[-1],
                    "peak_rss": a.peak_rss,
                    "abandoned": bool(a.has("abandoned the write")),
                }
            )
        if a.rc not in (0, 75):
            print("\n".join(line for _, line in a.lines[-30:]))
            raise SystemExit(f"{name} attempt {k + 1} failed with exit code {a.rc}")
    saves = []
    for a in attempts:
        saves += [
            (m.group(1), float(m.group(3)), float(m.group(4)) if m.group(4) else None, m.group(2))
            for _, m in a.grep(SAVED)
        ]
    uploads = [(m.group(1), float(m.group(2)), float(m.group(3))) for a in attempts for _, m in a.grep(UPLOADED)]
    said = [line.split("] ", 1)[-1] for line in attempts[-1].has("] goodput ")]
    good = said[-1] if said else "no goodput line"
    return {
        "name": name,
        "attempts": attempts,
        "steps": step_classes(attempts),
        "saves": saves,
        "uploads": uploads,
        "stops": stops,
        "goodput": good,
        "bucket": bucket,
        "run_dir": run_dir,
    }


def drop_caches() -> bool:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def bench_restore(bucket: Path, work: Path) -> list[tuple[str, float, float]]:
    from trainer.storage import open_storage
    from trainer.upload.restore import restore_newest

    rows = []
    cold = drop_caches()
    dest = work / "restore"
    shutil.rmtree(dest, ignore_errors=True)
    t0 = time.monotonic()
    got = restore_newest(open_storage(bucket.as_uri()), dest, task="pretrain")
    seconds = time.monotonic() - t0
    assert got is not None, "nothing restored"
    parts = sorted((bucket / "bench" / got.name).glob("part-*"))  # the objects of the checkpoint restored
    nbytes = sum(p.stat().st_size for p in parts)
    rows.append(
        (
            f"trainer restore of {got.name} ({len(parts)} parts, 4 at a time, CRC32C of every part and file, fsync)",
            nbytes,
            seconds,
        )
    )
    shutil.rmtree(dest)
    download = work / "download"
    for label, streams, copy in (
        ("tar -x, one part after another, then sync", 1, False),
        ("tar -x, 4 parts at a time, then sync", 4, False),
        ("cp of the parts, then tar -x of each, then sync", 1, True),
    ):
        drop_caches()
        dest.mkdir()
        t0 = time.monotonic()
        sources = parts
        if copy:
            download.mkdir()
            sources = []
            for p in parts:
                shutil.copyfile(p, download / p.name)
                sources.append(download / p.name)
        procs: list[subprocess.Popen] = []
        for p in sources:
            if len(procs) >= streams:
                procs.pop(0).wait()
            procs.append(subprocess.Popen(["tar", "-xf", str(p), "-C", str(dest)]))
        for proc in procs:
            proc.wait()
        subprocess.run(["sync"], check=True)
        rows.append((label, nbytes, time.monotonic() - t0))
        shutil.rmtree(dest)
        shutil.rmtree(download, ignore_errors=True)
    print(f"  restore: page cache {'dropped' if cold else 'NOT dropped (no permission)'} before each", flush=True)
    return rows


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f}" if xs else "n/a"


def report(results: list[dict], restore_rows: list, args: argparse.Namespace) -> None:
    print(
        f"\n### {args.preset}, 1 CPU rank, {args.signals} SIGTERM restart(s), OMP_NUM_THREADS={args.threads}, "
        f"{args.steps} steps, save_every {args.save_every},"
        f" micro batch 1 x grad_accum 4, seq 128, grace {args.grace:.0f} s, file:// bucket\n"
    )
    print(
        "| checkpoint.async | scheduled saves | blocked per save (s) | background write (s) | step, nothing beside (s) "
        "|"
        " step during write (s) | step during upload (s) | write/neither | upload/neither | peak RSS (GiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = {}
    for r in results:
        sched = [s for s in r["saves"] if s[3] == "scheduled"]
        st = r["steps"]
        n = statistics.median(st["neither"]) if st["neither"] else float("nan")
        ratio = lambda k: f"{statistics.median(st[k]) / n:.3f}" if st[k] and n == n else "n/a"  # noqa: E731
        peak = max(a.peak_rss for a in r["attempts"]) / 2**30
        base[r["name"]] = [s[1] for s in sched]
        print(
            f"| {'on' if r['name'] == 'async' else 'off'} | {len(sched)} | {med([s[1] for s in sched])} |"
            f" {med([s[2] for s in sched if s[2] is not None])} | {med(st['neither'])} ({len(st['neither'])}) |"
            f" {med(st['write'])} ({len(st['write'])}, {med(st['write_overlap'])} s beside) | {med(st['upload'])}"
            f" ({len(st['upload'])}, {med(st['upload_overlap'])} s beside) | {ratio('write')} |"
            f" {ratio('upload')} | {peak:.1f} |"
        )
    if base.get("async") and base.get("sync"):
        print(
            "\nblocked per scheduled save, async / sync: "
            f"{statistics.median(base['async']) / statistics.median(base['sync']):.3f}"
        )
    print(
        "\n| checkpoint.async | SIGTERM | exit after signal (s) | exit code | stop line | committed | uploaded | peak "
        "RSS (GiB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        for s in r["stops"]:
            print(
                f"| {'on' if r['name'] == 'async' else 'off'} | attempt {s['attempt']} | {s['exit_s']:.1f} | {s['rc']} "
                "|"
                f" {s['stop']}{' (write abandoned)' if s['abandoned'] else ''} | {', '.join(s['committed']) or '-'} |"
                f" {', '.join(s['uploaded']) or '-'} | {s['peak_rss'] / 2**30:.1f} |"
            )
    print("\n| checkpoint.async | goodput over the run's attempts (as the last attempt logs it) |\n|---|---|")
    for r in results:
        print(f"| {'on' if r['name'] == 'async' else 'off'} | {r['goodput']} |")
    for r in results:
        ups = r["uploads"]
        print(
            f"\nuploads, async {'on' if r['name'] == 'async' else 'off'}: "
            + ", ".join(f"{u[0]} {u[1]:.0f} MB in {u[2]:.1f} s ({u[1] / max(u[2], 0.05):.0f} MB/s)" for u in ups)
        )
    if restore_rows:
        print(
            "\n| restore of the newest checkpoint | MB | s | MB/s | vs the fastest plain way |\n|---|---|---|---|---|"
        )
        ref = max(n / MB / secs for _, n, secs in restore_rows[1:])
        for label, nbytes, secs in restore_rows:
            print(
                f"| {label} | {nbytes / MB:,.0f} | {secs:.1f} | {nbytes / MB / secs:.0f} | "
                f"{nbytes / MB / secs / ref:.2f} |"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="neox-410m")
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--save-every", type=int, default=4)
    p.add_argument("--signal-delay", type=float, default=2.0, help="seconds after the trigger step's log line")
    p.add_argument(
        "--signals", type=int, default=2, help="attempts stopped by SIGTERM before the one that runs to the end"
    )
    p.add_argument("--grace", type=float, default=25.0)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the rank")
    p.add_argument("--modes", default="async,sync")
    p.add_argument("--no-restore", action="store_true")
    p.add_argument("--work", type=Path, default=REPO / "build" / "bench_checkpoint")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    shards = args.work / f"shards-{args.vocab}"
    if not (shards / "shard_00000.npy").exists():
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
    results = []
    for mode in args.modes.split(","):
        print(f"{mode}:", flush=True)
        results.append(bench_mode(args, shards, args.work, mode == "async"))
        for a in results[-1]["attempts"]:
            a.lines = [
                x for x in a.lines if STEP.search(x[1]) or "checkpoint" in x[1] or "upload" in x[1] or "stop" in x[1]
            ]
        if mode != "async":  # keep only the async run's bucket for the restore
            shutil.rmtree(results[-1]["bucket"], ignore_errors=True)
        shutil.rmtree(results[-1]["run_dir"] / "bench" / "checkpoints", ignore_errors=True)
    restore_rows = []
    if not args.no_restore and results and results[0]["name"] == "async":
        restore_rows = bench_restore(results[0]["bucket"], args.work)
    report(results, restore_rows, args)


if __name__ == "__main__":
    main()
