"""A multi-node job through DeepSpeed's runner, pdsh and ssh, run as one command by `trainer train --hostfile`.

What differs from one machine:
- The ranks are not children of this process. A SIGINT/SIGTERM is sent to them on every node through pdsh
  (`pkill -P` under each node's launcher), so they agree on a stop step, save, drain and exit 75, and this
  process waits for that. (Signalled itself, DeepSpeed's runner kills pdsh, pkills the launchers and exits
  after a second: the job's end would not be awaited.)
- Rank 0's exit code comes back as one line on its stderr (`trainer: rank 0 exit code N`): rank 0's machine need
  not be this one, so no file can carry it.
- A node that fails is named at the end with its last error line. If the other nodes have not ended within
  the grace period after it, they are stopped, then killed: a dead node never leaves the job hanging.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Optional

from trainer.errors import EXIT_PREEMPTED, EXIT_CODE_FILE_ENV, EXIT_CODE_TO_STDERR

_EXIT = re.compile(r"^(?P<host>[^\s:]+): trainer: rank 0 exit code (?P<code>-?\d+)\s*$")
_NODE_EXIT = re.compile(r"^pdsh@[^:]+: (?P<host>[^\s:]+): ssh exited with exit code (?P<code>\d+)")
_HOST_LINE = re.compile(r"^(?P<host>[^\s:@]+): (?P<text>.*\S)\s*$")
_LAUNCHER_UP = re.compile(r"launch\.py:\d+:main\] nnodes=\d+, num_local_procs=\d+, node_rank=\d+")  # DeepSpeed's
_ERROR_TEXT = re.compile(r"^(\[rank\d+\] )?error: |^[\w.]*(Error|Exception|Exit)\b.*:|^Killed\b")
_NOT_ERROR = re.compile(r"^Exception ignored in")


def ssh_unreachable(hosts: list[str], timeout_s: float = 10.0, env: Optional[dict] = None) -> dict[str, str]:
    """Host -> why `ssh HOST true` failed (BatchMode: no password prompts), for the hosts that failed."""

    def probe(host: str) -> Optional[str]:
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, int(timeout_s))}", host, "true"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s + 5, env=env)
        except FileNotFoundError:
            return "no ssh client on this machine"
        except subprocess.TimeoutExpired:
            return f"no answer in {timeout_s + 5:.0f} s"
        if r.returncode == 0:
            return None
        lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
        return lines[-1].strip() if lines else f"ssh exited with {r.returncode}"

    with ThreadPoolExecutor(max_workers=min(16, max(1, len(hosts)))) as pool:
        results = dict(zip(hosts, pool.map(probe, hosts)))
    return {h: why for h, why in results.items() if why}


def launcher_pattern(master_port: int) -> str:
    """Matches this job's per-node DeepSpeed launcher (not the bash, ssh or pdsh processes carrying its command)."""
    return (
        r"^[^ ]*python[^ ]* -u -m deepspeed\.launcher\.launch --world_info=[^ ]* --node_rank=[^ ]* "
        rf"--master_addr=[^ ]* --master_port={master_port}( |$)"
    )


