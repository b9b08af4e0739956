"""Rank-aware logging: rank 0 logs at TRAINER_LOG_LEVEL (default INFO), other ranks warnings only."""
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
    level_name = os.environ.get("TRAINER_LOG_LEVEL", "INFO").upper()
    level = getattr(logging, level_name, logging.INFO)
    if rank != 0 and level < logging.WARNING:
        level = logging.WARNING
    logger = logging.getLogger("trainer")
    logger.setLevel(level)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    formatter = logging.Formatter(_FORMAT, datefmt="%Y-%m-%dT%H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(formatter)
    stream.addFilter(_RankFilter(rank))
    logger.addHandler(stream)
    if log_file is not None:
        add_log_file(log_file, rank)
    return logger


def add_log_file(log_file: Path, rank: int | None = None) -> None:
    """Also append this process's log lines to `log_file` (used for the run's train.log)."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    logger = logging.getLogger("trainer")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%Y-%m-%dT%H:%M:%S"))
    handler.addFilter(_RankFilter(rank))
    logger.addHandler(handler)


_URL_CREDENTIALS = re.compile(r"(//)([^/@:\s]+)(:[^/@\s]*)?@")


def redact(text: str) -> str:
    """Hide credentials embedded in URLs (`https://user:token@host` -> `https://***@host`)."""
    return _URL_CREDENTIALS.sub(r"\1***@", text)


def get_logger(name: str = "") -> logging.Logger:
    return logging.getLogger("trainer" + (f".{name}" if name else ""))
