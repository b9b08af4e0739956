"""TensorBoard event files (`tracking.tensorboard: true`): the scalars MLflow gets, in `<run>/tensorboard/`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from trainer.log import get_logger

log = get_logger("tracking")

TENSORBOARD_DIR = "tensorboard"


class TensorBoardWriter:
    """torch's `SummaryWriter` (its own thread writes the events). A resumed run purges the events a lost
    attempt wrote after the step it resumes from, so the curves show each step once."""

    def __init__(self, run_root: Path, resume_step: Optional[int]):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(run_root) / TENSORBOARD_DIR
        self.writer = SummaryWriter(str(self.dir), purge_step=resume_step or None, flush_secs=10)

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in metrics.items():
            if value is not None:
                self.writer.add_scalar(key, float(value), step)

    def finish(self) -> None:
        self.writer.close()


def make_tensorboard(enabled: bool, run_root: Path, resume_step: Optional[int]) -> Optional[TensorBoardWriter]:
    if not enabled:
        return None
    try:
        return TensorBoardWriter(run_root, resume_step)
    except Exception as exc:  # a missing package or an unwritable folder must not stop a run
        log.warning("tracking.tensorboard is off for this run: %s: %s", type(exc).__name__, str(exc)[:200])
        return None
