"""Rank-aware logging: rank 0 logs at TRAINER_LOG_LEVEL (default INFO), other ranks warnings only.

Files: rank 0 appends to the run's `train.log`; every node keeps `logs/node-<N>-<host>.log` in the run folder
on its own disk (its first rank at the console level, its other ranks' warnings and errors, and any crash's
traceback), with `<run_dir>/latest-node-<N>.log` pointing at the newest run's.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

_FORMAT = "%(asctime)s %(levelname).1s [%(rank_tag)s] %(message)s"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank_tag = f"rank{rank}"

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank_tag = self.rank_tag
        return True


def setup_logging(rank: int | None = None, log_file: Path | None = None) -> logging.Logger:
    """Configure the `trainer` logger for this process; safe to call more than once."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    level = base_level()
    if rank != 0 and level < logging.WARNING:
        level = logging.WARNING
    logger = logging.getLogger("trainer")
    logger.setLevel(base_level())  # the console handler filters by rank: a node's first rank logs more to its node file
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    formatter = logging.Formatter(_FORMAT, datefmt="%Y-%m-%dT%H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setLevel(level)
    stream.setFormatter(formatter)
    stream.addFilter(_RankFilter(rank))
    logger.addHandler(stream)
    if log_file is not None:
        add_log_file(log_file, rank)
    return logger


def base_level() -> int:
    return getattr(logging, os.environ.get("TRAINER_LOG_LEVEL", "INFO").upper(), logging.INFO)


def add_log_file(log_file: Path, rank: int | None = None, level: int = logging.NOTSET) -> None:
    """Also append this process's log lines (from `level` up) to `log_file` (the run's train.log, a node's log)."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    logger = logging.getLogger("trainer")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)  # append: O_APPEND, so a node's ranks share one file line by line
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%Y-%m-%dT%H:%M:%S"))
    handler.addFilter(_RankFilter(rank))
    logger.addHandler(handler)


NODE_LOGS = "logs"


def node_log_name(node_rank: int, host: str) -> str:
    return f"node-{node_rank}-{re.sub(r'[^A-Za-z0-9._-]', '_', host)}.log"


NODES_FILE = "nodes.json"


def add_node_log(
    run_dir: Path,
    run_root: Path,
    node_rank: int,
    host: str,
    first_on_node: bool,
    rank: int,
    hosts: tuple[str, ...] = (),
) -> Path:
    """This rank's lines in its node's log (the node's first rank at the console level, the others from WARNING);
    the node's first rank points `<run_dir>/latest-node-<N>.log` at it (a link, not a folder: a folder of runs holds
    only runs) and lists every node's host in `logs/nodes.json` (so `trainer monitor --node N` knows where another
    node's log is)."""
    path = run_root / NODE_LOGS / node_log_name(node_rank, host)
    add_log_file(path, rank, base_level() if first_on_node else logging.WARNING)
    if first_on_node and hosts:  # every node's, so the monitor finds the others from any node's disk
        import json

        (run_root / NODE_LOGS / NODES_FILE).write_text(json.dumps({"hosts": list(hosts)}) + "\n")
    if first_on_node:
        link = run_dir / f"latest-node-{node_rank}.log"
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{link.name}.{os.getpid()}")
        try:
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(os.path.relpath(path, link.parent))
            os.replace(tmp, link)
        except OSError:
            tmp.unlink(missing_ok=True)
    return path


def to_log_files(level: int, text: str) -> None:
    """Put `text` in this process's log files only (a traceback the console already shows on stderr)."""
    logger = logging.getLogger("trainer")
    record = logger.makeRecord(logger.name, level, __file__, 0, text, None, None)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler) and level >= handler.level:
            try:
                handler.handle(record)
            except Exception:  # the log files must never turn a crash report into a second crash
                pass


_URL_CREDENTIALS = re.compile(r"(//)([^/@:\s]+)(:[^/@\s]*)?@")


def redact(text: str) -> str:
    """Hide credentials embedded in URLs (`https://user:token@host` -> `https://***@host`)."""
    return _URL_CREDENTIALS.sub(r"\1***@", text)


def get_logger(name: str = "") -> logging.Logger:
    return logging.getLogger("trainer" + (f".{name}" if name else ""))
