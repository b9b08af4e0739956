"""DeepSpeed hostfiles: `HOSTNAME slots=N` per line, `#` comments, blank lines ignored."""

from __future__ import annotations

import re
import socket
from pathlib import Path

from trainer.errors import UserError

_LINE = re.compile(r"^(?P<host>[A-Za-z0-9._:\-\[\]]+)\s+slots\s*=\s*(?P<slots>\d+)$")
LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}


def parse_hostfile(path: Path) -> dict[str, int]:
    """Host -> slots, in file order; `UserError` naming the line for anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: hostfile not found")
    hosts: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if not m:
            raise UserError(f"{path}:{number}: expected 'HOSTNAME slots=N', got {raw.strip()!r}")
        host, slots = m["host"], int(m["slots"])
        if slots < 1:
            raise UserError(f"{path}:{number}: slots must be >= 1 for host {host}, got {slots}")
        if host in hosts:
            raise UserError(f"{path}:{number}: duplicate host {host!r} (first on line {first_line[host]})")
        hosts[host] = slots
        first_line[host] = number
    if not hosts:
        raise UserError(f"{path}: no hosts (expected lines like 'worker-1 slots=8')")
    return hosts


def is_local(host: str) -> bool:
    return host in LOCAL_NAMES or host == socket.gethostname()
