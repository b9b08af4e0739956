#!/usr/bin/env python
"""What a start costs before training: `trainer train` against DeepSpeed's runner started the way it used to be.

    python tools/bench_launch.py --rounds 4            # neox-tiny, 2 CPU ranks, 2 steps, no checkpoint kept

Alternating, round by round, the same 2-step job (a fresh run each time):
- `trainer train --num-ranks 2`: the config checks, then DeepSpeed's per-node launcher started directly;
- `trainer train --num-ranks 2` with neither DS_ACCELERATOR nor OMP_NUM_THREADS set: the command imports torch to look
  for a GPU before it starts the launcher (with both set, as here and in the tests, it does not);
- `deepspeed --hostfile H --no_ssh_check --master_addr 127.0.0.1 ... launch/train.py` (DeepSpeed's runner, then its
  launcher: what `trainer train` ran on one machine before), without the config checks.
Prints the wall time of each and the medians. Every preempted job pays this once per restart.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    import yaml

    from trainer.launcher.command import free_port

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / "build" / "torch_extensions"))
    root = Path(tempfile.mkdtemp(prefix="bench-launch-"))
    subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "make_synthetic_shards.py"),
            "--out",
            str(root / "shards"),
            "--vocab",
            "512",
            "--tokens",
            "200000",
            "--shards",
            "2",
        ],
        check=True,
        capture_output=True,
    )
    cfg = yaml.safe_load((REPO / "configs" / "pretrain_tiny.yaml").read_text())
    cfg["data"]["path"] = str(root / "shards")
    cfg["run_dir"] = str(root / "runs")
    cfg["tracking"]["enabled"] = False
    cfg["train"]["max_steps"] = 2
    cfg["optim"]["warmup_steps"] = 1
    cfg["eval"]["enabled"] = False
    cfg["checkpoint"]["save_every"] = 1000
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    (root / "hostfile").write_text("localhost slots=2\n")
    train = [sys.executable, "-m", "trainer.cli.main", "train", str(path), "--num-ranks", "2", "--resume", "none"]
    ways = {
        "trainer train": lambda: train,
        "trainer train, GPU check": lambda: train,  # (the same command; the environment differs, below)
        "deepspeed runner": lambda: [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--hostfile",
            str(root / "hostfile"),
            "--no_ssh_check",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            str(REPO / "launch" / "train.py"),
            "--config",
            str(path),
            "--resume",
            "none",
        ],
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    for r in range(args.rounds):
        for name, cmd in ways.items():
            shutil.rmtree(root / "runs", ignore_errors=True)
            t0 = time.monotonic()
            env = dict(os.environ)
            if name == "trainer train, GPU check":
                env.pop("DS_ACCELERATOR"), env.pop("OMP_NUM_THREADS")
            done = subprocess.run(cmd(), cwd=REPO, capture_output=True, text=True, env=env)
            times[name].append(time.monotonic() - t0)
            if done.returncode != 0:
                sys.exit(f"{name} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
            print(f"round {r + 1} {name}: {times[name][-1]:.2f} s", flush=True)
    a, b = statistics.median(times["trainer train"]), statistics.median(times["deepspeed runner"])
    print("\n| way | wall time of a 2-step job, median (range), s |\n|---|---|")
    for name, xs in times.items():
        print(f"| {name} | {statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f}) |")
    c = statistics.median(times["trainer train, GPU check"])
    print(f"\ntrainer train / deepspeed runner: {a / b:.2f}x the time ({b - a:.1f} s less per start)")
    print(f"trainer train / the same with the GPU check: {a / c:.2f}x the time ({c - a:.1f} s less per start)")


if __name__ == "__main__":
    main()
