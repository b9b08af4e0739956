"""Two ssh-reachable "nodes" on this machine for multi-node tests: the real sshd and pdsh, no machine files edited.

    node-a -> 127.0.0.2   sshd whose disk is `root/disk` as the test sees it
    node-b -> 127.0.0.3   sshd in a private mount namespace where `root/node-b-disk` is mounted over `root/disk`

Each sshd runs in a PID namespace of its own, so a node sees only its own processes: DeepSpeed's runner stops a
job with `pkill` on every node, which on a shared process table would signal every node's launcher once per node.
The test itself (the parent namespace) sees them all.

So a run folder under `root/disk` is node-local, as on two VMs: node-b's files land in `root/node-b-disk`, and
node-a (where the test runs, like a user on the first node) sees only its own. Everything else (the checkout,
the venv, the data under other paths) is shared, like a VM image. The ssh client finds the hosts through an
ssh config of the bed's own: a `ssh` wrapper first on PATH passes `-F` (DeepSpeed's runner and pdsh both run
plain `ssh`), with a throwaway key and no known_hosts.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

SSHD = "/usr/sbin/sshd"
HOSTS = {"node-a": "127.0.0.2", "node-b": "127.0.0.3"}


def unavailable() -> Optional[str]:
    """Why the bed cannot run here, or None."""
    missing = [name for name in ("ssh", "ssh-keygen", "pdsh", "unshare", "mount") if shutil.which(name) is None]
    if not os.path.exists(SSHD):
        missing.insert(0, SSHD)
    if missing:
        return (
            f"the ssh test bed needs {', '.join(missing)} (Debian: apt-get install openssh-server pdsh; `make sysdeps`)"
        )
    if os.geteuid() != 0:
        return "the ssh test bed needs root (sshd's privilege separation, a private mount namespace for node-b)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        return s.getsockname()[1]


class SshBed:
    def __init__(self, root: Path):
        self.root = root
        self.disk = root / "disk"
        self.port = _free_port()
        self.bin = root / "bin"
        self.procs: list[subprocess.Popen] = []

    def node_disk(self, host: str) -> Path:
        """Where `host`'s view of `self.disk` lives on this machine."""
        return self.disk if host == "node-a" else self.root / f"{host}-disk"

    def env(self, base: Optional[dict] = None) -> dict:
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        return env

    def hostfile(self, path: Path, slots: int = 1, hosts: Optional[list[str]] = None) -> Path:
        path.write_text("".join(f"{h} slots={slots}\n" for h in (hosts or list(HOSTS))))
        return path

    def start(self) -> "SshBed":
        r = self.root
        for d in (self.bin, self.disk, self.node_disk("node-b")):
            d.mkdir(parents=True, exist_ok=True)
        for key in ("host_key", "user_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(r / key)], check=True)
        (r / "authorized_keys").write_text((r / "user_key.pub").read_text())
        os.chmod(r / "authorized_keys", 0o600)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
        lines: list[str] = []
        for host, addr in HOSTS.items():
            lines += [f"Host {host}", f"  HostName {addr}"]
        lines += [
            "Host *",
            f"  Port {self.port}",
            f"  IdentityFile {r / 'user_key'}",
            "  IdentitiesOnly yes",
            "  StrictHostKeyChecking no",
            "  UserKnownHostsFile /dev/null",
            "  BatchMode yes",
            "  LogLevel ERROR",
            "  ConnectTimeout 10",
        ]
        (r / "ssh_config").write_text("\n".join(lines) + "\n")
        wrapper = self.bin / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {r / "ssh_config"} "$@"\n')
        wrapper.chmod(0o755)
        for host, addr in HOSTS.items():
            cfg = r / f"sshd_{host}.conf"
            cfg.write_text(
                "\n".join(
                    [
                        f"Port {self.port}",
                        f"ListenAddress {addr}",
                        f"HostKey {r / 'host_key'}",
                        f"AuthorizedKeysFile {r / 'authorized_keys'}",
                        "PermitRootLogin prohibit-password",
                        "PasswordAuthentication no",
                        "KbdInteractiveAuthentication no",
                        "UsePAM no",
                        "StrictModes no",
                        "PrintMotd no",
                        "LogLevel ERROR",
                        f"PidFile {r / f'sshd_{host}.pid'}",
                        "",
                    ]
                )
            )
            sshd = [SSHD, "-D", "-e", "-f", str(cfg)]
            # its own processes (a PID namespace) and, but for node-a, its own disk over the shared path
            mount = f'mount --bind "{self.node_disk(host)}" "{self.disk}" && ' if host != "node-a" else ""
            cmd = [
                "unshare",
                "--mount",
                "--pid",
                "--fork",
                "--mount-proc",
                "--kill-child",
                "--propagation",
                "private",
                "sh",
                "-c",
                f'{mount}exec "$@"',
                "sh",
                *sshd,
            ]
            log = open(r / f"sshd_{host}.log", "wb")
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True))
        deadline = time.monotonic() + 20
        pending = set(HOSTS)
        while pending and time.monotonic() < deadline:
            for host in sorted(pending):
                if self.ssh(host, "true", timeout=10).returncode == 0:
                    pending.discard(host)
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.2)
        if pending:
            self.stop()
            logs = " | ".join((r / f"sshd_{h}.log").read_text(errors="replace").strip()[-300:] for h in HOSTS)
            raise RuntimeError(f"sshd did not answer for {sorted(pending)}: {logs}")
        return self

    def ssh(self, host: str, command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", host, command], env=self.env(), capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        for (
            p
        ) in self.procs:  # unshare --kill-child: its sshd, and with it everything left in that node's namespace, dies
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        self.procs = []
