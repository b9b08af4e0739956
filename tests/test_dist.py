"""Ranks waiting for one rank's long I/O: no collective timeout, progress in the log, a crash named at once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from trainer.launcher.command import free_port

# Two real ranks (gloo) whose process group times out after 3 s. Rank 1 works for 6 s (twice the
# timeout; say, downloading its node's shards) while reporting progress; rank 0 must wait it out,
# log that progress, then share a result of its own with rank 1 the same way.
SCRIPT = textwrap.dedent("""
    import sys, time
    from trainer.log import setup_logging
    from trainer.ranks import rank_info
    from trainer import progress
    from trainer.engine import dist

    setup_logging(int(sys.argv[1]))
    dist.WAIT_LOG_EVERY_S = 1.0
    dist.init_distributed(timeout_s=3)
    info = rank_info()
    mode = sys.argv[2]

    def slow():
        for i in range(12):
            progress.report(f"downloading shards: {i + 1} of 12 files")
            time.sleep(0.5)
            if mode == "crash" and i == 3:
                raise OSError("disk gone")

    try:
        dist.wait_for(slow, [1], "rank 1 downloading shards")
        got = dist.on_main_then_share(lambda: {"step": 12}, info, "rank 0 choosing the checkpoint")
    except BaseException as exc:
        print(f"rank {info.rank} raised {type(exc).__name__}: {exc}", flush=True)
        sys.exit(1)
    print(f"rank {info.rank} got {got}", flush=True)
    dist.barrier()  # the process group still works after a wait longer than its timeout
    print(f"rank {info.rank} done", flush=True)
""")


def _two_ranks(tmp_path: Path, mode: str) -> list[subprocess.CompletedProcess]:
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), str(rank), mode],
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    outs = [p.communicate(timeout=120)[0] for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, out, "") for p, out in zip(procs, outs)]


def test_ranks_wait_longer_than_the_collective_timeout_and_see_progress(tmp_path: Path) -> None:
    r0, r1 = _two_ranks(tmp_path, "ok")
    assert r0.returncode == 0 and r1.returncode == 0, r0.stdout + r1.stdout
    assert "rank 1 got {'step': 12}" in r1.stdout and "rank 1 done" in r1.stdout and "rank 0 done" in r0.stdout
    waits = [line for line in r0.stdout.splitlines() if "waiting" in line and "for rank 1 downloading shards" in line]
    assert len(waits) >= 3, r0.stdout  # about one a second for 6 s
    assert "rank 1: downloading shards:" in waits[-1] and "of 12 files" in waits[-1], waits


def test_a_rank_that_crashes_during_the_wait_is_named_at_once(tmp_path: Path) -> None:
    r0, r1 = _two_ranks(tmp_path, "crash")
    assert r1.returncode == 1 and "rank 1 raised OSError: disk gone" in r1.stdout, r1.stdout
    assert r0.returncode == 1, r0.stdout
    assert (
        "rank 0 raised RuntimeError: rank 1 failed while rank 1 downloading shards: OSError: disk gone" in r0.stdout
    ), r0.stdout
