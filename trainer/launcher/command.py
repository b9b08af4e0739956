"""The `deepspeed` launcher command for a run, and running it as one process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from trainer.errors import EXIT_PREEMPTED, EXIT_CODE_FILE_ENV
from trainer.launcher.hostfile import is_local

REPO_SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "train.py"
ENTRY_MODULE = "trainer.engine.entry"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_rank_env() -> dict[str, str]:
    """What the deepspeed launcher sets for the only rank of a one-process job on this host."""
    return {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }


def become_one_rank() -> None:
    """Let this process start a one-rank engine in-process. A process a launcher started keeps the launcher's
    environment whole: filling single keys into it would mix two jobs' views (one local rank of several)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        for key, value in one_rank_env().items():
            os.environ.setdefault(key, value)  # a MASTER_PORT of the user's own is kept


@dataclass
class LaunchPlan:
    hostfile: Path
    hosts: dict[str, int]
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    node_rank: Optional[int] = None

    @property
    def world_size(self) -> int:
        return sum(self.hosts.values())

    @property
    def single_local_host(self) -> bool:
        return len(self.hosts) == 1 and is_local(next(iter(self.hosts)))

    @property
    def uses_ssh(self) -> bool:
        """The runner reaches every node through pdsh and ssh: several hosts and no --node-rank. (With one host,
        even a remote name, DeepSpeed's runner starts the ranks on this machine.)"""
        return self.node_rank is None and len(self.hosts) > 1

    def command(self, config: str, worker_args: list[str]) -> list[str]:
        """The launcher command for this plan. Across nodes over ssh: DeepSpeed's runner (the `deepspeed` command,
        through ds_runner: secret values masked in its log). Otherwise DeepSpeed's per-node launcher itself (through
        ds_launch), started as the runner would start it on one node, without the runner's seconds of imports."""
        from trainer.launcher.ds_launch import encode_world_info

        script = [str(REPO_SCRIPT)] if REPO_SCRIPT.exists() else ["--module", ENTRY_MODULE]
        if self.uses_ssh:
            cmd = [sys.executable, "-m", "trainer.launcher.ds_runner", "--hostfile", str(self.hostfile)]
            if self.master_addr:
                cmd += ["--master_addr", self.master_addr]  # else the runner asks the first host (`hostname -I`)
            cmd += ["--master_port", str(self.master_port or 29500)]
        else:
            cmd = [
                sys.executable,
                "-m",
                "trainer.launcher.ds_launch",
                f"--world_info={encode_world_info(self.hosts)}",
                f"--master_addr={self.master_addr or '127.0.0.1'}",
                f"--master_port={self.master_port or 29500}",
            ]
            if self.node_rank is not None:  # one launcher per node, started on each node by hand or a scheduler
                cmd.append(f"--node_rank={self.node_rank}")
        return cmd + script + ["--config", config, *worker_args]


def worker_processes(root_pid: int) -> list:
    """The training ranks below the launcher (DeepSpeed starts them with `--local_rank=N`)."""
    import psutil

    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for child in children:
        try:
            if any(arg.startswith("--local_rank") for arg in child.cmdline()):
                out.append(child)
        except psutil.Error:
            pass
    return out


def run_process_group(cmd: list[str], env: dict[str, str], grace_s: float = 25.0) -> int:
    """Run the launcher in its own session and return the job's exit code; SIGINT/SIGTERM go to the ranks.

    The signal is sent to the training ranks themselves: they agree on a stop step, save and exit
    with 75. (Signalled, DeepSpeed's per-node launcher SIGTERMs its ranks' whole process trees and
    SIGKILLs them 30 s later.) Before any rank exists the whole group gets the signal. If the launcher
    dies first (a signal that reached it directly), the ranks notice and stop on their own: the
    wrapper waits for them. The exit code is the one rank 0 reported (DeepSpeed's launchers do not
    always pass it up), else the launcher's.
    """
    fd, code_file = tempfile.mkstemp(prefix="trainer-exit-code-")
    os.close(fd)
    os.unlink(code_file)  # rank 0 creates it when it exits
    proc = subprocess.Popen(cmd, env={**env, EXIT_CODE_FILE_ENV: code_file}, start_new_session=True)

    stopped: list[int] = []

    def forward(signum: int, frame: object) -> None:
        stopped.append(signum)
        workers = worker_processes(proc.pid)
        try:
            if workers:
                for w in workers:
                    w.send_signal(signum)
            else:
                os.killpg(proc.pid, signum)
        except (ProcessLookupError, OSError):
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
        _wait_for_group(proc.pid, grace_s + 10)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    try:
        return int(Path(code_file).read_text())
    except (OSError, ValueError):
        if stopped and code in _died_of(stopped[0]):  # a rank died of the signal before its handler was in place
            print(
                f"trainer: stopped by {signal.Signals(stopped[0]).name} while the ranks were starting: nothing trained,"
                " nothing to save; run the same command again",
                file=sys.stderr,
                flush=True,
            )
            return EXIT_PREEMPTED
        return 128 - code if code < 0 else code
    finally:
        Path(code_file).unlink(missing_ok=True)


def _died_of(signum: int) -> set[int]:
    """The launcher's exit codes for a rank killed by `signum`: -N from Popen, 256-N through DeepSpeed's
    `sys.exit(returncode)`, 128+N from a shell."""
    return {-signum, 256 - signum, 128 + signum}


def _wait_for_group(pgid: int, timeout_s: float) -> None:
    """Wait for the processes left in the launcher's process group (ranks still saving after the
    runner died); past the timeout they are killed."""
    import psutil

    def members() -> list:
        out = []
        for p in psutil.process_iter():
            try:
                if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except (OSError, psutil.Error):
                pass
        return out

    left = members()
    if not left:
        return
    gone, alive = psutil.wait_procs(left, timeout=timeout_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
