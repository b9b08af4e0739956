#!/usr/bin/env python
"""SIGTERM to exit on two nodes over ssh and pdsh, against one node: what the signal path itself costs.

    python tools/bench_multinode.py --trials 5            # neox-tiny, 2 ranks, a file:// bucket

Needs root, openssh-server and pdsh (`make sysdeps`): the two nodes are the test bed of tests/sshbed.py (two
sshd on 127.0.0.2/3, each in its own PID namespace; node-b with its own disk). Three ways of running the same
job (neox-tiny, ZeRO-2, fp32, micro batch 8, every checkpoint uploaded), alternated trial by trial:
- `one node`: `trainer train --num-ranks 2`;
- `two nodes`: `trainer train --hostfile` (node-a, node-b, 1 rank each), the signal sent through pdsh;
- `runner by hand`: `deepspeed --hostfile` with `.deepspeed_env`, SIGTERM to DeepSpeed's runner.
Each trial waits for the log line of step 10, sends SIGTERM, and measures the seconds until the command exits
and until the last rank is gone, and checks that the stop step's checkpoint is committed and uploaded.
Prints a Markdown table of medians (and ranges).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

MODES = ("one node", "two nodes", "runner by hand")


def ranks_alive(cfg: Path) -> int:
    import psutil

    n = 0
    for p in psutil.process_iter():
        try:
            cmd = p.cmdline()
            if (
                str(cfg) in cmd
                and any(a.startswith("--local_rank") for a in cmd)
                and p.status() != psutil.STATUS_ZOMBIE
            ):
                n += 1
        except psutil.Error:
            pass
    return n


def trial(mode: str, bed, root: Path, shards: Path, n: int, grace: int) -> dict:  # type: ignore[no-untyped-def]
    import yaml

    from trainer.checkpoint.remote import verify_remote
    from trainer.storage import open_storage

    cfg = yaml.safe_load((REPO / "configs" / "pretrain_tiny.yaml").read_text())
    bucket = root / f"bucket-{n}"
    cfg.update(run_dir=str(bed.disk / f"runs-{n}"))
    cfg["data"]["path"] = str(shards)
    cfg["tracking"]["enabled"] = False
    cfg["train"].update(max_steps=100000, log_every=1)
    cfg["checkpoint"]["save_every"] = 100000
    cfg["upload"]["url"] = f"file://{bucket}"
    cfg["preemption"] = {"grace_s": grace}
    path = root / f"cfg-{n}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    work = root / f"work-{n}"
    work.mkdir()
    hostfile = bed.hostfile(work / "hostfile")
    env = bed.env()
    if mode == "one node":
        cmd = [sys.executable, "-m", "trainer.cli.main", "train", str(path), "--num-ranks", "2"]
    elif mode == "two nodes":
        cmd = [sys.executable, "-m", "trainer.cli.main", "train", str(path), "--hostfile", str(hostfile)]
    else:
        keep = ("DS_ACCELERATOR", "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR")
        (work / ".deepspeed_env").write_text("".join(f"{k}={env[k]}\n" for k in keep if env.get(k)))
        cmd = [
            str(Path(sys.executable).parent / "deepspeed"),
            "--hostfile",
            "hostfile",
            str(REPO / "launch" / "train.py"),
            "--config",
            str(path),
        ]
    proc = subprocess.Popen(
        cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    while True:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line and proc.poll() is not None:
            raise RuntimeError(f"{mode}: the job ended first ({proc.returncode})")
        m = re.search(r"\] step (\d+)/", line)
        if m and int(m.group(1)) >= 10:
            break
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    exit_s = time.monotonic() - t0
    while ranks_alive(path) and time.monotonic() - t0 < 120:
        time.sleep(0.05)
    gone_s = time.monotonic() - t0
    metas = sorted((bed.disk / f"runs-{n}").glob("*/checkpoints/step-*/metadata.json"))
    meta = json.loads(metas[-1].read_text()) if metas else {}
    ok = bool(meta) and verify_remote(open_storage(f"file://{bucket}"), f"{meta['run_id']}/{meta['tag']}")[0]
    return {
        "mode": mode,
        "code": proc.returncode,
        "exit_s": exit_s,
        "gone_s": gone_s,
        "step": meta.get("step"),
        "reason": meta.get("reason"),
        "uploaded": ok,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--grace", type=int, default=20, help="preemption.grace_s")
    args = p.parse_args()
    import sshbed

    why = sshbed.unavailable()
    if why:
        sys.exit(why)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / "build" / "torch_extensions"))
    root = Path(tempfile.mkdtemp(prefix="bench-multinode-"))
    bed = sshbed.SshBed(root / "bed").start()
    try:
        shards = root / "shards"
        subprocess.run(
            [
                sys.executable,
                str(REPO / "tools" / "make_synthetic_shards.py"),
                "--out",
                str(shards),
                "--vocab",
                "512",
                "--tokens",
                "400000",
                "--shards",
                "2",
            ],
            check=True,
            capture_output=True,
        )
        results: list[dict] = []
        n = 0
        for t in range(args.trials):
            for mode in MODES:
                n += 1
                r = trial(mode, bed, root, shards, n, args.grace)
                print(
                    f"trial {t + 1} {mode}: exit {r['exit_s']:.2f} s (code {r['code']}), ranks gone {r['gone_s']:.2f} "
                    "s,"
                    f" step {r['step']} {r['reason']}, uploaded {r['uploaded']}",
                    flush=True,
                )
                results.append(r)
    finally:
        bed.stop()

    def col(mode: str, key: str) -> str:
        xs = [r[key] for r in results if r["mode"] == mode]
        return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"

    print(
        "\n| how the job runs | SIGTERM to exit of the command, s | SIGTERM to the last rank gone, s | exit codes |"
        " preemption checkpoint committed and uploaded |"
    )
    print("|---|---|---|---|---|")
    for mode in MODES:
        rs = [r for r in results if r["mode"] == mode]
        codes = sorted({r["code"] for r in rs})
        good = sum(r["reason"] == "preemption" and r["uploaded"] for r in rs)
        print(f"| {mode} | {col(mode, 'exit_s')} | {col(mode, 'gone_s')} | {codes} | {good}/{len(rs)} |")


if __name__ == "__main__":
    main()