def signal_nodes(hosts: list[str], master_port: int, signum: int, env: dict) -> subprocess.Popen:
    """Send `signum` to the training ranks on every node (the launchers themselves where no rank exists yet)."""
    sig = signal.Signals(signum).name.removeprefix("SIG")
    script = (
        f'l=$(pgrep -d, -f \'{launcher_pattern(master_port)}\'); [ -z "$l" ] || pkill -{sig} -P "$l"'
        f" || kill -{sig} $(echo \"$l\" | tr , ' ')"
    )
    return subprocess.Popen(
        ["pdsh", "-w", ",".join(hosts), script],
        env={**env, "PDSH_RCMD_TYPE": "ssh"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


@dataclass
class _Watch:
    """What the runner's output says about the job: rank 0's code, the nodes that failed and their last error."""

    hosts: list[str]
    rank0_code: Optional[int] = None
    failed: dict[str, int] = field(default_factory=dict)
    first_failure: Optional[float] = None
    last_error: dict[str, str] = field(default_factory=dict)
    launchers: set[str] = field(default_factory=set)  # the hosts whose DeepSpeed launcher has started
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def all_launched(self) -> bool:
        return self.launchers >= set(self.hosts)

    def see(self, line: str) -> None:
        with self.lock:
            if m := _EXIT.match(line):
                self.rank0_code = int(m["code"])
            elif m := _NODE_EXIT.match(line):
                if int(m["code"]) != EXIT_PREEMPTED:  # (a node that stopped on a signal did not fail)
                    self.failed[m["host"]] = int(m["code"])
                    self.first_failure = self.first_failure or time.monotonic()
            elif (m := _HOST_LINE.match(line)) and m["host"] in self.hosts:
                if _LAUNCHER_UP.search(m["text"]):
                    self.launchers.add(m["host"])
                elif _ERROR_TEXT.search(m["text"]) and not _NOT_ERROR.match(m["text"]):
                    self.last_error[m["host"]] = m["text"]


def _pump(src: IO[bytes], dst: IO[str], watch: _Watch) -> None:
    for raw in iter(src.readline, b""):
        line = raw.decode(errors="replace")
        watch.see(line.rstrip("\n"))
        try:
            dst.write(line)
            dst.flush()
        except (OSError, ValueError):
            pass


def run_over_ssh(cmd: list[str], env: dict[str, str], hosts: list[str], master_port: int, grace_s: float) -> int:
    """Run the runner with what every node's ranks need in a private env file (removed at the end), pass its output
    through, forward signals to every node's ranks; rank 0's exit code."""
    from trainer.launcher.remote_env import write_env_file

    # what the user's shell has (not this machine's CPU defaults, nor its own data check), and rank 0's exit line
    env_file = write_env_file({**os.environ, EXIT_CODE_FILE_ENV: EXIT_CODE_TO_STDERR})
    try:
        return _run(
            cmd,
            {**env, EXIT_CODE_FILE_ENV: EXIT_CODE_TO_STDERR, "DS_ENV_FILE": str(env_file)},
            hosts,
            master_port,
            grace_s,
        )
    finally:
        env_file.unlink(missing_ok=True)


def _run(cmd: list[str], env: dict[str, str], hosts: list[str], master_port: int, grace_s: float) -> int:
    watch = _Watch(hosts)
    senders: list[subprocess.Popen] = []
    early: list[int] = []  # signals that came before the runner existed
    proc: Optional[subprocess.Popen] = None

    def forward(signum: int, frame: object) -> None:
        if proc is None:
            early.append(signum)
        elif watch.all_launched:
            senders.append(signal_nodes(hosts, master_port, signum, env))
        else:  # not every node's launcher runs yet: DeepSpeed's runner stops what it started (pkill on every node)
            try:
                os.killpg(proc.pid, signum)
            except OSError:
                pass

    # the handlers first: a signal while the runner starts is passed on, not lost with the env file left behind
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    except BaseException:
        for s, handler in previous.items():
            signal.signal(s, handler)
        raise
    for signum in early:
        forward(signum, None)
    pumps = [
        threading.Thread(target=_pump, args=(proc.stdout, sys.stdout, watch), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, sys.stderr, watch), daemon=True),
    ]
    for t in pumps:
        t.start()
    stop_sent: Optional[float] = None
    wait_s = grace_s + 15
    try:
        while proc.poll() is None:
            time.sleep(0.2)
            now = time.monotonic()
            if watch.first_failure and stop_sent is None and now - watch.first_failure > wait_s:
                hosts_failed = ", ".join(sorted(watch.failed))
                print(
                    f"trainer: {hosts_failed} failed {wait_s:.0f} s ago and the job goes on: stopping the other nodes",
                    file=sys.stderr,
                    flush=True,
                )
                senders.append(signal_nodes(hosts, master_port, signal.SIGTERM, env))
                stop_sent = now
            elif stop_sent is not None and now - stop_sent > wait_s:
                print("trainer: the nodes did not stop: killing them", file=sys.stderr, flush=True)
                senders.append(signal_nodes(hosts, master_port, signal.SIGKILL, env))
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                break
        proc.wait()
        for t in pumps:
            t.join(timeout=10)
        for s in senders:
            try:
                s.wait(timeout=30)
            except subprocess.TimeoutExpired:
                s.kill()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    code = proc.returncode
    result = watch.rank0_code if watch.rank0_code is not None else (128 - code if code < 0 else code)
    if watch.failed:  # whatever rank 0 says: a node that failed is named
        for host, node_code in watch.failed.items():  # in the order pdsh saw them end (not always the cause first)
            why = watch.last_error.get(host, "no error line (see its output above)")
            print(f"trainer: node {host} exited with {node_code}: {why}", file=sys.stderr, flush=True)
    return result
